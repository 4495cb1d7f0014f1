"""HiSS models: hierarchical (low + high level), flat baseline, multi-branch (Bhirangi et al. 2024,
arXiv 2402.10211, Sec. 4, Fig. 2).

Shapes: x (B, L, D_in) at the input rate, L = T * k with k = chunk_size (the frequency ratio, 10
in CSP-Bench) -> y (B, T, D_out), one prediction per chunk.

    HierarchicalModel:  (B, L, D_in) -> (B*T, k, D_in)          every chunk from a zero state
                        -> low LevelModel: Dense D_in -> d_low, stack, Dense d_low -> d_high
                        -> keep the LAST step of each chunk     (B, T, d_high)
                        -> high stack at d_high (no embedding)  -> Dense head -> (B, T, D_out)
    FlatModel:          Dense D_in -> d, stack at the full rate, Dense head, keep the LAST step of
                        each chunk.  The official HiSS code keeps the FIRST step of each chunk;
                        the last step is the causal-consistent choice (the prediction for chunk t
                        then sees all of chunk t, exactly what the hierarchical model sees).
    MultiBranchModel:   branch i reads input channels [start_i, stop_i) with its own low
                        LevelModel (same low config, own parameters) ending in d_high; the branch
                        chunk features are concatenated (n_branches * d_high) and a Dense `merge`
                        maps them to d_high before the high level.

The blocks of every level come from the registry (`hiss_jax.models.registry`); these modules only
compose them and never look at kind strings.

Mixed precision (config.model.dtype): the embed / out / merge Dense layers run in `dtype` like the
stacks' activations; the prediction head is float32 (Dense(dtype=float32): float32 predictions and
loss), as is the flat model's out Dense, which is its head (`LevelModel.out_dtype`).

Streaming (one input sample at a time, `hiss_jax.streaming`): every model exposes the linen
methods `init_low_state(batch_size, max_len)`, `low_step(state, x_t) -> (state, feature_t)`,
`init_high_state(batch_size, max_len)`, `high_step(state, feature) -> (state, y)` and the class
constant `reset_low_each_chunk` (True for the hierarchical models, whose low level restarts from
zero at every chunk; False for the flat model, whose single stack runs on across chunks and whose
`high_step` is the identity).
"""
from typing import Any, Sequence, Tuple

import jax.numpy as jnp
from flax import linen as nn


def check_chunking(x, chunk_size: int, name: str) -> Tuple[int, int, int]:
    """x: (B, L, D) with L a positive multiple of chunk_size -> (B, T = L // chunk_size, D)."""
    if x.ndim != 3:
        raise ValueError(f"{name} expects x (batch, length, channels), got {x.shape=}")
    b, length, d = x.shape
    if chunk_size < 1 or length == 0 or length % chunk_size:
        raise ValueError(
            f"{name}: {length=} is not a positive multiple of {chunk_size=}; crop or pad the "
            f"sequence to a multiple of the chunk (e.g. {length - length % chunk_size} or "
            f"{length + (-length) % chunk_size} steps)")
    return b, length // chunk_size, d


class LevelModel(nn.Module):
    """Optional Dense embed -> block stack -> optional Dense out (one HiSS level).

    x: (B, L, D) -> (B, L, out_features or stack width).  `stack` is any registry Stack
    (x (B, L, d_model) -> (B, L, d_model)); embed_features / out_features 0 or None skip the Dense.
    dtype: compute dtype of the embed Dense (None = promote: float32 with float32 params);
    out_dtype: that of the out Dense (None = dtype; float32 when it is the model's head).
    """
    stack: nn.Module
    embed_features: int | None = None
    out_features: int | None = None
    dtype: Any = None
    out_dtype: Any = None

    def setup(self):
        out_dtype = self.dtype if self.out_dtype is None else self.out_dtype
        self.embed = (nn.Dense(self.embed_features, dtype=self.dtype) if self.embed_features
                      else None)
        self.out = nn.Dense(self.out_features, dtype=out_dtype) if self.out_features else None

    def __call__(self, x, *, deterministic: bool = True):
        h = self.embed(x) if self.embed is not None else x
        h = self.stack(h, deterministic=deterministic)
        return self.out(h) if self.out is not None else h

    def init_state(self, batch_size: int, max_len: int | None = None) -> Any:
        """The stack's streaming state; max_len = the most steps that will be run (sizes the
        Transformer's KV cache; None = the stack's default)."""
        if max_len is None:
            return self.stack.init_state(batch_size)
        return self.stack.init_state(batch_size, max_len)

    def step(self, state, x_t):
        """x_t: (B, D) -> (state, y_t (B, out_features or d_model))."""
        h = self.embed(x_t) if self.embed is not None else x_t
        state, h = self.stack.step(state, h)
        return state, (self.out(h) if self.out is not None else h)


