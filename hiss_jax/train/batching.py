"""Host-side batching: shuffled training batches as a pure function of (seed, step), padded eval.

Split: inputs (N, L, D_in) float32, targets (N, T, D_out), mask (N, T) bool, with L = T * k.
The batch at training step s depends only on (seed, s): epoch e = s // steps_per_epoch uses the
permutation np.random.default_rng([seed, e]).permutation(N), so a resumed run replays the same
order. Optional windows: `window` target steps (window * k input steps) cut at a random start
inside each episode's valid part, drawn from np.random.default_rng([seed, e, s]).
Optional augmentation (RoNIN's random yaw): augment(inputs, targets, mask, rng) with
rng = np.random.default_rng([seed, e, s, 1]), also a pure function of the step.
"""
from __future__ import annotations

import numpy as np


class TrainBatches:
    def __init__(self, split, batch_size: int, seed: int, chunk_size: int, window: int = 0,
                 augment=None):
        n = split.inputs.shape[0]
        if n < batch_size:
            raise ValueError(f"the training split has {n} sequences, fewer than "
                             f"config.train.batch_size={batch_size}; lower the batch size or "
                             "use more episodes (config.data.n_episodes)")
        t = split.targets.shape[1]
        if split.inputs.shape[1] != t * chunk_size:
            raise ValueError(f"inputs length {split.inputs.shape[1]} != targets length {t} x "
                             f"chunk_size {chunk_size}")
        self.split, self.batch_size, self.seed, self.k = split, batch_size, seed, chunk_size
        self.window = window if 0 < window < t else 0
        self.augment = augment
        self.steps_per_epoch = n // batch_size  # the remainder of an epoch is dropped
        # valid target steps per episode (mask is a prefix of True after padding at the end)
        self.valid = split.mask.sum(axis=1)

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.split.inputs.shape[0])
        return perm[i * self.batch_size:(i + 1) * self.batch_size]

    def epoch(self, step: int) -> int:
        return int(step) // self.steps_per_epoch

    def __call__(self, step: int) -> dict:
        idx = self.indices(step)
        s = self.split
        key = [self.seed, self.epoch(step), int(step)]
        if not self.window:
            inputs, targets, mask = s.inputs[idx], s.targets[idx], s.mask[idx]
        else:
            w, k = self.window, self.k
            starts = np.random.default_rng(key).integers(0, np.maximum(self.valid[idx] - w, 0) + 1)
            inputs = np.stack([s.inputs[j, a * k:(a + w) * k] for j, a in zip(idx, starts)])
            targets = np.stack([s.targets[j, a:a + w] for j, a in zip(idx, starts)])
            mask = np.stack([s.mask[j, a:a + w] for j, a in zip(idx, starts)])
        if self.augment is not None:
            inputs, targets = self.augment(inputs, targets, mask, np.random.default_rng(key + [1]))
        return {"inputs": inputs, "targets": targets, "mask": mask}


def eval_batches(split, batch_size: int):
    """Every sequence once, in order, in batches of `batch_size`; the last is padded with mask 0."""
    n = split.inputs.shape[0]
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = {"inputs": split.inputs[start:stop], "targets": split.targets[start:stop],
                 "mask": split.mask[start:stop]}
        pad = batch_size - (stop - start)
        if pad:
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                     for k, v in batch.items()}
        yield batch
