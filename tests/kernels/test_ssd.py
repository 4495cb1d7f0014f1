"""Tests of kernels.ssd: the chunked XLA path and the Pallas kernels against the sequential spec.

x, z: (B, L, H, P)  dt: (B, L, H)  A: (H,)  B, C: (B, L, G, N)  state: (B, H, P, N)
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import ssd
from kernels.ssd import (BlockSizes, ssd_associative_reference, ssd_chunked, ssd_pallas,
                         ssd_reference)
from tests.conftest import assert_close, rel_err

FLOAT_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_inputs(key, b=2, l=33, h=4, p=8, g=2, n=8, dtype=jnp.float32, d_per_channel=False,
                with_optional=True):
    """Random inputs in the Mamba-2 regime: A < 0 and dt > 0 with or without the softplus."""
    ks = jax.random.split(key, 9)
    args = dict(
        x=jax.random.normal(ks[0], (b, l, h, p)).astype(dtype),
        dt=jax.random.uniform(ks[1], (b, l, h), minval=0.1, maxval=0.6).astype(dtype),
        A=-jnp.exp(jax.random.uniform(ks[2], (h,), minval=-1.0, maxval=1.0)),
        B=jax.random.normal(ks[3], (b, l, g, n)).astype(dtype),
        C=jax.random.normal(ks[4], (b, l, g, n)).astype(dtype),
    )
    if with_optional:
        args["D"] = jax.random.normal(ks[5], (h, p) if d_per_channel else (h,))
        args["z"] = jax.random.normal(ks[6], (b, l, h, p)).astype(dtype)
        args["dt_bias"] = jax.random.uniform(ks[7], (h,), minval=-0.1, maxval=0.1)
        args["initial_state"] = jax.random.normal(ks[8], (b, h, p, n))
    return args


def run(fn, args, **kw):
    """Calls an ssd-like fn with positional (x, dt, A, B, C) and the rest as keywords."""
    pos = [args[k] for k in ("x", "dt", "A", "B", "C")]
    rest = {k: v for k, v in args.items() if k not in ("x", "dt", "A", "B", "C")}
    return fn(*pos, **rest, **kw)


def vjp_all(fn, args, key, **kw):
    """(y, h_L) and the gradient of every float input under a random cotangent (jitted)."""
    return _vjp_all_jit(functools.partial(fn, dt_softplus=True, return_final_state=True, **kw),
                        args, key)


@functools.partial(jax.jit, static_argnums=0)
def _vjp_all_jit(fn, args, key):
    names = [k for k in FLOAT_ARGS if k in args]

    def f(*vals):
        return run(fn, dict(zip(names, vals)))

    (y, h_last), pull = jax.vjp(f, *[args[k] for k in names])
    k1, k2 = jax.random.split(key)
    gy = jax.random.normal(k1, y.shape).astype(y.dtype)
    gh = jax.random.normal(k2, h_last.shape).astype(h_last.dtype)
    return y, h_last, dict(zip(names, pull((gy, gh))))


def compare(actual, expected, dtype, what):
    y, h, grads = actual
    y0, h0, grads0 = expected
    assert_close(y, y0, dtype, "out", f"{what}: y")
    assert_close(h, h0, dtype, "out", f"{what}: final state")
    for k in grads0:
        assert_close(grads[k], grads0[k], dtype, "grad", f"{what}: d{k}")


# --------------------------------------------------------------------------------------------
# References and the chunked XLA path (impl="xla").
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("l,chunk,g,d_per_channel", [
    (1, 16, 1, False), (7, 4, 2, True), (65, 16, 4, False), (64, 16, 1, True),
])
def test_xla_matches_reference(l, chunk, g, d_per_channel):
    key = jax.random.PRNGKey(l * 100 + chunk)
    args = make_inputs(key, l=l, g=g, d_per_channel=d_per_channel)
    ref = vjp_all(ssd_reference, args, key)
    compare(vjp_all(functools.partial(ssd, impl="xla", chunk_size=chunk), args, key), ref,
            jnp.float32, f"xla l={l} chunk={chunk}")


def test_associative_matches_reference():
    key = jax.random.PRNGKey(1)
    args = make_inputs(key, l=23, g=2, d_per_channel=True)
    compare(vjp_all(ssd_associative_reference, args, key), vjp_all(ssd_reference, args, key),
            jnp.float32, "associative")


def test_minimal_arguments_and_softplus():
    key = jax.random.PRNGKey(2)
    args = make_inputs(key, l=19, g=1, with_optional=False)
    y_ref = run(ssd_reference, args, dt_softplus=True)
    y = run(ssd, args, chunk_size=8, impl="xla", dt_softplus=True)
    assert y.shape == args["x"].shape and y.dtype == args["x"].dtype
    assert_close(y, y_ref, jnp.float32, what="xla, no optional args")
    # softplus changes the answer: the flag is not ignored.
    assert rel_err(run(ssd_reference, args), y_ref) > 1e-2


def test_bfloat16_inputs():
    key = jax.random.PRNGKey(3)
    args = make_inputs(key, l=37, g=2, dtype=jnp.bfloat16)
    args32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    y, h = run(ssd, args, chunk_size=16, impl="xla", return_final_state=True)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    y0, h0 = run(ssd_reference, args32, return_final_state=True)
    assert_close(y, y0, jnp.bfloat16, what="bf16 y")
    assert_close(h, h0, jnp.bfloat16, what="bf16 state")


@pytest.mark.parametrize("impl", ["ref", "xla"])
def test_two_halves_with_carried_state_equal_whole(impl):
    key = jax.random.PRNGKey(4)
    args = make_inputs(key, l=50, g=2)
    y, h = run(ssd, args, chunk_size=16, impl=impl, dt_softplus=True, return_final_state=True)
    first = {k: (v[:, :21] if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
    second = {k: (v[:, 21:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
    y1, h1 = run(ssd, first, chunk_size=16, impl=impl, dt_softplus=True,
                 return_final_state=True)
    second["initial_state"] = h1
    y2, h2 = run(ssd, second, chunk_size=16, impl=impl, dt_softplus=True,
                 return_final_state=True)
    assert_close(jnp.concatenate([y1, y2], axis=1), y, jnp.float32, what="halves y")
    assert_close(h2, h, jnp.float32, what="halves state")


def test_chunked_is_stable_for_strong_decay():
    # dt*|A| = 4 per step: a 64-step chunk spans exp(256), which overflows exp(cs_i)*exp(-cs_j).
    key = jax.random.PRNGKey(5)
    args = make_inputs(key, l=128, g=1, with_optional=False)
    args["dt"] = jnp.full_like(args["dt"], 2.0)
    args["A"] = jnp.full_like(args["A"], -2.0)
    y = run(ssd_chunked, args, chunk_size=64)
    assert_close(y, run(ssd_reference, args), jnp.float32, what="strong decay")


@pytest.mark.parametrize("bad,match", [
    (dict(x=jnp.zeros((2, 9, 4))), "x must be"),
    (dict(dt=jnp.zeros((2, 9, 3))), "dt must be"),
    (dict(A=jnp.zeros((3,))), "A must be"),
    (dict(B=jnp.zeros((2, 9, 3, 8)), C=jnp.zeros((2, 9, 3, 8))), "not divisible by n_groups"),
    (dict(C=jnp.zeros((2, 9, 2, 4))), "C must have"),
    (dict(D=jnp.zeros((4, 3))), "D must be"),
    (dict(z=jnp.zeros((2, 8, 4, 8))), "z must have"),
    (dict(dt_bias=jnp.zeros((2,))), "dt_bias must be"),
    (dict(initial_state=jnp.zeros((2, 4, 8, 7))), "initial_state must be"),
])
def test_bad_shapes_raise(bad, match):
    args = {**make_inputs(jax.random.PRNGKey(6), l=9, g=2), **bad}
    with pytest.raises(ValueError, match=match):
        run(ssd, args, chunk_size=4, impl="xla")


def test_bad_impl_and_chunk_raise():
    args = make_inputs(jax.random.PRNGKey(7), l=9, g=2)
    with pytest.raises(ValueError, match="unknown impl"):
        run(ssd, args, chunk_size=4, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        run(ssd, args, chunk_size=0, impl="xla")


# --------------------------------------------------------------------------------------------
# Pallas kernels (interpret mode on CPU) and their Triton lowering.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("l,chunk,g,p,n,optional", [
    (1, 16, 1, 8, 8, None),       # a single step, no optional args; P and N padded to 16
    (37, 8, 2, 8, 8, "D(H,P)"),   # odd length, groups; chunk 8 runs as the minimum chunk 16
    (65, 32, 4, 16, 32, "D(H)"),  # one head per group
    (131, 256, 1, 8, 8, "D(H)"),  # caller chunk 256: one-chunk test at 128, chunked at 64
])
def test_pallas_matches_reference(l, chunk, g, p, n, optional):
    key = jax.random.PRNGKey(10 + l)
    args = make_inputs(key, l=l, g=g, p=p, n=n, d_per_channel=optional == "D(H,P)",
                       with_optional=optional is not None)
    ref = vjp_all(ssd_reference, args, key)
    got = vjp_all(functools.partial(ssd, impl="pallas", chunk_size=chunk), args, key)
    compare(got, ref, jnp.float32, f"pallas l={l} chunk={chunk} g={g} p={p} n={n}")


@pytest.mark.parametrize("bwd,kw", [
    # one head per dB/dC program (4 partials over 2 groups, summed in XLA); dx grid batch first
    # and the dx pass of session 4 (expf decays, s_prev as an elementwise product)
    ("split3", dict(bwd_heads=1, state_store_at_exit=False, dx_heads_fastest=False,
                    fast_exp=False, s_prev="dx")),
    # the defaults: states stored at the previous chunk's end, dx grid heads first, exp2
    # decays, s_prev as a trace dot in dx (dda_dot: f32 inputs keep the cumsum)
    ("split3", dict(bwd_heads=32)),
    # s_prev from the dB/dC pass (one head per program)
    ("split3", dict(bwd_heads=1, fast_exp=False, s_prev="dbc")),
    ("split", dict(bwd_heads=1, state_store_at_exit=False)),
    ("fused", dict(state_store_at_exit=False)),
])
def test_pallas_backward_variants_match_reference(bwd, kw):
    key = jax.random.PRNGKey(15)
    args = make_inputs(key, l=29, h=4, g=2, p=16, n=16)
    ref = vjp_all(ssd_reference, args, key)
    bs = BlockSizes(bwd=bwd, **kw)
    fn = functools.partial(ssd_pallas, chunk_size=16, block_sizes=bs)
    compare(vjp_all(fn, args, key), ref, jnp.float32, f"pallas, {bwd} backward {kw}")


@pytest.mark.parametrize("bwd", ["split3", "fused"])
def test_pallas_zero_states_inline_matches_reference(bwd):
    """`BlockSizes.zero_states_inline`: no zeros arrays for a missing initial state or an
    unreturned final state's cotangent. With and without an initial state, with and without
    the final state returned (then no hT / dh0 written): y, h_L and every gradient."""
    key = jax.random.PRNGKey(16)
    args = make_inputs(key, l=29, h=4, g=2, p=16, n=16)
    bs = BlockSizes(bwd=bwd, zero_states_inline=True)
    fn = functools.partial(ssd_pallas, chunk_size=16, block_sizes=bs)
    compare(vjp_all(fn, args, key), vjp_all(ssd_reference, args, key), jnp.float32,
            f"zero_states_inline {bwd}, initial state")
    del args["initial_state"]
    compare(vjp_all(fn, args, key), vjp_all(ssd_reference, args, key), jnp.float32,
            f"zero_states_inline {bwd}, no initial state")
    y, grads = vjp_y(fn, args, key)
    y0, grads0 = vjp_y(ssd_reference, args, key)
    assert_close(y, y0, jnp.float32, "out", "zero_states_inline: y without final state")
    for k in grads0:
        assert_close(grads[k], grads0[k], jnp.float32, "grad", f"zero_states_inline: d{k}")


def test_pallas_bfloat16():
    key = jax.random.PRNGKey(12)
    args = make_inputs(key, l=40, g=2, p=16, n=16, dtype=jnp.bfloat16)
    args32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    y, h, grads = vjp_all(functools.partial(ssd, impl="pallas", chunk_size=16), args, key)
    y0, h0, grads0 = vjp_all(ssd_reference, args32, key)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    compare((y, h, grads), (y0, h0, grads0), jnp.bfloat16, "pallas bf16")


SPLIT3 = ("ssd_bwd_dstate", "ssd_bwd_dx", "ssd_bwd_dbc")


OLD_DX = dict(fast_exp=False, dda_dot=False, s_prev="dx")   # the dx pass before run 12


@pytest.mark.parametrize("options", [
    {},                                   # the defaults: fast_exp, dda_dot, s_prev "dot"
    dict(OLD_DX, dda_dot=True),
    dict(s_prev="dbc", bwd_heads=2),
    dict(OLD_DX, s_prev="dot"),
])
def test_pallas_bfloat16_backward_options(options):
    """The split3 backward options that act on 16-bit inputs: within the bf16 tolerance of the
    f32 reference, and equal to the session-4 kernels' bf16 result (OLD_DX) within the f32
    tolerance (they only regroup the same f32 sums: a wrong pair term would show here)."""
    key = jax.random.PRNGKey(17)
    args = make_inputs(key, l=40, g=2, p=16, n=16, dtype=jnp.bfloat16)
    args32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    fn = functools.partial(ssd_pallas, chunk_size=16)
    got = vjp_all(functools.partial(fn, block_sizes=BlockSizes(**options)), args, key)
    compare(got, vjp_all(ssd_reference, args32, key), jnp.bfloat16, f"pallas bf16 {options}")
    base = vjp_all(functools.partial(fn, block_sizes=BlockSizes(**OLD_DX)), args, key)
    for k in ("dt", "A", "dt_bias"):
        assert_close(got[2][k], base[2][k], jnp.float32, "grad", f"{options}: d{k} vs default")


@pytest.mark.parametrize("bwd,kernels,at_exit,options", [
    ("split3", SPLIT3, False, {}),
    ("split3", SPLIT3, True, {}),
    ("split3", SPLIT3, True, dict(s_prev="dbc")),
    ("split3", SPLIT3, True, dict(fast_exp=False, dda_dot=False, s_prev="dx")),
    ("split3", SPLIT3, True, dict(zero_states_inline=True)),
    ("split", ("ssd_bwd_dstate", "ssd_bwd_chunk"), False, {}),
    ("fused", ("ssd_bwd",), False, {}),
])
def test_pallas_lowers_to_triton(bwd, kernels, at_exit, options):
    """Forward and backward cross-lower to Triton IR without a GPU (catches lowering errors)."""
    args = make_inputs(jax.random.PRNGKey(13), b=1, l=70, h=2, p=32, n=64, g=1,
                       dtype=jnp.bfloat16)
    names = list(FLOAT_ARGS)

    def loss(*vals):
        kw = dict(zip(names, vals))
        y, h = ssd_pallas(kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"),
                          chunk_size=64, dt_softplus=True, return_final_state=True,
                          interpret=False,
                          block_sizes=BlockSizes(bwd=bwd, state_store_at_exit=at_exit,
                                                 **options), **kw)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    vals = [args[k] for k in names]
    fwd = jax.jit(loss).trace(*vals).lower(lowering_platforms=("cuda",)).as_text()
    bwd_text = jax.jit(jax.grad(loss, argnums=tuple(range(len(names))))).trace(*vals).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "ssd_fwd" in fwd
    for name in ("ssd_fwd",) + kernels:
        assert name in bwd_text, f"{name} missing from the lowered backward"


def test_pallas_per_pass_warps_reach_their_kernels():
    """num_warps_dstate / num_warps_dx / num_warps_bwd are the launch parameters of their own
    kernels (the lowered Triton custom calls carry num_warps)."""
    args = make_inputs(jax.random.PRNGKey(16), b=1, l=70, h=2, p=32, n=64, g=1,
                       dtype=jnp.bfloat16, with_optional=False)
    bs = BlockSizes(num_warps_fwd=4, num_warps_dstate=2, num_warps_dx=8, num_warps_bwd=16)

    def loss(x, dt, A, B, C):
        y = ssd_pallas(x, dt, A, B, C, chunk_size=64, interpret=False, block_sizes=bs)
        return jnp.sum(y.astype(jnp.float32))

    vals = [args[k] for k in ("x", "dt", "A", "B", "C")]
    text = jax.jit(jax.grad(loss)).trace(*vals).lower(lowering_platforms=("cuda",)).as_text()
    launches = {}
    for line in text.splitlines():
        if "__gpu$xla.gpu.triton" in line:
            name = re.search(r'name = "(ssd_\w+)"', line).group(1)
            launches[name] = int(re.search(r"num_warps = (\d+)", line).group(1))
    assert launches == {"ssd_fwd": 4, "ssd_bwd_dstate": 2, "ssd_bwd_dx": 8, "ssd_bwd_dbc": 16}


# --------------------------------------------------------------------------------------------
# The one-chunk path (L <= kernel chunk): HiSS's low level runs many sequences of ~10 steps.
# --------------------------------------------------------------------------------------------
def vjp_y(fn, args, key, **kw):
    """y and the gradient of every float input under a random cotangent, without the final
    state (the path that stacks several sequences per program)."""
    return _vjp_y_jit(functools.partial(fn, dt_softplus=True, **kw), args, key)


@functools.partial(jax.jit, static_argnums=0)
def _vjp_y_jit(fn, args, key):
    names = [k for k in FLOAT_ARGS if k in args]

    def f(*vals):
        return run(fn, dict(zip(names, vals)))

    y, pull = jax.vjp(f, *[args[k] for k in names])
    gy = jax.random.normal(key, y.shape).astype(y.dtype)
    return y, dict(zip(names, pull(gy)))


def short_inputs(key, b, l, g, dtype, keep, d_per_channel=False):
    """make_inputs with only the optional arguments named in `keep`."""
    args = make_inputs(key, b=b, l=l, h=4, p=16, n=16, g=g, dtype=dtype,
                       d_per_channel=d_per_channel)
    return {k: v for k, v in args.items() if k in ("x", "dt", "A", "B", "C") or k in keep}


ALL_OPT = ("D", "z", "dt_bias", "initial_state")


def check_short(args, key, dtype, bs, chunk, what):
    """y and every gradient of ssd_pallas (BlockSizes bs) vs the f32 sequential reference."""
    args32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    fn = functools.partial(ssd_pallas, chunk_size=chunk, block_sizes=bs)
    y, grads = vjp_y(fn, args, key)
    y0, grads0 = vjp_y(ssd_reference, args32, key)
    assert y.dtype == dtype
    assert_close(y, y0, dtype, "out", f"{what}: y")
    for k in grads0:
        assert_close(grads[k], grads0[k], dtype, "grad", f"{what}: d{k}")


@pytest.mark.parametrize("l,chunk,b,g,keep,short_batch,dtype", [
    (1, 16, 2, 1, (), None, jnp.float32),                  # one step, nothing optional
    (7, 4, 3, 2, ("D", "z", "dt_bias"), 2, jnp.float32),   # batch 3 padded to 4
    (10, 10, 5, 1, ("D", "dt_bias"), None, jnp.float32),   # HiSS: 2 per program, 5 -> 6
    (16, 16, 2, 4, ("z",), 4, jnp.float32),                # exactly one chunk
    (20, 32, 3, 2, ("D", "z"), 2, jnp.float32),            # Q = 32, 2 per program
    (10, 10, 3, 2, ("D", "z", "dt_bias"), 2, jnp.bfloat16),
])
def test_pallas_short_padded_layout_matches_reference(l, chunk, b, g, keep, short_batch, dtype):
    """Run 6's layout (short_pack=False): each sequence padded to the kernel chunk in XLA."""
    key = jax.random.PRNGKey(100 + l)
    args = short_inputs(key, b, l, g, dtype, keep, d_per_channel=l == 7)
    check_short(args, key, dtype, BlockSizes(short_pack=False, short_batch=short_batch), chunk,
                f"short padded l={l}")


