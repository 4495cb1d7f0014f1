"""GPU check and timing of kernels.ssd (one script, one device call).

Run on the GPU machine from the repository root:
    python benchmarks/gpu_ssd.py [--budget 270] [--variants a,b] [--no-precompile]
The parent process never touches the GPU; it runs tasks in worker processes and rewrites
$OUT/ssd_gpu.json (or ./ssd_gpu.json) after each:
  0. (parallel, optional) precompile: one worker per variant compiles that variant's jitted
     functions into a persistent compilation cache while task 1 runs;
  1. references: f32 sequential `ssd_reference` (every optional argument, bf16 inputs upcast)
     at L (b2) and S (b8): y, h_L and the gradient of every float input, saved to a file;
  2. per-kernel breakdown at L and S for a few variants (forward, forward + residuals, dL/dh
     pass, dx pass, dB/dC pass, each jitted alone on the padded operands);
  3. per variant, in priority order: equivalence of y, h_L and every gradient vs the
     references (pass = within the bf16 entry of tests/conftest.py TOLERANCES), then timings
     under jax.jit (2 warm-up calls, mean of 50 back-to-back calls with one
     block_until_ready) of the forward and of forward+backward (jax.grad of sum(y) wrt x,
     dt, A, B, C, D) at L (b8 L4096 h32 p64 n128 g1) and S (b64 L1024 h4 p32 n64 g1);
  4. (optional) dA / ddt gradient accuracy at length 65536 for one variant.
`--short` instead runs run 7's tasks at HiSS's low-level shape (12800, 10, 4, 64, n64):
every SHORT_VARIANTS entry (one-chunk path knobs), run 6's default ("old") and xla, each
checked against the f32 sequential reference on the GPU (fresh inputs per check) and timed
(fwd, fwd+bwd; f32 and bf16 inputs), then the combination of the best knob of each group,
then the chunked default at L and S; everything is precompiled in parallel first, with a
ptxas report of the one-chunk kernels. `--summary SSD_JSON` reprints its table.
`--ptxas-report VARIANT` instead prints each kernel's registers, spills, shared memory and
resident programs per SM (Triton + ptxas for sm_90a; no GPU needed).
Each worker has a watchdog: a task over its time limit is recorded as an error and the next
worker goes on with the remaining tasks. No new task starts after --budget seconds.
The table is printed last.
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
import traceback
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Copied from tests/conftest.py TOLERANCES["bfloat16"] (the one tolerance table).
BF16_TOL = {"out": 2e-2, "grad": 3e-2}
SHAPES = {
    "L": dict(b=8, l=4096, h=32, p=64, n=128, g=1),
    "S": dict(b=64, l=1024, h=4, p=32, n=64, g=1),
}
EQ_BATCH = {"L": 2, "S": 8}
if os.environ.get("SSD_BENCH_TINY"):  # CPU dry run of the script itself (interpret mode)
    SHAPES = {"L": dict(b=2, l=128, h=4, p=64, n=128, g=1),
              "S": dict(b=2, l=64, h=2, p=32, n=64, g=1)}
    EQ_BATCH = {"L": 1, "S": 1}
OUT = os.environ.get("OUT", ".")
CACHE_DIR = os.environ.get("SSD_JAX_CACHE", "/tmp/ssd_jax_cache")
REF_PATH = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ssd_gpu_refs.npz")

# name -> BlockSizes keywords (chunk 64 pinned). Order = priority: a device call may end
# before the last. Runs 4 and 5 timed options since removed (see benchmarks/NOTES_ssd.md and
# the JSON in benchmarks/results/); these are the current knobs. (A 2-warp dx spills 24 KB
# per thread in the --ptxas-report: not worth a timing.)
VARIANTS = {
    "default": dict(),
    "dbc w4": dict(num_warps_bwd=4),
    "dstate w8": dict(num_warps_dstate=8),
    "hb8 dbc w4": dict(bwd_heads=8, num_warps_bwd=4),
    "stages1": dict(num_stages=1),     # run 8: 10% slower at L (helped the one-chunk kernels)
    "st_entry": dict(state_store_at_exit=False),  # run 9: 2.110 vs the default's 2.074 at L
    "dx_bch": dict(dx_heads_fastest=False),  # the dx grid's order before run 10 (batch first)
    # Runs 11-12: instruction cuts in the dx pass (NOTES_ssd.md); all three knobs spelled out.
    "run10": dict(fast_exp=False, dda_dot=False, s_prev="dx"),   # the default before run 12
    "sp_dot": dict(fast_exp=False, dda_dot=False, s_prev="dot"),
    "sp_dbc": dict(fast_exp=False, dda_dot=False, s_prev="dbc"),
    "fexp": dict(fast_exp=True, dda_dot=False, s_prev="dx"),
    "ddadot": dict(fast_exp=False, dda_dot=True, s_prev="dx"),
    "all3": dict(fast_exp=True, dda_dot=True, s_prev="dbc"),
    "sp_dot ddadot": dict(fast_exp=False, dda_dot=True, s_prev="dot"),
    "sp_dot fexp": dict(fast_exp=True, dda_dot=False, s_prev="dot"),
    "session4": dict(fast_exp=False, dda_dot=False, s_prev="dx", dx_heads_fastest=False),
    # Run 16: the dx pass on the Mosaic GPU backend (kernels/ssd_mgpu.py; bf16, p64, no z),
    # the default since; "triton_dx" = the default before.
    "mgpu_dx": dict(dx_backend="mosaic"),
    "triton_dx": dict(dx_backend="triton"),
    "mgpu_1bar": dict(dx_backend="mosaic", mgpu_dx_split_loads=False),
    # Run 18: the dB/dC pass on the Mosaic GPU backend (kernels/ssd_mgpu.py dbc_call; bf16,
    # p64, no z), 1-3 TMA slots per head tile.
    "mgpu_dbc": dict(dbc_backend="mosaic"),
    "mgpu_dbc s1": dict(dbc_backend="mosaic", mgpu_dbc_slots=1),
    "mgpu_dbc s3": dict(dbc_backend="mosaic", mgpu_dbc_slots=3),
    "triton_dbc": dict(dbc_backend="triton"),      # the default before run 18
    "mgpu_apart": dict(dbc_backend="mosaic", mgpu_fused=False),   # run 18's default
    # Run 19: dx and dB/dC CTAs in one launch (kernels/ssd_mgpu.py dx_dbc_call).
    "mgpu_fused": dict(dbc_backend="mosaic", mgpu_fused=True),
    "mgpu_fused s1": dict(dbc_backend="mosaic", mgpu_fused=True, mgpu_dbc_slots=1),
    "mgpu_fused s3": dict(dbc_backend="mosaic", mgpu_fused=True, mgpu_dbc_slots=3),
    # Run 21: the one launch's dB/dC CTAs `lead` (batch, chunk) groups ahead of its dx CTAs
    # (BlockSizes.mgpu_dbc_lead; 512 = every dB/dC CTA first at L), and no zeros arrays for
    # the missing initial state / final-state cotangent (zero_states_inline).
    "lead32": dict(mgpu_dbc_lead=32),
    "lead64": dict(mgpu_dbc_lead=64),
    "lead128": dict(mgpu_dbc_lead=128),
    "lead512": dict(mgpu_dbc_lead=512),
    "zs": dict(zero_states_inline=True),
    "zs lead64": dict(zero_states_inline=True, mgpu_dbc_lead=64),
    "default again": dict(),     # the default timed a second time in the same call
    # Run 22: both together, leads around run 21's best (32).
    "zs lead8": dict(zero_states_inline=True, mgpu_dbc_lead=8),
    "zs lead16": dict(zero_states_inline=True, mgpu_dbc_lead=16),
    "zs lead24": dict(zero_states_inline=True, mgpu_dbc_lead=24),
    "zs lead32": dict(zero_states_inline=True, mgpu_dbc_lead=32),
    "zs lead48": dict(zero_states_inline=True, mgpu_dbc_lead=48),
}
BREAKDOWN = ("default",)
GRAD64K = "best"   # the fastest passing variant at L (fwd+bwd)


# --------------------------------------------------------------------------------------------
# Worker side (imports jax).
# --------------------------------------------------------------------------------------------
def _jax():
    import jax
    jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax


def rel_err(a, e):
    import jax.numpy as jnp
    import numpy as np
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    e = np.asarray(jnp.asarray(e, jnp.float32), np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def inputs(key, b, l, h, p, n, g, optional=False, dtype=None):
    import jax
    import jax.numpy as jnp
    import numpy as np
    # SSD_BENCH_DTYPE=float32: every check and timing with float32 x, B, C, z (the checks keep
    # the bf16 tolerances; float32 dots run as TF32 on the GPU).
    dtype = dtype or jnp.dtype(os.environ.get("SSD_BENCH_DTYPE", "bfloat16"))
    ks = jax.random.split(key, 9)
    args = dict(
        x=jax.random.normal(ks[0], (b, l, h, p), jnp.float32).astype(dtype),
        # dt after softplus in the Mamba-2 range (0.001 .. 0.1 at init, larger in training).
        dt=jnp.exp(jax.random.uniform(ks[1], (b, l, h), minval=np.log(1e-3),
                                      maxval=np.log(0.2))),
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


def vjp_fn(fn, names, **kw):
    """jit-able: (vals, key) -> y, h_L, grads of every input under a random cotangent."""
    import jax
    import jax.numpy as jnp

    def go(vals, key):
        def f(*v):
            return call(fn, dict(zip(names, v)), return_final_state=True, **kw)
        (y, h), pull = jax.vjp(f, *vals)
        k1, k2 = jax.random.split(key)
        gy = jax.random.normal(k1, y.shape, jnp.float32).astype(y.dtype)
        gh = jax.random.normal(k2, h.shape, jnp.float32)
        return y, h, pull((gy, gh))
    return go


def compiled(f, *args):
    """Explicit lower + compile (the same path in precompile and measuring workers, so the
    persistent cache key matches); returns (executable, compile seconds)."""
    jax = _jax()
    t0 = time.time()
    exe = jax.jit(f).lower(*args).compile()
    return exe, time.time() - t0


def bench(exe, args, iters=50):
    jax = _jax()
    for _ in range(2):
        jax.block_until_ready(exe(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = exe(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters * 1e3


def block_sizes(name):
    from kernels.ssd import BlockSizes
    return BlockSizes(**{"chunk": 64, **VARIANTS[name]})


def _pallas(bs):
    from kernels.ssd import ssd_pallas

    def f(x, dt, A, B, C, **kw):
        return ssd_pallas(x, dt, A, B, C, chunk_size=64, block_sizes=bs, **kw)
    return f


# Equivalence checks: L and S with every optional argument; "Lnz" = L without z (the Mosaic
# dx pass, `BlockSizes.dx_backend`, runs only without z: with z the Triton kernel does).
EQ_SHAPES = ("L", "S", "Lnz")


def eq_setup(shape):
    jax = _jax()
    import jax.numpy as jnp
    base = shape[0]
    cfg = dict(SHAPES[base], b=EQ_BATCH[base])
    key = jax.random.PRNGKey(0)
    args = inputs(key, **cfg, optional=True)
    if shape == "Lnz":
        del args["z"]
    names = list(args)
    return cfg, key, args, names, jnp


def task_refs(rec, precompile=False):
    del precompile
    jax = _jax()
    import numpy as np
    from kernels.ssd import ssd_reference
    out = {}
    for shape in EQ_SHAPES:
        cfg, key, args, names, jnp = eq_setup(shape)
        args32 = [args[k].astype(jnp.float32) for k in names]
        with jax.default_matmul_precision("highest"):
            y, h, grads = jax.jit(vjp_fn(ssd_reference, names, dt_softplus=True))(args32, key)
        out[f"{shape}/y"] = np.asarray(y, np.float32)
        out[f"{shape}/h_L"] = np.asarray(h, np.float32)
        for k, g in zip(names, grads):
            out[f"{shape}/d{k}"] = np.asarray(g, np.float32)
    np.savez(REF_PATH, **out)
    rec["saved"] = REF_PATH


def task_variant(rec, name, precompile=False):
    jax = _jax()
    import jax.numpy as jnp
    import numpy as np
    if name == "peer":   # the peer jax-linear-attention 0.1.0 mamba2_ssd: timings only
        from jla.layers.ssm import mamba2_ssd

        def f(x, dt, A, B, C, D=None):
            return mamba2_ssd(x, dt, A, B, C, d=D, chunk_size=64)[0]
    elif name == "xla":  # impl="xla" (chunked plain JAX), the ratio column: timings only
        from kernels.ssd import ssd

        def f(x, dt, A, B, C, **kw):
            return ssd(x, dt, A, B, C, chunk_size=64, impl="xla", **kw)
    else:
        f = _pallas(block_sizes(name))
    rec["block_sizes"] = VARIANTS.get(name)
    rec["compile_s"] = {}
    refs = None if precompile or not os.path.exists(REF_PATH) else np.load(REF_PATH)
    for shape in (() if name in ("peer", "xla") else EQ_SHAPES):
        cfg, key, args, names, _ = eq_setup(shape)
        vals = [args[k] for k in names]
        exe, ct = compiled(vjp_fn(f, names, dt_softplus=True), vals, key)
        rec["compile_s"][f"{shape} eq"] = round(ct, 1)
        if refs is not None:
            y, h, grads = exe(vals, key)
            errs = {"y": rel_err(y, refs[f"{shape}/y"]), "h_L": rel_err(h, refs[f"{shape}/h_L"])}
            errs.update({"d" + k: rel_err(g, refs[f"{shape}/d{k}"])
                         for k, g in zip(names, grads)})
            ok = all(v <= BF16_TOL["out" if k in ("y", "h_L") else "grad"]
                     for k, v in errs.items())
            rec[f"{shape}_errors"] = errs
            rec[f"{shape}_max_err"] = max(errs.values())
            rec[f"{shape}_pass"] = ok
        del exe
    for shape in ("L", "S"):
        cfg = SHAPES[shape]
        args = inputs(jax.random.PRNGKey(3), **cfg)
        vals = [args[k] for k in ("x", "dt", "A", "B", "C", "D")]

        def fwd(x, dt, A, B, C, D):
            return f(x, dt, A, B, C, D=D)

        def loss(*v):
            return jnp.sum(fwd(*v).astype(jnp.float32))

        for what, fn in (("fwd", fwd), ("fwd_bwd", jax.grad(loss, argnums=tuple(range(6))))):
            exe, ct = compiled(fn, *vals)
            rec["compile_s"][f"{shape} {what}"] = round(ct, 1)
            if not precompile:
                rec[f"{shape}_{what}_ms"] = bench(exe, vals)
            del exe


def task_breakdown(rec, name, precompile=False):
    """Each kernel of the variant jitted alone at L and S on the padded operands."""
    jax = _jax()
    import jax.numpy as jnp
    import importlib
    K = importlib.import_module("kernels.ssd_long")   # the multi-chunk kernels and launchers
    bs = block_sizes(name)
    q = 64
    for shape in ("L", "S"):
        cfg = SHAPES[shape]
        args = inputs(jax.random.PRNGKey(3), **cfg)
        b, l, h, p, n, g = (cfg[k] for k in ("b", "l", "h", "p", "n", "g"))
        x, dt, A, B, C = (args[k] for k in POS)
        D = jnp.broadcast_to(args["D"][:, None], (h, p)).astype(jnp.float32)
        h0 = jnp.zeros((b, h, p, n), jnp.float32)
        dy = jax.random.normal(jax.random.PRNGKey(4), x.shape, jnp.float32).astype(x.dtype)
        dhT = jnp.zeros((b, h, p, n), jnp.float32)
        hb = K._largest_divisor_at_most(h // g, bs.bwd_heads)
        kw = dict(q=q, bs=bs, interpret=jax.default_backend() != "gpu")
        if precompile:   # shapes only: no GPU work while other workers time kernels
            states = dstates = jnp.zeros((b, l // q, h, p, n), x.dtype)
        else:
            _, _, states = jax.jit(lambda *a: K._fwd_call(*a, None, h0, save_states=True,
                                                          **kw))(x, dt, A, B, C, D)
            dstates, _ = jax.jit(lambda *a: K._dstate_call(*a, states_dtype=x.dtype, **kw))(
                dt, A, C, None, dy, dhT)
        # s_prev "dbc": the dx pass reads s_prev written by the dB/dC pass.
        sp = None
        if bs.s_prev == "dbc":
            sp = (jnp.zeros((b, l // q, h, 16), jnp.float32) if precompile else
                  jax.jit(lambda *a: K._dbc_call(*a, hb=hb, **kw))(
                      x, dt, A, B, C, None, states, dstates, dy)[2])
        jobs = {
            "fwd": (lambda *a: K._fwd_call(*a, None, h0, save_states=False, **kw),
                    (x, dt, A, B, C, D)),
            "fwd_res": (lambda *a: K._fwd_call(*a, None, h0, save_states=True, **kw),
                        (x, dt, A, B, C, D)),
            "dstate": (lambda *a: K._dstate_call(*a, states_dtype=x.dtype, **kw),
                       (dt, A, C, None, dy, dhT)),
            "dx": (lambda *a: K._dx_call(*a, **kw),
                   (x, dt, A, B, C, D, None, states, dstates, dy, sp)),
            "dbc": (lambda *a: K._dbc_call(*a, hb=hb, **kw),
                    (x, dt, A, B, C, None, states, dstates, dy)),
        }
        M = importlib.import_module("kernels.ssd_mgpu")
        if bs.dx_backend == "mosaic" and M.supports(x, B, q):
            jobs["dx"] = (lambda *a: M.dx_call(*a, q=q, interpret=kw["interpret"]),
                          (x, dt, A, B, C, D, states, dstates, dy))
        if bs.dbc_backend == "mosaic" and M.dbc_supports(x, B, q):
            jobs["dbc"] = (lambda *a: M.dbc_call(*a, q=q, interpret=kw["interpret"],
                                                 slots=bs.mgpu_dbc_slots),
                           (x, dt, A, B, C, states, dstates, dy))
        if bs.mgpu_fused and "dx" in jobs and M.dbc_supports(x, B, q):
            jobs["dx_dbc"] = (lambda *a: M.dx_dbc_call(*a, q=q, interpret=kw["interpret"],
                                                       slots=bs.mgpu_dbc_slots),
                              (x, dt, A, B, C, D, states, dstates, dy))
        for what, (fn, a) in jobs.items():
            exe, _ = compiled(fn, *a)
            if not precompile:
                rec[f"{shape}_{what}_ms"] = bench(exe, a)
        if not precompile:
            rec[f"{shape}_sum_ms"] = sum(rec.get(f"{shape}_{k}_ms", 0.0)
                                         for k in ("fwd_res", "dstate", "dx", "dbc"))


def task_grad64k(rec, name, precompile=False):
    jax = _jax()
    import jax.numpy as jnp
    from kernels.ssd import ssd_reference
    if precompile:
        return
    # Head dim 64, d_state 128: the Mosaic dx / dB/dC passes run for the bf16 inputs (the
    # float32 ones take the Triton kernels).
    cfg = dict(b=1, l=65536, h=4, p=64, n=128, g=1)
    base = inputs(jax.random.PRNGKey(1), **cfg, dtype=jnp.float32)
    f = _pallas(block_sizes(name))

    def grads(fn, args):
        def loss(dt, A):
            y = call(fn, {**args, "dt": dt, "A": A})
            w = jax.random.normal(jax.random.PRNGKey(2), y.shape, jnp.float32)
            return jnp.sum(y.astype(jnp.float32) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(args["dt"], args["A"])

    with jax.default_matmul_precision("highest"):
        ref = grads(ssd_reference, base)
    for dtype in (jnp.float32, jnp.bfloat16):
        args = {k: (v.astype(dtype) if k in ("x", "B", "C") else v) for k, v in base.items()}
        got = grads(f, args)
        errs = {"d" + k: rel_err(gv, r) for k, gv, r in zip(("dt", "A"), got, ref)}
        rec[jnp.dtype(dtype).name] = errs
        rec[jnp.dtype(dtype).name + "_pass"] = all(v <= BF16_TOL["grad"] for v in errs.values())


def _ptxas_rows(lower, warps, num_stages):
    """Registers, spills and shared memory of every Pallas kernel that `lower()` lowers.

    Captures the Triton IR that Pallas lowers for CUDA, compiles it for sm_90a with the
    `triton` package (installed on the GPU machine; elsewhere put it on PYTHONPATH) at each
    kernel's num_warps (`warps[name]`) and num_stages, and runs that package's ptxas -v.
    Triton's own pipeline, not XLA's copy of it: indicative, not exact. Resident programs per
    SM = min(64K registers, 228 KB shared memory, 64 warps) over one program's needs.
    """
    import re
    import tempfile
    from jax._src.pallas.triton import pallas_call_registration as reg
    import triton
    from triton.backends.compiler import GPUTarget
    tmp = tempfile.mkdtemp()
    irs = {}
    orig = reg.lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        res = orig(*a, **k)
        text = res.module.operation.get_asm(enable_debug_info=False)
        irs[re.search(r"tt\.func public @(\w+)", text).group(1)] = text
        return res

    reg.lowering.lower_jaxpr_to_triton_module = capture
    try:
        lower()
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    rows = []
    for kname, text in irs.items():
        w = warps[kname]
        path = os.path.join(tmp, f"{kname}.ttir")
        with open(path, "w") as f:
            f.write(text)
        k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": w, "num_stages": num_stages})
        ptx = os.path.join(tmp, f"{kname}.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", ptx + ".cubin"],
                             capture_output=True, text=True).stderr
        regs = int(re.search(r"Used (\d+) registers", out).group(1))
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
        smem = int(k.metadata.shared)
        per_sm = min(65536 // (regs * 32 * w), (228 * 1024) // max(smem, 1), 64 // w)
        rows.append({"kernel": kname, "num_warps": w, "registers": regs,
                     "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2)),
                     "shared_bytes": smem, "programs_per_sm": per_sm,
                     "triton": triton.__version__})
    return rows


def _print_ptxas(title, rows):
    print(f"\nptxas report, {title} (sm_90a):")
    print("kernel           warps  regs  spill st/ld   shared   programs/SM")
    for r in rows:
        print(f"{r['kernel']:16s} {r['num_warps']:5d} {r['registers']:5d} "
              f"{r['spill_stores']:6d}/{r['spill_loads']:<6d} {r['shared_bytes']:7d} "
              f"{r['programs_per_sm']:8d}")


def ptxas_report(name, shape="L"):
    """`_ptxas_rows` for the chunked kernels of a VARIANTS entry (chunk 64)."""
    jax = _jax()
    import jax.numpy as jnp
    from kernels.ssd import ssd_pallas
    bs = block_sizes(name)
    warps = {"ssd_fwd": bs.num_warps_fwd,
             "ssd_bwd_dstate": bs.num_warps_dstate or bs.num_warps_fwd,
             "ssd_bwd_dx": bs.num_warps_dx or bs.num_warps_fwd,
             "ssd_bwd_dbc": bs.num_warps_bwd, "ssd_bwd": bs.num_warps_bwd,
             "ssd_bwd_chunk": bs.num_warps_bwd}
    cfg = dict(SHAPES[shape], b=1, l=128)      # the kernel body does not depend on b, l
    args = inputs(jax.random.PRNGKey(0), **cfg)
    vals = [args[k] for k in ("x", "dt", "A", "B", "C", "D")]

    def loss(x, dt, A, B, C, D):
        y = ssd_pallas(x, dt, A, B, C, D=D, chunk_size=64, block_sizes=bs, interpret=False)
        return jnp.sum(y.astype(jnp.float32))

    rows = _ptxas_rows(lambda: jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(
        *vals).lower(lowering_platforms=("cuda",)), warps, bs.num_stages)
    _print_ptxas(f"variant {name!r}, shape {shape}", rows)
    return rows


TASKS = {"refs": task_refs, "variant": task_variant, "breakdown": task_breakdown,
         "grad64k": task_grad64k}


def worker(job_path, results_path, precompile):
    """Runs the tasks of a job file in order, appending one JSON line per task."""
    global RESULTS_PATH
    RESULTS_PATH = results_path
    with open(job_path) as f:
        job = json.load(f)
    print(f"[worker] {'precompile ' if precompile else ''}{len(job)} tasks", flush=True)
    if precompile:
        os.nice(10)
    for task in job:
        if time.time() > task["deadline"]:
            print("[worker] deadline reached", flush=True)
            return
        rec = {"task": task["kind"], "name": task.get("name"), "precompile": precompile}
        done = threading.Event()

        def watchdog(limit=task["limit_s"], rec=rec):
            if not done.wait(limit):
                rec["error"] = f"over {limit} s (compile or run)"
                with open(results_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"[worker] {rec['task']} {rec['name']}: over {limit} s", flush=True)
                os._exit(3)

        threading.Thread(target=watchdog, daemon=True).start()
        t0 = time.time()
        try:
            kw = {"name": task["name"]} if task.get("name") else {}
            TASKS[task["kind"]](rec, precompile=precompile, **kw)
        except Exception as e:  # keep the other tasks' results
            rec["error"] = repr(e)[:1500]
            rec["trace"] = traceback.format_exc()[-2500:]
        rec["wall_s"] = round(time.time() - t0, 1)
        done.set()
        with open(results_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                 if k not in ("trace", "L_errors", "S_errors", "block_sizes", "compile_s")}
        print(f"[worker] {str(short)[:400]}", flush=True)


# --------------------------------------------------------------------------------------------
# --short: the one-chunk path at HiSS's low-level shape (run 7; run 6's version of this
# section is in git history, commit 709ef21).
# --------------------------------------------------------------------------------------------
# The training benchmark's low level: 32 x 4000 steps in chunks of 10 -> 12 800 sequences of
# 10 steps; d_model 128 -> 4 heads of 64, d_state 64, 1 group, chunk_size 10; the Mamba-2
# mixer passes D (per head), dt_bias and softplus, no z, no initial or final state.
LOW = dict(b=12800, l=10, h=4, p=64, n=64, g=1)
LOW_CHUNK = 10
if os.environ.get("SSD_BENCH_TINY"):
    LOW = dict(b=64, l=10, h=4, p=64, n=64, g=1)
# name -> BlockSizes keywords (no pinned chunk: the caller's chunk_size 10, as in the model).
# Order = priority. Run 7 ran these with the then defaults short_fwd_heads 1 and num_stages 2
# for every kernel (RUN7_BASE; a global num_stages=1 was its "stages1"); its best-knob
# combination (4 heads per forward program, 1 stage) is the default since ("default").
# "old" is run 6's default (each sequence padded to 16 steps in XLA, 2 per 32-row program).
RUN7_BASE = dict(short_fwd_heads=1, num_stages_short=2)
SHORT_VARIANTS = {
    "default": dict(),
    "pack32": dict(RUN7_BASE),
    "old": dict(RUN7_BASE, short_pack=False),
    "rows16": dict(RUN7_BASE, short_rows=16),
    "rows64": dict(RUN7_BASE, short_rows=64),
    "fh4": dict(RUN7_BASE, short_fwd_heads=4),
    "fwd_w2": dict(RUN7_BASE, num_warps_short_fwd=2),
    "unroll": dict(RUN7_BASE, short_unroll=True),
    "bwd_w2": dict(RUN7_BASE, num_warps_short_bwd=2),
    "bwd_w8": dict(RUN7_BASE, num_warps_short_bwd=8),
    "stages1": dict(RUN7_BASE, num_stages_short=1),
}
# The combination task takes the best of each group (each differs from pack32 in one knob):
ROW_KNOBS = ("pack32", "rows16", "rows64")               # both kernels: by fwd+bwd
FWD_KNOBS = ("pack32", "fh4", "fwd_w2")                  # forward kernel only: by fwd
BWD_KNOBS = ("pack32", "unroll", "bwd_w2", "bwd_w8", "stages1")   # by fwd+bwd - fwd
PTXAS_SHORT = ("old", "default", "pack32", "rows16", "rows64", "fh4", "unroll", "bwd_w2")
# f32 inputs run TF32 dots on the GPU (~5e-4 relative per operand): their GPU tolerance.
F32_GPU_TOL = {"out": 3e-3, "grad": 3e-3}
RESULTS_PATH = None       # set in worker(): the combination task reads the earlier records


def low_inputs(key, dtype, b=None, full=False):
    """Model-like inputs at the low-level shape: raw dt (softplus + bias in the call)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    cfg = dict(LOW, b=b or LOW["b"])
    b, l, h, p, n, g = (cfg[k] for k in ("b", "l", "h", "p", "n", "g"))
    ks = jax.random.split(key, 9)
    args = dict(
        x=jax.random.normal(ks[0], (b, l, h, p), jnp.float32).astype(dtype),
        dt=jax.random.normal(ks[1], (b, l, h)) - 2.0,
        A=-jnp.exp(jax.random.uniform(ks[2], (h,), minval=0.0, maxval=np.log(16.0))),
        B=jax.random.normal(ks[3], (b, l, g, n), jnp.float32).astype(dtype),
        C=jax.random.normal(ks[4], (b, l, g, n), jnp.float32).astype(dtype),
        D=jax.random.normal(ks[5], (h,), jnp.float32),
        dt_bias=jax.random.uniform(ks[7], (h,), minval=-1.0, maxval=0.0),
    )
    if full:   # every optional argument: one sequence per program
        args["D"] = jax.random.normal(ks[5], (h, p), jnp.float32)
        args["z"] = jax.random.normal(ks[6], (b, l, h, p), jnp.float32).astype(dtype)
        args["initial_state"] = jax.random.normal(ks[8], (b, h, p, n), jnp.float32)
    return args


