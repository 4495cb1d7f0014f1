"""Kernel benchmark: kernels.selective_scan and kernels.ssd, every impl, fwd and fwd+bwd.

    python benchmarks/kernels.py                         # GPU: both ops, all shapes (two runs
    python benchmarks/kernels.py --ops selective_scan    #   of < 10 min each fit a device call)
    python benchmarks/kernels.py --ops ssd
    python benchmarks/kernels.py --smoke                 # CPU, tiny shapes, Pallas interpret mode
    python benchmarks/kernels.py --lower-only            # any host: lower every Pallas variant
                                                         #   of the sweep for CUDA (Triton)

For every (op, shape, dtype, mode, impl): jit, two warm-up calls, then R repeats of N
back-to-back calls with one block_until_ready at the end; the time is the median over repeats
of the per-call mean (benchmarks/common.py; jax has no device-event API). Modes: "fwd" (y) and
"fwd_bwd" (jax.grad of sum(y) w.r.t. every float input). Dtypes: the activations (u, delta, B, C
/ x, B, C) in float32 or bfloat16; A, D, biases and SSD's dt stay float32 (the contract).
Effective bandwidth = minimal bytes / time, minimal bytes = every input read once and every
output written once (fwd: inputs + y; fwd_bwd: inputs + one gradient per input), and as a % of
the device-to-device bandwidth measured in the same run (`common.copy_bandwidth`).
Speed-up = time of impl "xla" / time of the row, same op, shape, dtype and mode.
"ref" (sequential lax.scan) runs only up to --ref-max-len steps (a note marks the rows left out).
Pallas SSD at a kernel chunk >= 128 compiles (128, 128) tiles, which took minutes once
(KERNELS.md): those variants run in a child process under --isolate-timeout.
JSON (all records, the copy bandwidth, the device) goes to --out; the table is printed last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)
# Isolated children need device memory: do not let this process preallocate 75% of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from kernels.selective_scan import selective_scan, selective_scan_pallas  # noqa: E402
from kernels.ssd import BlockSizes as SSDBlockSizes, ssd, ssd_pallas  # noqa: E402

try:  # the kernel's own chunk rule (private: fall back to its documented behaviour)
    from kernels.ssd import _kernel_chunk  # noqa: E402
except ImportError:  # pragma: no cover
    def _kernel_chunk(chunk_size, block_sizes):
        q = block_sizes.chunk or min(max(1 << max(0, (chunk_size - 1).bit_length()), 16), 128)
        return q

# Best SSD chunk found by the kernel helper (benchmarks/NOTES_ssd.md, run 1: q64 fastest fwd).
SSD_BEST_CHUNK = 64
# name -> dims. "llm": the Mamba / Mamba-2 language-model shapes; "hiss<w>": HiSS-sized
# (batch 64 x 1024 steps, inner width w; SSD with head dim 32 as configs/mamba2.py).
SCAN_SHAPES = {
    "llm": dict(b=8, l=4096, d=2048, n=16),
    "hiss64": dict(b=64, l=1024, d=64, n=16),
    "hiss128": dict(b=64, l=1024, d=128, n=16),
    "hiss256": dict(b=64, l=1024, d=256, n=16),
}
SSD_SHAPES = {
    "llm_q256": dict(b=8, l=4096, h=32, p=64, n=128, q=256),
    f"llm_q{SSD_BEST_CHUNK}": dict(b=8, l=4096, h=32, p=64, n=128, q=SSD_BEST_CHUNK),
    "hiss64": dict(b=64, l=1024, h=2, p=32, n=64, q=64),
    "hiss128": dict(b=64, l=1024, h=4, p=32, n=64, q=64),
    "hiss256": dict(b=64, l=1024, h=8, p=32, n=64, q=64),
}
SMOKE_SCAN_SHAPES = {"tiny": dict(b=2, l=48, d=32, n=8)}
SMOKE_SSD_SHAPES = {"tiny": dict(b=1, l=40, h=2, p=16, n=16, q=16)}
IMPLS = ("pallas", "xla", "ref")
DTYPES = ("float32", "bfloat16")
MODES = ("fwd", "fwd_bwd")


# ------------------------------------------------------------------------------ inputs
def _dt_bias(key, d):
    """softplus^-1 of a step log-uniform in [1e-3, 1e-1] (Mamba's init)."""
    dt0 = jnp.exp(jax.random.uniform(key, (d,)) * (np.log(0.1) - np.log(1e-3)) + np.log(1e-3))
    return dt0 + jnp.log(-jnp.expm1(-dt0))


def scan_inputs(seed, b, l, d, n, dtype):
    """u, delta, B, C in `dtype` (random normal: never zeros); A = -(1..N), D, delta_bias f32."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    return dict(
        u=jax.random.normal(ks[0], (b, l, d)).astype(dtype),
        delta=(0.1 * jax.random.normal(ks[1], (b, l, d))).astype(dtype),
        A=-jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n)),
        B=jax.random.normal(ks[2], (b, l, n)).astype(dtype),
        C=jax.random.normal(ks[3], (b, l, n)).astype(dtype),
        D=jax.random.normal(ks[4], (d,)),
        delta_bias=_dt_bias(ks[5], d))


def ssd_inputs(seed, b, l, h, p, n, dtype):
    """x, B, C in `dtype`; raw dt (f32) with dt_bias and softplus; A = -exp(U[0, log 16])."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    return dict(
        x=jax.random.normal(ks[0], (b, l, h, p)).astype(dtype),
        dt=0.5 * jax.random.normal(ks[1], (b, l, h)),
        A=-jnp.exp(jax.random.uniform(ks[2], (h,), maxval=np.log(16.0))),
        B=jax.random.normal(ks[3], (b, l, 1, n)).astype(dtype),
        C=jax.random.normal(ks[4], (b, l, 1, n)).astype(dtype),
        D=jax.random.normal(ks[5], (h,)),
        dt_bias=_dt_bias(ks[6], h))


