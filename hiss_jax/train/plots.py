"""Predicted vs true trajectories: cumulative sums of the un-normalised per-step deltas."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_trajectories(path: str, pred, target, mask, info, title: str = "") -> None:
    """pred, target: (E, T, D) normalised; mask (E, T). One row per episode, one column per axis."""
    mean = np.asarray(info.target_mean, np.float64).reshape(-1)
    std = np.asarray(info.target_std, np.float64).reshape(-1)
    n_ep, _, d = target.shape
    names = list(getattr(info, "target_names", None) or [f"axis {i}" for i in range(d)])
    fig, axes = plt.subplots(n_ep, d, figsize=(3.2 * d, 2.4 * n_ep), squeeze=False)
    for e in range(n_ep):
        valid = int(np.asarray(mask[e]).sum())
        p = np.cumsum(np.asarray(pred[e, :valid], np.float64) * std + mean, axis=0)
        t = np.cumsum(np.asarray(target[e, :valid], np.float64) * std + mean, axis=0)
        for i in range(d):
            ax = axes[e, i]
            ax.plot(t[:, i], label="true", color="k")
            ax.plot(p[:, i], label="predicted", color="tab:orange")
            ax.set_title(f"episode {e}, {names[i]}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title or f"{info.name}: cumulative sum of predicted vs true deltas", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
