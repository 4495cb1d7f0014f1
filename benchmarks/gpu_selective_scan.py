"""GPU check and timing of the selective scan (Mamba-1) variants: one script, one device call.

    python3 benchmarks/gpu_selective_scan.py        # writes $OUT/selective_scan_gpu.json

Every variant is a `BlockSizes` (VARIANTS below; BENCH_VARIANTS=a,b picks some).
0. All jitted functions (every variant x shape) are lowered and compiled in a thread pool
   first, so the Triton compiles overlap; a compile that fails or outlasts the budget
   disables that variant only.
1. Equivalence, bf16 tolerances of tests/conftest.py, relative L2 error against a float64
   reference (the sequential spec under jax_enable_x64, computed at the end):
   - S (b64 L1024 d256 n16): y and the gradient of sum(y) w.r.t. every float input;
   - L (b8 L4096 d2048 n16): y, du, ddelta, dB, dC of the first two sequences (the reference
     runs on those two only; dA, dD, dbias sum over the batch);
   - odd (b3 L1000 d200 n12, 2 groups, z, initial state): y, final state and the vjp of a
     random cotangent w.r.t. every input.
   At S and L the checked functions are the timed ones.
2. NaN/inf check of the default at length 65536.
3. Timings under jax.jit, the issue's method: warm-up (at least 2 calls and 50 ms of calls;
   session 11, from run mgpu55), mean of 50 back-to-back calls,
   one block_until_ready; forward, and forward+backward (jax.grad of sum(y) w.r.t. every
   float input). Shapes L and S: D, delta_bias, softplus, no z, bf16 u/delta/B/C, float32
   A/D/bias. The first two variants are timed twice (start and end) to show the noise.
BENCH_SMALL=1 runs the whole script on CPU in interpret mode at tiny shapes (a dry run).

    python3 benchmarks/gpu_selective_scan.py --mgpu   # writes $OUT/selective_scan_h100_mgpu.json

--mgpu (or BENCH_MGPU=1) swaps the variant list for the Mosaic GPU kernels
(kernels/selective_scan_mgpu.py, `MgpuBlockSizes` variants) against v5, impl="xla"
and the peer jax-linear-attention 0.1.0 (`jla.ops.mosaic_gpu.mamba1.mamba1`; install its wheel
first, e.g. `pip install --no-deps --target /tmp/site .whl/jax_linear_attention-0.1.0-*.whl`
and put /tmp/site on PYTHONPATH; without it the peer is reported as a compile failure).
"""
import concurrent.futures as cf
import json
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, ".")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels.selective_scan import (BlockSizes, selective_scan,  # noqa: E402
                                    selective_scan_pallas)
from kernels.selective_scan_mgpu import MgpuBlockSizes, selective_scan_mgpu  # noqa: E402

try:
    from tests.conftest import TOLERANCES
    BF16_TOL = TOLERANCES["bfloat16"]
except Exception:  # pytest may be missing on the device: the same numbers, copied.
    BF16_TOL = {"out": 2e-2, "grad": 3e-2}

T0 = time.time()
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "270"))
OUT = os.environ.get("OUT", "/tmp")
SMALL = os.environ.get("BENCH_SMALL") == "1"
SHAPES = {"S": (64, 1024, 256, 16), "L": (8, 4096, 2048, 16)}
ODD = dict(b=3, l=1000, d=200, n=12, g=2)
NAN_LEN, N_CALLS, N_REF, WARM_S = 65536, 50, 2, 0.05
if SMALL:
    SHAPES = {"S": (2, 40, 32, 16), "L": (3, 70, 64, 16)}
    ODD = dict(b=2, l=37, d=20, n=5, g=2)
    NAN_LEN, N_CALLS, WARM_S = 300, 2, 0.0

