"""Mamba2Stack: shapes, grads, init, headdim cap, scan impls agree, causality, streaming step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiss_jax.models.mamba2 import Mamba2Mixer, Mamba2Stack, pick_headdim
from hiss_jax.models.norms import RMSNormGated
from tests.conftest import assert_close

# d_inner 48, headdim cap 16 -> 3 heads of 16; chunk 4 so the SSD chunking (and its padding of
# a length that is not a multiple of the chunk) is exercised by L = 10; 3 B/C groups (one per
# head) exercise the head -> group mapping in the scan, the streaming step and the gated norm.
SMALL = dict(d_model=24, n_layers=2, d_state=8, headdim=16, chunk_size=4, n_groups=3)


@pytest.fixture(autouse=True)
def _ieee_float32_matmuls():
    """The float32 tolerances assume IEEE float32 matmuls; GPUs default to TF32."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def xla_model():
    """(params, jitted forward) of a small 2-layer stack, shared to pay compilation once."""
    stack = Mamba2Stack(**SMALL, scan_impl="xla")
    params = jax.jit(stack.init)(jax.random.PRNGKey(0), jnp.zeros((2, 10, 24)))["params"]
    return params, jax.jit(lambda p, x: stack.apply({"params": p}, x))


def test_shapes_and_finite_grads(xla_model):
    params, fwd = xla_model
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 10, 24))
    assert fwd(params, x).shape == x.shape
    grads = jax.jit(jax.grad(lambda p: jnp.sum(fwd(p, x) ** 2)))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    for name in ("A_log", "dt_bias", "D"):
        assert float(jnp.abs(grads["mixers_1"][name]).sum()) > 0, name


def test_param_shapes_and_init(xla_model):
    params, _ = xla_model
    m = params["mixers_0"]
    h, d_inner, n, g = 3, 48, 8, 3
    assert m["in_proj"]["kernel"].shape == (24, 2 * d_inner + 2 * g * n + h)
    assert m["conv_weight"].shape == (4, d_inner + 2 * g * n)
    a = np.exp(np.asarray(m["A_log"]))
    assert a.shape == (h,) and a.min() >= 1.0 and a.max() <= 16.0
    dt = np.asarray(jax.nn.softplus(m["dt_bias"]))
    assert dt.shape == (h,) and dt.min() >= 1e-4 - 1e-9 and dt.max() <= 1e-1 + 1e-6
    np.testing.assert_array_equal(m["D"], np.ones(h))
    assert "bias" not in m["in_proj"] and "bias" not in m["out_proj"]


def test_pick_headdim():
    assert pick_headdim(128, 64) == 64
    assert pick_headdim(32, 64) == 32  # d_model 16: one head of 32
    assert pick_headdim(48, 64) == 48
    assert pick_headdim(96, 64) == 48  # 64 does not divide 96
    assert Mamba2Mixer(d_model=20, headdim=64).n_heads == 1


def test_bad_groups_raise():
    with pytest.raises(ValueError, match="n_groups=2 must divide n_heads=3"):
        Mamba2Mixer(d_model=24, headdim=16, n_groups=2).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 4, 24)))


def test_gated_rmsnorm_groups():
    y = jax.random.normal(jax.random.PRNGKey(2), (3, 8))
    z = jax.random.normal(jax.random.PRNGKey(3), (3, 8))
    norm = RMSNormGated(n_groups=2)
    out = norm.apply(norm.init(jax.random.PRNGKey(0), y, z), y, z)
    g = np.asarray(y * jax.nn.silu(z)).reshape(3, 2, 4)
    ref = g / np.sqrt((g ** 2).mean(-1, keepdims=True) + 1e-5)
    assert_close(out, ref.reshape(3, 8), jnp.float32, what="gated rmsnorm")


def test_ref_and_xla_scan_agree(xla_model):
    params, fwd = xla_model
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 10, 24))
    ref = jax.jit(lambda p, x: Mamba2Stack(**SMALL, scan_impl="ref").apply({"params": p}, x))
    assert_close(fwd(params, x), ref(params, x), jnp.float32, what="ref vs xla")


def test_causal(xla_model):
    params, fwd = xla_model
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 10, 24))
    y = fwd(params, x)
    y2 = fwd(params, x.at[:, 5:].add(jax.random.normal(jax.random.PRNGKey(8), (2, 5, 24))))
    np.testing.assert_allclose(np.asarray(y[:, :5]), np.asarray(y2[:, :5]), rtol=0, atol=1e-6)
    assert not np.allclose(np.asarray(y[:, 5:]), np.asarray(y2[:, 5:]))


def test_step_matches_forward(xla_model):
    params, fwd = xla_model
    stack = Mamba2Stack(**SMALL)
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 10, 24))
    state = stack.apply({"params": params}, 2, method="init_state")

    def body(s, xt):
        return stack.apply({"params": params}, s, xt, method="step")

    _, ys = jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))(state, jnp.swapaxes(x, 0, 1))
    assert_close(jnp.swapaxes(ys, 0, 1), fwd(params, x), jnp.float32, what="step vs forward")