def _short_fn(kw):
    """kw: BlockSizes keywords, or "xla"."""
    from kernels.ssd import BlockSizes, ssd, ssd_pallas
    if kw == "xla":
        return functools.partial(ssd, chunk_size=LOW_CHUNK, impl="xla")
    return functools.partial(ssd_pallas, chunk_size=LOW_CHUNK, block_sizes=BlockSizes(**kw))


def _y_grads(fn, names, final):
    """jit-able: (vals, key) -> y [, h_L], grads of every input under a random cotangent."""
    import jax
    import jax.numpy as jnp

    def go(vals, key):
        def f(*v):
            return call(fn, dict(zip(names, v)), dt_softplus=True, return_final_state=final)
        out, pull = jax.vjp(f, *vals)
        k1, k2 = jax.random.split(key)
        if final:
            y, h = out
            return y, h, pull((jax.random.normal(k1, y.shape, jnp.float32).astype(y.dtype),
                               jax.random.normal(k2, h.shape, jnp.float32)))
        return out, None, pull(jax.random.normal(k1, out.shape, jnp.float32).astype(out.dtype))
    return go


def short_eq(kw, dtype, seed, full=False, precompile=False):
    """Errors of y [, h_L] and every gradient vs the f32 sequential reference (HIGHEST
    precision) on fresh inputs (seed): an unwritten output row cannot match by chance."""
    jax = _jax()
    import jax.numpy as jnp
    from kernels.ssd import ssd_reference
    args = low_inputs(jax.random.PRNGKey(seed), dtype, full=full)
    names = list(args)
    vals = [args[k] for k in names]
    vals32 = [v.astype(jnp.float32) for v in vals]
    key = jax.random.PRNGKey(seed + 1)
    with jax.default_matmul_precision("highest"):
        ref_exe, _ = compiled(_y_grads(ssd_reference, names, full), vals32, key)
    exe, ct = compiled(_y_grads(_short_fn(kw), names, full), vals, key)
    if precompile:
        return {"compile_s": round(ct, 1)}
    y0, h0, g0 = ref_exe(vals32, key)
    y, h, gr = exe(vals, key)
    errs = {"y": rel_err(y, y0)}
    if full:
        errs["h_L"] = rel_err(h, h0)
    errs.update({"d" + k: rel_err(a, b) for k, a, b in zip(names, gr, g0)})
    tol = BF16_TOL if jnp.dtype(dtype) == jnp.bfloat16 else F32_GPU_TOL
    ok = all(v <= tol["out" if k in ("y", "h_L") else "grad"] for k, v in errs.items())
    return {"errors": errs, "max_err": max(errs.values()), "pass": ok}


