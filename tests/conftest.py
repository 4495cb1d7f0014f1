"""Shared test configuration: the one tolerance table and the comparison helper.

Errors are measured as relative L2 error, ||actual - expected|| / ||expected||, the measure the
GPU method notes use (float32 lands far under 1e-3, bf16 operands between 1e-3 and 1e-2).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# dtype of the inputs -> largest allowed relative L2 error, for outputs/states and for gradients.
TOLERANCES = {
    "float64": {"out": 1e-12, "grad": 1e-10},
    "float32": {"out": 1e-5, "grad": 1e-5},
    "bfloat16": {"out": 2e-2, "grad": 3e-2},
}


def rel_err(actual, expected) -> float:
    # Straight to float64 (bf16 arrays convert through ml_dtypes): rounding float64 inputs to
    # float32 first would make the float64 entries of the table meaningless.
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected).astype(np.float64)
    assert a.shape == e.shape, f"shape mismatch: {a.shape=} vs {e.shape=}"
    assert np.all(np.isfinite(a)), "actual holds NaN or inf"
    denom = max(np.linalg.norm(e.ravel()), 1e-30)
    return float(np.linalg.norm((a - e).ravel()) / denom)


def assert_close(actual, expected, dtype, kind="out", what=""):
    """Relative L2 error of `actual` against `expected` within TOLERANCES[dtype][kind]."""
    name = jnp.dtype(dtype).name
    tol = TOLERANCES[name][kind]
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({name}, {kind})"


def has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
