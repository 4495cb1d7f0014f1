import numpy as np

from hiss_jax.train.metrics import add_sums, eval_sums, masked_mse, summarise
from tests.conftest import assert_close


def _data(seed=0):
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=(3, 5, 2)).astype(np.float32)
    target = rng.normal(size=(3, 5, 2)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    return pred, target, mask


def test_masked_mse_is_sse_over_valid_steps_times_dim():
    pred, target, mask = _data()
    expected = ((pred - target) ** 2)[mask].sum() / (2 * mask.sum())
    assert_close(masked_mse(pred, target, mask), np.float32(expected), "float32")
    # padded steps do not count, whatever they hold
    pred2 = pred.copy()
    pred2[~mask] = 1e3
    assert_close(masked_mse(pred2, target, mask), np.float32(expected), "float32")
    assert float(masked_mse(pred, target, np.zeros_like(mask))) == 0.0


def test_summary_adds_batches_and_unnormalises_per_axis():
    pred, target, mask = _data()
    std = np.array([2.0, 0.5])
    whole = summarise(add_sums(None, eval_sums(pred, target, mask)), std)
    parts = None
    for i in range(3):  # one batch per sequence, then summed: same numbers
        parts = add_sums(parts, eval_sums(pred[i:i + 1], target[i:i + 1], mask[i:i + 1]))
    split = summarise(parts, std)
    assert abs(whole["mse"] - split["mse"]) < 1e-6
    err = ((pred - target) ** 2)[mask]  # (n_valid, 2)
    np.testing.assert_allclose(whole["mse"], err.mean(), rtol=1e-5)
    np.testing.assert_allclose([whole["mse_raw_0"], whole["mse_raw_1"]],
                               err.mean(0) * std**2, rtol=1e-5)
    np.testing.assert_allclose(whole["rmse_raw_1"], np.sqrt(err[:, 1].mean()) * 0.5, rtol=1e-5)
    np.testing.assert_allclose(whole["zero_mse"], (target[mask] ** 2).mean(), rtol=1e-5)
    np.testing.assert_allclose(whole["mse_over_zero"], whole["mse"] / whole["zero_mse"], rtol=1e-6)