# Packed-layout options, rotated over the lengths: the default (32-row tiles, the heads of
# a group in one forward program, 1 stage), 16 and 64 rows, one head per forward program,
# the head loops unrolled, 2 stages.
PACKED_OPTIONS = (dict(), dict(short_rows=16, short_fwd_heads=1),
                  dict(short_rows=64, short_unroll=True),
                  dict(short_fwd_heads=1, short_unroll=True, num_stages_short=2))


@pytest.mark.parametrize("l", range(1, 21))
def test_pallas_short_packed_every_length(l):
    """The packed layout (default) at every length 1..20: sequences of l steps stacked as they
    lie in memory, max(1, rows // l) per tile, the last tile's tail masked (batch 7)."""
    key = jax.random.PRNGKey(400 + l)
    dtype = jnp.bfloat16 if l in (10, 19) else jnp.float32
    keep = ("D", "dt_bias") + (("z",) if l % 2 else ())
    args = short_inputs(key, 7, l, 2, dtype, keep, d_per_channel=l % 3 == 0)
    bs = BlockSizes(**PACKED_OPTIONS[l % len(PACKED_OPTIONS)])
    check_short(args, key, dtype, bs, 20, f"short packed l={l} {bs}")


@pytest.mark.parametrize("l,chunk,g,keep,dtype,pack", [
    (1, 16, 1, ALL_OPT, jnp.float32, True),
    (7, 8, 2, ("z", "initial_state"), jnp.float32, True),
    (10, 10, 2, ALL_OPT, jnp.float32, True),
    (10, 10, 2, ALL_OPT, jnp.float32, False),                # run 6's padded layout
    (10, 10, 1, ("D", "dt_bias"), jnp.float32, True),        # final state without an initial one
    (16, 16, 4, ALL_OPT, jnp.float32, True),                 # exactly one chunk
    (13, 16, 2, ALL_OPT, jnp.bfloat16, True),
])
def test_pallas_short_with_states_matches_reference(l, chunk, g, keep, dtype, pack):
    """Initial state in, final state out (and their gradients) on the one-chunk path."""
    key = jax.random.PRNGKey(200 + l)
    args = short_inputs(key, 3, l, g, dtype, keep)
    args32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    got = vjp_all(functools.partial(ssd_pallas, chunk_size=chunk,
                                    block_sizes=BlockSizes(short_pack=pack)), args, key)
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    compare(got, vjp_all(ssd_reference, args32, key), dtype, f"short+state l={l}")