def make_inputs(op, dims, dtype, seed):
    """The op's named inputs at `dims`, activations in `dtype`."""
    dt = jnp.dtype(dtype)
    if op == "selective_scan":
        return scan_inputs(seed, dims["b"], dims["l"], dims["d"], dims["n"], dt)
    return ssd_inputs(seed, dims["b"], dims["l"], dims["h"], dims["p"], dims["n"], dt)


def make_call(op, impl, dims, gpu_lowering=False):
    """(names, f(*vals) -> y) for the public op with every optional input of the LLM setting.

    gpu_lowering: call the Pallas wrappers with interpret=False (Triton kernels even on a CPU
    host), for --lower-only.
    """
    if op == "selective_scan":
        names = ("u", "delta", "A", "B", "C", "D", "delta_bias")

        def f(*vals):
            if gpu_lowering:
                return selective_scan_pallas(**dict(zip(names, vals)), delta_softplus=True,
                                             interpret=False)
            return selective_scan(**dict(zip(names, vals)), delta_softplus=True, impl=impl)
    else:
        names = ("x", "dt", "A", "B", "C", "D", "dt_bias")

        def f(*vals):
            kw = dict(zip(names, vals))
            args = [kw.pop(k) for k in ("x", "dt", "A", "B", "C")]
            if gpu_lowering:
                return ssd_pallas(*args, chunk_size=dims["q"], dt_softplus=True,
                                  interpret=False, **kw)
            return ssd(*args, chunk_size=dims["q"], dt_softplus=True, impl=impl, **kw)
    return names, f


def lower_for_gpu(op, shape, dims, dtype, modes) -> list[dict]:
    """Lowers the Pallas variant to CUDA (Triton) on any host, from abstract inputs: catches
    lowering errors before a device run (not Triton compile failures: those need the GPU)."""
    names, f = make_call(op, "pallas", dims, gpu_lowering=True)
    recs = []
    for mode in modes:
        rec = {"op": op, "shape": shape, "dims": dims, "dtype": dtype, "impl": "pallas",
               "mode": mode}

        def go(mode=mode):
            ins = jax.eval_shape(lambda: make_inputs(op, dims, dtype, 0))
            args = [ins[k] for k in names]
            fn = f if mode == "fwd" else jax.grad(
                lambda *v: jnp.sum(f(*v).astype(jnp.float32)), argnums=tuple(range(len(names))))
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            return {"lowered_cuda": True, "triton_calls": text.count("triton")}
        recs.append(common.guarded(rec, go))
    return recs


