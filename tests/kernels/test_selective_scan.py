"""Selective scan (Mamba-1): every impl against the sequential reference.

Shapes stay tiny: the Pallas kernels run in interpret mode on CPU. Lengths are odd on purpose
(not multiples of any block or chunk).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.selective_scan import (BlockSizes, selective_scan, selective_scan_associative,
                                    selective_scan_pallas, selective_scan_reference)
from tests.conftest import TOLERANCES, assert_close

FLOAT_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(seed, b, l, di, n, g=None, dtype=jnp.float32, D=True, z=True, bias=True,
                h0=True, softplus=True):
    """Random inputs in the ranges Mamba trains in: A < 0, step sizes around 0.01 to 1."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    bc_shape = (b, l, n) if g is None else (b, l, g, n)
    args = {
        "u": jax.random.normal(ks[0], (b, l, di)).astype(dtype),
        "delta": (jax.random.normal(ks[1], (b, l, di)) * 0.5 - (1.0 if softplus else 0.0)),
        "A": -jnp.exp(jax.random.normal(ks[2], (di, n)) * 0.5),
        "B": jax.random.normal(ks[3], bc_shape).astype(dtype),
        "C": jax.random.normal(ks[4], bc_shape).astype(dtype),
        "D": jax.random.normal(ks[5], (di,)) if D else None,
        "z": jax.random.normal(ks[6], (b, l, di)).astype(dtype) if z else None,
        "delta_bias": jax.random.normal(ks[7], (di,)) * 0.3 if bias else None,
        "initial_state": jax.random.normal(ks[8], (b, di, n)) if h0 else None,
    }
    if not softplus:
        # Without softplus the raw delta is the step size: keep it positive.
        args["delta"] = jnp.abs(args["delta"]) * 0.5
        if bias:
            args["delta_bias"] = jnp.abs(args["delta_bias"])
    args["delta"] = args["delta"].astype(dtype)
    return args


def run_with_grads(impl, args, softplus, seed=123):
    """(y, h_L) and the vjp of a random cotangent w.r.t. every float input that is given.

    `impl` is an impl name of `selective_scan` or a function with its signature (minus impl).
    """
    names = [k for k in FLOAT_ARGS if args[k] is not None]
    fn = functools.partial(selective_scan, impl=impl) if isinstance(impl, str) else impl

    def f(*vals):
        kw = dict(args)
        kw.update(zip(names, vals))
        return fn(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                  kw["delta_bias"], delta_softplus=softplus, initial_state=kw["initial_state"],
                  return_final_state=True)

    vals = [args[k] for k in names]
    y_shape, h_shape = jax.eval_shape(f, *vals)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    dy = jax.random.normal(k1, y_shape.shape).astype(y_shape.dtype)
    dh = jax.random.normal(k2, h_shape.shape, h_shape.dtype)

    @jax.jit  # one compile instead of op-by-op dispatch: keeps the CPU suite fast
    def forward_and_vjp(vals, cts):
        out, vjp = jax.vjp(f, *vals)
        return out, vjp(cts)

    (y, h), grads = forward_and_vjp(vals, (dy, dh))
    return y, h, dict(zip(names, grads))


def check_against_ref(impl, args, softplus, dtype):
    y_ref, h_ref, g_ref = run_with_grads("ref", args, softplus)
    y, h, g = run_with_grads(impl, args, softplus)
    assert y.dtype == args["u"].dtype and y.shape == args["u"].shape
    assert h.dtype == jnp.float32
    assert_close(y, y_ref, dtype, "out", f"{impl} y")
    assert_close(h, h_ref, dtype, "out", f"{impl} h_L")
    assert set(g) == set(g_ref)
    for k in g_ref:
        assert g[k].dtype == g_ref[k].dtype, k
        assert_close(g[k], g_ref[k], dtype, "grad", f"{impl} d{k}")


