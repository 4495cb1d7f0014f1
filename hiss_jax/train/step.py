"""Jitted, sharded train and eval steps.

batch: inputs (B, L, D_in), targets (B, T, D_out), mask (B, T); B sharded over the 'data' axis.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from hiss_jax.train.metrics import eval_sums, masked_mse


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def make_train_step(model, tx, schedule, mesh, shardings, rules):
    """train_step(state, batch) -> (state, metrics): a flat dict of scalars."""

    def train_step(state, batch):
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            y = model.apply({"params": params}, batch["inputs"], deterministic=False,
                            rngs={"dropout": dropout_rng})
            return masked_mse(y, batch["targets"], batch["mask"])

        with nn.logical_axis_rules(rules):
            loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
                   "param_norm": optax.tree.norm(params)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated), donate_argnums=0)


def make_eval_step(model, mesh, param_shardings, rules):
    """eval_step(params, batch) -> per-axis sums (see metrics.eval_sums)."""

    def eval_step(params, batch):
        with nn.logical_axis_rules(rules):
            y = model.apply({"params": params}, batch["inputs"], deterministic=True)
        return eval_sums(y, batch["targets"], batch["mask"])

    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, P()))


def make_predict(model, mesh, param_shardings, rules):
    def predict(params, inputs):
        with nn.logical_axis_rules(rules):
            return model.apply({"params": params}, inputs, deterministic=True)
    return jax.jit(predict, in_shardings=(param_shardings, batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, P()))


def to_global(batch: dict, mesh) -> dict:
    """Host numpy batch (the global batch, identical on every process) -> sharded jax arrays.

    Each process hands over only its rows, so the same call works on one host and many.
    """
    sharding = batch_sharding(mesh)
    n_proc, pid = jax.process_count(), jax.process_index()
    out = {}
    for k, v in batch.items():
        rows = v.shape[0] // n_proc
        local = v[pid * rows:(pid + 1) * rows]
        out[k] = jax.make_array_from_process_local_data(sharding, local, v.shape)
    return out
