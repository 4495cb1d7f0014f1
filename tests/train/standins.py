"""Tiny stand-ins for the model and dataset, so the training system is tested on its own.

The real models and data are exercised by test_families.py; these keep the loop tests fast.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Split:
    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


@dataclasses.dataclass
class Info:
    name: str
    input_dim: int
    output_dim: int
    chunk_size: int
    input_mean: np.ndarray
    input_std: np.ndarray
    target_mean: np.ndarray
    target_std: np.ndarray
    target_names: tuple


@dataclasses.dataclass
class Dataset:
    train: Split
    val: Split
    info: Info


def make_dataset(n_train=12, n_val=5, t=6, k=10, d_in=3, d_out=2, seed=0) -> Dataset:
    """Targets are a linear function of each chunk's mean input, with ragged valid lengths."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d_in, d_out)).astype(np.float32)

    def split(n):
        x = rng.normal(size=(n, t * k, d_in)).astype(np.float32)
        y = x.reshape(n, t, k, d_in).mean(2) @ w * 3.0
        valid = rng.integers(t // 2, t + 1, size=n)
        mask = np.arange(t)[None] < valid[:, None]
        x = x * np.repeat(mask, k, axis=1)[..., None]
        return Split(x, (y * mask[..., None]).astype(np.float32), mask)

    info = Info("standin", d_in, d_out, k, np.zeros(d_in), np.ones(d_in), np.zeros(d_out),
                np.full(d_out, 2.0), ("x", "y"))
    return Dataset(split(n_train), split(n_val), info)


class StandinModel(nn.Module):
    """(B, T*k, D_in) -> (B, T, D_out): per-chunk MLP with dropout, one SSM-named param.

    logical: annotate the hidden kernel with logical axes ('embed', 'mlp') for rule-based sharding.
    """
    output_dim: int
    chunk_size: int = 10
    logical: bool = False

    @nn.compact
    def __call__(self, x, deterministic=True):
        b, l, d = x.shape
        h = x.reshape(b, l // self.chunk_size, self.chunk_size * d)
        init = nn.initializers.lecun_normal()
        if self.logical:
            init = nn.with_logical_partitioning(init, ("embed", "mlp"))
        h = nn.gelu(nn.Dense(16, kernel_init=init)(h))
        h = nn.Dropout(0.1, deterministic=deterministic)(h)
        A_log = self.param("A_log", nn.initializers.zeros, (16,))
        return nn.Dense(self.output_dim)(h * jnp.exp(A_log))