# Pallas (interpret mode on CPU): odd lengths/widths/d_state, groups, every optional argument
# on and off, bf16, and tile variants that exercise several chunks, blocks and prefetch depths,
# with the v4 options (lane layout, carried prefetch, float32 B/C) on and off; V3 is the v3
# kernel. (fast_math changes only the compiled GPU code: interpret mode computes softplus
# exactly; the GPU test below and benchmarks/gpu_selective_scan.py check it.)
# (length, d_inner, d_state, n_groups, dtype, optional-args switches, softplus, BlockSizes)
V3 = dict(layout="tile", fast_math=False, carry_prefetch=False, bc_f32=False)
PALLAS_CASES = [
    (1, 4, 3, None, jnp.float32, dict(), True, BlockSizes()),
    (7, 6, 4, None, jnp.float32, dict(D=False, z=False, bias=False, h0=False), False,
     BlockSizes()),
    (33, 40, 5, 2, jnp.float32, dict(z=False), True, BlockSizes(block_d=16, chunk=8, unroll=2)),
    (37, 24, 16, 3, jnp.bfloat16, dict(), True, BlockSizes(unroll=2, prefetch=2)),
    (21, 32, 8, None, jnp.float32, dict(h0=False), False,
     BlockSizes(chunk=4, unroll=1, prefetch=0)),
    (19, 12, 2, 4, jnp.bfloat16, dict(D=False, bias=False), False,
     BlockSizes(chunk=8, unroll=2, prefetch=3)),
    (45, 70, 32, None, jnp.float32, dict(), True, BlockSizes(chunk=32, unroll=8)),
    (29, 48, 16, 2, jnp.float32, dict(), True, BlockSizes(layout="tile")),
    (27, 20, 6, None, jnp.bfloat16, dict(), True,
     BlockSizes(carry_prefetch=False, bc_f32=False)),
    (23, 66, 4, None, jnp.float32, dict(), True,
     BlockSizes(block_d=64, num_warps=2, bwd_block_d=16)),
    (31, 40, 16, 2, jnp.bfloat16, dict(), True, BlockSizes(block_d=8, bwd_block_d=32)),
    (17, 24, 5, 3, jnp.float32, dict(), True, BlockSizes(block_d=16, bwd_block_d=8)),
    (37, 24, 16, 3, jnp.bfloat16, dict(), True, BlockSizes(bc_shuffle=True)),
    (45, 70, 32, None, jnp.float32, dict(), True,
     BlockSizes(bc_shuffle=True, block_d=16, chunk=32, unroll=8)),
    (33, 40, 5, 2, jnp.float32, dict(z=False), True, BlockSizes(bc_shuffle=True, block_d=8)),
    (21, 32, 8, None, jnp.float32, dict(h0=False), False, BlockSizes(bc_shuffle=True)),
    (37, 24, 16, 3, jnp.bfloat16, dict(), True, BlockSizes(unroll=2, prefetch=2, **V3)),
    (33, 40, 5, 2, jnp.float32, dict(z=False), True,
     BlockSizes(block_d=16, chunk=8, unroll=2, **V3)),
    # block_sizes=None: the wrapper's length-aware default (32-channel blocks when short)
    (10, 70, 16, None, jnp.float32, dict(), True, None),
    (11, 40, 16, 2, jnp.bfloat16, dict(), True, None),
]


@pytest.mark.parametrize("l,di,n,g,dtype,opts,softplus,bs", PALLAS_CASES)
def test_pallas_matches_reference(l, di, n, g, dtype, opts, softplus, bs):
    args = make_inputs(l * 3 + di, 2, l, di, n, g, dtype, softplus=softplus, **opts)
    check_against_ref(functools.partial(selective_scan_pallas, block_sizes=bs), args,
                      softplus, dtype)


def test_pallas_is_an_impl_of_selective_scan():
    args = make_inputs(4, 1, 9, 8, 4)
    y = selective_scan(**args, delta_softplus=True, impl="pallas")
    assert_close(y, selective_scan(**args, delta_softplus=True, impl="ref"), jnp.float32)


