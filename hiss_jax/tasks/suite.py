"""Every headline run of docs/TASKS.md in one command, and the results tables.

    python -m hiss_jax.tasks.suite --out runs/tasks                      # all groups
    python -m hiss_jax.tasks.suite --out runs/tasks --groups copy,disc   # a subset
    python -m hiss_jax.tasks.suite --out runs/tasks --runs copy_mamba    # one run
    python -m hiss_jax.tasks.suite --out runs/tasks --table              # tables from results.json

Groups: 'copy' (selective copying: Mamba, Mamba2, S4, Transformer, S4D), 'disc' (Mamba and S4 under
each of approx_zoh / zoh / bilinear on selective copying, DISC_STEPS steps each), 'pig' (Pig Latin:
Mamba, Mamba2, Transformer).
Each run is a `python -m hiss_jax.tasks` subprocess (killed after --run_timeout s, default 1200)
writing <out>/<name>/{metrics.jsonl,results.json} (error.txt when it failed or timed out); a run
whose results.json exists is skipped (rerun by deleting it), and an unfinished run restarts from
its last checkpoint (one per held-out eval), so an interrupted suite resumes.  --parallel N runs
N at once on the one accelerator (small models leave most of it idle), each logging to
<out>/<name>/log.txt.  Tables go to <out>/TABLES.md.
Extra `--set key=value` overrides apply to every run (e.g. --set train.num_steps=200 for a smoke).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import time

DISC_STEPS = 2000

# name -> (config spec, overrides)
RUNS = {
    "copy": {
        "copy_mamba": ("configs/selective_copy.py:mamba", {}),
        "copy_mamba2": ("configs/selective_copy.py:mamba2", {}),
        "copy_s4": ("configs/selective_copy.py:s4", {}),
        "copy_transformer": ("configs/selective_copy.py:transformer", {}),
        "copy_s4d": ("configs/selective_copy.py:s4", {"model.s4.mode": "diag"}),
    },
    # the discretisation study: every discretisation of Mamba and S4 on selective copying at one
    # shorter budget (DISC_STEPS), so the six rows compare at equal steps and schedule
    "disc": {
        f"disc_{kind}_{disc}": (f"configs/selective_copy.py:{kind}",
                                {f"model.{kind}.disc": disc, "train.num_steps": DISC_STEPS})
        for kind in ("mamba", "s4") for disc in ("approx_zoh", "zoh", "bilinear")
    },
    "pig": {
        "pig_mamba": ("configs/pig_latin.py:mamba", {}),
        "pig_mamba2": ("configs/pig_latin.py:mamba2", {}),
        "pig_transformer": ("configs/pig_latin.py:transformer", {}),
    },
}


def _parse_sets(items):
    """['train.num_steps=200', ...] -> {'train.num_steps': '200', ...} (passed on as flags)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. train.num_steps=200")
        out[key] = value
    return out


def _run_one(name, spec, overrides, out, sets, timeout_s, capture) -> str:
    workdir = os.path.join(out, name)
    flags = [f"--config.{k}={v}" for k, v in {**overrides, **sets}.items()]
    cmd = [sys.executable, "-m", "hiss_jax.tasks", f"--config={spec}", f"--workdir={workdir}",
           *flags]
    print(f"[suite] {name}: {' '.join(cmd[1:])}", flush=True)
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ)
    if capture:  # several runs share one accelerator: no process may preallocate its memory
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    t0 = time.time()
    try:
        with open(os.path.join(workdir, "log.txt"), "a") if capture else contextlib.nullcontext() as log:
            rc = subprocess.run(cmd, timeout=timeout_s, env=env, stdout=log,
                                stderr=subprocess.STDOUT if capture else None).returncode
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    except subprocess.TimeoutExpired:
        status = f"TIMEOUT after {timeout_s:.0f} s (rerun to resume from its last checkpoint)"
    if status != "ok":
        with open(os.path.join(workdir, "error.txt"), "w") as f:
            f.write(status + "\n")
    elif os.path.exists(os.path.join(workdir, "error.txt")):
        os.remove(os.path.join(workdir, "error.txt"))
    print(f"[suite] {name}: {status} ({time.time() - t0:.0f} s)", flush=True)
    return status


