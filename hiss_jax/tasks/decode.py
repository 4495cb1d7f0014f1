"""Greedy decoding of a `TokenModel`: streaming (the Stack's `init_state` / `step`) and the
parallel recomputation it must equal.

prefix: int (B, T) each row's forced tokens (source + separator) then anything;
prefix_len: int (B,) how many leading tokens of each row are forced (>= 1).
Both return preds: int32 (B, T), preds[:, t] = argmax of the logits after reading token t, where
token t is prefix[:, t] while t < prefix_len and preds[:, t - 1] after; so row b's generated text
is preds[b, prefix_len[b] - 1:].  Rows switch from forcing to generating at their own step, which
batches words of different lengths through one scan.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hiss_jax.tasks.lm import TokenModel


@functools.partial(jax.jit, static_argnums=0)
def greedy_decode_streaming(model: TokenModel, params, prefix, prefix_len):
    """One `lax.scan` over T steps of `model.step` (O(1) state per step for the SSMs)."""
    b, t_max = prefix.shape
    variables = {"params": params}
    state = model.apply(variables, b, t_max, method=TokenModel.init_state)

    def body(carry, t):
        state, prev = carry
        tok = jnp.where(t < prefix_len, prefix[:, t], prev)
        state, logits = model.apply(variables, state, tok, method=TokenModel.step)
        pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (state, pred), pred

    init = (state, jnp.zeros((b,), jnp.int32))
    _, preds = jax.lax.scan(body, init, jnp.arange(t_max))
    return preds.T


def greedy_decode_parallel(model: TokenModel, params, prefix, prefix_len):
    """Reference: re-run the full causal forward over the growing sequence at every step (O(T^2))."""
    prefix = np.asarray(prefix)
    prefix_len = np.asarray(prefix_len)
    b, t_max = prefix.shape
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, deterministic=True))
    seq = prefix.copy()
    preds = np.zeros((b, t_max), np.int32)
    for t in range(t_max):
        logits = np.asarray(forward(params, jnp.asarray(seq)))
        preds[:, t] = logits[:, t].argmax(-1)
        if t + 1 < t_max:
            seq[:, t + 1] = np.where(t + 1 < prefix_len, prefix[:, t + 1], preds[:, t])
    return preds


@functools.partial(jax.jit, static_argnums=0)
def streaming_logits(model: TokenModel, params, tokens):
    """tokens (B, T) -> logits (B, T, V) by T calls of `model.step` (equals `model(tokens)`)."""
    b, t_max = tokens.shape
    variables = {"params": params}
    state = model.apply(variables, b, t_max, method=TokenModel.init_state)

    def body(state, tok):
        return model.apply(variables, state, tok, method=TokenModel.step)

    _, logits = jax.lax.scan(body, state, tokens.T)
    return jnp.swapaxes(logits, 0, 1)
