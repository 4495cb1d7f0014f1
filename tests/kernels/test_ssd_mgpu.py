"""The Mosaic GPU dx pass of the SSD backward (kernels/ssd_mgpu.py, `BlockSizes.dx_backend`).

CPU: Mosaic GPU interpret mode (jax >= 0.11.2; skipped where `ssd_mgpu.AVAILABLE` is False,
e.g. jax 0.10.2, whose default path is then the Triton dx kernel) and cross-lowering to the
Mosaic GPU custom call. Interpret mode feeds the register A operands of three dots through
shared memory (its wgmma reads refs only); cross-lowering covers the register form.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import ssd_long, ssd_mgpu
from kernels.ssd import BlockSizes, ssd_pallas, ssd_reference
from tests.conftest import assert_close
from tests.kernels.test_ssd import compare, make_inputs, vjp_all

pytestmark = pytest.mark.skipif(not ssd_mgpu.AVAILABLE,
                                reason="needs the Mosaic GPU API of jax >= 0.11.2")


def _dx_inputs(key, b=1, lp=128, h=2, g=1, p=64, n=128, q=64):
    ks = jax.random.split(key, 10)
    bf = jnp.bfloat16
    nc = lp // q
    return dict(
        x=jax.random.normal(ks[0], (b, lp, h, p)).astype(bf),
        dt=jnp.exp(jax.random.uniform(ks[1], (b, lp, h), minval=np.log(1e-3),
                                      maxval=np.log(0.3))),
        A=-jnp.exp(jax.random.uniform(ks[2], (h,), maxval=np.log(16.0))),
        B=jax.random.normal(ks[3], (b, lp, g, n)).astype(bf),
        C=jax.random.normal(ks[4], (b, lp, g, n)).astype(bf),
        D=jax.random.normal(ks[5], (h, p)),
        states=jax.random.normal(ks[6], (b, nc, h, p, n)).astype(bf),
        dstates=jax.random.normal(ks[7], (b, nc, h, p, n)).astype(bf),
        dy=jax.random.normal(ks[8], (b, lp, h, p)).astype(bf))


ORDER = ("x", "dt", "A", "B", "C", "D", "states", "dstates", "dy")


def _l_shapes(b=8, lp=4096, h=32, g=1, p=64, n=128, q=64):
    """The benchmark's L shape as abstract operands of dx_call / dx_dbc_call (x, dt, A, B,
    C, D, states, dstates, dy): what the cross-lowering tests lower."""
    nc = lp // q
    S = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    return [S((b, lp, h, p), bf), S((b, lp, h), f32), S((h,), f32), S((b, lp, g, n), bf),
            S((b, lp, g, n), bf), S((h, p), f32), S((b, nc, h, p, n), bf),
            S((b, nc, h, p, n), bf), S((b, lp, h, p), bf)]


def _exact_da(a, q):
    """dA per (batch, head) of the dx pass in float64 from the pass's definition (cumsums,
    the exclusive row cumsum of the pair terms, the elementwise state product)."""
    f = {k: np.asarray(jnp.asarray(v, jnp.float32), np.float64) for k, v in a.items()}
    b, lp, h, _ = f["x"].shape
    rep = h // f["B"].shape[2]
    causal = np.tril(np.ones((q, q), bool))
    da = np.zeros((b, h))
    for bi in range(b):
        for c in range(lp // q):
            t = slice(c * q, (c + 1) * q)
            for hi in range(h):
                x, dt, do = f["x"][bi, t, hi], f["dt"][bi, t, hi], f["dy"][bi, t, hi]
                Bc, Cc = f["B"][bi, t, hi // rep], f["C"][bi, t, hi // rep]
                hp, dh = f["states"][bi, c, hi], f["dstates"][bi, c, hi]
                cs = np.cumsum(dt * f["A"][hi])
                m = (Cc @ Bc.T) * np.where(causal, np.exp(np.where(causal, cs[:, None]
                                                                  - cs[None, :], 0)), 0)
                e = (do @ (x * dt[:, None]).T) * m
                t_inter = np.exp(cs) * np.sum(do * (Cc @ hp.T), 1)
                w = np.exp(cs[-1] - cs)
                f_write = w * np.sum(x * dt[:, None] * (Bc @ dh.T), 1)
                excl = np.cumsum(e, 1) - e
                dda = (np.sum(np.where(causal, excl + t_inter[:, None], 0), 0)
                       + np.cumsum(f_write) - f_write + np.exp(cs[-1]) * np.sum(dh * hp))
                da[bi, hi] += np.sum(dda * dt)
    return da


@pytest.mark.parametrize("split_loads", [True, False])
def test_mgpu_dx_matches_triton_dx(split_loads):
    """The kernel alone against the Triton dx kernel on the same padded operands (two chunks,
    two heads of one group): dx, ddt within the bf16 tolerance (both round M^T to bf16 for a
    dot; the Triton kernel also rounds dt x, this one scales dy x^T by dt), the dD partials
    within the f32 one; and dA, whose pair, inter-chunk, write and state terms sum with
    cancellation, within the f32 tolerance of a float64 evaluation of the pass."""
    a = _dx_inputs(jax.random.PRNGKey(0))
    q = 64
    got = ssd_mgpu.dx_call(*[a[k] for k in ORDER], q=q, interpret=True,
                           split_loads=split_loads)
    want = ssd_long._dx_call(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], None,
                             a["states"], a["dstates"], a["dy"], None, q=q,
                             bs=BlockSizes(chunk=q), interpret=True)
    assert got[2] is None
    assert_close(got[0], want[0], jnp.bfloat16, "grad", "dx")
    assert_close(got[1], want[1], jnp.bfloat16, "grad", "ddt")
    assert_close(got[4], want[4], jnp.float32, "grad", "dD partials")
    assert_close(got[3].sum(1)[..., 0], _exact_da(a, q), jnp.float32, "grad", "dA")


@pytest.mark.parametrize("what,h,g,seed,bs", [
    ("mosaic dx", 2, 1, 21, BlockSizes(dx_backend="mosaic")),
    ("mosaic dB/dC", 4, 2, 23, BlockSizes(dbc_backend="mosaic")),
    ("mosaic fused", 4, 2, 24, BlockSizes(dbc_backend="mosaic", mgpu_fused=True)),
])
def test_mgpu_path_matches_reference(what, h, g, seed, bs):
    """ssd_pallas with the Mosaic passes (dx; dx and dB/dC, two groups of two heads) at a
    length that is no multiple of the chunk, with the softplus, a bias, D per channel and an
    initial state (no z: with z the Triton kernels run): y, the final state and every
    gradient vs the f32 reference."""
    key = jax.random.PRNGKey(seed)
    args = make_inputs(key, b=1, l=100, h=h, p=64, g=g, n=128, dtype=jnp.bfloat16,
                       d_per_channel=True)
    del args["z"]
    args32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    fn = functools.partial(ssd_pallas, chunk_size=64, dt_softplus=True, block_sizes=bs)
    ref = functools.partial(ssd_reference, dt_softplus=True)
    compare(vjp_all(fn, args, key), vjp_all(ref, args32, key), jnp.bfloat16, what)


def test_mgpu_dx_supports():
    a = _dx_inputs(jax.random.PRNGKey(1))
    assert ssd_mgpu.supports(a["x"], a["B"], 64)
    assert not ssd_mgpu.supports(a["x"], a["B"], 32)
    assert not ssd_mgpu.supports(a["x"].astype(jnp.float32), a["B"], 64)
    assert not ssd_mgpu.supports(a["x"][..., :32], a["B"], 64)
    with pytest.raises(ValueError, match="dx_backend"):
        BlockSizes(dx_backend="cuda")


@pytest.mark.parametrize("split_loads", [True, False])
def test_mgpu_dx_lowers_to_mosaic_gpu_without_gpu(split_loads):
    """Cross-lowering runs the whole Mosaic GPU lowering (layouts, TMA descriptors, barriers,
    the register A operands) on CPU at the benchmark's L shape."""
    shapes, q = _l_shapes(), 64
    f = functools.partial(ssd_mgpu.dx_call, q=q, interpret=False, split_loads=split_loads)
    text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize("slots", [1, 2])