def test_pallas_short_initial_state_without_final():
    key = jax.random.PRNGKey(300)
    args = short_inputs(key, 2, 10, 2, jnp.float32, ("D", "z", "initial_state"))
    fn = functools.partial(ssd_pallas, chunk_size=10)
    y, grads = vjp_y(fn, args, key)
    y0, grads0 = vjp_y(ssd_reference, args, key)
    assert_close(y, y0, jnp.float32, "out", "short h0: y")
    for k in grads0:
        assert_close(grads[k], grads0[k], jnp.float32, "grad", f"short h0: d{k}")


@pytest.mark.parametrize("short,final,kernels,options", [
    (True, False, ("ssd_short_fwd", "ssd_short_bwd"), {}),
    (True, True, ("ssd_short_fwd", "ssd_short_bwd"), {}),
    (True, False, ("ssd_short_fwd", "ssd_short_bwd"), dict(short_pack=False)),
    (True, True, ("ssd_short_fwd", "ssd_short_bwd"),
     dict(short_rows=64, short_fwd_heads=4, short_unroll=True)),
    (True, False, ("ssd_short_fwd", "ssd_short_bwd"),
     dict(short_fwd_heads=1, num_stages_short=2)),
    (False, False, ("ssd_fwd", "ssd_bwd_dstate", "ssd_bwd_dx", "ssd_bwd_dbc"), {}),
])
def test_pallas_short_lowers_to_triton(short, final, kernels, options):
    """The one-chunk kernels cross-lower to Triton IR, replace the chunked ones at L <= chunk,
    and `BlockSizes(short=False)` switches back; with their launch warps."""
    args = make_inputs(jax.random.PRNGKey(17), b=8, l=10, h=4, p=64, n=64, g=1,
                       dtype=jnp.bfloat16, with_optional=final)
    names = list(args)
    bs = BlockSizes(short=short, num_warps_short_fwd=2, num_warps_short_bwd=8, **options)

    def loss(*vals):
        kw = dict(zip(names, vals))
        out = ssd_pallas(kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"),
                         chunk_size=10, dt_softplus=True, return_final_state=final,
                         interpret=False, block_sizes=bs, **kw)
        if final:
            return jnp.sum(out[0].astype(jnp.float32)) + jnp.sum(out[1])
        return jnp.sum(out.astype(jnp.float32))

    vals = [args[k] for k in names]
    text = jax.jit(jax.grad(loss, argnums=tuple(range(len(names))))).trace(*vals).lower(
        lowering_platforms=("cuda",)).as_text()
    launches = {}
    for line in text.splitlines():
        if "__gpu$xla.gpu.triton" in line:
            name = re.search(r'name = "(ssd_\w+)"', line).group(1)
            launches[name] = int(re.search(r"num_warps = (\d+)", line).group(1))
    assert set(launches) == set(kernels)
    if short:
        assert launches == {"ssd_short_fwd": 2, "ssd_short_bwd": 8}