class HierarchicalModel(nn.Module):
    """HiSS (Bhirangi et al. 2024, Sec. 4). x: (B, L, D_in) -> (B, L // chunk_size, output_dim).

    low: LevelModel mapping a chunk (B*T, k, D_in) -> (B*T, k, d_high);  high: a Stack at d_high.
    """
    low: nn.Module
    high: nn.Module
    chunk_size: int
    output_dim: int

    reset_low_each_chunk = True

    def setup(self):
        # float32 head whatever the activations' dtype: predictions (and the loss) in float32.
        self.head = nn.Dense(self.output_dim, dtype=jnp.float32)

    def chunk_features(self, x, *, deterministic: bool = True):
        """x: (B, L, D_in) -> (B, T, d_high): the low level's last step of each chunk."""
        b, t, d = check_chunking(x, self.chunk_size, type(self).__name__)
        # Chunks are independent sequences from a zero state: fold them into the batch.
        feats = self.low(x.reshape(b * t, self.chunk_size, d), deterministic=deterministic)
        return feats[:, -1].reshape(b, t, feats.shape[-1])

    def predict_from_features(self, feats, *, deterministic: bool = True):
        """feats: (B, T, d_high) chunk features -> (B, T, output_dim): high stack + head."""
        return self.head(self.high(feats, deterministic=deterministic))

    def __call__(self, x, *, deterministic: bool = True):
        feats = self.chunk_features(x, deterministic=deterministic)
        return self.predict_from_features(feats, deterministic=deterministic)

    def init_low_state(self, batch_size: int, max_len: int | None = None) -> Any:
        """State at a chunk's start; a chunk never runs past chunk_size steps (max_len unused)."""
        del max_len
        return self.low.init_state(batch_size, self.chunk_size)

    def low_step(self, state, x_t):
        """x_t: (B, D_in) -> (state, feature_t (B, d_high))."""
        return self.low.step(state, x_t)

    def init_high_state(self, batch_size: int, max_len: int | None = None) -> Any:
        """max_len: the most chunks that will be streamed (None = the stack's default)."""
        if max_len is None:
            return self.high.init_state(batch_size)
        return self.high.init_state(batch_size, max_len)

    def high_step(self, state, feature):
        """feature: (B, d_high), the low level's output at a chunk's last step
        -> (state, y (B, D_out))."""
        state, h = self.high.step(state, feature)
        return state, self.head(h)


class FlatModel(nn.Module):
    """Flat baseline. x: (B, L, D_in) -> (B, L // chunk_size, output_dim).

    level: LevelModel (Dense embed, stack, Dense head to output_dim) run at the full input rate;
    the output at the LAST step of each chunk is kept (module docstring: official code keeps the
    first).
    """
    level: nn.Module
    chunk_size: int

    reset_low_each_chunk = False

    def __call__(self, x, *, deterministic: bool = True):
        check_chunking(x, self.chunk_size, type(self).__name__)
        y = self.level(x, deterministic=deterministic)
        return y[:, self.chunk_size - 1::self.chunk_size]

    def init_low_state(self, batch_size: int, max_len: int | None = None) -> Any:
        """max_len: the most input steps that will be streamed (None = the stack's default)."""
        return self.level.init_state(batch_size, max_len)

    def low_step(self, state, x_t):
        """x_t: (B, D_in) -> (state, y_t (B, D_out)); y_t is a prediction at every input step."""
        return self.level.step(state, x_t)

    def init_high_state(self, batch_size: int, max_len: int | None = None) -> Any:
        del batch_size, max_len
        return ()

    def high_step(self, state, feature):
        """Identity: the flat model's prediction for a chunk is its output at the chunk's last
        step."""
        return state, feature