def run(out: str, groups, sets, timeout_s: float, only=(), parallel: int = 1) -> None:
    """Each run in its own `python -m hiss_jax.tasks` process, killed after timeout_s; with
    parallel > 1, that many at once (output to <out>/<name>/log.txt)."""
    todo = []
    for group in groups:
        for name, (spec, overrides) in RUNS[group].items():
            if only and name not in only:
                continue
            if os.path.exists(os.path.join(out, name, "results.json")):
                print(f"[suite] {name}: done, skipped", flush=True)
                continue
            todo.append((name, spec, overrides))
    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        futures = [pool.submit(_run_one, name, spec, overrides, out, sets, timeout_s,
                               parallel > 1) for name, spec, overrides in todo]
        for f in futures:
            f.result()


def _load(out, name):
    path = os.path.join(out, name, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _missing(out, name) -> str:
    path = os.path.join(out, name, "error.txt")
    if os.path.exists(path):
        with open(path) as f:
            return f.readline().strip()
    return "not run"


def tables(out: str) -> str:
    titles = {"copy": "## Selective copying (held-out, answer positions only)",
              "disc": f"## Discretisation study (selective copying, {DISC_STEPS} steps each)"}
    lines = []
    for group in ("copy", "disc"):
        lines += [titles[group], "",
                  "| run | model | disc | params | steps | token acc | seq acc | loss | train s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, (spec, overrides) in RUNS[group].items():
            r = _load(out, name)
            kind = spec.split(":")[1] + (" (diag)" if overrides.get("model.s4.mode") == "diag"
                                         else "")
            disc = overrides.get("model.mamba.disc", overrides.get("model.s4.disc", "default"))
            if r is None:
                lines.append(f"| {name} | {kind} | {disc} | - | - | {_missing(out, name)} | | | |")
                continue
            lines.append(f"| {name} | {kind} | {disc} | {r['params']:,} | {r['steps']} | "
                         f"{100 * r['token_acc']:.2f}% | {100 * r['seq_acc']:.2f}% | "
                         f"{r['loss']:.4f} | {r['train_time_s']:.0f} |")
        lines.append("")
    lines += ["## Pig Latin (held-out words, greedy streaming decoding)", "",
              "| run | model | params | steps | exact word | token acc (teacher forced) | train s |",
              "|---|---|---|---|---|---|---|"]
    for name, (spec, _) in RUNS["pig"].items():
        r = _load(out, name)
        if r is None:
            lines.append(f"| {name} | {spec.split(':')[1]} | - | - | {_missing(out, name)} | | |")
            continue
        lines.append(f"| {name} | {r['kind']} | {r['params']:,} | {r['steps']} | "
                     f"{100 * r['exact_word_acc']:.2f}% ({r['n_words']} words) | "
                     f"{100 * r['token_acc']:.2f}% | {r['train_time_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "TABLES.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/tasks")
    parser.add_argument("--groups", default="copy,disc,pig")
    parser.add_argument("--set", action="append", help="key=value override for every run")
    parser.add_argument("--table", action="store_true", help="only write the tables")
    parser.add_argument("--runs", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--run_timeout", type=float, default=1200.0,
                        help="seconds before one run is killed (and recorded as TIMEOUT; a "
                             "rerun resumes it from its last checkpoint)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at once (they share the accelerator; logs to <run>/log.txt)")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(RUNS))
    if unknown:
        raise SystemExit(f"--groups: unknown {unknown}; allowed {sorted(RUNS)}")
    if not args.table:
        only = {r.strip() for r in args.runs.split(",") if r.strip()}
        known = {n for g in RUNS.values() for n in g}
        if only - known:
            raise SystemExit(f"--runs: unknown {sorted(only - known)}; known {sorted(known)}")
        run(args.out, groups, _parse_sets(args.set), args.run_timeout, only, args.parallel)
    print(tables(args.out))


if __name__ == "__main__":
    main()
