"""The loop on stand-ins: outputs, checkpoint round trip, kill-and-resume equality (and the wall
time adding up over the segments), init_from."""
import json
import os
import time

import jax
import numpy as np
import pytest

from configs import mamba2
from hiss_jax.train import batching, checkpoint, state as state_lib, train_and_evaluate
from tests.train import standins


def _config(**train):
    c = mamba2.get_config("tiny")
    c.train.update(dict(num_steps=6, eval_every=3, log_every=1, progress=False, plot_episodes=1))
    c.train.update(train)
    return c


def _run(workdir, config, **kw):
    return train_and_evaluate(config, str(workdir), dataset=standins.make_dataset(),
                              model=standins.StandinModel(2), **kw)


def _latest_params(workdir, config):
    """Params of the last periodic checkpoint, restored into a fresh state's shapes."""
    model, ds = standins.StandinModel(2), standins.make_dataset()
    tx, _ = state_lib.make_optimizer(config.optim, config.train.num_steps)
    mesh = state_lib.make_mesh(config)
    state, shardings = state_lib.create_train_state(model, tx, mesh, (), 0, (1, 20, 3))
    ckpts = checkpoint.Checkpoints(str(workdir), 2)
    restored, meta = ckpts.restore_latest(state_lib.abstract_with_shardings(state, shardings))
    ckpts.close()
    return jax.device_get(restored.params), meta


def test_run_writes_summary_metrics_plot_and_events(tmp_path, capsys):
    summary = _run(tmp_path, _config())
    for name in ("summary.json", "metrics.jsonl", "predictions.png", "config.json"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert "predictions.png" in capsys.readouterr().out.splitlines()[-1]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    with open(tmp_path / "summary.json") as f:
        assert json.load(f) == pytest.approx(summary)
    assert summary["steps"] == 6 and summary["param_count"] > 0
    assert summary["zero_baseline_mse"] > 0
    assert summary["ratio_to_zero"] == pytest.approx(
        summary["best_val_mse"] / summary["zero_baseline_mse"])
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    train = [l for l in lines if l["split"] == "train"]
    assert [l["step"] for l in train] == list(range(1, 7))
    assert {"loss", "lr", "grad_norm", "param_norm"} <= set(train[0])
    assert [l["step"] for l in lines if l["split"] == "val"] == [3, 6]
    assert sorted(int(s) for s in os.listdir(tmp_path / "best")) == [summary["best_step"]]


def test_no_plot_is_drawn_or_reported_with_plot_episodes_0(tmp_path, capsys):
    _run(tmp_path, _config(num_steps=2, eval_every=2, plot_episodes=0))
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("wrote ") and "summary.json" in last, last
    assert "predictions.png" not in last and not os.path.exists(tmp_path / "predictions.png")


def test_checkpoint_round_trip_is_exact(tmp_path):
    config = _config()
    model = standins.StandinModel(2)
    tx, _ = state_lib.make_optimizer(config.optim, 10)
    mesh = state_lib.make_mesh(config)
    state, shardings = state_lib.create_train_state(model, tx, mesh, (), 1, (1, 20, 3))
    # take one real step so the opt state is not all zeros
    from hiss_jax.train import step as step_lib
    train_step = step_lib.make_train_step(model, tx, lambda s: 0.0, mesh, shardings, ())
    batch = batching.TrainBatches(standins.make_dataset().train, 4, 0, 10)(0)
    state, _ = train_step(state, step_lib.to_global(batch, mesh))
    expected = jax.device_get(state)
    ckpts = checkpoint.Checkpoints(str(tmp_path), 2)
    ckpts.save(state, {"step": 1, "best_val": 0.5}, best_val=0.5)
    ckpts.close()
    fresh, _ = state_lib.create_train_state(model, tx, mesh, (), 2, (1, 20, 3))
    ckpts = checkpoint.Checkpoints(str(tmp_path), 2)
    abstract = state_lib.abstract_with_shardings(fresh, shardings)
    for restored, meta in (ckpts.restore_latest(abstract), ckpts.restore_best(abstract)):
        assert meta == {"step": 1, "best_val": 0.5}
        assert type(restored) is state_lib.TrainState
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
    ckpts.close()


def test_killed_run_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    config = _config()
    _run(tmp_path / "straight", config)

    call = batching.TrainBatches.__call__

    def killed_at_4(self, step):
        if step == 4:  # after the checkpoint at step 3, before step 5 is taken
            raise KeyboardInterrupt("simulated kill")
        return call(self, step)

    monkeypatch.setattr(batching.TrainBatches, "__call__", killed_at_4)
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "resumed", _config())
    first_segment = time.time() - t0
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3"]
    _, meta_3 = _latest_params(tmp_path / "resumed", config)
    assert 0 < meta_3["wall_s"] <= first_segment  # the first segment's time up to step 3
    monkeypatch.setattr(batching.TrainBatches, "__call__", call)
    summary = _run(tmp_path / "resumed", _config())  # new objects, same workdir
    assert summary["source"].startswith("resumed")
    # the wall time adds the first segment (up to its checkpoint) to the second's
    assert summary["wall_s"] >= meta_3["wall_s"] + summary["train_loop_s"]

    a, meta_a = _latest_params(tmp_path / "straight", config)
    b, meta_b = _latest_params(tmp_path / "resumed", config)
    assert meta_a["step"] == meta_b["step"] == 6
    assert meta_b["wall_s"] > meta_3["wall_s"]
    jax.tree.map(np.testing.assert_array_equal, a, b)
    val = lambda d: [l for l in map(json.loads, open(d / "metrics.jsonl")) if l["split"] == "val"]
    assert val(tmp_path / "straight")[-1] == val(tmp_path / "resumed")[-1]


def test_init_from_another_run_loads_its_params(tmp_path):
    _run(tmp_path / "a", _config())
    config = _config(num_steps=1, eval_every=1, init_from=str(tmp_path / "a"))
    summary = _run(tmp_path / "b", config)
    assert summary["source"].startswith("params from") and "best" in summary["source"]
    with pytest.raises(FileNotFoundError, match="config.train.init_from"):
        _run(tmp_path / "c", _config(init_from=str(tmp_path / "nothing")))
