"""Streaming inference: feed sensor samples as they arrive, get one prediction per chunk.

Shapes: a sample x_t (B, D_in) or a block (B, n, D_in) in; predictions (B, n_done, D_out) out,
where n_done is the number of chunks (chunk_size samples each) completed by the block.

HiSS (Bhirangi et al. 2024, arXiv 2402.10211, Sec. 4) runs its low level on each chunk from a zero
state and its high level once per chunk on the low level's last output; streamed, that becomes

    every sample:     low_state, feature = low_step(low_state, x_t)
    at a chunk's end: high_state, y = high_step(high_state, feature)  -> emit y
                      low_state = init_low_state()                     (hierarchical models only)

The flat model runs its one stack on across chunks (no reset) and emits its output at each
chunk's last sample.  With the same parameters the streamed predictions equal the parallel
forward `model.apply(params, x[:, :T * chunk_size])` up to float rounding; samples of a final,
partial chunk update the low state but emit nothing until the chunk completes.

The per-sample work is one jitted `low_step`; a chunk's last sample adds one jitted `high_step`
(two small dispatches; fusing them would save one dispatch of latency at the cost of compiling
the low step twice).  Models provide the streaming methods (`hiss_jax.models.hiss` docstring).
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class StreamingPredictor:
    """Stateful streaming wrapper around a HiSS / flat / multi-branch model and its parameters.

    model: a model from `hiss_jax.models.build_model`;  params: its 'params' collection.
    batch_size: streams run side by side (B).  max_len: the most input samples that will be
    streamed before `reset()` (sizes Transformer KV caches; None = the stacks' defaults).
    """

    def __init__(self, model, params, *, batch_size: int = 1, max_len: int | None = None,
                 jit: bool = True):
        self.model = model
        self.params = params
        self.batch_size = int(batch_size)
        self.chunk_size = int(model.chunk_size)
        self.reset_low_each_chunk = bool(model.reset_low_each_chunk)
        variables = {"params": params}
        # The flat model's single stack sees every sample; a hierarchical high level one per chunk.
        high_len = None if max_len is None else max(1, max_len // self.chunk_size)
        self._low0 = model.apply(variables, self.batch_size, max_len, method="init_low_state")
        self._high0 = model.apply(variables, self.batch_size, high_len, method="init_high_state")

        def sample(p, low_state, x_t):
            return model.apply({"params": p}, low_state, x_t, method="low_step")

        def chunk(p, high_state, feature):
            return model.apply({"params": p}, high_state, feature, method="high_step")

        self._sample = jax.jit(sample) if jit else sample
        self._chunk = jax.jit(chunk) if jit else chunk
        self._out_structs = {}
        self.reset()

    def reset(self):
        """Start a new recording: zero states, position 0 in the chunk."""
        self.low_state: Any = self._low0
        self.high_state: Any = self._high0
        self.position = 0  # samples of the current chunk already consumed

    def push(self, x):
        """x: (B, D_in) one sample or (B, n, D_in) a block -> (B, n_done, D_out) predictions of
        the chunks that this input completed (n_done may be 0)."""
        # Samples arrive from the host: slice them in numpy rather than dispatching a device
        # slice per sample (that dispatch costs as much as a small model's step).
        x = np.asarray(x)
        if x.ndim == 2:
            x = x[:, None]
        if x.ndim != 3 or x.shape[0] != self.batch_size:
            raise ValueError(f"push expects (batch_size={self.batch_size}, D_in) or "
                             f"(batch_size, n, D_in), got {x.shape=}")
        preds = []
        for i in range(x.shape[1]):
            self.low_state, feature = self._sample(self.params, self.low_state, x[:, i])
            self.position += 1
            if self.position == self.chunk_size:
                self.high_state, y = self._chunk(self.params, self.high_state, feature)
                preds.append(y)
                self.position = 0
                if self.reset_low_each_chunk:
                    # the next chunk starts from a zero low state, as in the parallel form
                    self.low_state = self._low0
        if not preds:
            return jnp.zeros((self.batch_size, 0) + self._output_struct(x).shape[1:],
                             self._output_struct(x).dtype)
        return jnp.stack(preds, axis=1)

    def _output_struct(self, x):
        """Shape/dtype of one prediction (B, D_out), by shape-only evaluation, cached."""
        key = (x.shape[2], x.dtype)
        if self._out_structs.get(key) is None:
            x_t = jax.ShapeDtypeStruct((self.batch_size, x.shape[2]), x.dtype)
            feature = jax.eval_shape(self._sample, self.params, self.low_state, x_t)[1]
            self._out_structs[key] = jax.eval_shape(self._chunk, self.params, self.high_state,
                                                    feature)[1]
        return self._out_structs[key]


def stream(model, params, x, *, block: int = 1, jit: bool = True):
    """Stream a whole recording x: (B, L, D_in) through `StreamingPredictor`, `block` samples per
    push -> (B, L // chunk_size, D_out).  A final partial chunk emits nothing."""
    b, length, _ = x.shape
    predictor = StreamingPredictor(model, params, batch_size=b, max_len=length, jit=jit)
    outs = [predictor.push(x[:, i:i + block]) for i in range(0, length, block)]
    return jnp.concatenate(outs, axis=1)
