"""The selective scan at the HiSS low level's shapes (many short sequences): one device call.

    python3 benchmarks/gpu_selective_scan_short.py      # writes $OUT/selective_scan_short.json

HiSS runs its low-level Mamba over batch x (input steps / chunk) sequences of `chunk` steps:
the throughput benchmark's low level is (12 800, 10, 256 channels, d_state 16) in float32, with
z, D, delta_bias and softplus (the MambaMixer call). Per shape and BlockSizes variant: relative
L2 error of y and of every gradient against impl="xla", and the issue's timing (jit, 2 warm-up
calls, mean of 50 back-to-back calls, one block_until_ready) of the forward and of the
forward+backward (jax.grad of sum(y) w.r.t. every float input). Table printed last.
BENCH_SMALL=1: tiny shapes in interpret mode (a CPU dry run).
"""
import json
import os
import sys
import time
import traceback

sys.path.insert(0, ".")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels.selective_scan import (BlockSizes, selective_scan,  # noqa: E402
                                    selective_scan_pallas)

SMALL = os.environ.get("BENCH_SMALL") == "1"
OUT = os.environ.get("OUT", "/tmp")
SHAPES = {"low10": (12800, 10, 256, 16), "low64": (2048, 64, 256, 16)}
N_CALLS = 50
if SMALL:
    SHAPES, N_CALLS = {"low10": (4, 10, 40, 16), "low64": (2, 64, 40, 16)}, 2
VARIANTS = {
    "v3": BlockSizes(layout="tile", fast_math=False, carry_prefetch=False, bc_f32=False),
    "v5 (16/16)": BlockSizes(block_d=16, bwd_block_d=16),
    "32/32": BlockSizes(block_d=32, bwd_block_d=32),
    "64/64": BlockSizes(block_d=64, bwd_block_d=64),
    "default": None,
}
ARGN = ("u", "delta", "A", "B", "C", "D", "delta_bias", "z")


def inputs(b, l, d, n, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    dt0 = jnp.exp(jax.random.uniform(ks[4], (d,)) * (np.log(0.1) - np.log(1e-3)) + np.log(1e-3))
    return dict(u=jax.random.normal(ks[0], (b, l, d)),
                delta=0.1 * jax.random.normal(ks[1], (b, l, d)),
                A=-jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n)),
                B=jax.random.normal(ks[2], (b, l, n)), C=jax.random.normal(ks[3], (b, l, n)),
                D=jnp.ones((d,), jnp.float32), delta_bias=dt0 + jnp.log(-jnp.expm1(-dt0)),
                z=jax.random.normal(ks[5], (b, l, d)))


def fns(impl, bs):
    def fwd(**kw):
        kw = dict(kw)
        u, delta, A, B, C = (kw.pop(k) for k in ("u", "delta", "A", "B", "C"))
        opts = dict(z=kw.pop("z"), delta_bias=kw.pop("delta_bias"), delta_softplus=True)
        if impl == "pallas":  # block_sizes None: the wrapper's length-aware default
            return selective_scan_pallas(u, delta, A, B, C, kw.pop("D"), block_sizes=bs, **opts)
        return selective_scan(u, delta, A, B, C, kw.pop("D"), impl=impl, **opts)

    def loss(*xs):
        return jnp.sum(fwd(**dict(zip(ARGN, xs))))

    return (jax.jit(lambda *xs: fwd(**dict(zip(ARGN, xs)))),
            jax.jit(jax.grad(loss, argnums=tuple(range(len(ARGN))))))


def mean_ms(f, args):
    for _ in range(2):
        jax.block_until_ready(f(*args))
    t = time.perf_counter()
    out = None
    for _ in range(N_CALLS):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / N_CALLS * 1e3


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": []}
    for shape, (b, l, d, n) in SHAPES.items():
        args = [inputs(b, l, d, n)[k] for k in ARGN]
        xf, xg = fns("xla", None)
        ref_y, ref_g = xf(*args), xg(*args)
        rows = [("xla", None)] + [(k, v) for k, v in VARIANTS.items()]
        for name, bs in rows:
            row = {"shape": shape, "dims": [b, l, d, n], "variant": name}
            try:
                f, g = (xf, xg) if name == "xla" else fns("pallas", bs)
                if name != "xla":
                    row["err_y"] = rel(f(*args), ref_y)
                    row["err_grad"] = max(rel(a, r) for a, r in zip(g(*args), ref_g))
                row["fwd_ms"], row["fwd_bwd_ms"] = mean_ms(f, args), mean_ms(g, args)
            except Exception as e:  # noqa: BLE001 (a variant that fails is a row)
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                traceback.print_exc()
            res["rows"].append(row)
            print(row, flush=True)
            with open(os.path.join(OUT, "selective_scan_short.json"), "w") as fh:
                json.dump(res, fh, indent=1)
    print(f"\n{'shape':7} {'variant':11} {'fwd ms':>8} {'fwd+bwd':>8} {'err y':>8} {'err grad':>8}")
    for r in res["rows"]:
        print(f"{r['shape']:7} {r['variant']:11} {r.get('fwd_ms', float('nan')):8.3f} "
              f"{r.get('fwd_bwd_ms', float('nan')):8.3f} {r.get('err_y', 0):8.1e} "
              f"{r.get('err_grad', 0):8.1e} {r.get('error', '')[:60]}")


if __name__ == "__main__":
    main()
