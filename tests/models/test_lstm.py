"""LSTMStack: against a float64 numpy LSTM, causality, dropout placement, streaming step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiss_jax.models.lstm import LSTMStack
from tests.conftest import assert_close, rel_err

H, L, BATCH = 6, 37, 2


@functools.lru_cache(maxsize=None)
def _stack(n_layers=2):
    model = LSTMStack(d_model=H, n_layers=n_layers, dropout=0.3)
    x = jax.random.normal(jax.random.key(0), (BATCH, L, H))
    return model, jax.jit(model.init)(jax.random.key(1), x), x


def _np_lstm(params, x, n_layers):
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    x = np.asarray(x, np.float64)
    for i in range(n_layers):
        p = {k: np.asarray(v, np.float64) for k, v in params[f"layers_{i}"].items()}
        h = np.zeros((x.shape[0], H))
        c = np.zeros_like(h)
        out = []
        for t in range(x.shape[1]):
            z = x[:, t] @ p["w_ih"] + h @ p["w_hh"] + p["bias"]
            gi, gf, gg, go = np.split(z, 4, axis=-1)  # PyTorch gate order i, f, g, o
            c = sig(gf) * c + sig(gi) * np.tanh(gg)
            h = sig(go) * np.tanh(c)
            out.append(h)
        x = np.stack(out, axis=1)
    return x


def test_matches_float64_reference():
    model, variables, x = _stack()
    y = model.apply(variables, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, _np_lstm(variables["params"], x, 2), jnp.float32, what="LSTMStack")


def test_step_matches_call():
    model, variables, x = _stack()
    y = model.apply(variables, x)
    state = model.apply(variables, BATCH, method="init_state")
    assert [tuple(s.shape for s in hc) for hc in state] == [((BATCH, H), (BATCH, H))] * 2

    def body(s, x_t):
        return model.apply(variables, s, x_t, method="step")

    _, ys = jax.lax.scan(body, state, jnp.swapaxes(x, 0, 1))
    assert_close(jnp.swapaxes(ys, 0, 1), y, jnp.float32, what="LSTM step vs call")


def test_causal():
    model, variables, x = _stack()
    t = 20
    y = model.apply(variables, x)
    x2 = x.at[:, t + 1:].add(1.0)
    y2 = model.apply(variables, x2)
    assert_close(y2[:, : t + 1], y[:, : t + 1], jnp.float32, what="prefix")
    assert rel_err(y2[:, t + 1:], y[:, t + 1:]) > 1e-2


def test_dropout_only_between_layers_and_finite_grads():
    model, variables, x = _stack()
    rngs = lambda k: {"dropout": jax.random.key(k)}  # noqa: E731
    y_a = model.apply(variables, x, deterministic=False, rngs=rngs(2))
    y_b = model.apply(variables, x, deterministic=False, rngs=rngs(3))
    assert rel_err(y_a, y_b) > 1e-3
    one, one_vars, _ = _stack(1)
    # A single layer has no "between": dropout must not touch its output (nn.LSTM semantics).
    assert_close(one.apply(one_vars, x, deterministic=False, rngs=rngs(2)),
                 one.apply(one_vars, x), jnp.float32, what="1-layer dropout")
    loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(variables["params"])
    for g in jax.tree_util.tree_leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_validates_input_shape():
    model, variables, _ = _stack()
    with pytest.raises(ValueError, match=f"d_model={H}"):
        model.apply(variables, jnp.zeros((1, 4, H + 1)))


def test_bfloat16_inputs_keep_dtype_and_track_float32():
    model, variables, x = _stack()
    y16 = model.apply(variables, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert_close(y16, model.apply(variables, x), jnp.bfloat16, what="LSTMStack bf16 vs f32")