def test_mgpu_dbc_matches_triton_dbc(slots):
    """The Mosaic dB/dC kernel alone against the Triton dB/dC kernel on the same padded
    operands (two chunks, three heads of one group: the TMA ring wraps): dB, dC within the
    bf16 tolerance (both round the per-head dot operands to bf16)."""
    a = _dx_inputs(jax.random.PRNGKey(2), h=3)
    q = 64
    got = ssd_mgpu.dbc_call(a["x"], a["dt"], a["A"], a["B"], a["C"], a["states"], a["dstates"],
                            a["dy"], q=q, interpret=True, slots=slots)
    want = ssd_long._dbc_call(a["x"], a["dt"], a["A"], a["B"], a["C"], None, a["states"],
                              a["dstates"], a["dy"], q=q, hb=3, bs=BlockSizes(chunk=q),
                              interpret=True)
    for name, g_, w_ in zip(("dB", "dC"), got, want[:2]):
        assert g_.shape == a["B"].shape and g_.dtype == a["B"].dtype
        assert_close(g_, w_.reshape(g_.shape), jnp.bfloat16, "grad", name)


def test_mgpu_dbc_supports():
    a = _dx_inputs(jax.random.PRNGKey(1))
    assert ssd_mgpu.dbc_supports(a["x"], a["B"], 64)
    assert not ssd_mgpu.dbc_supports(a["x"], a["B"], 32)
    assert not ssd_mgpu.dbc_supports(a["x"], a["B"][..., :96], 64)
    assert not ssd_mgpu.dbc_supports(a["x"].astype(jnp.float32), a["B"], 64)
    with pytest.raises(ValueError, match="dbc_backend"):
        BlockSizes(dbc_backend="cuda")


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_mgpu_dbc_lowers_to_mosaic_gpu_without_gpu(slots):
    """Cross-lowering of the dB/dC kernel at the benchmark's L shape (TMA ring, barriers,
    the accumulators carried over the head loop, the transposed shared-memory A operand)."""
    shapes, q = _l_shapes(), 64
    del shapes[5]                       # no D
    f = functools.partial(ssd_mgpu.dbc_call, q=q, interpret=False, slots=slots)
    text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize("split_loads", [True, False])
