"""The HiSS combination grid: every low x high pair of block families plus every flat model.

    python -m hiss_jax.experiments.grid                                   # synthetic IMU, 30 models
    python -m hiss_jax.experiments.grid --steps=800 --workdir=runs/grid
    python -m hiss_jax.experiments.grid --seconds=60                      # ~60 s of training each
    python -m hiss_jax.experiments.grid --config.data.name=csp:vector --config.data.dir=/data/csp
    python -m hiss_jax.experiments.grid --config=configs/csp.py:vector --config.data.dir=/data/csp \
        --steps=5000                          # the paper's widths and optimizer for that dataset
    python -m hiss_jax.experiments.grid --pairs=s4-mamba,flat-mamba2      # a subset
    python -m hiss_jax.experiments.grid --smoke                           # CPU, seconds

25 HiSS pairs (low, high) over FAMILIES = s4, mamba, mamba2, lstm, transformer, plus the 5 flat
models, each trained by `hiss_jax.train.train_and_evaluate` in its own workdir
(<workdir>/<low>-<high> or <workdir>/flat-<kind>) from the same config (--config, default
configs/mamba2.py: every level carries every family's settings, so only `kind` changes).
Budget per model: --steps (default: the config's train.num_steps), or --seconds, turned into a
step count by timing the library's train step on a real batch first (so the learning-rate
schedule knows its length).
Writes <workdir>/grid.md (a markdown table sorted by validation MSE: val MSE, zero-baseline MSE,
their ratio, wall time, steps, parameters, status) and grid.json. A NaN (validation MSE or any
logged training loss) or a failure is a row with its status and error, never dropped, and makes
the command exit 1. Resumable: a model whose workdir holds summary.json is not trained again
(delete its folder to retry it); an interrupted model resumes from its last checkpoint.
--max_total_seconds stops starting models after that many seconds; the rest are 'pending' rows
and the exit code is 3 (rerun the same command to continue), unless something failed (1).
--workers N trains N models at once, each in its own process (`--pairs=<id>`, output in
<workdir>/<id>/log.txt) sharing the one accelerator: the models are small, so one alone leaves
the GPU mostly idle and compilation (CPU) dominates; N = 6-8 suits a 16-core H100 machine.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback

FAMILIES = ("s4", "mamba", "mamba2", "lstm", "transformer")
SMOKE_PAIRS = ("lstm-transformer", "flat-lstm")
EXIT_FAILED, EXIT_PENDING = 1, 3


def all_pairs() -> tuple[str, ...]:
    """'low-high' for the 25 HiSS pairs, then 'flat-<kind>' for the 5 flat models."""
    return (tuple(f"{lo}-{hi}" for lo in FAMILIES for hi in FAMILIES)
            + tuple(f"flat-{k}" for k in FAMILIES))


def parse_pairs(spec: str) -> tuple[str, ...]:
    """'all' or '' -> all_pairs(); else a comma list of ids, each checked."""
    if not spec or spec == "all":
        return all_pairs()
    ids = tuple(p.strip() for p in spec.split(",") if p.strip())
    bad = [p for p in ids if p not in all_pairs()]
    if bad:
        raise ValueError(f"unknown pair ids {bad}; use 'low-high' or 'flat-kind' with kinds "
                         f"{FAMILIES}, e.g. 's4-mamba,flat-mamba2'")
    return ids


def pair_config(config, pair: str):
    """A copy of `config` with the model type and level kinds of `pair`."""
    cfg = copy.deepcopy(config)
    first, second = pair.split("-")
    if first == "flat":
        cfg.model.type = "flat"
        cfg.model.flat.kind = second
    else:
        cfg.model.type = "hiss"
        cfg.model.low.kind, cfg.model.high.kind = first, second
    return cfg


def measure_step_seconds(config, dataset, n_steps: int = 5) -> float:
    """Seconds per training step of `config` on `dataset`, with the library's own state and
    jitted step (compile and two warm-up steps excluded)."""
    import jax
    from hiss_jax.models import build_model
    from hiss_jax.train import batching, state as state_lib, step as step_lib

    info = dataset.info
    model = build_model(config.model, input_dim=info.input_dim, output_dim=info.output_dim,
                        scan_impl=config.kernels.impl)
    tx, schedule = state_lib.make_optimizer(config.optim, 1000)
    mesh = state_lib.make_mesh(config)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    state, shardings = state_lib.create_train_state(
        model, tx, mesh, rules, config.train.seed, (1, 2 * info.chunk_size, info.input_dim))
    step = step_lib.make_train_step(model, tx, schedule, mesh, shardings, rules)
    batches = batching.TrainBatches(dataset.train, config.train.batch_size, config.train.seed,
                                    info.chunk_size, config.train.window)
    batch = step_lib.to_global(batches(0), mesh)
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(n_steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t) / n_steps


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _nonfinite_logged(run_dir: str) -> str | None:
    """The first metrics.jsonl entry with a non-finite loss or mse, described; else None."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            for key in ("loss", "mse"):
                if key in rec and not _finite(rec[key]):
                    return f"{rec.get('split')} {key}={rec[key]} at step {rec.get('step')}"
    return None


