"""Training and evaluation of a causal `TokenModel` on a token task (selective copying, Pig Latin).

batch: inputs, targets: int32 (B, L)  mask: bool (B, L), True where the loss and the accuracy
read (answer / target positions).  Loss = mean cross-entropy over masked positions; token
accuracy = argmax hits over masked positions; sequence accuracy = rows whose masked positions
are all right.

Reuses hiss_jax.train: `make_optimizer` (Adam/AdamW + schedule, SSM dynamics params routed by
name to `optim.ssm_lr` without decay), `TrainState` / `create_train_state` (eval_shape + jitted
sharded init), `make_mesh`, `batch_sharding` / `to_global` (batch over the 'data' axis) and
`Checkpoints` (a checkpoint at every held-out eval, under <workdir>/checkpoints).
Outputs in <workdir>: metrics.jsonl (one JSON line per log / eval), results.json (final).
Resumable: a run killed mid-way restarts from its last checkpoint (state, eval history and
elapsed training time); batches are a pure function of the step, so the resumed run sees the
same data as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from hiss_jax.tasks.decode import greedy_decode_streaming
from hiss_jax.tasks.lm import build_token_model
from hiss_jax.tasks.pig_latin import PigLatinTask
from hiss_jax.tasks.selective_copy import SelectiveCopyTask
from hiss_jax.train.state import create_train_state, make_mesh, make_optimizer, param_count
from hiss_jax.train.step import batch_sharding, to_global

TASKS = {"selective_copy": SelectiveCopyTask, "pig_latin": PigLatinTask}
_BATCH_KEYS = ("inputs", "targets", "mask")


def build_task(config):
    name = config.task.name
    if name not in TASKS:
        raise ValueError(f"unknown config.task.name={name!r}; allowed: {sorted(TASKS)}")
    return TASKS[name](config.task, config.train.batch_size, config.train.eval_batch_size)


def token_sums(logits, targets, mask) -> dict:
    """logits (B, L, V), targets (B, L), mask (B, L) -> sums that add across batches."""
    m = mask.astype(jnp.float32)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    hit = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * m
    rows = jnp.sum(m, axis=1) > 0
    row_ok = jnp.all((hit > 0) | (m == 0), axis=1) & rows
    return {"xent": jnp.sum(xent * m), "correct": jnp.sum(hit), "count": jnp.sum(m),
            "seq_correct": jnp.sum(row_ok), "n_seq": jnp.sum(rows)}


def summarise(sums: dict) -> dict:
    n = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["xent"]) / n, "token_acc": float(sums["correct"]) / n,
            "seq_acc": float(sums["seq_correct"]) / max(float(sums["n_seq"]), 1.0)}


def make_steps(model, tx, schedule, mesh, shardings):
    """-> (train_step(state, batch) -> (state, metrics), eval_step(params, batch) -> sums)."""

    def train_step(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            logits = model.apply({"params": params}, batch["inputs"], deterministic=False,
                                 rngs={"dropout": rng})
            sums = token_sums(logits, batch["targets"], batch["mask"])
            return sums["xent"] / jnp.maximum(sums["count"], 1.0), sums

        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "token_acc": sums["correct"] / jnp.maximum(sums["count"], 1.0),
                   "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(params, batch):
        logits = model.apply({"params": params}, batch["inputs"], deterministic=True)
        return token_sums(logits, batch["targets"], batch["mask"])

    replicated = NamedSharding(mesh, P())
    train = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)),
                    out_shardings=(shardings, replicated), donate_argnums=0)
    evaluate = jax.jit(eval_step, in_shardings=(shardings.params, batch_sharding(mesh)),
                       out_shardings=replicated)
    return train, evaluate


def evaluate(eval_step, params, batches, mesh) -> dict:
    total = None
    for batch in batches:
        sums = jax.device_get(eval_step(params, to_global({k: batch[k] for k in _BATCH_KEYS},
                                                          mesh)))
        total = sums if total is None else {k: total[k] + sums[k] for k in total}
    return summarise(total)


def train_and_evaluate(config, workdir: str | None = None, *, verbose: bool = True) -> dict:
    """Train config.model on config.task for config.train.num_steps; returns the final results
    (held-out loss / token_acc / seq_acc, exact_word_acc for Pig Latin, params, history)."""
    for key in ("num_steps", "log_every", "eval_every", "batch_size", "eval_batch_size"):
        if int(config.train[key]) < 1:
            raise ValueError(f"config.train.{key}={config.train[key]!r} must be a positive "
                             f"integer")
    task = build_task(config)
    model = build_token_model(config.model, task.vocab_size, config.kernels.impl)
    n_steps = int(config.train.num_steps)
    tx, schedule = make_optimizer(config.optim, n_steps)
    mesh = make_mesh(config)
    state, shardings = create_train_state(model, tx, mesh, config.mesh.rules,
                                          int(config.train.seed), (1, task.seq_len))
    train_step, eval_step = make_steps(model, tx, schedule, mesh, shardings)
    eval_batches = task.eval_batches()
    n_params = param_count(state.params)
    log = _Log(workdir, verbose)
    ckpt, history, start, elapsed = None, [], 0, 0.0
    if workdir:
        from hiss_jax.train.checkpoint import Checkpoints
        from hiss_jax.train.state import abstract_with_shardings
        ckpt = Checkpoints(workdir, max_to_keep=1)
        restored = ckpt.restore_latest(abstract_with_shardings(state, shardings))
        if restored is not None:
            state, meta = restored
            start, history, elapsed = int(meta["step"]), meta["history"], meta["train_time_s"]
    log.write({"event": "resume" if start else "start", "task": task.name,
               "kind": config.model.kind, "params": n_params, "seq_len": task.seq_len,
               "steps": n_steps, "from_step": start})
    t0 = time.time() - elapsed
    for step in range(start, n_steps):
        batch = task.train_batch(step)
        state, metrics = train_step(state, to_global({k: batch[k] for k in _BATCH_KEYS}, mesh))
        done = step + 1
        if done % int(config.train.log_every) == 0 or done == n_steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            log.write({"event": "train", "step": done, "time_s": time.time() - t0, **m})
        if done % int(config.train.eval_every) == 0 or done == n_steps:
            ev = evaluate(eval_step, state.params, eval_batches, mesh)
            history.append({"step": done, **ev})
            log.write({"event": "eval", "step": done, "time_s": time.time() - t0, **ev})
            if ckpt is not None:
                ckpt.save(state, {"step": done, "history": history,
                                  "train_time_s": time.time() - t0})
    results = {"task": task.name, "kind": config.model.kind, "params": n_params,
               "steps": n_steps, "train_time_s": time.time() - t0, **history[-1],
               "history": history}
    if hasattr(task, "decode_eval"):
        decode_fn = lambda prefix, plen: greedy_decode_streaming(  # noqa: E731
            model, state.params, jnp.asarray(prefix), jnp.asarray(plen))
        results.update(task.decode_eval(decode_fn))
    log.write({"event": "final", **{k: v for k, v in results.items() if k != "history"}})
    if workdir:
        ckpt.close()
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=lambda o: np.asarray(o).tolist())
    return results


class _Log:
    def __init__(self, workdir, verbose):
        self.path = os.path.join(workdir, "metrics.jsonl") if workdir else None
        self.verbose = verbose
        if self.path:
            os.makedirs(workdir, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.verbose:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.items()), flush=True)
