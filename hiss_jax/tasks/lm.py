"""Causal token model for the classic SSM tasks: embedding -> a registry Stack -> logits.

Shapes: tokens (B, L) int -> logits (B, L, V) float32;  V = vocab_size, D = level d_model.
The Stack is the registry's (`hiss_jax.models.registry.make_stack`): every family setting of the
level config, e.g. `mamba.disc` or `s4.disc`, reaches it unchanged.
Streaming: `init_state(batch_size, max_len)` then `step(state, token_t)` with token_t: (B,) int
-> (state', logits_t (B, V)), through `apply(..., method=...)` with the `__call__` parameters; it
uses the Stack's own `init_state` / `step`, so stepping a sequence equals `__call__` on it.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from hiss_jax.models.registry import make_stack


class TokenModel(nn.Module):
    """tokens (B, L) -> logits (B, L, V): Embed(V, D) -> stack -> Dense(V).  Causal."""
    vocab_size: int
    d_model: int
    stack: nn.Module

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.d_model)
        self.head = nn.Dense(self.vocab_size)

    def __call__(self, tokens, *, deterministic: bool = True):
        if tokens.ndim != 2:
            raise ValueError(f"TokenModel expects tokens (B, L), got {tokens.shape=}")
        # int cast: the shared TrainState init feeds a float32 zeros dummy.
        h = self.embed(tokens.astype(jnp.int32))
        h = self.stack(h, deterministic=deterministic)
        return self.head(h).astype(jnp.float32)

    def init_state(self, batch_size: int, max_len: int):
        """The Stack's streaming state for a stream of at most `max_len` steps."""
        return self.stack.init_state(batch_size, max_len)

    def step(self, state, token_t):
        """token_t: (B,) int -> (state', logits_t (B, V) float32)."""
        h = self.embed(token_t.astype(jnp.int32))
        state, y = self.stack.step(state, h)
        return state, self.head(y).astype(jnp.float32)


def build_token_model(model_cfg, vocab_size: int, scan_impl: str = "auto") -> TokenModel:
    """config.model (a level config) -> unbound TokenModel."""
    return TokenModel(vocab_size=int(vocab_size), d_model=int(model_cfg.d_model),
                      stack=make_stack(model_cfg, scan_impl))