def record_from_summary(pair: str, run_dir: str, summary: dict) -> dict:
    rec = {"id": pair, "status": "ok", "val_mse": summary.get("best_val_mse"),
           "zero_mse": summary.get("zero_baseline_mse"), "ratio": summary.get("ratio_to_zero"),
           "wall_s": summary.get("wall_s"), "steps": summary.get("steps"),
           "best_step": summary.get("best_step"), "params": summary.get("param_count"),
           "steps_per_s": summary.get("steps_per_s"), "model": summary.get("model"),
           "dataset": summary.get("dataset")}
    bad = [k for k in ("val_mse", "zero_mse", "ratio") if not _finite(rec[k])]
    logged = _nonfinite_logged(run_dir)
    if bad or logged:
        rec["status"] = "nan"
        rec["error"] = "; ".join(filter(None, [f"non-finite {bad}" if bad else None, logged]))
    return rec


def run_grid(config, workdir: str, pairs, *, steps: int = 0, seconds: float = 0.0,
             max_total_seconds: float = 0.0, keep_checkpoints: bool = False,
             dataset=None, log=print, write: bool = True) -> tuple[list[dict], int]:
    """Trains every pair not yet finished; returns (records, exit code) and writes grid.md/json
    (unless write=False: a worker of run_grid_parallel, whose parent writes them).

    dataset: injected by tests; by default load_dataset(config.data), loaded once for all pairs.
    """
    from hiss_jax.train import train_and_evaluate

    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    records, walls = [], []
    for i, pair in enumerate(pairs):
        run_dir = os.path.join(workdir, pair)
        summary_path = os.path.join(run_dir, "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                records.append(dict(record_from_summary(pair, run_dir, json.load(f)),
                                    resumed=True))
            log(f"[grid] {pair}: finished earlier, skipped ({records[-1]['status']})")
            continue
        if max_total_seconds and time.time() - t0 > max_total_seconds:
            records.append({"id": pair, "status": "pending",
                            "error": f"--max_total_seconds={max_total_seconds} reached"})
            continue
        t_pair = time.time()
        try:
            if dataset is None:
                from hiss_jax.data import load_dataset
                dataset = load_dataset(config.data)
            cfg = pair_config(config, pair)
            if seconds > 0:
                per_step = measure_step_seconds(cfg, dataset)
                cfg.train.num_steps = max(10, int(seconds / per_step))
                log(f"[grid] {pair}: {per_step * 1e3:.1f} ms/step -> "
                    f"{cfg.train.num_steps} steps for {seconds:.0f} s")
            elif steps > 0:
                cfg.train.num_steps = int(steps)
            summary = train_and_evaluate(cfg, run_dir, dataset=dataset)
            rec = record_from_summary(pair, run_dir, summary)
            rec["wall_s"] = time.time() - t_pair  # includes the --seconds probe
            if not keep_checkpoints:
                for sub in ("checkpoints", "best"):
                    shutil.rmtree(os.path.join(run_dir, sub), ignore_errors=True)
        except Exception as e:  # noqa: BLE001 (recorded, reported, and the exit code says so)
            rec = {"id": pair, "status": "failed", "error": f"{type(e).__name__}: {e}"[:1000],
                   "wall_s": time.time() - t_pair}
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "error.txt"), "w") as f:
                f.write(traceback.format_exc())
        records.append(rec)
        walls.append(rec["wall_s"])
        left = sum(1 for p in pairs[i + 1:]
                   if not os.path.exists(os.path.join(workdir, p, "summary.json")))
        log(f"[grid] {pair}: {rec['status']} val MSE {rec.get('val_mse')} "
            f"ratio {rec.get('ratio')} in {rec['wall_s']:.0f} s; {left} to go, about "
            f"{left * sum(walls) / len(walls) / 60:.1f} min more")
        if write:
            write_outputs(workdir, records, config)
    if write:
        write_outputs(workdir, records, config)
    statuses = {r["status"] for r in records}
    code = EXIT_FAILED if statuses & {"nan", "failed"} else (
        EXIT_PENDING if "pending" in statuses else 0)
    return records, code