def test_mgpu_fused_dx_dbc_matches_separate(split_loads):
    """The one-launch form (dB/dC CTAs and dx CTAs in one grid) against the two kernels run
    apart on the same operands: every output identical (same code per CTA)."""
    a = _dx_inputs(jax.random.PRNGKey(3), h=3)
    q = 64
    args = [a[k] for k in ORDER]
    got = ssd_mgpu.dx_dbc_call(*args, q=q, interpret=True, split_loads=split_loads)
    want = (*ssd_mgpu.dx_call(*args, q=q, interpret=True, split_loads=split_loads),
            *ssd_mgpu.dbc_call(a["x"], a["dt"], a["A"], a["B"], a["C"], a["states"],
                               a["dstates"], a["dy"], q=q, interpret=True))
    assert len(got) == len(want) == 7 and got[2] is None
    for g_, w_ in zip(got, want):
        if w_ is not None:
            np.testing.assert_array_equal(np.asarray(g_, np.float32), np.asarray(w_, np.float32))


@pytest.mark.parametrize("nk,h,t_all,lead", [(2, 32, 8, 3), (2, 3, 4, 1), (4, 5, 6, 6),
                                             (1, 2, 3, 9), (2, 4, 5, 0)])
def test_mgpu_fused_lead_index_is_a_permutation(nk, h, t_all, lead):
    """`BlockSizes.mgpu_dbc_lead`: every dB/dC (group, block) and dx (group, head) CTA comes
    exactly once, the dB/dC CTAs `lead` groups ahead of the dx CTAs."""
    seen_dbc, seen_dx = [], []
    for i in range(t_all * (nk + h)):
        is_dbc, dbc, dx = ssd_mgpu._lead_index(i, nk=nk, h=h, t_all=t_all, lead=lead)
        (seen_dbc if is_dbc else seen_dx).append((i, dbc if is_dbc else dx))
    assert sorted(v for _, v in seen_dbc) == [(t, k) for t in range(t_all) for k in range(nk)]
    assert sorted(v for _, v in seen_dx) == [(t, k) for t in range(t_all) for k in range(h)]
    first_dx = {}
    for i, (t, _) in seen_dx:
        first_dx.setdefault(t, i)
    for i, (t, _) in seen_dbc:       # group t's dB/dC CTAs precede group t - lead's dx CTAs
        if t - lead >= 0 and lead:
            assert i < first_dx[t - lead] + nk + h


def test_mgpu_fused_lead_matches_separate():
    """The one-launch form with the dB/dC CTAs one group ahead (`mgpu_dbc_lead`, one grid
    axis) against the two kernels run apart: every output identical."""
    a = _dx_inputs(jax.random.PRNGKey(5), b=2, h=3)
    q = 64
    args = [a[k] for k in ORDER]
    got = ssd_mgpu.dx_dbc_call(*args, q=q, interpret=True, lead=1)
    want = (*ssd_mgpu.dx_call(*args, q=q, interpret=True),
            *ssd_mgpu.dbc_call(a["x"], a["dt"], a["A"], a["B"], a["C"], a["states"],
                               a["dstates"], a["dy"], q=q, interpret=True))
    for g_, w_ in zip(got, want):
        if w_ is not None:
            np.testing.assert_array_equal(np.asarray(g_, np.float32), np.asarray(w_, np.float32))


def test_mgpu_fused_lowers_to_mosaic_gpu_without_gpu():
    shapes, q = _l_shapes(), 64
    for lead in (0, 64):
        f = functools.partial(ssd_mgpu.dx_dbc_call, q=q, interpret=False, lead=lead)
        text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("custom_call @mosaic_gpu") == 1
