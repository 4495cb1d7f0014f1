"""Mamba discretisations (`ssm_math.discretize`, `selective_scan_disc`, `MambaStack.disc`): the
pure-JAX scan against the kernel reference (approx ZOH) and a sequential float64 NumPy recurrence
(all three), gradients, the stack's streaming step against its call for each discretisation, and
the registry passing `mamba.disc` / `s4.disc` through.  S4's three discretisations are tested
against float64 references in test_s4.py (COMBOS)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from configs.base import level_config
from hiss_jax.models import mamba as mamba_lib
from hiss_jax.models.mamba import MambaStack
from hiss_jax.models.registry import make_stack
from hiss_jax.models.s4 import S4Stack
from hiss_jax.models.ssm_math import DISCRETIZATIONS, discretize, selective_scan_disc
from tests.conftest import assert_close


@pytest.fixture(autouse=True)
def _ieee_float32_matmuls():
    """The float32 tolerances assume IEEE float32 matmuls; GPUs default to TF32."""
    with jax.default_matmul_precision("highest"):
        yield


def _inputs(b=2, l=11, di=6, n=4, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    u = jax.random.normal(ks[0], (b, l, di))
    delta = jax.random.normal(ks[1], (b, l, di))
    a = -jnp.exp(jax.random.normal(ks[2], (di, n)))
    bm = jax.random.normal(ks[3], (b, l, n))
    cm = jax.random.normal(ks[4], (b, l, n))
    d = jax.random.normal(ks[5], (di,))
    z = jax.random.normal(ks[6], (b, l, di))
    bias = jax.random.normal(ks[7], (di,)) * 0.5
    h0 = jax.random.normal(ks[8], (b, di, n))
    return u, delta, a, bm, cm, d, z, bias, h0


def _numpy_reference(u, delta, a, bm, cm, d, z, bias, h0, disc):
    """Sequential float64 recurrence: A_bar, B_bar written out per discretisation."""
    u, delta, a, bm, cm, d, z, bias, h = (np.asarray(x, np.float64)
                                          for x in (u, delta, a, bm, cm, d, z, bias, h0))
    dt = np.log1p(np.exp(delta + bias))  # softplus
    ys = []
    for t in range(u.shape[1]):
        x = dt[:, t, :, None] * a
        if disc == "approx_zoh":
            ab, bs = np.exp(x), dt[:, t, :, None] * np.ones_like(x)
        elif disc == "zoh":
            ab, bs = np.exp(x), (np.exp(x) - 1) / a
        else:
            ab, bs = (1 + x / 2) / (1 - x / 2), dt[:, t, :, None] / (1 - x / 2)
        h = ab * h + bs * u[:, t, :, None] * bm[:, t, None, :]
        y = np.einsum("bdn,bn->bd", h, cm[:, t]) + d * u[:, t]
        ys.append(y * z[:, t] / (1 + np.exp(-z[:, t])))
    return np.stack(ys, 1), h


def test_approx_zoh_equals_the_kernel_reference():
    u, delta, a, bm, cm, d, z, bias, h0 = _inputs()
    args = dict(D=d, z=z, delta_bias=bias, delta_softplus=True, initial_state=h0,
                return_final_state=True)
    y, h = selective_scan_disc(u, delta, a, bm, cm, disc="approx_zoh", **args)
    y_ref, h_ref = kernels.selective_scan(u, delta, a, bm, cm, impl="ref", **args)
    assert_close(y, y_ref, jnp.float32, what="y")
    assert_close(h, h_ref, jnp.float32, what="h_L")


def test_approx_zoh_gradients_equal_the_kernel_reference():
    u, delta, a, bm, cm, d, z, bias, _ = _inputs(seed=2)
    cot = jax.random.normal(jax.random.PRNGKey(9), u.shape)

    def grads(fn):
        f = lambda *p: fn(*p, D=d, z=z, delta_bias=bias, delta_softplus=True)  # noqa: E731
        _, vjp = jax.vjp(f, u, delta, a, bm, cm)
        return vjp(cot)

    got = grads(lambda *p, **k: selective_scan_disc(*p, **k, disc="approx_zoh"))
    want = grads(lambda *p, **k: kernels.selective_scan(*p, **k, impl="ref"))
    for name, g, w in zip(("u", "delta", "A", "B", "C"), got, want):
        assert_close(g, w, jnp.float32, kind="grad", what=f"d{name}")


@pytest.mark.parametrize("length", [1, 11])
@pytest.mark.parametrize("disc", DISCRETIZATIONS)
def test_each_discretisation_matches_a_float64_recurrence(disc, length):
    inputs = _inputs(l=length, seed=1)
    u, delta, a, bm, cm, d, z, bias, h0 = inputs
    y, h = selective_scan_disc(u, delta, a, bm, cm, d, z, bias, delta_softplus=True, disc=disc,
                               initial_state=h0, return_final_state=True)
    y_np, h_np = _numpy_reference(*inputs, disc)
    assert_close(y, y_np, jnp.float32, what=f"{disc} y")
    assert_close(h, h_np, jnp.float32, what=f"{disc} h_L")


def test_discretisations_agree_for_small_steps_and_differ_for_large():
    a = -jnp.arange(1.0, 5.0)[None]
    small = [discretize(jnp.full((1, 1), 1e-3), a, k) for k in DISCRETIZATIONS]
    big = dict((k, discretize(jnp.full((1, 1), 1.0), a, k)) for k in DISCRETIZATIONS)
    for ab, bs in small[1:]:
        np.testing.assert_allclose(ab, small[0][0], rtol=1e-5)
        np.testing.assert_allclose(bs, small[0][1], rtol=5e-3)
    # at dt |A| = 1..4 the input terms differ a lot: dt vs (1 - e^{-dt|A|}) / |A|
    assert np.abs(big["approx_zoh"][1] - big["zoh"][1]).max() > 0.5
    # bilinear keeps |A_bar| < 1 for every dt (A-stable)
    assert (np.abs(big["bilinear"][0]) < 1).all()
    with pytest.raises(ValueError, match="disc='euler'.*approx_zoh"):
        discretize(jnp.ones((1, 1)), a, "euler")


def _step_scan(stack, params, x):
    state = stack.apply(params, x.shape[0], method=MambaStack.init_state)

    def body(s, x_t):
        return stack.apply(params, s, x_t, method=MambaStack.step)

    _, ys = jax.lax.scan(body, state, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1)


@pytest.mark.parametrize("disc", DISCRETIZATIONS)
def test_mamba_stack_step_equals_call(disc):
    stack = MambaStack(d_model=8, n_layers=2, d_state=4, disc=disc, scan_impl="ref")
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 7, 8))
    params = stack.init(jax.random.PRNGKey(0), x)
    full = stack.apply(params, x)
    assert_close(_step_scan(stack, params, x), full, jnp.float32, what=f"{disc} step vs call")


def test_approx_zoh_runs_the_kernel_and_the_others_do_not(monkeypatch):
    kw = dict(d_model=8, n_layers=2, d_state=4, scan_impl="ref")
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 8))
    params = MambaStack(**kw).init(jax.random.PRNGKey(0), x)  # one parameter tree for all discs
    calls = []
    scan = kernels.selective_scan

    def spy(*args, **kwargs):
        calls.append((len(args), kwargs["impl"], kwargs["delta_softplus"], sorted(kwargs)))
        return scan(*args, **kwargs)

    monkeypatch.setattr(mamba_lib.kernels, "selective_scan", spy)
    out = {disc: MambaStack(**kw, disc=disc).apply(params, x) for disc in DISCRETIZATIONS}
    # only the two approx_zoh layers call the kernel, with the arguments of before
    # (u, delta, A, B, C, D positional; z, delta_bias, softplus, impl by keyword)
    assert calls == [(6, "ref", True, ["delta_bias", "delta_softplus", "impl", "z"])] * 2
    default = MambaStack(**kw).apply(params, x)
    np.testing.assert_array_equal(np.asarray(out["approx_zoh"]), np.asarray(default))
    for disc in ("zoh", "bilinear"):  # the discretisation changes the output
        assert float(jnp.abs(out[disc] - default).max()) > 1e-4, disc


def test_bad_mamba_disc_raises():
    with pytest.raises(ValueError, match="disc='euler'.*mamba.disc"):
        MambaStack(d_model=8, n_layers=1, disc="euler").init(jax.random.PRNGKey(0),
                                                              jnp.zeros((1, 3, 8)))


def test_registry_passes_disc_through():
    level = level_config("mamba", 16, 1)
    assert level.mamba.disc == "approx_zoh" and make_stack(level).disc == "approx_zoh"
    level.mamba.disc = "zoh"
    stack = make_stack(level)
    assert type(stack) is MambaStack and stack.disc == "zoh"
    level = level_config("s4", 16, 1)
    level.s4.disc = "approx_zoh"
    stack = make_stack(level)
    assert type(stack) is S4Stack and stack.disc == "approx_zoh"


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_s4_approx_zoh_differs_from_zoh(mode):
    """Same parameters, dt up to 0.3: the B_bar of approx ZOH (dt B) and exact ZOH differ
    visibly (each is checked against a float64 recurrence in test_s4.py)."""
    kw = dict(d_model=4, n_layers=1, d_state=8, mode=mode, dt_min=0.05, dt_max=0.3)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 6, 4))
    params = S4Stack(**kw, disc="zoh").init(jax.random.PRNGKey(0), x)
    approx = S4Stack(**kw, disc="approx_zoh").apply(params, x)
    zoh = S4Stack(**kw, disc="zoh").apply(params, x)
    assert float(jnp.abs(approx - zoh).max()) > 1e-4