def collect_record(workdir: str, pair: str, note: str = "") -> dict:
    """The record of a model trained by a worker process: from its summary.json, else failed
    (error.txt or `note`), else pending."""
    run_dir = os.path.join(workdir, pair)
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return record_from_summary(pair, run_dir, json.load(f))
    error_path = os.path.join(run_dir, "error.txt")
    if os.path.exists(error_path):
        with open(error_path) as f:
            lines = [ln for ln in f.read().strip().splitlines() if ln.strip()]
        return {"id": pair, "status": "failed", "error": (lines[-1] if lines else note)[:1000]}
    if note:
        return {"id": pair, "status": "failed", "error": note}
    return {"id": pair, "status": "pending", "error": "not started"}


def _worker_argv(argv) -> list[str]:
    """argv minus the flags the parent sets per worker (--pairs, --workdir, --workers,
    --max_total_seconds), in either '--flag=v' or '--flag v' form."""
    drop = ("--pairs", "--workdir", "--workers", "--worker", "--max_total_seconds")
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop:
            skip = "=" not in arg and name != "--worker"  # the value is the next word
            continue
        out.append(arg)
    return out


def run_grid_parallel(config, workdir: str, pairs, workers: int, argv, *,
                      max_total_seconds: float = 0.0, log=print) -> tuple[list[dict], int]:
    """Like run_grid, with `workers` models at once, each `python -m hiss_jax.experiments.grid
    --pairs=<id>` (argv's other flags passed on), logging to <workdir>/<id>/log.txt."""
    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # N processes share the GPU
    todo = [p for p in pairs if not os.path.exists(os.path.join(workdir, p, "summary.json"))]
    log(f"[grid] {len(pairs) - len(todo)} finished earlier, {len(todo)} to train, "
        f"{workers} at once")
    running, notes = {}, {}
    while todo or running:
        while todo and len(running) < workers and not (
                max_total_seconds and time.time() - t0 > max_total_seconds):
            pair = todo.pop(0)
            run_dir = os.path.join(workdir, pair)
            os.makedirs(run_dir, exist_ok=True)
            if os.path.exists(os.path.join(run_dir, "error.txt")):  # an earlier failure's
                os.remove(os.path.join(run_dir, "error.txt"))
            cmd = [sys.executable, "-m", "hiss_jax.experiments.grid", f"--pairs={pair}",
                   f"--workdir={workdir}", "--worker", *_worker_argv(argv)]
            out = open(os.path.join(run_dir, "log.txt"), "a")
            running[pair] = (subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                              env=env), out, time.time())
        if not running:
            break  # the time limit stopped the rest: they stay pending
        time.sleep(1.0)
        for pair, (proc, out, t_start) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            out.close()
            del running[pair]
            if rc not in (0, EXIT_FAILED):  # killed, crashed: no row written by the worker
                notes[pair] = f"worker exit code {rc}; see {pair}/log.txt"
            rec = collect_record(workdir, pair, notes.get(pair, ""))
            log(f"[grid] {pair}: {rec['status']} val MSE {rec.get('val_mse')} ratio "
                f"{rec.get('ratio')} in {time.time() - t_start:.0f} s; {len(todo)} queued, "
                f"{len(running)} running, {time.time() - t0:.0f} s elapsed")
            write_outputs(workdir, [collect_record(workdir, p, notes.get(p, ""))
                                    for p in pairs], config)
    records = [collect_record(workdir, p, notes.get(p, "")) for p in pairs]
    write_outputs(workdir, records, config)
    statuses = {r["status"] for r in records}
    code = EXIT_FAILED if statuses & {"nan", "failed"} else (
        EXIT_PENDING if "pending" in statuses else 0)
    return records, code


