"""TransformerStack: against a float64 numpy reference, causality, PE, KV-cache streaming step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiss_jax.models.transformer import DEFAULT_CACHE_LEN, TransformerStack, sinusoidal_encoding
from tests.conftest import assert_close, rel_err

D, HEADS, FF, L, BATCH = 8, 2, 16, 37, 2


@functools.lru_cache(maxsize=None)
def _stack():
    model = TransformerStack(d_model=D, n_layers=2, dropout=0.2, n_heads=HEADS, d_ff=FF)
    x = jax.random.normal(jax.random.key(0), (BATCH, L, D))
    return model, jax.jit(model.init)(jax.random.key(1), x), x


def _np_layer_norm(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _np_transformer(params, x):
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    length = x.shape[1]
    pos = np.arange(length)[:, None]
    i = np.arange(D)[None, :]
    angle = pos / 10000 ** ((i - i % 2) / D)
    x = x + np.where(i % 2 == 0, np.sin(angle), np.cos(angle))
    dh = D // HEADS
    causal = np.tril(np.ones((length, length), bool))
    for n in range(2):
        p = params[f"layers_{n}"]
        q, k, v = np.split(_np_dense(_np_layer_norm(x, p["norm1"]), p["qkv"]), 3, axis=-1)
        heads = []
        for h in range(HEADS):
            sl = slice(h * dh, (h + 1) * dh)
            s = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / np.sqrt(dh)
            s = np.where(causal, s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            heads.append((w / w.sum(-1, keepdims=True)) @ v[..., sl])
        x = x + _np_dense(np.concatenate(heads, -1), p["attn_out"])
        z = np.maximum(_np_dense(_np_layer_norm(x, p["norm2"]), p["ff_in"]), 0)
        x = x + _np_dense(z, p["ff_out"])
    return _np_layer_norm(x, params["final_norm"])


def test_sinusoidal_encoding_closed_form():
    pe = np.asarray(sinusoidal_encoding(jnp.arange(3), 6))
    np.testing.assert_allclose(pe[0], [0, 1, 0, 1, 0, 1], atol=1e-7)
    np.testing.assert_allclose(pe[2, :4], [np.sin(2), np.cos(2), np.sin(2 / 10000 ** (2 / 6)),
                                           np.cos(2 / 10000 ** (2 / 6))], rtol=1e-6)
    assert sinusoidal_encoding(jnp.arange(4), 5).shape == (4, 5)


def test_matches_float64_reference():
    model, variables, x = _stack()
    y = model.apply(variables, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, _np_transformer(variables["params"], x), jnp.float32, what="Transformer")


def test_step_matches_call():
    model, variables, x = _stack()
    y = model.apply(variables, x)
    # A cache longer than the stream: unused slots must stay masked.
    state = model.apply(variables, BATCH, max_len=L + 5, method="init_state")

    @jax.jit
    def run(state, xs):
        def body(s, x_t):
            return model.apply(variables, s, x_t, method="step")
        return jax.lax.scan(body, state, jnp.swapaxes(xs, 0, 1))

    state, ys = run(state, x)
    assert int(state["pos"]) == L
    assert_close(jnp.swapaxes(ys, 0, 1), y, jnp.float32, what="Transformer step vs call")
    # Past the cache the step must not silently return numbers.
    full = model.apply(variables, BATCH, max_len=2, method="init_state")
    for t in range(3):
        full, y_t = model.apply(variables, full, x[:, t], method="step")
    assert bool(jnp.all(jnp.isnan(y_t)))


def test_causal():
    model, variables, x = _stack()
    t = 20
    y = model.apply(variables, x)
    # A random perturbation: a constant shift of every feature would vanish in LayerNorm.
    noise = jax.random.normal(jax.random.key(5), x[:, t + 1:].shape)
    y2 = model.apply(variables, x.at[:, t + 1:].add(noise))
    assert_close(y2[:, : t + 1], y[:, : t + 1], jnp.float32, what="prefix")
    assert rel_err(y2[:, t + 1:], y[:, t + 1:]) > 1e-2


def test_dropout_and_finite_grads():
    model, variables, x = _stack()
    y_a = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    y_b = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert rel_err(y_a, y_b) > 1e-3
    cot = jax.random.normal(jax.random.key(4), x.shape)
    loss = lambda p: jnp.sum(model.apply({"params": p}, x) * cot)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(variables["params"])
    for g in jax.tree_util.tree_leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_validates_options():
    with pytest.raises(ValueError, match="d_model=6 is not divisible by n_heads=4"):
        TransformerStack(d_model=6, n_layers=1, n_heads=4).init(
            jax.random.key(0), jnp.zeros((1, 3, 6)))
    model, variables, _ = _stack()
    with pytest.raises(ValueError, match="max_len=0"):
        model.apply(variables, BATCH, max_len=0, method="init_state")
    default = model.apply(variables, BATCH, method="init_state")
    assert default["layers"][0]["k"].shape == (BATCH, DEFAULT_CACHE_LEN, HEADS, D // HEADS)


def test_bfloat16_inputs_keep_dtype_and_track_float32():
    model, variables, x = _stack()
    y16 = model.apply(variables, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert_close(y16, model.apply(variables, x), jnp.bfloat16, what="TransformerStack bf16 vs f32")