class MultiBranchModel(nn.Module):
    """Multi-branch HiSS. x: (B, L, D_in) -> (B, L // chunk_size, output_dim).

    branches: ((name, start, stop), ...) channel ranges [start, stop) of x, one per entry of
    `lows` (LevelModels ending in d_high).  Chunk features (B, T, n_branches * d_high) ->
    Dense `merge` -> (B, T, d_high) -> high stack -> Dense head.
    """
    branches: Sequence[Tuple[str, int, int]]
    lows: Sequence[nn.Module]
    high: nn.Module
    chunk_size: int
    d_high: int
    output_dim: int
    dtype: Any = None  # compute dtype of `merge` (config.model.dtype); the head is float32

    reset_low_each_chunk = True

    def setup(self):
        if len(self.branches) != len(self.lows) or not self.branches:
            raise ValueError(f"need one low LevelModel per branch, got {len(self.branches)} "
                             f"branches and {len(self.lows)} low models")
        self.merge = nn.Dense(self.d_high, dtype=self.dtype)
        self.head = nn.Dense(self.output_dim, dtype=jnp.float32)

    def _check_ranges(self, d_in: int):
        for name, start, stop in self.branches:
            if not 0 <= start < stop <= d_in:
                raise ValueError(f"branch {name!r}: channel range [{start}, {stop}) does not lie "
                                 f"inside the {d_in} input channels; fix model.branches.{name}")

    def chunk_features(self, x, *, deterministic: bool = True):
        """x: (B, L, D_in) -> (B, T, d_high)."""
        b, t, d = check_chunking(x, self.chunk_size, type(self).__name__)
        self._check_ranges(d)
        chunks = x.reshape(b * t, self.chunk_size, d)
        feats = [low(chunks[..., start:stop], deterministic=deterministic)[:, -1]
                 for low, (_, start, stop) in zip(self.lows, self.branches)]
        return self.merge(jnp.concatenate(feats, axis=-1)).reshape(b, t, self.d_high)

    def predict_from_features(self, feats, *, deterministic: bool = True):
        """feats: (B, T, d_high) chunk features -> (B, T, output_dim): high stack + head."""
        return self.head(self.high(feats, deterministic=deterministic))

    def __call__(self, x, *, deterministic: bool = True):
        feats = self.chunk_features(x, deterministic=deterministic)
        return self.predict_from_features(feats, deterministic=deterministic)

    def init_low_state(self, batch_size: int, max_len: int | None = None) -> Any:
        """State at a chunk's start; a chunk never runs past chunk_size steps (max_len unused)."""
        del max_len
        return tuple(low.init_state(batch_size, self.chunk_size) for low in self.lows)

    def low_step(self, state, x_t):
        """x_t: (B, D_in) -> (state, feature_t (B, d_high))."""
        self._check_ranges(x_t.shape[-1])
        new_state, feats = [], []
        for low, s, (_, start, stop) in zip(self.lows, state, self.branches):
            s, f = low.step(s, x_t[..., start:stop])
            new_state.append(s)
            feats.append(f)
        return tuple(new_state), self.merge(jnp.concatenate(feats, axis=-1))

    def init_high_state(self, batch_size: int, max_len: int | None = None) -> Any:
        """max_len: the most chunks that will be streamed (None = the stack's default)."""
        if max_len is None:
            return self.high.init_state(batch_size)
        return self.high.init_state(batch_size, max_len)

    def high_step(self, state, feature):
        state, h = self.high.step(state, feature)
        return state, self.head(h)