# ------------------------------------------------------------------------------ one variant
def run_variant(op, shape, dims, dtype, impl, modes, opts) -> list[dict]:
    """Times one (op, shape, dtype, impl) in every mode; one record per mode."""
    names, f = make_call(op, impl, dims)
    recs = []
    base = {"op": op, "shape": shape, "dims": dims, "dtype": dtype, "impl": impl}
    try:
        first = make_inputs(op, dims, dtype, seed=0)
        in_bytes = common.tree_nbytes(first)
        # Rotate input sets while one set would sit in L2 (50 MB on an H100).
        n_sets = int(min(4, max(1, math.ceil(opts.rotate_bytes / max(in_bytes, 1)))))
        sets = [tuple(first[k] for k in names)]
        sets += [tuple(make_inputs(op, dims, dtype, seed=s)[k] for k in names)
                 for s in range(1, n_sets)]
    except Exception as e:  # noqa: BLE001
        return [dict(base, mode=m, error=f"inputs: {type(e).__name__}: {e}"[:800]) for m in modes]

    for mode in modes:
        rec = dict(base, mode=mode)

        def go(mode=mode):
            if mode == "fwd":
                fn = jax.jit(f)
                y_shape = jax.eval_shape(fn, *sets[0])
                nbytes = in_bytes + common.tree_nbytes(y_shape)
            else:
                def loss(*v):
                    return jnp.sum(f(*v).astype(jnp.float32))
                fn = jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))
                nbytes = 2 * in_bytes  # read every input once, write one gradient per input
            t = common.time_calls(fn, sets, repeats=opts.repeats, target_ms=opts.target_ms)
            out = jax.block_until_ready(fn(*sets[0]))
            finite = all(bool(jnp.all(jnp.isfinite(jnp.asarray(o, jnp.float32))))
                         for o in jax.tree.leaves(out))
            gbps = nbytes / (t["ms"] * 1e-3) / 1e9
            return dict(t, bytes=nbytes, GBps=gbps, n_input_sets=len(sets), finite=finite)
        recs.append(common.guarded(rec, go))
    return recs


def _isolated(op, shape, dims, dtype, impl, modes, opts, timeout) -> list[dict]:
    """run_variant in a child process with a time limit (slow Triton compiles)."""
    path = os.path.join(opts.tmpdir, f"child_{op}_{shape}_{dtype}_{impl}.json")
    spec = dict(op=op, shape=shape, dims=dims, dtype=dtype, impl=impl, modes=list(modes),
                repeats=opts.repeats, target_ms=opts.target_ms, rotate_bytes=opts.rotate_bytes)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec),
           "--out", path]
    base = {"op": op, "shape": shape, "dims": dims, "dtype": dtype, "impl": impl,
            "isolated": True}
    proc = None
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        with open(path) as fh:
            recs = json.load(fh)
        os.remove(path)
        return [dict(r, isolated=True) for r in recs]
    except subprocess.TimeoutExpired:
        return [dict(base, mode=m, error=f"compile+run over {timeout:.0f} s (isolated child)")
                for m in modes]
    except Exception as e:  # noqa: BLE001
        msg = f"child failed: {e!r}" + (f"; stderr: {proc.stderr[-600:]}" if proc else "")
        return [dict(base, mode=m, error=msg[:800]) for m in modes]


def _risky(op, impl, dims) -> bool:
    return (op == "ssd" and impl == "pallas"
            and _kernel_chunk(dims["q"], SSDBlockSizes.get_default()) >= 128)


