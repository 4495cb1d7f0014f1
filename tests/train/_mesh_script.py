"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (test_mesh.py).

Trains the stand-in 3 steps on a 1-device mesh, a 4-device data mesh and a 2 x 2 data x model
mesh (hidden kernel sharded over 'model' by the logical rules); writes the losses, eval sums,
final params and the shardings seen as JSON to argv[1].
"""
import json
import sys

import jax
import numpy as np

from configs import mamba2
from hiss_jax.train import batching, state as state_lib, step as step_lib
from tests.train import standins


def run(devices, data, model_axis):
    config = mamba2.get_config("tiny")
    config.mesh.data, config.mesh.model = data, model_axis
    rules = tuple(tuple(r) for r in config.mesh.rules)
    model = standins.StandinModel(2, logical=True)
    ds = standins.make_dataset(n_train=16, n_val=8)
    tx, schedule = state_lib.make_optimizer(config.optim, 10)
    mesh = state_lib.make_mesh(config, devices)
    state, shardings = state_lib.create_train_state(model, tx, mesh, rules, 0, (1, 20, 3))
    train_step = step_lib.make_train_step(model, tx, schedule, mesh, shardings, rules)
    eval_step = step_lib.make_eval_step(model, mesh, shardings.params, rules)
    batches = batching.TrainBatches(ds.train, 8, 0, 10)
    losses, batch_devices = [], None
    for s in range(3):
        batch = step_lib.to_global(batches(s), mesh)
        batch_devices = len(batch["inputs"].sharding.device_set)
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    sums = jax.device_get(eval_step(state.params, step_lib.to_global(
        next(batching.eval_batches(ds.val, 8)), mesh)))
    kernel = state.params["Dense_0"]["kernel"]
    return {"losses": losses, "sse": np.asarray(sums["sse"]).tolist(),
            "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
            "batch_devices": batch_devices,
            "kernel_shard_shape": list(kernel.sharding.shard_shape(kernel.shape)),
            "mesh": dict(mesh.shape)}


if __name__ == "__main__":
    assert jax.device_count() == 4, jax.devices()
    out = {"one": run(jax.devices()[:1], -1, 1), "data4": run(jax.devices(), -1, 1),
           "data2_model2": run(jax.devices(), 2, 2)}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