def short_time(rec, kw, dtypes=("float32", "bfloat16"), precompile=False):
    """fwd and fwd+bwd (jax.value_and_grad of sum(y) wrt x, dt, A, B, C, D, dt_bias) at the
    low-level shape per input dtype: two bursts of 50 back-to-back calls (mean each); ms =
    their mean. value_and_grad, not grad: the one-chunk backward needs no output of the
    forward kernel, so under jax.grad XLA drops that kernel (run 7's "fwd_bwd" column was
    the backward alone)."""
    jax = _jax()
    import jax.numpy as jnp
    f = _short_fn(kw)
    keys = ("x", "dt", "A", "B", "C", "D", "dt_bias")
    for dname in dtypes:
        args = low_inputs(jax.random.PRNGKey(3), jnp.dtype(dname))
        vals = [args[k] for k in keys]

        def fwd(*v):
            return call(f, dict(zip(keys, v)), dt_softplus=True)

        def loss(*v):
            return jnp.sum(fwd(*v).astype(jnp.float32))

        for what, fn in (("fwd", fwd),
                         ("fwd_bwd", jax.value_and_grad(loss, argnums=tuple(range(7))))):
            k = f"{dname} {what}"
            try:
                exe, ct = compiled(fn, *vals)
                rec[k + " compile_s"] = round(ct, 1)
                if not precompile:
                    runs = [bench(exe, vals), bench(exe, vals)]
                    rec[k + " runs_ms"] = runs
                    rec[k + " ms"] = sum(runs) / len(runs)
                del exe
            except Exception as e:  # keep the other timings
                rec[k + " error"] = repr(e)[:400]