def test_block_sizes_validate():
    assert BlockSizes.get_default() == BlockSizes()
    # short sequences (the HiSS low level) get 32-channel blocks, long ones the tuned default
    assert BlockSizes.get_default(10) == BlockSizes(block_d=32, bwd_block_d=32)
    assert BlockSizes.get_default(4096) == BlockSizes()
    with pytest.raises(ValueError, match="block_d=24 must be a power of 2"):
        BlockSizes(block_d=24)
    with pytest.raises(ValueError, match="prefetch=-1"):
        BlockSizes(prefetch=-1)
    with pytest.raises(ValueError, match="unroll=8 must be <= chunk=4"):
        BlockSizes(chunk=4, unroll=8)
    with pytest.raises(ValueError, match="layout='rows' must be 'tile' or 'lane'"):
        BlockSizes(layout="rows")
    with pytest.raises(ValueError, match="bwd_block_d=12 must be a power of 2"):
        BlockSizes(bwd_block_d=12)
    with pytest.raises(ValueError, match="bc_shuffle shuffles within one warp"):
        BlockSizes(bc_shuffle=True, block_d=64)
    with pytest.raises(ValueError, match="bc_shuffle shuffles within one warp"):
        BlockSizes(bc_shuffle=True, layout="tile")


@pytest.mark.parametrize("dtype,g,bs", [
    (jnp.bfloat16, None, BlockSizes()),
    (jnp.float32, 3, BlockSizes()),
    (jnp.bfloat16, None, BlockSizes(**V3)),
    (jnp.float32, 3, BlockSizes(layout="tile", unroll=2, prefetch=2)),
    (jnp.bfloat16, None, BlockSizes(block_d=16, bwd_block_d=8)),
    (jnp.float32, 3, BlockSizes(bc_shuffle=True)),
])
def test_pallas_lowers_to_triton_without_gpu(dtype, g, bs):
    # Cross-lowering catches Triton lowering errors (unsupported ops, non power-of-2 values)
    # on CPU; Triton compile failures (registers, shared memory) show only on a GPU.
    args = make_inputs(0, 2, 45, 48, 5, g, dtype)
    names = [k for k in FLOAT_ARGS if args[k] is not None]

    def loss(*vals):
        kw = dict(zip(names, vals))
        y, h = selective_scan_pallas(**kw, delta_softplus=True, return_final_state=True,
                                     block_sizes=bs, interpret=False)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    grad = jax.grad(loss, argnums=tuple(range(len(names))))
    lowered = jax.jit(grad).trace(*[args[k] for k in names]).lower(
        lowering_platforms=("cuda",))
    text = lowered.as_text()
    for kernel in ("selective_scan_fwd", "selective_scan_bwd"):
        assert kernel in text, kernel
    assert text.count("__gpu$xla.gpu.triton") == 2


# (length, d_inner, d_state, n_groups, dtype, optional-args switches, softplus)
XLA_CASES = [
    (1, 4, 3, None, jnp.float32, dict(), True),
    (7, 6, 4, None, jnp.float32, dict(D=False, z=False, bias=False, h0=False), False),
    (33, 8, 5, 2, jnp.float32, dict(), True),
    (33, 8, 4, 4, jnp.float32, dict(z=False, h0=False), False),
    (17, 6, 4, 3, jnp.bfloat16, dict(), True),
    (9, 4, 2, None, jnp.bfloat16, dict(D=False, bias=False), False),
]


@pytest.mark.parametrize("l,di,n,g,dtype,opts,softplus", XLA_CASES)
def test_xla_matches_reference(l, di, n, g, dtype, opts, softplus):
    args = make_inputs(l * 7 + di, 2, l, di, n, g, dtype, softplus=softplus, **opts)
    check_against_ref("xla", args, softplus, dtype)


@pytest.mark.parametrize("impl", ["ref", "xla", "pallas"])
def test_two_halves_with_carried_state_equal_the_whole(impl):
    args = make_inputs(5, 2, 23, 6, 4, 3)
    kw = dict(delta_softplus=True, return_final_state=True, impl=impl)
    seq = ("u", "delta", "B", "C", "z")
    whole_y, whole_h = selective_scan(**args, **kw)
    cut = 10
    first = {k: (v[:, :cut] if k in seq else v) for k, v in args.items()}
    second = {k: (v[:, cut:] if k in seq else v) for k, v in args.items()}
    y1, h1 = selective_scan(**first, **kw)
    second["initial_state"] = h1
    y2, h2 = selective_scan(**second, **kw)
    assert_close(jnp.concatenate([y1, y2], axis=1), whole_y, jnp.float32, "out", "y")
    assert_close(h2, whole_h, jnp.float32, "out", "h_L")