@pytest.mark.parametrize("options", PACKED_OPTIONS[:3])
def test_pallas_short_packed_lowers_every_length(options):
    """Forward and backward of the packed layout cross-lower to Triton IR at every length
    1..20 (tile masks, division by a length that is no power of two), f32 and bf16."""
    bs = BlockSizes(**options)
    for l in range(1, 21):
        dtype = jnp.bfloat16 if l % 2 else jnp.float32
        args = make_inputs(jax.random.PRNGKey(18), b=5, l=l, h=4, p=64, n=64, g=1,
                           dtype=dtype, with_optional=False)

        def loss(x, dt, A, B, C):
            y = ssd_pallas(x, dt, A, B, C, chunk_size=20, dt_softplus=True, interpret=False,
                           block_sizes=bs)
            return jnp.sum(y.astype(jnp.float32))

        vals = [args[k] for k in ("x", "dt", "A", "B", "C")]
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*vals).lower(
            lowering_platforms=("cuda",)).as_text()
        names = set(re.findall(r'name = "(ssd_\w+)"', text))
        assert names == {"ssd_short_fwd", "ssd_short_bwd"}, (l, names)


def test_pallas_block_sizes_validated():
    args = make_inputs(jax.random.PRNGKey(14), l=9, g=2)
    with pytest.raises(ValueError, match="BlockSizes.chunk"):
        run(ssd_pallas, args, chunk_size=16, block_sizes=BlockSizes(chunk=24))
    with pytest.raises(ValueError, match="BlockSizes.bwd"):
        BlockSizes(bwd="reverse")
    with pytest.raises(ValueError, match="BlockSizes.s_prev"):
        BlockSizes(s_prev="fwd")
    with pytest.raises(ValueError, match="BlockSizes.short_batch"):
        BlockSizes(short_batch=3)
    with pytest.raises(ValueError, match="BlockSizes.short_rows"):
        BlockSizes(short_rows=24)
    with pytest.raises(ValueError, match="BlockSizes.short_fwd_heads"):
        BlockSizes(short_fwd_heads=0)
    with pytest.raises(ValueError, match="BlockSizes.num_stages_short"):
        BlockSizes(num_stages_short=0)
