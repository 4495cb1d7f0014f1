"""Mamba discretisations: the pure-JAX scan against the kernel reference (approx ZOH) and a
sequential float64 NumPy recurrence (all three); DiscMambaStack's step against its call."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from hiss_jax.models.mamba import MambaStack
from hiss_jax.tasks.discretization import (MAMBA_DISCS, DiscMambaStack, discretize,
                                           selective_scan_disc)
from tests.conftest import assert_close


def _inputs(b=2, l=11, di=6, n=4, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    u = jax.random.normal(ks[0], (b, l, di))
    delta = jax.random.normal(ks[1], (b, l, di))
    a = -jnp.exp(jax.random.normal(ks[2], (di, n)))
    bm = jax.random.normal(ks[3], (b, l, n))
    cm = jax.random.normal(ks[4], (b, l, n))
    d = jax.random.normal(ks[5], (di,))
    z = jax.random.normal(ks[6], (b, l, di))
    bias = jax.random.normal(ks[7], (di,)) * 0.5
    return u, delta, a, bm, cm, d, z, bias


def _numpy_reference(u, delta, a, bm, cm, d, z, bias, disc):
    u, delta, a, bm, cm, d, z, bias = (np.asarray(x, np.float64)
                                       for x in (u, delta, a, bm, cm, d, z, bias))
    dt = np.log1p(np.exp(delta + bias))  # softplus
    b, l, di = u.shape
    h = np.zeros((b, di, a.shape[1]))
    ys = []
    for t in range(l):
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
    u, delta, a, bm, cm, d, z, bias = _inputs()
    args = dict(D=d, z=z, delta_bias=bias, delta_softplus=True, return_final_state=True)
    y, h = selective_scan_disc(u, delta, a, bm, cm, disc="approx_zoh", **args)
    y_ref, h_ref = kernels.selective_scan(u, delta, a, bm, cm, impl="ref", **args)
    assert_close(y, y_ref, jnp.float32, what="y")
    assert_close(h, h_ref, jnp.float32, what="h_L")


@pytest.mark.parametrize("disc", MAMBA_DISCS)
def test_each_discretisation_matches_a_float64_recurrence(disc):
    inputs = _inputs(seed=1)
    u, delta, a, bm, cm, d, z, bias = inputs
    y, h = selective_scan_disc(u, delta, a, bm, cm, d, z, bias, delta_softplus=True, disc=disc,
                               return_final_state=True)
    y_np, h_np = _numpy_reference(*inputs, disc)
    assert_close(y, y_np, jnp.float32, what=f"{disc} y")
    assert_close(h, h_np, jnp.float32, what=f"{disc} h_L")


def test_discretisations_agree_for_small_steps_and_differ_for_large():
    a = -jnp.arange(1.0, 5.0)[None]
    small = [discretize(jnp.full((1, 1), 1e-3), a, k) for k in MAMBA_DISCS]
    big = [discretize(jnp.full((1, 1), 1.0), a, k) for k in MAMBA_DISCS]
    for ab, bs in small[1:]:
        np.testing.assert_allclose(ab, small[0][0], rtol=1e-5)
        np.testing.assert_allclose(bs, small[0][1], rtol=5e-3)
    # at dt |A| = 1..4 the input terms differ a lot: dt vs (1 - e^{-dt|A|}) / |A|
    assert np.abs(big[0][1] - big[1][1]).max() > 0.5
    # bilinear keeps |A_bar| < 1 for every dt (A-stable)
    assert (np.abs(big[2][0]) < 1).all()
    with pytest.raises(ValueError, match="approx_zoh"):
        discretize(jnp.ones((1, 1)), a, "euler")


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_disc_stack_step_equals_call(disc):
    stack = DiscMambaStack(d_model=8, n_layers=1, d_state=4, disc=disc, scan_impl="ref")
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 7, 8))
    params = stack.init(jax.random.PRNGKey(0), x)
    full = stack.apply(params, x)
    state = stack.apply(params, 2, method=DiscMambaStack.init_state)

    def body(s, x_t):
        return stack.apply(params, s, x_t, method=DiscMambaStack.step)

    _, ys = jax.lax.scan(body, state, jnp.swapaxes(x, 0, 1))
    assert_close(jnp.swapaxes(ys, 0, 1), full, jnp.float32, what=f"{disc} step vs call")


def test_disc_stack_approx_zoh_is_the_plain_mamba_stack():
    kw = dict(d_model=8, n_layers=2, d_state=4, scan_impl="ref")
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 8))
    params = MambaStack(**kw).init(jax.random.PRNGKey(0), x)
    plain = MambaStack(**kw).apply(params, x)
    disc = DiscMambaStack(**kw, disc="approx_zoh").apply(params, x)  # same parameter tree
    zoh = DiscMambaStack(**kw, disc="zoh").apply(params, x)
    assert_close(disc, plain, jnp.float32, what="approx_zoh vs MambaStack")
    assert float(jnp.abs(zoh - plain).max()) > 1e-4  # the discretisation changes the output


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_s4_approx_zoh_step_equals_call_and_differs_from_zoh(mode):
    from hiss_jax.models.s4 import S4Stack
    from hiss_jax.tasks.discretization import DiscS4Stack
    kw = dict(d_model=4, n_layers=1, d_state=8, mode=mode, dt_min=0.05, dt_max=0.3)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 6, 4))
    params = S4Stack(**kw, disc="zoh").init(jax.random.PRNGKey(0), x)
    stack = DiscS4Stack(**kw, disc="approx_zoh")
    full = stack.apply(params, x)  # same parameter tree as S4Stack
    state = stack.apply(params, 2, method=DiscS4Stack.init_state)

    def body(s, x_t):
        return stack.apply(params, s, x_t, method=DiscS4Stack.step)

    _, ys = jax.lax.scan(body, state, jnp.swapaxes(x, 0, 1))
    assert_close(jnp.swapaxes(ys, 0, 1), full, jnp.float32, what=f"{mode} approx_zoh step")
    zoh = S4Stack(**kw, disc="zoh").apply(params, x)
    assert_close(DiscS4Stack(**kw, disc="zoh").apply(params, x), zoh, jnp.float32, what="zoh")
    assert float(jnp.abs(full - zoh).max()) > 1e-4