def test_matches_hand_computed_single_channel():
    # One channel, one state, no options: h_t = e^{dA} h + d b u, y = c h (checks the spec
    # itself, not just agreement between implementations).
    u = jnp.array([[[1.0], [2.0], [-1.0]]])
    delta = jnp.array([[[0.5], [0.1], [1.0]]])
    A = jnp.array([[-2.0]])
    B = jnp.array([[[1.0], [0.5], [2.0]]])
    C = jnp.array([[[1.0], [3.0], [-1.0]]])
    h, ys = 0.0, []
    for t in range(3):
        h = np.exp(float(delta[0, t, 0] * A[0, 0])) * h + float(delta[0, t, 0] * B[0, t, 0]
                                                              * u[0, t, 0])
        ys.append(float(C[0, t, 0]) * h)
    for impl in ("ref", "xla", "pallas"):
        y, hl = selective_scan(u, delta, A, B, C, return_final_state=True, impl=impl)
        np.testing.assert_allclose(np.asarray(y)[0, :, 0], ys, rtol=1e-6)
        np.testing.assert_allclose(float(hl[0, 0, 0]), h, rtol=1e-6)


def test_return_final_state_off_returns_only_y():
    args = make_inputs(1, 1, 5, 4, 2)
    y = selective_scan(**args, impl="xla")
    assert isinstance(y, jax.Array) and y.shape == (1, 5, 4)


BAD = [
    (dict(u=(2, 5)), "u must be"),
    (dict(delta=(2, 5, 3)), "delta must"),
    (dict(A=(3, 2)), "A must be"),
    (dict(B=(2, 5, 3)), "B must be"),
    (dict(C=(2, 5, 2, 2)), "C must have"),
    (dict(B=(2, 5, 3, 2), C=(2, 5, 3, 2)), "not divisible by n_groups=3"),
    (dict(D=(3,)), "D must be"),
    (dict(delta_bias=(4, 1)), "delta_bias must be"),
    (dict(z=(2, 5, 3)), "z must have"),
    (dict(initial_state=(2, 4)), "initial_state must be"),
]


@pytest.mark.parametrize("impl", ["ref", "xla", "pallas", "auto"])
@pytest.mark.parametrize("bad,match", BAD)
def test_bad_shapes_raise(impl, bad, match):
    shapes = dict(u=(2, 5, 4), delta=(2, 5, 4), A=(4, 2), B=(2, 5, 2), C=(2, 5, 2), D=(4,),
                  z=(2, 5, 4), delta_bias=(4,), initial_state=(2, 4, 2))
    shapes.update(bad)
    args = {k: jnp.zeros(s) for k, s in shapes.items()}
    with pytest.raises(ValueError, match=match):
        selective_scan(**args, impl=impl)


def test_unknown_impl_names_the_choices():
    args = make_inputs(0, 1, 3, 2, 2)
    with pytest.raises(ValueError, match="'ref', 'xla', 'pallas', 'auto'"):
        selective_scan(**args, impl="cuda")


def test_reference_functions_are_exported():
    args = make_inputs(2, 1, 4, 2, 2)
    y1 = selective_scan_reference(**args, delta_softplus=True)
    y2 = selective_scan_associative(**args, delta_softplus=True)
    assert_close(y2, y1, jnp.float32, "out", "y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_compiled_on_gpu_matches_reference(dtype):
    # The compiled Triton kernels (not interpret mode): registers, barriers and the scratch
    # round trip only show on a GPU.
    args = make_inputs(11, 2, 300, 96, 16, 3, dtype)
    check_against_ref(functools.partial(selective_scan_pallas, interpret=False), args, True,
                      dtype)
