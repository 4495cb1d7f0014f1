"""GPU check and timing of kernels.ssd (one script, one device call).

Run on the GPU machine from the repository root:
    python benchmarks/gpu_ssd.py [--quick]
Sections, each guarded so one failure does not lose the rest; JSON is rewritten to
$OUT/ssd_gpu.json (or ./ssd_gpu.json) after every section:
  1. equivalence at realistic shapes (every optional argument, bf16) vs an f32 sequential
     reference: y, h_L and the gradient of every float input; pass = within the bf16 entry of
     tests/conftest.py TOLERANCES.
  2. dA / ddt gradient accuracy at length 65536 (pallas, f32 and bf16 inputs) vs the reference.
  3. timings under jax.jit: 2 warm-up calls, then the mean of 50 back-to-back calls with one
     block_until_ready; forward and forward+backward (jax.grad of sum(y) wrt x, dt, A, B, C, D);
     shapes L (b8 L4096 h32 p64 n128 g1) and S (b64 L1024 h4 p32 n64 g1), bf16 activations;
     impl pallas (several tilings) vs xla, and the peer jax-linear-attention when installed.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.ssd import BlockSizes, ssd, ssd_pallas, ssd_reference  # noqa: E402

# Copied from tests/conftest.py TOLERANCES["bfloat16"] (the one tolerance table).
BF16_TOL = {"out": 2e-2, "grad": 3e-2}
SHAPES = {
    "L": dict(b=8, l=4096, h=32, p=64, n=128, g=1),
    "S": dict(b=64, l=1024, h=4, p=32, n=64, g=1),
}
if os.environ.get("SSD_BENCH_TINY"):  # CPU dry run of the script itself (interpret mode)
    SHAPES = {"L": dict(b=2, l=128, h=4, p=64, n=128, g=1),
              "S": dict(b=2, l=64, h=2, p=32, n=64, g=1)}
OUT = os.environ.get("OUT", ".")
RESULTS = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
           "equivalence": [], "grad_64k": [], "timings": [], "errors": []}


def save():
    path = RESULTS.get("_path") or os.path.join(OUT, "ssd_gpu.json")
    with open(path, "w") as f:
        json.dump({k: v for k, v in RESULTS.items() if k != "_path"}, f, indent=1)


def rel_err(a, e):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    e = np.asarray(jnp.asarray(e, jnp.float32), np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def inputs(key, b, l, h, p, n, g, dtype=jnp.bfloat16, optional=False):
    ks = jax.random.split(key, 9)
    args = dict(
        x=jax.random.normal(ks[0], (b, l, h, p), jnp.float32).astype(dtype),
        # dt after softplus in the Mamba-2 range (0.001 .. 0.1 at init, larger in training).
        dt=jnp.exp(jax.random.uniform(ks[1], (b, l, h), minval=np.log(1e-3), maxval=np.log(0.2))),
        A=-jnp.exp(jax.random.uniform(ks[2], (h,), minval=0.0, maxval=np.log(16.0))),
        B=jax.random.normal(ks[3], (b, l, g, n), jnp.float32).astype(dtype),
        C=jax.random.normal(ks[4], (b, l, g, n), jnp.float32).astype(dtype),
        D=jax.random.normal(ks[5], (h,), jnp.float32),
    )
    if optional:
        args["dt"] = jax.random.normal(ks[1], (b, l, h)) - 2.0     # raw: softplus + bias
        args["D"] = jax.random.normal(ks[5], (h, p), jnp.float32)
        args["z"] = jax.random.normal(ks[6], (b, l, h, p), jnp.float32).astype(dtype)
        args["dt_bias"] = jax.random.uniform(ks[7], (h,), minval=-1.0, maxval=0.0)
        args["initial_state"] = jax.random.normal(ks[8], (b, h, p, n), jnp.float32)
    return args


POS = ("x", "dt", "A", "B", "C")


def call(fn, args, **kw):
    return fn(*[args[k] for k in POS], **{k: v for k, v in args.items() if k not in POS}, **kw)


def vjp_all(fn, args, key, **kw):
    names = list(args)

    @jax.jit
    def go(vals):
        def f(*v):
            return call(fn, dict(zip(names, v)), return_final_state=True, **kw)
        (y, h), pull = jax.vjp(f, *vals)
        k1, k2 = jax.random.split(key)
        gy = jax.random.normal(k1, y.shape, jnp.float32).astype(y.dtype)
        gh = jax.random.normal(k2, h.shape, jnp.float32)
        return y, h, dict(zip(names, pull((gy, gh))))

    return go([args[k] for k in names])


def section(name, fn):
    t0 = time.time()
    try:
        fn()
    except Exception as e:  # keep the other sections' results
        RESULTS["errors"].append({"section": name, "error": repr(e)[:2000],
                                  "trace": traceback.format_exc()[-3000:]})
        print(f"[{name}] FAILED: {e!r}"[:2000], flush=True)
    print(f"[{name}] {time.time() - t0:.1f} s", flush=True)
    save()


def equivalence():
    for shape, b in (("L", 2), ("S", 8)):
        cfg = dict(SHAPES[shape], b=b)
        key = jax.random.PRNGKey(0)
        args = inputs(key, **cfg, optional=True)
        args32 = {k: v.astype(jnp.float32) for k, v in args.items()}
        with jax.default_matmul_precision("highest"):
            ref = vjp_all(ssd_reference, args32, key, dt_softplus=True)
        got = vjp_all(ssd, args, key, chunk_size=64, impl="pallas", dt_softplus=True)
        errs = {"y": rel_err(got[0], ref[0]), "h_L": rel_err(got[1], ref[1])}
        errs.update({"d" + k: rel_err(got[2][k], ref[2][k]) for k in ref[2]})
        ok = all(v <= BF16_TOL["out" if k in ("y", "h_L") else "grad"] for k, v in errs.items())
        RESULTS["equivalence"].append({"shape": shape, **cfg, "errors": errs, "pass": ok})
        print(f"equivalence {shape} b={b}: pass={ok} " +
              " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)


def grad_64k():
    cfg = dict(b=1, l=65536, h=4, p=32, n=64, g=1)
    key = jax.random.PRNGKey(1)
    base = inputs(key, **cfg, dtype=jnp.float32)
    names = ("dt", "A")

    def grads(fn, args, **kw):
        def loss(dt, A):
            y = call(fn, {**args, "dt": dt, "A": A}, **kw)
            w = jax.random.normal(jax.random.PRNGKey(2), y.shape, jnp.float32)
            return jnp.sum(y.astype(jnp.float32) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(args["dt"], args["A"])

    with jax.default_matmul_precision("highest"):
        ref = grads(ssd_reference, base)
    for dtype in (jnp.float32, jnp.bfloat16):
        args = {k: (v.astype(dtype) if k in ("x", "B", "C") else v) for k, v in base.items()}
        for impl in ("pallas",):
            got = grads(ssd, args, chunk_size=64, impl=impl)
            errs = {"d" + k: rel_err(g, r) for k, g, r in zip(names, got, ref)}
            RESULTS["grad_64k"].append({"dtype": jnp.dtype(dtype).name, "impl": impl, **cfg,
                                        "errors": errs,
                                        "pass": all(v <= BF16_TOL["grad"] for v in errs.values())})
            print(f"grad 64k {jnp.dtype(dtype).name} {impl}: {errs}", flush=True)


def bench(f, args, iters=50):
    out = f(*args)
    jax.block_until_ready(out)
    out = f(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters * 1e3


def floors(cfg):
    """Bytes (bf16 x, y, B, C; f32 dt) and flops of the chunked forward at chunk 64."""
    b, l, h, p, n, g = (cfg[k] for k in ("b", "l", "h", "p", "n", "g"))
    q = 64
    bytes_fwd = 2 * (2 * b * l * h * p + 2 * b * l * g * n) + 4 * b * l * h
    flops_fwd = b * (l // q) * h * (2 * q * q * n + 2 * q * q * p + 4 * q * p * n)
    return bytes_fwd, flops_fwd


def _bs(**kw):
    return BlockSizes(**{"chunk": 64, "num_warps_fwd": 4, **kw})


# Variants whose Triton compile may take minutes ((128, 128) tiles): run in a subprocess with
# a time limit so they cannot eat the device call. Run 2 measured chunk 128 (compiled in time,
# 1.3 / 7.1 ms at L): no longer timed.
RISKY = set()


def make_variants(shape):
    """Timing variants, most informative first (a device call may end before the last)."""
    del shape
    return [("xla", dict(impl="xla", chunk_size=64)),
            ("jax-linear-attention", None),
            ("pallas default", dict(impl="pallas", chunk_size=64)),  # run 3: split3 hb8 w4/8
            ("pallas q64 split3 hb8 w4/4", dict(chunk_size=64, block_sizes=_bs(
                num_warps_bwd=4))),
            ("pallas q64 split3 hb32 w4/8", dict(chunk_size=64, block_sizes=_bs(
                bwd_heads=32))),
            ("pallas q32 split3 hb8 w4/8", dict(chunk_size=32, block_sizes=_bs(chunk=32))),
            ("pallas q64 split hb8 w4/8", dict(chunk_size=64, block_sizes=_bs(bwd="split"))),
            ("pallas q64 fused w4/4", dict(chunk_size=64, block_sizes=_bs(
                bwd="fused", num_warps_bwd=4)))]


def _bind(kw):
    """The public `ssd` for plain variants; `ssd_pallas` when a tiling is pinned."""
    fn = ssd_pallas if "block_sizes" in kw else ssd
    kw = {k: v for k, v in kw.items() if not (fn is ssd_pallas and k == "impl")}

    def f(x, dt, A, B, C, D):
        return fn(x, dt, A, B, C, D=D, **kw)
    return f


def jla_fn():
    from jla.layers.ssm import mamba2_ssd  # noqa: WPS433 (peer, optional)

    def f(x, dt, A, B, C, D):
        y, _ = mamba2_ssd(x, dt, A, B, C, d=D, chunk_size=64)
        return y
    return f


def _run_isolated(shape, name, limit_s=150):
    """Times one variant in a child process with a time limit; returns its record."""
    path = os.path.join(OUT, f"ssd_child_{shape}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--skip", "equivalence,grad_64k",
           "--shapes", shape, "--only", name, "--json", path, "--no-isolate"]
    try:
        subprocess.run(cmd, timeout=limit_s, check=False)
        with open(path) as f:
            recs = json.load(f)["timings"]
        os.remove(path)
        return recs[0] if recs else {"shape": shape, "variant": name, "error": "no record"}
    except subprocess.TimeoutExpired:
        return {"shape": shape, "variant": name, "error": f"compile+run over {limit_s} s"}


def timings(quick, shapes=("L", "S"), only=None, isolate=True):
    for shape in shapes:
        cfg = SHAPES[shape]
        args = inputs(jax.random.PRNGKey(3), **cfg)
        vals = [args[k] for k in ("x", "dt", "A", "B", "C", "D")]
        by, fl = floors(cfg)
        RESULTS.setdefault("floors", {})[shape] = {"bytes_fwd": by, "flops_fwd": fl,
                                                   "ms_at_3.35TBps": by / 3.35e12 * 1e3}
        variants = [(n, None if kw is None else _bind(kw)) for n, kw in make_variants(shape)]
        if quick:
            variants = variants[:3]
        if only:
            variants = [v for v in variants if v[0] in only]
        for name, f in variants:
            if isolate and name in RISKY:
                RESULTS["timings"].append(_run_isolated(shape, name))
                print(f"timing {RESULTS['timings'][-1]}", flush=True)
                save()
                continue
            rec = {"shape": shape, "variant": name}
            try:
                if f is None:
                    f = jla_fn()
                fwd = jax.jit(f)
                rec["fwd_ms"] = bench(fwd, vals)
                if name == "pallas default":
                    # forward that also writes the backward's residuals (chunk-entry states)
                    rec["fwd_with_residuals_ms"] = bench(
                        jax.jit(lambda *v: jax.vjp(f, *v)[0]), vals)
                loss = lambda *v: jnp.sum(f(*v).astype(jnp.float32))  # noqa: E731
                rec["fwd_bwd_ms"] = bench(jax.jit(jax.grad(loss, argnums=tuple(range(6)))), vals)
            except Exception as e:
                rec["error"] = repr(e)[:600]
            RESULTS["timings"].append(rec)
            print(f"timing {rec}", flush=True)
            save()


def table():
    rows = RESULTS["timings"]
    print("\nshape variant                      fwd ms   fwd+bwd ms   vs xla (fwd / fwd+bwd)")
    for shape in ("L", "S"):
        base = next((r for r in rows if r["shape"] == shape and r["variant"] == "xla"), {})
        for r in rows:
            if r["shape"] != shape:
                continue
            f, fb = r.get("fwd_ms"), r.get("fwd_bwd_ms")
            ratio = ""
            if f and base.get("fwd_ms") and fb and base.get("fwd_bwd_ms"):
                ratio = f"{base['fwd_ms'] / f:5.2f}x / {base['fwd_bwd_ms'] / fb:5.2f}x"
            fs = f"{f:8.3f}" if f else "     n/a"
            fbs = f"{fb:10.3f}" if fb else "       n/a"
            print(f"{shape:5s} {r['variant']:28s} {fs} {fbs}   {ratio} {r.get('error', '')[:80]}")
    for e in RESULTS["equivalence"]:
        print(f"equivalence {e['shape']}: pass={e['pass']} max err "
              f"{max(e['errors'].values()):.2e} (bf16 tol out {BF16_TOL['out']}, "
              f"grad {BF16_TOL['grad']})")
    for g in RESULTS["grad_64k"]:
        print(f"grad 64k {g['dtype']} {g['impl']}: {g['errors']} pass={g['pass']}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer timing variants")
    parser.add_argument("--skip", default="", help="comma list of sections to skip")
    parser.add_argument("--shapes", default="L,S")
    parser.add_argument("--only", default="", help="comma list of timing variant names")
    parser.add_argument("--json", default="", help="JSON path (default $OUT/ssd_gpu.json)")
    parser.add_argument("--no-isolate", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    skip = set(opts.skip.split(","))
    if opts.json:
        RESULTS["_path"] = opts.json
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    if "timings" not in skip:
        only = set(opts.only.split(",")) - {""}
        section("timings", lambda: timings(opts.quick, opts.shapes.split(","), only,
                                           not opts.no_isolate))
    if "equivalence" not in skip:
        section("equivalence", equivalence)
    if "grad_64k" not in skip:
        section("grad_64k", grad_64k)
    table()
    save()


if __name__ == "__main__":
    main()
