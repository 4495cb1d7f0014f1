"""MambaStack: shapes, gradients, init, scan impls agree, causality, streaming step == forward."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiss_jax.models.mamba import MambaMixer, MambaStack, causal_depthwise_conv
from tests.conftest import assert_close

SMALL = dict(d_model=16, n_layers=2, d_state=4)


@pytest.fixture(autouse=True)
def _ieee_float32_matmuls():
    """The float32 tolerances assume IEEE float32 matmuls; GPUs default to TF32."""
    with jax.default_matmul_precision("highest"):
        yield


def _init(stack, x):
    return jax.jit(stack.init)(jax.random.PRNGKey(0), x)["params"]


@pytest.fixture(scope="module")
def xla_model():
    """(params, jitted forward) of a small 2-layer stack, shared to pay compilation once."""
    stack = MambaStack(**SMALL, scan_impl="xla")
    x = jnp.zeros((2, 12, 16))
    return _init(stack, x), jax.jit(lambda p, x: stack.apply({"params": p}, x))


def test_shapes_and_finite_grads(xla_model):
    params, fwd = xla_model
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 16))
    assert fwd(params, x).shape == x.shape
    grads = jax.jit(jax.grad(lambda p: jnp.sum(fwd(p, x) ** 2)))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    # every parameter is used: the SSM dynamics leaves get a nonzero gradient
    mixer = grads["mixers_0"]
    for name in ("A_log", "dt_bias", "D"):
        assert float(jnp.abs(mixer[name]).sum()) > 0, name


def test_param_names_and_init():
    stack = MambaStack(d_model=40, n_layers=1, d_state=16)
    params = _init(stack, jnp.zeros((1, 4, 40)))
    m = params["mixers_0"]
    d_inner, rank = 80, math.ceil(40 / 16)
    assert m["A_log"].shape == (d_inner, 16)
    np.testing.assert_allclose(np.exp(m["A_log"][3]), np.arange(1, 17), rtol=1e-6)
    np.testing.assert_array_equal(m["D"], np.ones(d_inner))
    dt = np.asarray(jax.nn.softplus(m["dt_bias"]))
    assert dt.shape == (d_inner,) and dt.min() >= 1e-4 - 1e-9 and dt.max() <= 1e-1 + 1e-6
    assert m["dt_proj"]["kernel"].shape == (rank, d_inner)
    assert float(jnp.abs(m["dt_proj"]["kernel"]).max()) <= rank ** -0.5
    assert "bias" not in m["in_proj"] and "bias" not in m["out_proj"]
    assert m["x_proj"]["kernel"].shape == (d_inner, rank + 32)
    assert m["conv_weight"].shape == (4, d_inner) and m["conv_bias"].shape == (d_inner,)


def test_causal_conv_matches_lax_conv():
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 5))
    w = jax.random.normal(jax.random.PRNGKey(3), (4, 5))
    b = jax.random.normal(jax.random.PRNGKey(4), (5,))
    # reference: lax depthwise conv with left padding K - 1 (PyTorch Conv1d + truncation)
    ref = jax.lax.conv_general_dilated(
        x, w[:, None, :], window_strides=(1,), padding=[(3, 0)],
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=5) + b
    assert_close(causal_depthwise_conv(x, w, b), ref, jnp.float32, what="conv")


def test_ref_and_xla_scan_agree(xla_model):
    params, fwd = xla_model
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 12, 16))
    ref = jax.jit(lambda p, x: MambaStack(**SMALL, scan_impl="ref").apply({"params": p}, x))
    assert_close(fwd(params, x), ref(params, x), jnp.float32, what="ref vs xla")


def test_causal(xla_model):
    params, fwd = xla_model
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 12, 16))
    y = fwd(params, x)
    # a random perturbation: a constant shift would be removed by the first LayerNorm
    y2 = fwd(params, x.at[:, 7:].add(jax.random.normal(jax.random.PRNGKey(8), (2, 5, 16))))
    np.testing.assert_array_equal(np.asarray(y[:, :7]), np.asarray(y2[:, :7]))
    assert not np.allclose(np.asarray(y[:, 7:]), np.asarray(y2[:, 7:]))


def test_step_matches_forward(xla_model):
    params, fwd = xla_model
    stack = MambaStack(**SMALL)
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 12, 16))
    y = fwd(params, x)
    state = stack.apply({"params": params}, 2, method="init_state")

    def body(s, xt):
        return stack.apply({"params": params}, s, xt, method="step")

    _, ys = jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))(state, jnp.swapaxes(x, 0, 1))
    assert_close(jnp.swapaxes(ys, 0, 1), y, jnp.float32, what="step vs forward")


def test_bad_width_raises():
    with pytest.raises(ValueError, match="expects x"):
        MambaMixer(d_model=8).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 6)))