def task_short_var(rec, name, precompile=False):
    """One variant: GPU equivalence (f32 and bf16 model arguments; for pack32 and old also
    every optional argument), then its timings."""
    kw = SHORT_VARIANTS[name] if name in SHORT_VARIANTS else "xla"
    rec["block_sizes"] = kw
    if kw != "xla":
        seed = 100 + 10 * (list(SHORT_VARIANTS).index(name))
        cases = [("f32", "float32", False), ("bf16", "bfloat16", False)]
        if name in ("default", "pack32", "old"):
            cases += [("f32 all optional", "float32", True), ("bf16 all optional", "bfloat16", True)]
        for i, (what, dname, full) in enumerate(cases):
            rec["eq " + what] = short_eq(kw, dname, seed + i, full=full, precompile=precompile)
        if not precompile:
            rec["pass"] = all(v["pass"] for k, v in rec.items() if k.startswith("eq "))
    short_time(rec, kw, precompile=precompile)


def _score(rec, what):
    vals = [rec.get(f"{d} {what} ms") for d in ("float32", "bfloat16")]
    return sum(vals) if all(isinstance(v, float) for v in vals) else None


def combo_choice(recs):
    """The best of each knob group (passing variants only) -> (BlockSizes keywords, picks)."""
    by = {r["name"]: r for r in recs if r["task"] == "short_var" and r.get("pass")}

    def best(group, key):
        scored = [(key(by[n]), n) for n in group if n in by and key(by[n]) is not None]
        return min(scored)[1] if scored else "pack32"

    fb = lambda r: _score(r, "fwd_bwd")                                      # noqa: E731
    fw = lambda r: _score(r, "fwd")                                          # noqa: E731
    bw = lambda r: (None if fb(r) is None or fw(r) is None else fb(r) - fw(r))  # noqa: E731
    picks = {"rows": best(ROW_KNOBS, fb), "fwd": best(FWD_KNOBS, fw), "bwd": best(BWD_KNOBS, bw)}
    base = SHORT_VARIANTS["pack32"]
    kw = dict(base)
    for n in picks.values():   # each pick's difference from pack32
        kw.update({k: v for k, v in SHORT_VARIANTS[n].items() if base.get(k) != v})
    return kw, picks


