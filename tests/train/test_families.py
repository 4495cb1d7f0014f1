"""Every family config at :tiny (HiSS and flat) builds the real model and trains 2 steps."""
import os

import jax
import numpy as np
import pytest

from hiss_jax.models import build_model
from hiss_jax.train import batching, state as state_lib, step as step_lib
from hiss_jax.train.config_check import check_config, load_config_file
from tests.train import standins

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("arg", ["tiny", "flat,tiny"])
@pytest.mark.parametrize("family", ["s4", "mamba", "mamba2", "lstm", "transformer"])
def test_tiny_config_trains_two_steps(family, arg):
    config = load_config_file(os.path.join(ROOT, f"configs/{family}.py:{arg}"))
    check_config(config, jax.device_count())
    ds = standins.make_dataset(n_train=4, t=4)  # (4, 40, 3) -> (4, 4, 2)
    model = build_model(config.model, input_dim=3, output_dim=2, scan_impl=config.kernels.impl)
    tx, schedule = state_lib.make_optimizer(config.optim, 2)
    mesh = state_lib.make_mesh(config)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    state, shardings = state_lib.create_train_state(model, tx, mesh, rules, 0, (1, 20, 3))
    init = jax.device_get(state.params)
    train_step = step_lib.make_train_step(model, tx, schedule, mesh, shardings, rules)
    batches = batching.TrainBatches(ds.train, 4, 0, 10)
    for s in range(2):
        state, metrics = train_step(state, step_lib.to_global(batches(s), mesh))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert int(state.step) == 2
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, init)
    assert max(jax.tree.leaves(moved)) > 0