_ORDER = {"ok": 0, "nan": 1, "failed": 2, "pending": 3}


def sort_records(records):
    return sorted(records, key=lambda r: (_ORDER[r["status"]],
                                          r["val_mse"] if _finite(r.get("val_mse")) else math.inf,
                                          r["id"]))


def _cell(v, spec):
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def markdown(records, title: str = "") -> str:
    cols = [("id", "model (low-high / flat-kind)", "s"), ("val_mse", "val MSE", ".5f"),
            ("zero_mse", "zero-baseline MSE", ".5f"), ("ratio", "ratio", ".3f"),
            ("wall_s", "wall s", ".0f"), ("steps", "steps", "d"), ("params", "params", ",d"),
            ("status", "status", "s")]
    lines = [f"## {title}", ""] if title else []
    lines.append("| # | " + " | ".join(h for _, h, _ in cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for i, r in enumerate(sort_records(records), 1):
        cells = [_cell(r.get(k), s) for k, _, s in cols]
        if r.get("error"):
            cells[-1] += f": {r['error'][:120]}".replace("|", "/").replace("\n", " ")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(workdir, records, config) -> None:
    title = (f"HiSS grid on {config.data.name}: {len(records)} models, "
             f"sorted by validation MSE (normalised targets)")
    with open(os.path.join(workdir, "grid.md"), "w") as f:
        f.write(markdown(records, title))
    tmp = os.path.join(workdir, "grid.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"dataset": config.data.name, "records": sort_records(records)}, f, indent=1)
    os.replace(tmp, os.path.join(workdir, "grid.json"))


def smoke_config(config):
    """Seconds on a CPU: the tiny models of configs/base.py:apply_tiny, 4 steps, no plots."""
    from configs import base
    base.apply_tiny(config)
    config.train.update(num_steps=4, eval_every=2, log_every=2, plot_episodes=0,
                        progress=False)
    return config


def main(argv):
    del argv
    from absl import flags, logging
    f = flags.FLAGS
    if not f["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    config = f.config
    pairs = parse_pairs(f.pairs or (",".join(SMOKE_PAIRS) if f.smoke else "all"))
    if f.smoke:
        smoke_config(config)
    config.train.progress = False
    workdir = f.workdir or os.path.join(
        "runs", "grid_" + config.data.name.replace(":", "_") + ("_smoke" if f.smoke else ""))
    if f.workers > 1 and len(pairs) > 1:
        records, code = run_grid_parallel(config, workdir, pairs, f.workers, sys.argv[1:],
                                          max_total_seconds=f.max_total_seconds)
    else:
        records, code = run_grid(config, workdir, pairs, steps=f.steps, seconds=f.seconds,
                                 max_total_seconds=f.max_total_seconds,
                                 keep_checkpoints=f.keep_checkpoints, write=not f.worker)
    if f.worker:
        sys.exit(code)
    print("\n" + markdown(records))
    print(f"wrote {workdir}/grid.md and grid.json; exit code {code} "
          "(0 all done, 1 NaN or failure, 3 pending: rerun to continue)", flush=True)
    sys.exit(code)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", "configs/mamba2.py",
                                    "Base config file[:arg]; only the level kinds change.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Grid folder (default runs/grid_<dataset>).")
    flags.DEFINE_string("pairs", "", "Comma list of 'low-high' / 'flat-kind' ids (default all).")
    flags.DEFINE_integer("steps", 0, "Training steps per model (0: config.train.num_steps).")
    flags.DEFINE_float("seconds", 0.0, "Training seconds per model (overrides --steps).")
    flags.DEFINE_float("max_total_seconds", 0.0, "Start no model after this (0: no limit).")
    flags.DEFINE_bool("keep_checkpoints", False, "Keep each model's checkpoints/ and best/.")
    flags.DEFINE_integer("workers", 1, "Models trained at once, each in its own process.")
    flags.DEFINE_bool("worker", False, "Internal: a --workers child (writes no grid.md/json).")
    flags.DEFINE_bool("smoke", False, "Tiny models, 4 steps, two models (CPU check).")


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