# ------------------------------------------------------------------------------ main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpret mode)")
    p.add_argument("--ops", default="selective_scan,ssd")
    p.add_argument("--shapes", default="", help="comma list of shape names (default: all)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--target-ms", type=float, default=200.0, help="time of one repeat")
    p.add_argument("--rotate-bytes", type=float, default=128e6,
                   help="rotate input sets until they total this many bytes (max 4 sets)")
    p.add_argument("--ref-max-len", type=int, default=1024, help="skip ref above this length")
    p.add_argument("--copy-bytes", type=float, default=2 ** 30)
    p.add_argument("--isolate-timeout", type=float, default=180.0)
    p.add_argument("--no-isolate", action="store_true")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="stop starting variants after this many seconds (device call limit)")
    p.add_argument("--out", default="")
    p.add_argument("--lower-only", action="store_true",
                   help="no timing: lower every Pallas variant for CUDA (works on a CPU host)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.smoke:
        opts.repeats, opts.target_ms, opts.copy_bytes = 2, 5.0, 4e6
        opts.rotate_bytes = 0.0
    return opts


def main(argv=None) -> dict:
    opts = parse(argv)
    if opts.child:
        spec = json.loads(opts.child)
        opts.repeats, opts.target_ms = spec["repeats"], spec["target_ms"]
        opts.rotate_bytes = spec["rotate_bytes"]
        recs = run_variant(spec["op"], spec["shape"], spec["dims"], spec["dtype"], spec["impl"],
                           spec["modes"], opts)
        common.write_json(opts.out, recs)
        return {"records": recs}

    t0 = time.time()
    if opts.lower_only:
        return _lower_only(opts)
    out = opts.out or common.default_out("kernels_smoke.json" if opts.smoke else "kernels.json")
    opts.tmpdir = os.path.dirname(os.path.abspath(out))
    os.makedirs(opts.tmpdir, exist_ok=True)
    result = {"device": common.device_info(), "method": (
        "jit; 2 warm-up calls; median over repeats of (N back-to-back calls, one "
        "block_until_ready) / N; bytes = inputs read once + outputs written once"),
        "smoke": opts.smoke, "records": [], "notes": []}
    print(f"[kernels] {result['device']}", flush=True)
    try:
        result["copy"] = common.copy_bandwidth(int(opts.copy_bytes))
    except Exception as e:  # noqa: BLE001
        result["copy"] = {"GBps": None, "error": repr(e)[:400]}
    print(f"[kernels] copy bandwidth {common.fmt(result['copy'].get('GBps'), '.0f')} GB/s",
          flush=True)

    shapes_by_op = {"selective_scan": SMOKE_SCAN_SHAPES if opts.smoke else SCAN_SHAPES,
                    "ssd": SMOKE_SSD_SHAPES if opts.smoke else SSD_SHAPES}
    only = set(filter(None, opts.shapes.split(",")))
    modes = [m for m in opts.modes.split(",") if m]
    variants = []
    for op in filter(None, opts.ops.split(",")):
        for shape, dims in shapes_by_op[op].items():
            if only and shape not in only:
                continue
            for dtype in filter(None, opts.dtypes.split(",")):
                for impl in filter(None, opts.impls.split(",")):
                    variants.append((op, shape, dims, dtype, impl))
    # Isolated (slow-compiling) variants last, so that a compile that eats the time budget
    # costs only themselves.
    isolate = [v for v in variants if _risky(v[0], v[4], v[2]) and not opts.no_isolate]
    variants = [v for v in variants if v not in isolate] + isolate
    for op, shape, dims, dtype, impl in variants:
        left = opts.budget_s - (time.time() - t0)
        base = {"op": op, "shape": shape, "dims": dims, "dtype": dtype, "impl": impl}
        if impl == "ref" and dims["l"] > opts.ref_max_len:
            note = (f"ref skipped at length {dims['l']} > --ref-max-len {opts.ref_max_len}: "
                    "a sequential lax.scan, not a contender")
            result["records"] += [dict(base, mode=m, skipped=note) for m in modes]
            continue
        if left < 20:
            result["records"] += [dict(base, mode=m, skipped="time budget spent") for m in modes]
            continue
        if (op, shape, dims, dtype, impl) in isolate:
            recs = _isolated(op, shape, dims, dtype, impl, modes, opts,
                             min(opts.isolate_timeout, left - 10))
        else:
            recs = run_variant(op, shape, dims, dtype, impl, modes, opts)
        result["records"] += recs
        for r in recs:
            print(f"[kernels {time.time() - t0:6.1f}s] {op} {shape} {dtype} {r['mode']} {impl}: "
                  + (f"{r['ms']:.4f} ms" if "ms" in r else r.get("error", "")[:300]),
                  flush=True)
        common.write_json(out, result)
    _derive(result)
    if any(r.get("skipped", "").startswith("ref skipped") for r in result["records"]):
        result["notes"].append(f"ref rows left out above length {opts.ref_max_len}")
    result["wall_s"] = time.time() - t0
    common.write_json(out, result)
    print(f"\nwrote {out}")
    print(report(result))
    return result


def _lower_only(opts) -> dict:
    out = opts.out or common.default_out("kernels_lowering.json")
    shapes_by_op = {"selective_scan": SMOKE_SCAN_SHAPES if opts.smoke else SCAN_SHAPES,
                    "ssd": SMOKE_SSD_SHAPES if opts.smoke else SSD_SHAPES}
    only = set(filter(None, opts.shapes.split(",")))
    modes = [m for m in opts.modes.split(",") if m]
    result = {"device": common.device_info(), "records": []}
    for op in filter(None, opts.ops.split(",")):
        for shape, dims in shapes_by_op[op].items():
            if only and shape not in only:
                continue
            for dtype in filter(None, opts.dtypes.split(",")):
                result["records"] += lower_for_gpu(op, shape, dims, dtype, modes)
    common.write_json(out, result)
    print(f"wrote {out}")
    print(common.table(
        [dict(r, status="ok" if r.get("lowered_cuda") else r.get("error", "")[:60])
         for r in result["records"]],
        [("op", "op", "s"), ("shape", "shape", "s"), ("dtype", "dtype", "s"),
         ("mode", "mode", "s"), ("triton_calls", "triton calls", "d"),
         ("status", "CUDA lowering", "s")]))
    return result


def _derive(result):
    """% of the measured copy bandwidth and speed-up over xla for every timed record."""
    copy = result.get("copy", {}).get("GBps")
    xla = {(r["op"], r["shape"], r["dtype"], r["mode"]): r["ms"] for r in result["records"]
           if r["impl"] == "xla" and "ms" in r}
    for r in result["records"]:
        if "ms" not in r:
            continue
        r["pct_copy"] = 100.0 * r["GBps"] / copy if copy else None
        x = xla.get((r["op"], r["shape"], r["dtype"], r["mode"]))
        r["speedup_vs_xla"] = x / r["ms"] if x else None


def report(result) -> str:
    rows = []
    for r in result["records"]:
        row = dict(r, spread=(f"{r['ms_min']:.3f}-{r['ms_max']:.3f}" if "ms" in r else None),
                   status=("ok" if "ms" in r and r.get("finite", True) else
                           "NONFINITE" if "ms" in r else
                           ("skip" if "skipped" in r else "ERROR")))
        rows.append(row)
    cols = [("op", "op", "s"), ("shape", "shape", "s"), ("dtype", "dtype", "s"),
            ("mode", "mode", "s"), ("impl", "impl", "s"), ("ms", "ms (median)", ".4f"),
            ("spread", "min-max", "s"), ("GBps", "GB/s", ".0f"), ("pct_copy", "% copy", ".1f"),
            ("speedup_vs_xla", "vs xla", ".2f"), ("status", "status", "s")]
    copy = result.get("copy", {}).get("GBps")
    head = (f"=== kernels on {result['device']['device_kind']} (jax {result['device']['jax']}); "
            f"copy bandwidth {common.fmt(copy, '.0f')} GB/s ===")
    return head + "\n" + common.table(rows, cols)


if __name__ == "__main__":
    main()
