"""Causal pre-norm Transformer encoder (the HiSS Transformer baseline), with a KV-cache step.

Shapes: x (B, L, D), D = d_model; heads: (B, L, n_heads, D // n_heads); KV cache per layer
k, v: (B, max_len, n_heads, D // n_heads).

Vaswani et al. 2017: sinusoidal position encoding (Sec. 3.5) added at the input, then
n_layers pre-norm encoder layers (PyTorch nn.TransformerEncoderLayer(norm_first=True),
activation ReLU, dropout on attention weights, after attention, inside and after the
feed-forward), a causal mask, and a final LayerNorm:
  x = x + drop(MHA(LN(x), causal));  x = x + drop(W2 drop(relu(W1 LN(x))))
  Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + mask) V   (eq. 1)
Mixed precision (`dtype`, config.model.dtype): the Dense layers (qkv, attention out, feed-forward)
and their inputs run in `dtype` (e.g. bfloat16; parameters stay float32); the logits Q K^T
(float32 accumulation), the softmax, probs @ V, the LayerNorms, the position encoding and the
residual stream stay float32.  `dtype=None` computes in the input's dtype.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LAYER_NORM_EPS = 1e-5  # PyTorch nn.LayerNorm default
# KV cache length when init_state gets none: ~7 min at 5 Hz, 40 s at 50 Hz (flat baseline).
DEFAULT_CACHE_LEN = 2048


def sinusoidal_encoding(positions, d_model: int):
    """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(same)  (Vaswani eq. Sec. 3.5).

    positions: (...) integers -> (..., D) float32. Odd D drops the last cosine.
    """
    half = (d_model + 1) // 2
    freq = jnp.exp(-np.log(10000.0) * (2.0 * jnp.arange(half, dtype=jnp.float32) / d_model))
    angles = jnp.asarray(positions, jnp.float32)[..., None] * freq
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return pe.reshape(*pe.shape[:-2], 2 * half)[..., :d_model]


def attention_probs(q, k, mask):
    """Softmax attention weights in float32.

    q: (B, Q, h, d)  k: (B, T, h, d)  mask: broadcastable to (B, h, Q, T), True = attend
    -> (B, h, Q, T)
    """
    # Logits and softmax in float32.  bf16 q, k are cast up first (exact: bf16 products are exact
    # in float32, and XLA:CPU has no bf16 x bf16 -> f32 dot); a no-op for float32 inputs.
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bthd->bhqt", q, k, preferred_element_type=jnp.float32)
    logits = logits / np.sqrt(q.shape[-1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


class EncoderLayer(nn.Module):
    """One pre-norm causal encoder layer. x: (B, L, D) -> (B, L, D).

    The residual stream is float32 (as mamba_ssm's residual_in_fp32), so bf16 activations do
    not drift over layers; Dense layers see the stack's input dtype.
    """

    d_model: int
    n_heads: int
    d_ff: int
    dropout: float = 0.0
    dtype: Any = None  # compute dtype of the Dense layers; None = promote (pre-existing default)

    def setup(self):
        self.norm1 = nn.LayerNorm(epsilon=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(epsilon=LAYER_NORM_EPS)
        self.qkv = nn.Dense(3 * self.d_model, dtype=self.dtype)
        self.attn_out = nn.Dense(self.d_model, dtype=self.dtype)
        self.ff_in = nn.Dense(self.d_ff, dtype=self.dtype)
        self.ff_out = nn.Dense(self.d_model, dtype=self.dtype)
        self.drop = nn.Dropout(self.dropout)

    def _qkv(self, x, dtype):
        q, k, v = jnp.split(self.qkv(self.norm1(x).astype(dtype)), 3, axis=-1)
        heads = (self.n_heads, self.d_model // self.n_heads)
        return tuple(t.reshape(*t.shape[:-1], *heads) for t in (q, k, v))

    def _attend(self, probs, v, dtype, deterministic):
        probs = self.drop(probs, deterministic=deterministic)
        out = jnp.einsum("bhqt,bthd->bqhd", probs, v.astype(jnp.float32))
        out = out.reshape(*out.shape[:-2], self.d_model)
        out = self.drop(self.attn_out(out.astype(dtype)), deterministic=deterministic)
        return out.astype(jnp.float32)

    def _feed_forward(self, x, dtype, deterministic):
        z = jax.nn.relu(self.ff_in(self.norm2(x).astype(dtype)))
        z = self.drop(self.ff_out(self.drop(z, deterministic=deterministic)),
                      deterministic=deterministic)
        return x + z.astype(jnp.float32)

    def __call__(self, x, dtype, *, deterministic: bool = True):
        """x: (B, L, D) float32 residual stream; Dense layers run in `dtype`."""
        q, k, v = self._qkv(x, dtype)
        length = x.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        x = x + self._attend(attention_probs(q, k, causal), v, dtype, deterministic)
        return self._feed_forward(x, dtype, deterministic)

    def step(self, cache, x_t, pos, dtype):
        """cache {'k','v'}: (B, T, h, d); x_t: (B, D) float32; pos: int32 () -> (cache', (B, D))."""
        q, k, v = self._qkv(x_t[:, None], dtype)
        cache = {
            "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                              (0, pos, 0, 0)),
            "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype),
                                              (0, pos, 0, 0)),
        }
        visible = jnp.arange(cache["k"].shape[1]) <= pos
        x = x_t[:, None] + self._attend(attention_probs(q, cache["k"], visible), cache["v"],
                                        dtype, True)
        return cache, self._feed_forward(x, dtype, True)[:, 0]


class TransformerStack(nn.Module):
    """Sinusoidal PE -> dropout -> n_layers pre-norm causal encoder layers -> LayerNorm.

    x: (B, L, d_model) -> (B, L, d_model).  Streaming: `init_state(batch_size, max_len)` gives
    {'pos': int32 (), 'layers': [{'k', 'v'}: (B, max_len, n_heads, d_model // n_heads)]};
    `step(state, x_t)` with x_t: (B, d_model) returns (state', y_t), through
    `apply(..., method=...)` with the `__call__` parameters. Steps past max_len return NaN.
    """

    d_model: int
    n_layers: int
    dropout: float = 0.0
    n_heads: int = 2
    d_ff: int = 128
    dtype: Any = None  # compute dtype (config.model.dtype); None = the input's dtype

    def setup(self):
        if self.n_heads < 1 or self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}; pick n_heads dividing d_model")
        if self.n_layers < 1 or self.d_ff < 1:
            raise ValueError(f"need n_layers >= 1 and d_ff >= 1, got {self.n_layers=}, "
                             f"{self.d_ff=}")
        self.layers = [EncoderLayer(self.d_model, self.n_heads, self.d_ff, self.dropout,
                                    dtype=self.dtype)
                       for _ in range(self.n_layers)]
        self.final_norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS)
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, x, *, deterministic: bool = True):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"TransformerStack expects x (B, L, d_model={self.d_model}), "
                             f"got {x.shape}")
        dtype = x.dtype if self.dtype is None else self.dtype
        pe = sinusoidal_encoding(jnp.arange(x.shape[1]), self.d_model)
        x = self.drop(x.astype(jnp.float32) + pe, deterministic=deterministic)
        for layer in self.layers:
            x = layer(x, dtype, deterministic=deterministic)
        return self.final_norm(x).astype(dtype)

    def init_state(self, batch_size: int, max_len: int = DEFAULT_CACHE_LEN):
        """Zero KV caches of length max_len (the longest stream to be stepped) and pos = 0.

        The default lets callers that only pass batch_size (the uniform Stack interface) work;
        pass max_len for longer streams (steps past it return NaN).
        """
        if max_len < 1:
            raise ValueError(f"TransformerStack.init_state: KV cache length {max_len=} must be "
                             f">= 1; pass max_len >= the number of steps to run")
        shape = (batch_size, max_len, self.n_heads, self.d_model // self.n_heads)
        zeros = jnp.zeros(shape, jnp.float32)
        return {"pos": jnp.zeros((), jnp.int32),
                "layers": [{"k": zeros, "v": zeros} for _ in range(self.n_layers)]}

    def step(self, state, x_t):
        """state from `init_state`, x_t: (B, d_model) -> (state', y_t: (B, d_model))."""
        if x_t.ndim != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"step expects x_t (B, d_model={self.d_model}), got {x_t.shape}")
        pos = state["pos"]
        dtype = x_t.dtype if self.dtype is None else self.dtype
        x = x_t.astype(jnp.float32) + sinusoidal_encoding(pos, self.d_model)
        caches = []
        for layer, cache in zip(self.layers, state["layers"]):
            cache, x = layer.step(cache, x, pos, dtype)
            caches.append(cache)
        y = self.final_norm(x).astype(dtype)
        # dynamic_update_slice clamps out-of-range writes; make an overflow visible instead.
        y = jnp.where(pos < state["layers"][0]["k"].shape[1], y, jnp.nan)
        return {"pos": pos + 1, "layers": caches}, y
