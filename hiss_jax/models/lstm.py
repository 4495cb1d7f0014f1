"""Stacked LSTM (the HiSS LSTM baseline's recurrent core), with a streaming step.

Shapes: x (B, L, H), H = d_model = hidden size of every layer; per-layer state h, c: (B, H).

Cell (Hochreiter & Schmidhuber 1997, in the PyTorch nn.LSTM form the HiSS code uses):
  [i, f, g, o] = x W_ih + h W_hh + b
  c' = sigmoid(f) c + sigmoid(i) tanh(g),   h' = sigmoid(o) tanh(c')
Dropout on the outputs of every layer except the last (nn.LSTM(dropout=...)). The embedding
and output Dense layers belong to the model wrapper. Parameters per layer: `w_ih` (H, 4H),
`w_hh` (H, 4H), `bias` (4H,), initialised uniform(-1/sqrt(H), 1/sqrt(H)) as in PyTorch (the
two PyTorch biases are one here).

Mixed precision (`dtype`, config.model.dtype): the input projection x W_ih (one matmul over the
whole sequence, the bulk of the FLOPs and bytes) runs in `dtype` (e.g. bfloat16, as a flax Dense
with that dtype: its output is rounded to `dtype`, since XLA:CPU has no bf16 x bf16 -> f32 dot)
and is cast to float32; the recurrence h W_hh, the gates and the state h, c stay float32, since
rounding inside the recurrence compounds over time steps and that matmul is latency-bound.
`dtype=None`: float32 (the input cast up).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def lstm_cell(carry, gates_x, w_hh, bias):
    """One LSTM step given the input projection.

    carry: (h, c), each (B, H) float32   gates_x: (B, 4H) = x W_ih   w_hh: (H, 4H)  bias: (4H,)
    -> ((h', c'), h')
    """
    h, c = carry
    gates = gates_x + jnp.dot(h, w_hh, preferred_element_type=jnp.float32) + bias
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h


def _uniform(scale):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


class LSTMLayer(nn.Module):
    """One LSTM layer. x: (B, L, H) -> (B, L, H) float32; the state starts at zero."""

    d_model: int
    dtype: Any = None  # operand dtype of x W_ih; None = float32

    @property
    def _in_dtype(self):
        return jnp.float32 if self.dtype is None else self.dtype

    def setup(self):
        h = self.d_model
        init = _uniform(1.0 / h**0.5)
        self.w_ih = self.param("w_ih", init, (h, 4 * h))
        self.w_hh = self.param("w_hh", init, (h, 4 * h))
        self.bias = self.param("bias", init, (4 * h,))

    def __call__(self, x):
        # The input projection has no recurrence: one matmul for the whole sequence.
        dt = self._in_dtype  # the result is cast up to float32 (a no-op in float32)
        gates_x = jnp.einsum("blh,hg->lbg", x.astype(dt), self.w_ih.astype(dt),
                             preferred_element_type=dt).astype(jnp.float32)
        _, hs = jax.lax.scan(lambda carry, g: lstm_cell(carry, g, self.w_hh, self.bias),
                             self.init_state(x.shape[0]), gates_x)
        return jnp.swapaxes(hs, 0, 1)

    def init_state(self, batch_size: int):
        zeros = jnp.zeros((batch_size, self.d_model), jnp.float32)
        return (zeros, zeros)

    def step(self, state, x_t):
        dt = self._in_dtype
        gates_x = jnp.dot(x_t.astype(dt), self.w_ih.astype(dt),
                          preferred_element_type=dt).astype(jnp.float32)
        return lstm_cell(state, gates_x, self.w_hh, self.bias)


class LSTMStack(nn.Module):
    """n_layers stacked LSTM layers, hidden size d_model, dropout between layers.

    x: (B, L, d_model) -> (B, L, d_model).  Streaming: `init_state(batch_size)` gives one
    (h, c) pair of (B, d_model) zeros per layer; `step(state, x_t)` with x_t: (B, d_model)
    returns (state', y_t), through `apply(..., method=...)` with the `__call__` parameters.
    `max_len` is accepted by `init_state` for a uniform interface and ignored.
    """

    d_model: int
    n_layers: int
    dropout: float = 0.0
    dtype: Any = None  # compute dtype (config.model.dtype); None = the input's dtype

    def setup(self):
        if self.d_model < 1 or self.n_layers < 1:
            raise ValueError(f"need d_model >= 1 and n_layers >= 1, got {self.d_model=}, "
                             f"{self.n_layers=}")
        self.layers = [LSTMLayer(self.d_model, dtype=self.dtype) for _ in range(self.n_layers)]
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, x, *, deterministic: bool = True):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"LSTMStack expects x (B, L, d_model={self.d_model}), got {x.shape}")
        dtype = x.dtype if self.dtype is None else self.dtype
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.n_layers - 1:
                x = self.drop(x, deterministic=deterministic)
        return x.astype(dtype)

    def init_state(self, batch_size: int, max_len: int | None = None):
        del max_len
        return [layer.init_state(batch_size) for layer in self.layers]

    def step(self, state, x_t):
        """state: list of (h, c) per layer, x_t: (B, d_model) -> (state', y_t: (B, d_model))."""
        if x_t.ndim != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"step expects x_t (B, d_model={self.d_model}), got {x_t.shape}")
        dtype = x_t.dtype if self.dtype is None else self.dtype
        new_state = []
        for layer, s in zip(self.layers, state):
            s, x_t = layer.step(s, x_t)
            new_state.append(s)
        return new_state, x_t.astype(dtype)