def task_short_combo(rec, precompile=False):
    """The combination of the best knob of each group, checked and timed like a variant."""
    if precompile:
        return
    kw, picks = combo_choice(_read(RESULTS_PATH))
    rec["picks"] = picks
    rec["block_sizes"] = kw
    same = [n for n, v in SHORT_VARIANTS.items() if v == kw]
    if same:
        rec["same_as"] = same[0]
        return
    for i, (what, dname) in enumerate((("f32", "float32"), ("bf16", "bfloat16"))):
        rec["eq " + what] = short_eq(kw, dname, 900 + i)
    rec["eq bf16 all optional"] = short_eq(kw, "bfloat16", 910, full=True)
    rec["pass"] = all(v["pass"] for k, v in rec.items() if k.startswith("eq "))
    short_time(rec, kw)


def task_ptxas_short(rec, precompile=False):
    """Registers / spills / shared memory of the one-chunk kernels of PTXAS_SHORT (CPU only:
    runs in the precompile phase)."""
    if not precompile:
        return
    jax = _jax()
    import jax.numpy as jnp
    from kernels.ssd import BlockSizes
    for name in PTXAS_SHORT:
        bs = BlockSizes(**SHORT_VARIANTS[name])
        args = low_inputs(jax.random.PRNGKey(0), jnp.bfloat16, b=64)
        keys = ("x", "dt", "A", "B", "C", "D", "dt_bias")
        vals = [args[k] for k in keys]
        f = _short_fn(SHORT_VARIANTS[name])

        def loss(*v, f=f):
            kw = dict(zip(keys, v))
            y = call(f, kw, dt_softplus=True, interpret=False)
            return jnp.sum(y.astype(jnp.float32))

        warps = {"ssd_short_fwd": bs.num_warps_short_fwd, "ssd_short_bwd": bs.num_warps_short_bwd}
        try:
            rec[name] = _ptxas_rows(lambda: jax.jit(jax.grad(loss, argnums=tuple(range(7)))).trace(
                *vals).lower(lowering_platforms=("cuda",)), warps, bs.num_stages_short)
        except Exception as e:
            rec[name] = repr(e)[:300]