# Run 5 (results/selective_scan_h100_v5.json): "v4_bd16" became the default (v5 in the notes);
# every entry names its block sizes, so the list times the same kernels whatever the default.
V3 = dict(layout="tile", fast_math=False, carry_prefetch=False, bc_f32=False)
VARIANTS = {
    "v3": BlockSizes(**V3),                                   # the v3 kernel, unchanged
    "v4a": BlockSizes(block_d=32),                            # run 4's v4 (32/32 channels)
    "v4_f16": BlockSizes(block_d=16, bwd_block_d=32),         # 2 warps per scheduler (fwd)
    "v4_bd16": BlockSizes(block_d=16, bwd_block_d=16),
    "v4_f8": BlockSizes(block_d=8, bwd_block_d=32),
    "v4_f16b8": BlockSizes(block_d=16, bwd_block_d=8),
    "v4_shfl": BlockSizes(block_d=32, bc_shuffle=True),       # B/C by shuffles, no smem
    "v4_f16u8": BlockSizes(block_d=16, bwd_block_d=32, unroll=8),
    "v4_f8b16": BlockSizes(block_d=8, bwd_block_d=16),
    "v4_shflb16": BlockSizes(block_d=32, bwd_block_d=16, bc_shuffle=True),
}
# The odd-shape check runs the kernels' other code paths (z, groups, initial state, padding);
# the tuning variants share that code with "v4", so only these compile it (compile time).
ODD_VARIANTS = ("v4a", "v4_f16", "v4_bd16", "v4_f8", "v4_f16b8", "v4_shfl")
MGPU = "--mgpu" in sys.argv or os.environ.get("BENCH_MGPU") == "1"
if MGPU:
    # Strings name an impl of `selective_scan` ("pallas": the public route), or "peer";
    # MgpuBlockSizes the Mosaic GPU kernels. Run 2 (results/selective_scan_h100_mgpu2.json):
    # each Mosaic backward compile took 30-100+ s with 16 compiles in parallel, past the
    # compile budget: keep few Mosaic-backward variants per call.
    VARIANTS = {
        "v5": BlockSizes(block_d=16, bwd_block_d=16),              # the Triton default
        "mgpu": MgpuBlockSizes(),                                   # the Mosaic default
        "mgpu_c16": MgpuBlockSizes(bwd_chunk=16, bwd_tile=16, bwd_stages=1),  # half the states
        "mgpu_fu2": MgpuBlockSizes(unroll=2),
        "mgpu_s4": MgpuBlockSizes(stages=4),
        "mgpu_tbwd": MgpuBlockSizes(backward="triton"),             # Mosaic fwd + Triton bwd
        "mgpu_bcf32": MgpuBlockSizes(bc_f32=True),                 # f32 B/C converted by XLA
        # Session 5 (run mgpu10: chunk-entry states by TMA, -4.5% fwd+bwd at L): the
        # recompute loop unrolled (two steps' chains interleave; the adjoint stays at 1).
        "mgpu_ru1": MgpuBlockSizes(bwd_recompute_unroll=1),       # run mgpu10's default
        "mgpu_ru4": MgpuBlockSizes(bwd_recompute_unroll=4),
        "mgpu_ru8": MgpuBlockSizes(bwd_recompute_unroll=8),
        "mgpu_ru2": MgpuBlockSizes(bwd_recompute_unroll=2),       # run mgpu45's default
        "mgpu_u2": MgpuBlockSizes(bwd_unroll=2),   # the adjoint unrolled (run mgpu12: +33%)
        "mgpu_t16": MgpuBlockSizes(bwd_tile=16),
        "mgpu_fu4": MgpuBlockSizes(unroll=4),                     # forward unroll 4 (mgpu13)
        "mgpu_fu16": MgpuBlockSizes(unroll=16),
        "mgpu_ft32s3": MgpuBlockSizes(tile=32, stages=3),          # run mgpu14's forward
        "mgpu_ft64s3": MgpuBlockSizes(tile=64, stages=3),
        # Session 6: two warpgroups per backward block, half the states each (two warps per
        # scheduler; the backward tile halves to 16 steps to fit shared memory), and dt,
        # sigmoid(x) once per tile (bwd_dt_tile). Run mgpu19: both together -4.8% fwd+bwd at
        # L, either alone slower.
        "mgpu_w1": MgpuBlockSizes(bwd_warpgroups=1, bwd_dt_tile=False),   # run mgpu17's
        "mgpu_wg2": MgpuBlockSizes(bwd_warpgroups=2, bwd_dt_tile=False),
        "mgpu_wg2u2": MgpuBlockSizes(bwd_warpgroups=2, bwd_unroll=2, bwd_dt_tile=False),
        "mgpu_dtt": MgpuBlockSizes(bwd_warpgroups=1, bwd_dt_tile=True),
        "mgpu_wg2dtt": MgpuBlockSizes(bwd_warpgroups=2),   # run mgpu19 (+ in-kernel combine)
        "mgpu_wg2u2dtt": MgpuBlockSizes(bwd_warpgroups=2, bwd_unroll=2),
        "mgpu_wg2u2ru4dtt": MgpuBlockSizes(bwd_warpgroups=2, bwd_unroll=2,
                                           bwd_recompute_unroll=4),
        "mgpu_t8": MgpuBlockSizes(bwd_warpgroups=2, bwd_tile=8),
        # Four warpgroups, 4 states each; 8-step tiles (no z: with z 2 warpgroups fit).
        # Run mgpu21: the default since.
        "mgpu_wg4": MgpuBlockSizes(bwd_warpgroups=4),
        "mgpu_wg4ru1": MgpuBlockSizes(bwd_warpgroups=4, bwd_recompute_unroll=1),
        # Session 7: 16-byte shared-memory accesses in the backward (bwd_vec_smem) and the
        # TMA issue moved off the finalizing warpgroups, no ring barrier (bwd_lean_sync).
        "mgpu_s6": MgpuBlockSizes(bwd_vec_smem=False, bwd_lean_sync=False),  # session 6's
        "mgpu_vec": MgpuBlockSizes(bwd_lean_sync=False),
        "mgpu_lean": MgpuBlockSizes(bwd_vec_smem=False),
        # Session 9: the cross-block sums in one Triton launch (bwd_fused_sums) and dB/dC
        # added over the blocks by red.global in the kernel (bwd_dbc_atomic).
        "mgpu_s8": MgpuBlockSizes(bwd_fused_sums=False, bwd_dbc_atomic=False),  # session 8's
        "mgpu_fsum": MgpuBlockSizes(bwd_dbc_atomic=False),
        "mgpu_atom": MgpuBlockSizes(bwd_fused_sums=False),
        # Session 10: the dB/dC sums zeroed by the state-saving forward (fwd_zeroes), the
        # ddt term in log2 units (bwd_sa_log2: A not held in registers).
        "mgpu_s9": MgpuBlockSizes(fwd_zeroes=False, bwd_sa_log2=False,   # session 9's
                                  bwd_warp_rows=False, bwd_bc_f32=False,
                                  bwd_recompute_unroll=2),
        "mgpu_fz": MgpuBlockSizes(bwd_sa_log2=False),
        "mgpu_sa2": MgpuBlockSizes(fwd_zeroes=False),
        # Session 11: B/C converted to f32 by XLA for the backward (bwd_bc_f32: no per-tile
        # conversion, nor its warpgroup barrier, in the backward) and the dB/dC tile reduced
        # by the warps that wrote it (bwd_warp_rows: a warp barrier per reduction group
        # instead of a warpgroup barrier). Both on: the default since run mgpu52. (Measured
        # and removed, the notes have them: a_t h_{t-1} stored every other step, per-warpgroup
        # entry-state slots, the state-saving forward writing f32 B/C, a two-warpgroup forward.)
        "mgpu_bbf": MgpuBlockSizes(bwd_warp_rows=False),
        "mgpu_wr": MgpuBlockSizes(bwd_bc_f32=False),
        "mgpu_s10": MgpuBlockSizes(bwd_warp_rows=False, bwd_bc_f32=False,   # session 10's
                                   bwd_recompute_unroll=2),                 # (its L unroll)
        "pallas": "pallas",
        "xla": "xla",
        "peer": "peer",
    }
    ODD_VARIANTS = ("v5", "mgpu", "mgpu_tbwd", "mgpu_w1", "mgpu_wg2", "mgpu_dtt", "mgpu_wg4")
