"""Causal token model for the classic SSM tasks: embedding -> a registry Stack -> logits.

Shapes: tokens (B, L) int -> logits (B, L, V) float32;  V = vocab_size, D = level d_model.
Streaming: `init_state(batch_size, max_len)` then `step(state, token_t)` with token_t: (B,) int
-> (state', logits_t (B, V)), through `apply(..., method=...)` with the `__call__` parameters; it
uses the Stack's own `init_state` / `step`, so stepping a sequence equals `__call__` on it.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import linen as nn

from hiss_jax.models.registry import STACKS, make_stack
from hiss_jax.tasks.discretization import DiscMambaStack, DiscS4Stack

# kind -> (Stack subclass, {field: values only the subclass takes}).  The registry Stack is used
# unless the level config sets such a value; fields the registry Stack lacks (mamba.disc) are
# dropped at their default.  Goes away when hiss_jax/models take these values themselves.
TASK_STACKS = {"mamba": (DiscMambaStack, {"disc": ("zoh", "bilinear")}),
               "s4": (DiscS4Stack, {"disc": ("approx_zoh",)})}


def make_token_stack(level_cfg, scan_impl: str = "auto") -> nn.Module:
    """Level config (configs/base.py:level_config, plus task fields such as `mamba.disc`) ->
    unbound Stack (B, L, d_model) -> (B, L, d_model), built by
    `hiss_jax.models.registry.make_stack`, or by the `TASK_STACKS` subclass for the values only
    it takes (e.g. Mamba with exact ZOH, S4 with approximate ZOH)."""
    kind = level_cfg["kind"]
    if kind not in STACKS:
        raise ValueError(f"unknown model.kind {kind!r}; allowed kinds: {sorted(STACKS)}")
    base_fields = {f.name for f in dataclasses.fields(STACKS[kind])} - {"parent", "name"}
    cls, special = TASK_STACKS.get(kind, (None, {}))
    sub = dict(level_cfg[kind]) if level_cfg.get(kind) is not None else {}
    unknown = sorted(set(sub) - base_fields - set(special))
    if unknown:
        raise ValueError(f"model.{kind} has settings {unknown} that {STACKS[kind].__name__} "
                         f"does not take; its fields are {sorted(base_fields)}")
    for k in set(special) & set(sub) - base_fields:  # a field only the subclass knows
        default = cls.__dataclass_fields__[k].default
        if sub[k] != default and sub[k] not in special[k]:
            raise ValueError(f"model.{kind}.{k}={sub[k]!r} is not allowed; use one of "
                             f"{[default, *special[k]]}")
    use_subclass = any(sub.get(k) in values for k, values in special.items())
    plain = dict(level_cfg.to_dict() if hasattr(level_cfg, "to_dict") else level_cfg)
    plain[kind] = {k: v for k, v in sub.items()
                   if k in base_fields and not (use_subclass and k in special)}
    stack = make_stack(plain, scan_impl)
    if not use_subclass:
        return stack
    kwargs = {f: getattr(stack, f) for f in base_fields}
    kwargs.update({k: sub[k] for k in special if k in sub})
    return cls(**kwargs)


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
                      stack=make_token_stack(model_cfg, scan_impl))