TASKS.update({"short_var": task_short_var, "short_combo": task_short_combo,
              "ptxas_short": task_ptxas_short})


def short_table(recs):
    """The run-7 summary: low-level timings (ms) with equivalence, then the extras."""
    lines = []
    rows = [r for r in recs if r["task"] in ("short_var", "short_combo") and not r.get("precompile")]
    shape = "({b}, {l}, {h}, {p}, n{n})".format(**LOW)
    lines.append(f"low level {shape}, chunk {LOW_CHUNK}; ms (mean of 2x50 calls)")
    lines.append(f"{'variant':10s} {'f32 fwd':>8s} {'f32 f+b':>8s} {'bf16 fwd':>8s} "
                 f"{'bf16 f+b':>8s}  max err f32 / bf16 (all-opt)  pass")
    for r in rows:
        name = r["name"] or "combo"
        if r.get("same_as"):
            lines.append(f"combo = {r['same_as']} (picks {r.get('picks')})")
            continue
        cells = []
        for d in ("float32", "bfloat16"):
            for w in ("fwd", "fwd_bwd"):
                v = r.get(f"{d} {w} ms")
                cells.append(f"{v:8.3f}" if isinstance(v, float) else "     n/a")
        errs = []
        for what in ("f32", "bf16", "bf16 all optional"):
            e = r.get("eq " + what)
            if isinstance(e, dict) and "max_err" in e:
                errs.append(f"{e['max_err']:.1e}")
        err = " / ".join(errs) if errs else "-"
        lines.append(f"{name:10s} " + " ".join(cells) + f"  {err:28s} {r.get('pass', '-')}"
                     + (f"  {r.get('error', '')[:60]}" if r.get("error") else "")
                     + (f"  picks {r['picks']}" if r.get("picks") else ""))
    for r in recs:
        if r["task"] == "ptxas_short":
            for name in PTXAS_SHORT:
                v = r.get(name)
                if isinstance(v, list):
                    lines.append(f"ptxas {name:8s} " + "; ".join(
                        f"{k['kernel'][4:]} w{k['num_warps']} {k['registers']} regs "
                        f"spill {k['spill_stores']} smem {k['shared_bytes']} "
                        f"{k['programs_per_sm']}/SM" for k in v))
                elif v is not None:
                    lines.append(f"ptxas {name}: {v[:120]}")
            if r.get("error"):
                lines.append(f"ptxas: {r['error'][:200]}")
        if r["task"] == "variant" and not r.get("precompile"):
            def ms(k):
                v = r.get(k)
                return f"{v:.3f}" if isinstance(v, float) else "n/a"
            lines.append(f"long default: L fwd {ms('L_fwd_ms')} f+b {ms('L_fwd_bwd_ms')} | "
                         f"S fwd {ms('S_fwd_ms')} f+b {ms('S_fwd_bwd_ms')} "
                         f"{r.get('error', '')[:80]}")
    print("\n" + "\n".join(lines))


