"""train_and_evaluate: the whole run (data, model, state, loop, checkpoints, logs, summary).

Writes to the workdir: config.json, metrics.jsonl, TensorBoard events (tb/), checkpoints/, best/,
summary.json and (when config.train.plot_episodes > 0) predictions.png. Restore order: this
workdir's last checkpoint, else config.train.init_from (params only; fresh optimizer at step 0),
else a fresh init. Wall time (summary `wall_s`, metrics `elapsed_s`) is cumulative over resumes:
each checkpoint's meta holds the wall time up to it, and a resumed run adds it back (the time
between the last checkpoint and a kill is not counted).
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from hiss_jax.train import batching, checkpoint, config_check, plots
from hiss_jax.train import state as state_lib, step as step_lib
from hiss_jax.train.metrics import add_sums, summarise


def _load_dataset(config):
    from hiss_jax.data import load_dataset
    return load_dataset(config.data)


def _build_model(config, info):
    from hiss_jax.models import build_model
    return build_model(config.model, input_dim=info.input_dim, output_dim=info.output_dim,
                       scan_impl=config.kernels.impl)


def _augmenter(info):
    """RoNIN-style training augmentation declared by the dataset (info.augment), else None."""
    if getattr(info, "augment", None) is None:
        return None
    from hiss_jax.data import augment_batch
    return lambda x, y, m, rng: augment_batch(info, x, y, m, rng)


def total_steps(config, steps_per_epoch: int) -> int:
    if config.train.num_steps > 0:
        return int(config.train.num_steps)
    return max(1, int(math.ceil(config.train.num_epochs * steps_per_epoch)))


def evaluate(eval_step, params, split, batch_size, mesh, target_std) -> dict:
    sums = None
    for batch in batching.eval_batches(split, batch_size):
        sums = add_sums(sums, jax.device_get(eval_step(params, step_lib.to_global(batch, mesh))))
    return summarise(sums, target_std)


class _Log:
    """metrics.jsonl + TensorBoard, written by process 0 only."""

    def __init__(self, workdir):
        self.main = jax.process_index() == 0
        if self.main:
            self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, split: str, step: int, metrics: dict):
        if not self.main:
            return
        self.file.write(json.dumps({"split": split, "step": step, **metrics}) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self):
        if self.main:
            self.file.close()
            self.tb.close()


def train_and_evaluate(config, workdir: str, *, dataset=None, model=None) -> dict:
    """Trains, validates, checkpoints; returns the summary dict (also summary.json).

    dataset / model: injected by tests; by default built from config.data / config.model.
    """
    t_start = time.time()
    config_check.check_config(config, jax.device_count())
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    main = jax.process_index() == 0
    if main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    dataset = _load_dataset(config) if dataset is None else dataset
    info = dataset.info
    config_check.check_against_data(config, info)
    model = _build_model(config, info) if model is None else model
    t_data = time.time() - t_start

    tc = config.train
    mesh = state_lib.make_mesh(config)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    batches = batching.TrainBatches(dataset.train, tc.batch_size, tc.seed, info.chunk_size,
                                    tc.window, augment=_augmenter(info))
    n_steps = total_steps(config, batches.steps_per_epoch)
    eval_every = tc.eval_every or batches.steps_per_epoch
    ckpt_every = tc.checkpoint_every or eval_every
    tx, schedule = state_lib.make_optimizer(config.optim, n_steps)
    init_len = info.chunk_size * 2
    state, shardings = state_lib.create_train_state(model, tx, mesh, rules, tc.seed,
                                                    (1, init_len, info.input_dim))
    abstract = state_lib.abstract_with_shardings(state, shardings)

    ckpts = checkpoint.Checkpoints(workdir, tc.max_to_keep)
    meta = {"step": 0, "best_val": None, "best_step": None, "zero_mse": None, "epoch": 0,
            "wall_s": 0.0}
    restored = ckpts.restore_latest(abstract)
    source = "fresh"
    if restored is not None:
        state, meta = restored
        source = f"resumed {workdir} at step {meta['step']}"
    elif tc.init_from:
        params, where = checkpoint.restore_params_from(tc.init_from, abstract.params)
        state = jax.jit(lambda s, p: s.replace(params=p), out_shardings=shardings,
                        donate_argnums=0)(state, params)
        source = f"params from {where}"
    # wall time of the earlier segments of this run (checkpoints written before this version
    # hold none)
    wall_before = float(meta.get("wall_s") or 0.0)

    def wall_s() -> float:
        return wall_before + time.time() - t_start

    train_step = step_lib.make_train_step(model, tx, schedule, mesh, shardings, rules)
    eval_step = step_lib.make_eval_step(model, mesh, shardings.params, rules)
    log = _Log(workdir)
    n_params = state_lib.param_count(state.params)
    if main:
        print(f"hiss_jax: {config.model.type} {_levels(config)} on {info.name} "
              f"({dataset.train.inputs.shape[0]} train / {dataset.val.inputs.shape[0]} val "
              f"sequences), {n_params:,} params, {n_steps} steps, mesh {dict(mesh.shape)}, "
              f"{source}; workdir {workdir}", flush=True)

    first = int(meta["step"])
    bar = tqdm.tqdm(total=n_steps, initial=first, disable=not (main and tc.progress),
                    dynamic_ncols=True, desc="train")
    t_loop, t_steady, steady_from, t_side = time.time(), None, None, 0.0
    window = []
    for step in range(first, n_steps):
        state, metrics = train_step(state, step_lib.to_global(batches(step), mesh))
        window.append(metrics)
        done = step + 1
        if steady_from is None:
            jax.block_until_ready(metrics["loss"])  # exclude compilation from steps/s
            t_steady, steady_from = time.time(), done
        if done % tc.log_every == 0 or done == n_steps:
            host = jax.device_get(window)
            avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
            avg["epoch"] = batches.epoch(step)
            avg["elapsed_s"] = wall_s()
            log.write("train", done, avg)
            bar.set_postfix(loss=f"{avg['loss']:.4f}")
            window = []
        bar.update(1)
        if done % eval_every == 0 or done == n_steps:
            t0 = time.time()
            jax.block_until_ready(state.step)
            t_side -= time.time() - t0  # waiting for the queued train steps is training time
            val = evaluate(eval_step, state.params, dataset.val, tc.eval_batch_size, mesh,
                           info.target_std)
            log.write("val", done, val)
            improved = meta["best_val"] is None or val["mse"] < meta["best_val"]
            if improved:
                meta.update(best_val=val["mse"], best_step=done)
            meta.update(step=done, zero_mse=val["zero_mse"], epoch=batches.epoch(step),
                        wall_s=wall_s())
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", val=f"{val['mse']:.4f}",
                            best=f"{meta['best_val']:.4f}")
            if done % ckpt_every == 0 or done == n_steps or improved:
                ckpts.save(state, dict(meta), best_val=val["mse"] if improved else None)
            t_side += time.time() - t0
        elif done % ckpt_every == 0:
            t0 = time.time()
            meta.update(step=done, epoch=batches.epoch(step), wall_s=wall_s())
            ckpts.save(state, dict(meta))
            t_side += time.time() - t0
    jax.block_until_ready(state)
    bar.close()
    t_end = time.time()
    steady_steps = n_steps - steady_from if steady_from is not None else 0
    # training throughput: after compilation, without validation and checkpoint time
    steps_per_s = steady_steps / (t_end - t_steady - t_side) if steady_steps > 0 else None

    best = ckpts.restore_best(abstract)
    best_params = best[0].params if best is not None else state.params
    val = evaluate(eval_step, best_params, dataset.val, tc.eval_batch_size, mesh, info.target_std)
    summary = {
        "best_val_mse": val["mse"], "zero_baseline_mse": val["zero_mse"],
        "ratio_to_zero": val["mse_over_zero"], "best_step": meta["best_step"],
        "steps": n_steps, "steps_per_s": steps_per_s, "wall_s": wall_s(),
        "data_s": t_data, "train_loop_s": t_end - t_loop, "param_count": n_params,
        "dataset": info.name, "model": f"{config.model.type} {_levels(config)}",
        "val_rmse_raw": [val[f"rmse_raw_{i}"] for i in range(info.output_dim)],
        "devices": jax.device_count(), "source": source,
    }
    if tc.plot_episodes:  # every process runs the sharded predict; process 0 draws
        _plot(model, best_params, dataset.val, info, mesh, shardings.params, rules,
              tc.plot_episodes, os.path.join(workdir, "predictions.png"), main)
    if main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        written = ["summary.json", "metrics.jsonl", "tb/"]
        if tc.plot_episodes:
            written.append("predictions.png")
        print(f"best val MSE {summary['best_val_mse']:.5f} (step {summary['best_step']}) | "
              f"zero baseline {summary['zero_baseline_mse']:.5f} | ratio "
              f"{summary['ratio_to_zero']:.3f} | {steps_per_s or 0:.2f} steps/s | wall "
              f"{summary['wall_s']:.0f} s (data {t_data:.0f} s) | {n_params:,} params\n"
              f"wrote {workdir}/{', '.join(written)}", flush=True)
    log.close()
    ckpts.close()
    return summary


def _levels(config) -> str:
    m = config.model
    if m.type == "flat":
        return f"{m.flat.kind}(d={m.flat.d_model}, n={m.flat.n_layers})"
    return (f"{m.low.kind}(d={m.low.d_model}, n={m.low.n_layers}) -> "
            f"{m.high.kind}(d={m.high.d_model}, n={m.high.n_layers})")


def _plot(model, params, split, info, mesh, param_shardings, rules, n, path, draw):
    n = min(n, split.inputs.shape[0])
    rows = -(-n // mesh.shape["data"]) * mesh.shape["data"]  # a multiple of the data axis
    idx = np.arange(rows) % split.inputs.shape[0]
    predict = step_lib.make_predict(model, mesh, param_shardings, rules)
    pred = np.asarray(jax.device_get(predict(params, step_lib.to_global(
        {"x": split.inputs[idx]}, mesh)["x"])))[:n]
    if draw:
        plots.plot_trajectories(path, pred, split.targets[:n], split.mask[:n], info)
