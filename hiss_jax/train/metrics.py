"""Masked MSE (the paper's loss and metric) and the validation accumulators.

pred, target: (B, T, D_out) normalised   mask: (B, T) bool, False on padded target steps
MSE = sum of squared errors over valid steps / (D_out * n_valid)   (HiSS, sec. 5 "metric")
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def masked_mse(pred, target, mask):
    """Scalar masked MSE; a batch with no valid step gives 0, not NaN."""
    m = mask.astype(jnp.float32)[..., None]
    sse = jnp.sum(jnp.square(pred.astype(jnp.float32) - target) * m)
    n = jnp.sum(m) * pred.shape[-1]
    return sse / jnp.maximum(n, 1.0)


def eval_sums(pred, target, mask) -> dict:
    """Per-axis sums that add up exactly across batches (and across padded rows, mask 0).

    The zero baseline predicts 0 in normalised units, i.e. the training-set target mean.
    """
    m = mask.astype(jnp.float32)[..., None]
    pred = pred.astype(jnp.float32)
    return {
        "sse": jnp.sum(jnp.square(pred - target) * m, axis=(0, 1)),  # (D_out,)
        "zero_sse": jnp.sum(jnp.square(target) * m, axis=(0, 1)),  # (D_out,)
        "n_valid": jnp.sum(m),
    }


def summarise(sums: dict, target_std) -> dict:
    """Accumulated `eval_sums` -> flat dict of scalars.

    mse / zero_mse: normalised, averaged over axes (the reported metric). Per axis i:
    mse_<i> (normalised), mse_raw_<i> and rmse_raw_<i> (un-normalised with target_std).
    """
    n = max(float(sums["n_valid"]), 1.0)
    sse = np.asarray(sums["sse"], np.float64)
    zero = np.asarray(sums["zero_sse"], np.float64)
    std = np.broadcast_to(np.asarray(target_std, np.float64).reshape(-1), sse.shape)
    out = {"mse": float(sse.sum() / (n * sse.size)), "zero_mse": float(zero.sum() / (n * sse.size))}
    out["mse_over_zero"] = out["mse"] / max(out["zero_mse"], 1e-30)
    raw = sse / n * std**2
    for i in range(sse.size):
        out[f"mse_{i}"] = float(sse[i] / n)
        out[f"mse_raw_{i}"] = float(raw[i])
        out[f"rmse_raw_{i}"] = float(np.sqrt(raw[i]))
    out["mse_raw"] = float(raw.mean())
    out["zero_mse_raw"] = float((zero / n * std**2).mean())
    return out


def add_sums(a: dict | None, b: dict) -> dict:
    b = {k: np.asarray(v, np.float64) for k, v in b.items()}
    return b if a is None else {k: a[k] + b[k] for k in a}
