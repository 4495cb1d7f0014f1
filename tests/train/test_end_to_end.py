"""train.py's library path on the real synthetic dataset and the real model (mamba2:tiny)."""
import json
import os

from hiss_jax.train import train_and_evaluate
from hiss_jax.train.config_check import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mamba2_tiny_trains_and_evaluates(tmp_path):
    config = load_config_file(os.path.join(ROOT, "configs/mamba2.py:tiny"))
    config.data.cache_dir = str(tmp_path / "cache")
    config.train.update(num_steps=4, eval_every=2, log_every=2, progress=False)
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["dataset"] == "synthetic:imu" and summary["steps"] == 4
    assert summary["zero_baseline_mse"] > 0 and summary["best_val_mse"] > 0
    assert len(summary["val_rmse_raw"]) == 3
    run = tmp_path / "run"
    for name in ("summary.json", "metrics.jsonl", "predictions.png"):
        assert os.path.getsize(run / name) > 0
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
    with open(run / "summary.json") as f:
        assert json.load(f)["best_step"] in (2, 4)
    # The replay command streams a validation episode through the trained run's best checkpoint.
    from hiss_jax import replay
    assert replay.main(["--workdir", str(run), "--episode", "0"]) == 0
    with open(run / "replay_val_0.json") as f:
        result = json.load(f)
    assert result["predictions_emitted"] > 0 and result["rel_err_vs_parallel"] < 1e-5
    assert os.path.getsize(run / "replay_val_0.png") > 0