def _start_run(opts, known):
    """Common start of a GPU run: the time limits, no preallocation (worker processes share the
    GPU), fresh result files under OUT, and the chosen variant names (checked against `known`).
    Returns (start, deadline, hard_end, results_path, pre_path, names)."""
    start = time.time()
    deadline, hard_end = start + opts.budget, start + opts.hard_limit
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.makedirs(OUT, exist_ok=True)
    results_path = os.path.join(OUT, "ssd_gpu_tasks.jsonl")
    pre_path = os.path.join(OUT, "ssd_gpu_precompile.jsonl")
    for path in (results_path, pre_path):
        if os.path.exists(path):
            os.remove(path)
    names = [v for v in opts.variants.split(",") if v] or list(known)
    unknown = [v for v in names if v not in known and v not in ("peer", "xla")]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(known)}")
    return start, deadline, hard_end, results_path, pre_path, names


def short_main(opts):
    start, deadline, hard_end, results_path, pre_path, names = _start_run(opts, SHORT_VARIANTS)
    var = [{"kind": "short_var", "name": n, "limit_s": 75} for n in names]
    # Priority: the new and old defaults and xla, the other variants, their combination,
    # then the chunked default at L and S (a regression check of the unchanged long path).
    tasks = (var[:3] + [{"kind": "short_var", "name": "xla", "limit_s": 60}] + var[3:]
             + [{"kind": "short_combo", "limit_s": 75},
                {"kind": "variant", "name": "default", "limit_s": 60}])
    # Precompile every task into the persistent cache in parallel (CPU-bound) with the ptxas
    # report, then measure one task at a time on a quiet machine.
    pre = [{"kind": "ptxas_short", "limit_s": opts.precompile_s}] + [
        t for t in tasks if t["kind"] != "short_combo"]
    groups = [[] for _ in range(max(1, opts.precompile_workers))]
    for i, t in enumerate(pre):
        groups[i % len(groups)].append(t)
    threads = [threading.Thread(target=run_tasks, args=(
        grp, f"{pre_path}.{i}", start + opts.precompile_s, True, f"pre{i}",
        start + opts.precompile_s + 30)) for i, grp in enumerate(groups) if grp]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pre_recs = []
    for i in range(len(groups)):
        pre_recs += _read(f"{pre_path}.{i}")
        if os.path.exists(f"{pre_path}.{i}"):
            os.remove(f"{pre_path}.{i}")
    with open(pre_path, "w") as f:
        for r in pre_recs:
            f.write(json.dumps(r) + "\n")
    print(f"[parent] precompile done at {time.time() - start:.0f} s", flush=True)
    left = run_tasks(tasks, results_path, deadline, hard_end=hard_end)
    recs = _read(results_path)
    _write_summary({"run": 7, "low_shape": LOW, "low_chunk": LOW_CHUNK,
                    "short_variants": SHORT_VARIANTS, "knob_groups": {
                        "rows": ROW_KNOBS, "fwd": FWD_KNOBS, "bwd": BWD_KNOBS},
                    "tol_bf16": BF16_TOL, "tol_f32_gpu": F32_GPU_TOL, "shapes": SHAPES,
                    "results": recs, "precompile": pre_recs}, left, start)
    short_table(recs + [r for r in pre_recs if r["task"] == "ptxas_short"])


# --------------------------------------------------------------------------------------------
# Parent side (no jax).
# --------------------------------------------------------------------------------------------
def run_tasks(tasks, results_path, deadline, precompile=False, tag="main", hard_end=None):
    """Runs tasks in workers, restarting after a watchdog kill; no task starts after the
    deadline, and a worker still running at hard_end is killed."""
    pending = list(tasks)
    hard_end = hard_end or deadline
    while pending and time.time() < deadline:
        job_path = os.path.join(OUT, f"_job_{tag}.json")
        with open(job_path, "w") as f:
            json.dump([dict(t, deadline=deadline) for t in pending], f)
        before = _read(results_path)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", job_path,
               "--results", results_path] + (["--precompile"] if precompile else [])
        try:
            subprocess.run(cmd, timeout=max(5.0, hard_end - time.time()), check=False)
        except subprocess.TimeoutExpired:
            pass
        os.remove(job_path)
        n_done = len(_read(results_path)) - len(before)
        pending = pending[max(n_done, 1):]
    return pending