ONLY = [v for v in os.environ.get("BENCH_VARIANTS", "").split(",") if v]
if ONLY:
    VARIANTS = {k: v for k, v in VARIANTS.items() if k in ONLY}
ARGN = ("u", "delta", "A", "B", "C", "D", "delta_bias")
RESULTS = {"jax": jax.__version__, "device": str(jax.devices()[0]), "bf16_tol": BF16_TOL,
           "variants": {k: repr(v) for k, v in VARIANTS.items()}, "compile_s": {},
           "check": {}, "nan": {}, "time_ms": {}, "errors": {}}


def left():
    return BUDGET_S - (time.time() - T0)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def inputs(b, l, d, n, g=None, z=False, h0=False, seed=0, dtype=jnp.bfloat16):
    """Mamba-1 at init: A = -(1..N) (S4D-real), delta_bias = softplus^-1(dt), dt log-uniform
    in [1e-3, 1e-1], the projected delta small; activations bf16."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    bc = (b, l, n) if g is None else (b, l, g, n)
    dt0 = jnp.exp(jax.random.uniform(ks[5], (d,)) * (np.log(0.1) - np.log(1e-3)) + np.log(1e-3))
    args = dict(
        u=jax.random.normal(ks[0], (b, l, d)).astype(dtype),
        delta=(0.1 * jax.random.normal(ks[1], (b, l, d))).astype(dtype),
        A=-jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n)),
        B=jax.random.normal(ks[2], bc).astype(dtype),
        C=jax.random.normal(ks[3], bc).astype(dtype),
        D=jnp.ones((d,), jnp.float32),
        delta_bias=dt0 + jnp.log(-jnp.expm1(-dt0)),
    )
    if z:
        args["z"] = jax.random.normal(ks[4], (b, l, d)).astype(dtype)
    if h0:
        args["initial_state"] = jax.random.normal(ks[6], (b, d, n), jnp.float32)
    return args


def peer_scan(u, delta, A, B, C, D=None, delta_bias=None, z=None, initial_state=None):
    """The peer jax-linear-attention 0.1.0 (Mosaic GPU): q = C, k = B, v = u."""
    from jla.ops.mosaic_gpu.mamba1 import mamba1
    return mamba1(C, B, u, delta, A, d=D, z=z, dt_bias=delta_bias, dt_softplus=True,
                  initial_state=initial_state, output_final_state=True)


def scan(bs, impl=None):
    """(**kw) -> (y, h_L) for a BlockSizes (pallas), an MgpuBlockSizes (Mosaic GPU forward),
    an impl name, or "peer"."""
    if isinstance(bs, str):
        bs, impl = None, bs
    if impl == "peer":
        return peer_scan

    def f(**kw):
        if isinstance(bs, MgpuBlockSizes):
            return selective_scan_mgpu(**kw, delta_softplus=True, return_final_state=True,
                                       block_sizes=bs)
        if impl is not None:
            return selective_scan(**kw, delta_softplus=True, return_final_state=True,
                                  impl=impl)
        return selective_scan_pallas(**kw, delta_softplus=True, return_final_state=True,
                                     block_sizes=bs)
    return f


def timed_fns(fn, names):
    """fwd(*v) -> y ; grad(*v) -> d sum(y) / d v (every input): what the issue times."""
    def fwd(*v):
        return fn(**dict(zip(names, v)))[0]

    def loss(*v):
        return jnp.sum(fn(**dict(zip(names, v)))[0].astype(jnp.float32))
    return fwd, jax.grad(loss, argnums=tuple(range(len(names))))


def vjp_fn(fn, names):
    """(vals, cts) -> ((y, h), vjp(cts)): the odd-shape check, random cotangents."""
    def f(vals, cts):
        out, pull = jax.vjp(lambda *v: fn(**dict(zip(names, v))), *vals)
        return out, pull(cts)
    return f


def rel(a, e):
    a = np.asarray(a, np.float64)
    e = np.asarray(e, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def host(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


# ------------------------------------------------------------------ 0. compile everything
DATA = {}
for sname, (b, l, d, n) in SHAPES.items():
    DATA[sname] = inputs(b, l, d, n, seed=2)
odd_args = inputs(**ODD, z=True, h0=True, seed=1)
odd_names = list(odd_args)
odd_vals = [odd_args[k] for k in odd_names]
k1, k2 = jax.random.split(jax.random.PRNGKey(7))
odd_cts = (jax.random.normal(k1, (ODD["b"], ODD["l"], ODD["d"])).astype(jnp.bfloat16),
           jax.random.normal(k2, (ODD["b"], ODD["d"], ODD["n"]), jnp.float32))
nan_args = inputs(b=1, l=NAN_LEN, d=256, n=16, seed=3)

JOBS = {}   # (variant, what) -> (fn, args)
for vname, bs in VARIANTS.items():
    for sname in SHAPES:
        fwd, grad = timed_fns(scan(bs), list(ARGN))
        vals = [DATA[sname][k] for k in ARGN]
        JOBS[(vname, f"{sname}/fwd")] = (fwd, vals)
        JOBS[(vname, f"{sname}/grad")] = (grad, vals)
    if vname in ODD_VARIANTS:
        JOBS[(vname, "odd")] = (vjp_fn(scan(bs), odd_names), (odd_vals, odd_cts))
first = next(iter(VARIANTS))
default = "v4_f16" if "v4_f16" in VARIANTS else first
if MGPU:
    default = "mgpu"
_, nan_grad = timed_fns(scan(VARIANTS[default]), list(ARGN))
JOBS[(default, "nan")] = (nan_grad, [nan_args[k] for k in ARGN])


def dump_sass(key, path):
    """Compiles JOBS[key] once with Mosaic GPU's SASS and ptxas dumps (printed by the compiler
    on fd 1) sent to `path`: instructions per step and registers, read after the run."""
    fn, args = JOBS[key]
    sys.stdout.flush()
    saved, fd = os.dup(1), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.environ.update(MOSAIC_GPU_DUMP_SASS="1", MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_PTX="1")
    try:
        jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001
        print("SASS dump compile failed:", repr(e)[:3000])
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(fd)
        for k in ("MOSAIC_GPU_DUMP_SASS", "MOSAIC_GPU_DUMP_PTXAS", "MOSAIC_GPU_DUMP_PTX"):
            os.environ.pop(k, None)


# BENCH_SASS=v1,v2: the ptxas report of those variants' L/grad (the GPU machine has no
# nvdisasm: ptxas's register / spill report only), one file per variant under $OUT.
for _v in [v for v in os.environ.get("BENCH_SASS", "").split(",") if v] if MGPU else []:
    if (_v, "L/grad") in JOBS:
        os.makedirs(OUT, exist_ok=True)
        dump_sass((_v, "L/grad"), os.path.join(OUT, f"sass_{_v}.txt"))
        log(f"SASS / ptxas report of {_v} L/grad dumped")


def build(key):
    fn, args = JOBS[key]
    t = time.time()
    c = jax.jit(fn).lower(*args).compile()
    return c, time.time() - t


COMPILED, DEAD = {}, set()
with cf.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
    futs = {pool.submit(build, k): k for k in JOBS}
    try:
        for fut in cf.as_completed(futs, timeout=max(left() - 120, 30)):
            key = futs[fut]
            try:
                COMPILED[key], dt = fut.result()
                RESULTS["compile_s"]["/".join(key)] = round(dt, 1)
            except Exception as e:  # noqa: BLE001
                RESULTS["errors"]["compile/" + "/".join(key)] = repr(e)[:3000]
                log("compile FAILED", key, repr(e)[:3000 if MGPU else 600])
                DEAD.add(key[0])
    except cf.TimeoutError:
        for fut, key in futs.items():
            if key not in COMPILED and key[0] not in DEAD:
                RESULTS["errors"]["compile/" + "/".join(key)] = "compile timed out"
                log("compile timed out", key)
                DEAD.add(key[0])
        pool.shutdown(wait=False, cancel_futures=True)
log("compiled:", len(COMPILED), "of", len(JOBS), " max compile s:",
    max(RESULTS["compile_s"].values(), default=0))


# ------------------------------------------------------------------ 1a. outputs to check later
STORED = {}
for vname in VARIANTS:
    if vname in DEAD:
        continue
    try:
        st = {}
        for sname in SHAPES:
            vals = [DATA[sname][k] for k in ARGN]
            y = COMPILED[(vname, f"{sname}/fwd")](*vals)
            gs = COMPILED[(vname, f"{sname}/grad")](*vals)
            if sname == "S":
                st["S"] = {"y": host(y), **{f"d{k}": host(g) for k, g in zip(ARGN, gs)}}
            else:
                sel = dict(zip(ARGN, gs))
                st["L"] = {"y": host(y[:N_REF]),
                           **{f"d{k}": host(sel[k][:N_REF]) for k in ("u", "delta", "B", "C")}}
        if (vname, "odd") in COMPILED:
            (y, h), gs = COMPILED[(vname, "odd")](odd_vals, odd_cts)
            st["odd"] = {"y": host(y), "h": host(h),
                         **{f"d{k}": host(g) for k, g in zip(odd_names, gs)}}
        STORED[vname] = st
        log(f"outputs of {vname}: stored")
    except Exception as e:  # noqa: BLE001
        RESULTS["errors"][f"run/{vname}"] = repr(e)[:600]
        log(f"run {vname}: FAILED {e!r}"[:800])
        DEAD.add(vname)

# ------------------------------------------------------------------ 2. NaN check at 64k
if (default, "nan") in COMPILED:
    try:
        gs = COMPILED[(default, "nan")](*[nan_args[k] for k in ARGN])
        fin = {f"d{k}": bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
               for k, g in zip(ARGN, gs)}
        RESULTS["nan"] = {"variant": default, f"L{NAN_LEN}_all_finite": all(fin.values()),
                          "detail": fin}
        log(f"nan check {default} {NAN_LEN}:", all(fin.values()))
    except Exception as e:  # noqa: BLE001
        RESULTS["errors"]["nan"] = repr(e)[:500]


# ------------------------------------------------------------------ 3. timings
def bench(f, vals, n=N_CALLS, warm_s=WARM_S):
    # Warm-up: at least 2 calls and WARM_S seconds of back-to-back calls, so that the GPU is
    # busy at its full clock when the timed calls start (session 11: after 2 calls only, the
    # first timing of a run was up to 8% slow at S, 0.125-0.130 against 0.116-0.119 ms).
    jax.block_until_ready(f(*vals))
    t = time.perf_counter()
    k = 0
    while k < 2 or time.perf_counter() - t < warm_s:
        out = f(*vals)
        k += 1
        if k % 10 == 0:
            jax.block_until_ready(out)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(n):
        out = f(*vals)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3


def gpu_state():
    """SM clock, temperature and power from nvidia-smi (if present), to tell a throttled or
    shared GPU from a slow kernel when a timing is far off its repeat (runs mgpu13-16)."""
    try:
        import subprocess
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,temperature.gpu,power.draw,utilization.gpu",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return repr(e)[:200]


RESULTS["gpu_state"] = {"before_timings": gpu_state()}
order = [v for v in VARIANTS if v not in DEAD]
repeat = order[:2]
for tag, names in (("", order), ("_again", repeat)):
    for vname in names:
        for sname in SHAPES:
            if left() < 35:
                log(f"time budget spent: skipping {sname}/{vname}{tag}")
                continue
            vals = [DATA[sname][k] for k in ARGN]
            try:
                tf = bench(COMPILED[(vname, f"{sname}/fwd")], vals)
                tb = bench(COMPILED[(vname, f"{sname}/grad")], vals)
                RESULTS["time_ms"][f"{sname}/{vname}{tag}"] = {"fwd": tf, "fwd_bwd": tb,
                                                               "gpu": gpu_state()}
                log(f"time {sname} {vname}{tag}: fwd {tf:.3f} ms  fwd+bwd {tb:.3f} ms")
            except Exception as e:  # noqa: BLE001
                RESULTS["errors"][f"time/{sname}/{vname}{tag}"] = repr(e)[:500]
                log(f"time {sname} {vname}: FAILED", repr(e)[:800])

# ------------------------------------------------------------------ 1b. float64 references
try:
    jax.config.update("jax_enable_x64", True)
    ref = {}
    a64 = {k: jnp.asarray(host(v), jnp.float64) for k, v in DATA["S"].items()}
    fwd, grad = timed_fns(scan(None, "ref"), list(ARGN))
    vals = [a64[k] for k in ARGN]
    ref["S"] = {"y": jax.jit(fwd)(*vals),
                **{f"d{k}": g for k, g in zip(ARGN, jax.jit(grad)(*vals))}}
    a64 = {k: jnp.asarray(host(v[:N_REF] if k in ("u", "delta", "B", "C") else v), jnp.float64)
           for k, v in DATA["L"].items()}
    vals = [a64[k] for k in ARGN]
    gl = dict(zip(ARGN, jax.jit(grad)(*vals)))
    ref["L"] = {"y": jax.jit(fwd)(*vals), **{f"d{k}": gl[k] for k in ("u", "delta", "B", "C")}}
    o64 = [jnp.asarray(host(v), jnp.float64) for v in odd_vals]
    c64 = tuple(jnp.asarray(host(c), jnp.float64) for c in odd_cts)
    (y, h), gs = jax.jit(vjp_fn(scan(None, "ref"), odd_names))(o64, c64)
    ref["odd"] = {"y": y, "h": h, **{f"d{k}": g for k, g in zip(odd_names, gs)}}
    log("float64 references computed")
    for vname, st in STORED.items():
        for cname, outs in st.items():
            errs = {k: rel(v, ref[cname][k]) for k, v in outs.items()}
            ok = (max(v for k, v in errs.items() if not k.startswith("d")) <= BF16_TOL["out"]
                  and max(v for k, v in errs.items() if k.startswith("d")) <= BF16_TOL["grad"])
            RESULTS["check"][f"{cname}/{vname}"] = {"ok": ok, **errs}
            log(f"check {cname} {vname}: ok={ok} worst {max(errs.values()):.2e}")
except Exception as e:  # noqa: BLE001
    RESULTS["errors"]["f64"] = repr(e)[:500]
    log("f64 reference FAILED", repr(e)[:800])
    traceback.print_exc(limit=3)

# ------------------------------------------------------------------ table + json
os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "selective_scan_h100_mgpu.json" if MGPU else
                       "selective_scan_gpu.json"), "w") as f:
    json.dump(RESULTS, f, indent=1)
print("\n=== selective scan, ms (mean of 50 jit calls); worst rel err over S, L[, odd] ===")
print(f"{'variant':16s} {'L fwd':>8s} {'L f+b':>8s} {'S fwd':>8s} {'S f+b':>8s} {'ok':>3s} "
      f"{'worst':>8s}")
tm = RESULTS["time_ms"]
ROWS = list(VARIANTS) + [v + "_again" for v in repeat]


def cells(vname):
    """L fwd, L fwd+bwd, S fwd, S fwd+bwd of a variant (ms; nan where not timed)."""
    return [tm.get(f"{sname}/{vname}", {}).get(k, float("nan"))
            for sname in ("L", "S") for k in ("fwd", "fwd_bwd")]


for vname in ROWS:
    base = vname.replace("_again", "")
    chk = [v for k, v in RESULTS["check"].items() if k.endswith("/" + base)]
    ok = all(c["ok"] for c in chk) and len(chk) == (3 if base in ODD_VARIANTS else 2)
    worst = max((x for c in chk for k, x in c.items() if k != "ok"), default=float("nan"))
    print(f"{vname:16s} " + " ".join(f"{c:8.3f}" for c in cells(vname))
          + f" {'y' if ok else 'N':>3s} {worst:8.2e}")
xla = cells("xla")
if not np.isnan(xla).any():
    # Speed-up over impl="xla" (jax.lax.associative_scan) measured in the same call.
    print(f"\n=== speed-up over impl='xla' (same call) ===\n{'variant':16s} {'L fwd':>8s} "
          f"{'L f+b':>8s} {'S fwd':>8s} {'S f+b':>8s}")
    for vname in ROWS:
        print(f"{vname:16s} " + " ".join(f"{x / c:7.1f}x" for x, c in zip(xla, cells(vname))))
print("nan:", RESULTS["nan"].get(f"L{NAN_LEN}_all_finite"), " errors:", list(RESULTS["errors"]))
log("done")
sys.stdout.flush()
os._exit(0)     # do not wait for a compile thread that timed out
