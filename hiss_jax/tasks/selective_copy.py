"""Selective copying (Gu & Dao 2023, arXiv 2312.00752, Sec. 4.1.1, Fig. 2): data generated on the fly.

One example (token ids; V = vocab_size, L = seq_len, K = n_data):

    inputs  (L + K,)  noise (0) everywhere except K data tokens in [2, V) at K distinct random
                      positions of the first L steps (kept in order), then K markers (1)
    targets (L + K,)  the K data tokens, in order, at the K marker positions; 0 elsewhere
    mask    (L + K,)  True on the K marker positions only (loss and accuracy read only these)

A causal model therefore reads the whole noisy region, then writes the data tokens one per marker:
the output at marker k is the k-th data token.  The noise positions make the task content-aware
(a time-invariant convolution cannot solve it with a fixed kernel, Sec. 3.1).

Batches are a pure function of (seed, index): `batch(seed, index, batch_size)` always returns the
same arrays, so training is resumable and the held-out set (a different seed stream) is fixed.
"""
from __future__ import annotations

import dataclasses

import numpy as np

NOISE = 0  # the blank / noise token
MARKER = 1  # the "copy now" token; one per data token, after the noisy region
FIRST_DATA = 2  # data tokens are FIRST_DATA .. vocab_size - 1


@dataclasses.dataclass(frozen=True)
class SelectiveCopy:
    """Generator of selective-copying batches.  See the module docstring for the layout."""
    seq_len: int = 128  # L: length of the noisy region holding the data tokens
    n_data: int = 16  # K: data tokens to memorise (and markers after the region)
    vocab_size: int = 30  # V: noise + marker + (V - 2) data tokens

    def __post_init__(self):
        if self.vocab_size < 3:
            raise ValueError(f"{self.vocab_size=} must be >= 3 (noise, marker, >= 1 data token)")
        if not 1 <= self.n_data <= self.seq_len:
            raise ValueError(f"need 1 <= n_data <= seq_len, got {self.n_data=}, {self.seq_len=}; "
                             f"lower task.n_data or raise task.seq_len")

    @property
    def total_len(self) -> int:
        """Model input length L + K."""
        return self.seq_len + self.n_data

    def batch(self, seed: int, index: int, batch_size: int) -> dict:
        """-> {'inputs': int32 (B, L + K), 'targets': int32 (B, L + K), 'mask': bool (B, L + K)}.

        Deterministic in (seed, index); different seeds give independent streams.
        """
        rng = np.random.default_rng([int(seed), int(index)])
        b, l, k = batch_size, self.seq_len, self.n_data
        data = rng.integers(FIRST_DATA, self.vocab_size, size=(b, k), dtype=np.int32)
        # K distinct positions per row: the first K of a random permutation, sorted.
        pos = np.sort(np.argsort(rng.random((b, l)), axis=1)[:, :k], axis=1)
        inputs = np.full((b, l + k), NOISE, np.int32)
        np.put_along_axis(inputs, pos, data, axis=1)
        inputs[:, l:] = MARKER
        targets = np.zeros((b, l + k), np.int32)
        targets[:, l:] = data
        mask = np.zeros((b, l + k), bool)
        mask[:, l:] = True
        return {"inputs": inputs, "targets": targets, "mask": mask}



class SelectiveCopyTask:
    """The token-task interface of `hiss_jax.tasks.train_tokens` over `SelectiveCopy`.

    Training batches come from seed stream 2 * seed, the held-out set from 2 * seed + 1.
    """
    name = "selective_copy"

    def __init__(self, task_cfg, batch_size: int, eval_batch_size: int):
        self.gen = SelectiveCopy(int(task_cfg.seq_len), int(task_cfg.n_data),
                                 int(task_cfg.vocab_size))
        self.seed = int(task_cfg.seed)
        self.n_eval = int(task_cfg.n_eval)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.vocab_size = self.gen.vocab_size
        self.seq_len = self.gen.total_len

    def train_batch(self, step: int) -> dict:
        return self.gen.batch(2 * self.seed, step, self.batch_size)

    def eval_batches(self) -> list[dict]:
        """ceil(n_eval / B) held-out batches (the last one full: n_eval rounds up)."""
        n_batches = -(-self.n_eval // self.eval_batch_size)
        return [self.gen.batch(2 * self.seed + 1, i, self.eval_batch_size)
                for i in range(n_batches)]