def _write_summary(summary, left, start):
    """$OUT/ssd_gpu.json: `summary` + the tasks not run and the wall time."""
    summary.update(not_run=[t.get("name") or t["kind"] for t in left],
                   wall_s=round(time.time() - start, 1))
    with open(os.path.join(OUT, "ssd_gpu.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"[parent] done in {time.time() - start:.0f} s; not run: {summary['not_run']}")


def _read(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table(recs):
    rows = [r for r in recs if r["task"] == "variant" and not r.get("precompile")]
    print("\nvariant            L fwd   L f+b    S fwd   S f+b   max rel err (L / S)  pass")
    for r in rows:
        def ms(k):
            v = r.get(k)
            return f"{v:7.3f}" if isinstance(v, float) else "    n/a"
        err = f"{r.get('L_max_err', float('nan')):.1e} / {r.get('S_max_err', float('nan')):.1e}"
        if 'Lnz_max_err' in r:
            err += f" / nz {r['Lnz_max_err']:.1e}"
        ok = r.get("L_pass") and r.get("S_pass") and r.get("Lnz_pass", True)
        print(f"{r['name']:17s} {ms('L_fwd_ms')} {ms('L_fwd_bwd_ms')}  {ms('S_fwd_ms')} "
              f"{ms('S_fwd_bwd_ms')}   {err:19s}  {ok}  {r.get('error', '')[:60]}")
    cols = ("L_fwd_ms", "L_fwd_bwd_ms", "S_fwd_ms", "S_fwd_bwd_ms")
    xla = next((r for r in rows if r["name"] == "xla"), None)
    if xla is not None:       # speed-up over impl="xla" (xla time / variant time)
        print("x xla:")
        for r in rows:
            if r["name"] != "xla":
                print(f"{r['name']:17s} " + " ".join(
                    f"{xla[k] / r[k]:7.1f}x" if isinstance(r.get(k), float)
                    and isinstance(xla.get(k), float) else "     n/a" for k in cols))
    for r in recs:
        if r["task"] == "breakdown" and not r.get("precompile"):
            for shape in ("L", "S"):
                parts = " ".join(f"{k}={r.get(f'{shape}_{k}_ms', float('nan')):.3f}"
                                 for k in ("fwd", "fwd_res", "dstate", "dx", "dbc", "sum"))
                print(f"breakdown {r['name']} {shape}: {parts} {r.get('error', '')[:60]}")
        if r["task"] == "grad64k":
            print(f"grad 64k {r['name']}: f32 {r.get('float32')} bf16 {r.get('bfloat16')} "
                  f"{r.get('error', '')[:80]}")
        if r["task"] == "refs" and r.get("error"):
            print(f"refs: {r['error'][:200]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds after which no new task starts")
    parser.add_argument("--hard-limit", type=float, default=275.0,
                        help="seconds after which a running worker is killed")
    parser.add_argument("--variants", default="", help="comma list (default: all, in order)")
    parser.add_argument("--breakdown", default=",".join(BREAKDOWN))
    parser.add_argument("--grad64k", default=GRAD64K,
                        help="variant name, 'best' (fastest at L), or '' to skip")
    parser.add_argument("--no-precompile", action="store_true")
    parser.add_argument("--precompile-workers", type=int, default=6)
    parser.add_argument("--precompile-s", type=float, default=110.0,
                        help="precompile workers stop this many seconds after the start")
    parser.add_argument("--variant-limit", type=float, default=90.0)
    parser.add_argument("--ptxas-report", default="", metavar="VARIANT",
                        help="print registers / spills / shared memory per kernel and exit")
    parser.add_argument("--short", action="store_true",
                        help="run 7: the one-chunk path at HiSS's low-level shape (equivalence "
                             "and timings of its variants, old default, xla, best combination)")
    parser.add_argument("--summary", metavar="SSD_JSON",
                        help="print the --short table from its JSON")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--results", default="", help=argparse.SUPPRESS)
    parser.add_argument("--precompile", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts.worker, opts.results, opts.precompile)
        return
    if opts.summary:
        with open(opts.summary) as f:
            saved = json.load(f)
        short_table(saved["results"] + [r for r in saved.get("precompile", [])
                                        if r["task"] == "ptxas_short"])
        return
    if opts.short:
        short_main(opts)
        return
    if opts.ptxas_report:
        rows = ptxas_report(opts.ptxas_report)
        with open(os.path.join(OUT, "ssd_ptxas.json"), "w") as f:
            json.dump({"variant": opts.ptxas_report, "kernels": rows}, f, indent=1)
        return
    start, deadline, hard_end, results_path, pre_path, names = _start_run(opts, VARIANTS)
    breakdown = [v for v in opts.breakdown.split(",") if v]
    # Priority: the two main variants, their breakdowns, then the rest.
    tasks = [{"kind": "variant", "name": v, "limit_s": opts.variant_limit} for v in names]
    bd = [{"kind": "breakdown", "name": v, "limit_s": 60} for v in breakdown]
    tasks = tasks[:1] + bd + tasks[1:]
    # Precompile in parallel (CPU-bound Triton/XLA compiles) while the references run.
    procs = []
    if not opts.no_precompile:
        groups = [[] for _ in range(max(1, opts.precompile_workers))]
        for i, t in enumerate(tasks):
            groups[i % len(groups)].append(t)
        for i, grp in enumerate(groups):
            if grp:
                procs.append(threading.Thread(target=run_tasks, args=(
                    grp, f"{pre_path}.{i}", start + opts.precompile_s, True, f"pre{i}")))
        for t in procs:
            t.start()
    run_tasks([{"kind": "refs", "limit_s": 120}], results_path, deadline, tag="refs",
              hard_end=hard_end)
    for t in procs:
        t.join()
    with open(pre_path, "w") as f:
        for i in range(len(procs)):
            for r in _read(f"{pre_path}.{i}"):
                f.write(json.dumps(r) + "\n")
            if os.path.exists(f"{pre_path}.{i}"):
                os.remove(f"{pre_path}.{i}")
    print(f"[parent] refs + precompile done at {time.time() - start:.0f} s", flush=True)
    left = run_tasks(tasks, results_path, deadline, hard_end=hard_end)
    if opts.grad64k:
        name = opts.grad64k
        if name == "best":
            ok = [r for r in _read(results_path) if r["task"] == "variant"
                  and r.get("L_pass") and r.get("S_pass") and r.get("Lnz_pass", True)
                  and "L_fwd_bwd_ms" in r]
            name = min(ok, key=lambda r: r["L_fwd_bwd_ms"])["name"] if ok else ""
        if name:
            left += run_tasks([{"kind": "grad64k", "name": name, "limit_s": 150}],
                              results_path, deadline + 40, hard_end=hard_end, tag="g64")
    recs = _read(results_path)
    _write_summary({"shapes": SHAPES, "eq_batch": EQ_BATCH, "variants": VARIANTS,
                    "tol_bf16": BF16_TOL, "results": recs, "precompile": _read(pre_path)},
                   left, start)
    table(recs)


if __name__ == "__main__":
    main()
