"""End-to-end training benchmark: throughput per model and kernel impl, and cost vs length.

    python benchmarks/train.py --part throughput        # GPU, < 10 min (one device call)
    python benchmarks/train.py --part scaling           # GPU, < 10 min (one device call)
    python benchmarks/train.py --smoke                  # CPU, tiny sizes, seconds
    python benchmarks/train.py --plot a.json,b.json     # merge runs' scaling records -> PNG

Every point uses the library's own construction: `build_model`, `make_optimizer`, `make_mesh`,
`create_train_state` and the jitted, sharded, state-donating `make_train_step`
(hiss_jax.train), on random (never zero) inputs of the synthetic IMU's width (6 in, 3 out,
chunk 10). Per point: compile time (lower + compile of the train step), then two warm-up
steps and R repeats of N back-to-back steps with one block_until_ready; step time = median of
the per-step means; samples/s = batch / step time. Memory: XLA's compiled memory analysis
(arguments + outputs + temporaries) and `memory_stats()['peak_bytes_in_use']` of the device,
which is per process: on GPU every job runs in its own child process (also a guard against
hangs and out-of-memory crashes), so the peak is that job's own.

Part "throughput": HiSS Mamba2->Mamba2, Mamba->Mamba, S4->Mamba and the flat Mamba2 at a
realistic size (the --preset), kernels.impl = pallas vs xla at the same config.
Part "scaling": train-step time vs input length (1k..64k steps) for HiSS (Mamba2->Mamba2,
Mamba->Mamba), the flat SSMs (Mamba2, Mamba, S4) and the flat Transformer, impl auto; a
model's sweep stops at its first failure (e.g. out of memory). The fitted log-log slope over
the longer half of the lengths (launch overhead flattens the short end) should be ~1 for the
SSMs; the plot (PNG beside the JSON) draws a slope-1 reference line.
JSON goes to --out; the table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)
# Each job runs in a child process: the parent must not preallocate 75% of the device memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

INPUT_DIM, OUTPUT_DIM, CHUNK = 6, 3, 10  # the synthetic IMU task's widths and rate ratio

# name -> (type, low/flat kind, high kind)
MODELS = {
    "hiss_mamba2_mamba2": ("hiss", "mamba2", "mamba2"),
    "hiss_mamba_mamba": ("hiss", "mamba", "mamba"),
    "hiss_s4_mamba": ("hiss", "s4", "mamba"),
    "flat_mamba2": ("flat", "mamba2", None),
    "flat_mamba": ("flat", "mamba", None),
    "flat_s4": ("flat", "s4", None),
    "flat_transformer": ("flat", "transformer", None),
}
THROUGHPUT_MODELS = ("hiss_mamba2_mamba2", "hiss_mamba_mamba", "hiss_s4_mamba", "flat_mamba2")
SCALING_MODELS = ("hiss_mamba2_mamba2", "hiss_mamba_mamba", "flat_mamba2", "flat_mamba",
                  "flat_s4", "flat_transformer")
# --smoke without --models: one HiSS and one flat model per part (about a minute on a CPU).
SMOKE_MODELS = {"throughput": ("hiss_mamba2_mamba2", "flat_mamba2"),
                "scaling": ("flat_mamba2", "flat_transformer")}
# Model size and batch. "gpu": CSP-Bench-like widths (d 128, 4 layers per level) on 400 target
# steps (4000 input steps) per sequence; "cpu-smoke": seconds on a CPU.
PRESETS = {
    "gpu": dict(d_model=128, n_layers=4, batch=32, length=4000, scaling_batch=4,
                lengths=(1000, 2000, 4000, 8000, 16000, 32000, 64000),
                mamba2=dict(d_state=64, headdim=64), mamba=dict(d_state=16),
                s4=dict(d_state=64), transformer=dict(n_heads=4, d_ff=256),
                repeats=5, target_ms=500.0, max_steps=50),
    "cpu-smoke": dict(d_model=16, n_layers=1, batch=2, length=100, scaling_batch=1,
                      lengths=(100, 200, 400),
                      mamba2=dict(d_state=8, headdim=8), mamba=dict(d_state=4),
                      s4=dict(d_state=8), transformer=dict(n_heads=2, d_ff=32),
                      repeats=2, target_ms=5.0, max_steps=3),
}


# ------------------------------------------------------------------------------ one point
def make_config(model: str, preset: dict, impl: str, length: int):
    """A configs/base.py config for `model` at the preset's size (the library's defaults
    elsewhere); the SSD block length follows each level's sequence (as configs/mamba2.py)."""
    from configs import base
    mtype, low, high = MODELS[model]
    config = base.get_config()
    config.model.type = mtype
    config.model.chunk_size = CHUNK
    levels = {"flat": low} if mtype == "flat" else {"low": low, "high": high}
    for level, kind in levels.items():
        lc = base.level_config(kind, preset["d_model"], preset["n_layers"], 0.0)
        for family in ("mamba2", "mamba", "s4", "transformer"):
            lc[family].update(preset[family])
        seq = CHUNK if level == "low" else (length // CHUNK if level == "high" else length)
        lc.mamba2.chunk_size = int(min(64, seq))
        config.model[level] = lc
    config.kernels.impl = impl
    config.model.dtype = preset.get("dtype", "float32")
    config.train.batch_size = preset["batch"]
    return config


def measure_point(model: str, impl: str, length: int, batch: int, preset: dict) -> dict:
    """Compile and time the library's train step for one (model, impl, length, batch)."""
    from hiss_jax.models import build_model
    from hiss_jax.train import state as state_lib, step as step_lib

    config = make_config(model, preset, impl, length)
    m = build_model(config.model, input_dim=INPUT_DIM, output_dim=OUTPUT_DIM,
                    scan_impl=config.kernels.impl)
    tx, schedule = state_lib.make_optimizer(config.optim, 10_000)
    mesh = state_lib.make_mesh(config)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    t = time.perf_counter()
    state, shardings = state_lib.create_train_state(m, tx, mesh, rules, 0,
                                                    (1, 2 * CHUNK, INPUT_DIM))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t
    train_step = step_lib.make_train_step(m, tx, schedule, mesh, shardings, rules)
    rng = np.random.default_rng(0)
    t_steps = length // CHUNK
    batch_np = {"inputs": rng.standard_normal((batch, length, INPUT_DIM), np.float32),
                "targets": rng.standard_normal((batch, t_steps, OUTPUT_DIM), np.float32),
                "mask": np.ones((batch, t_steps), bool)}
    gbatch = step_lib.to_global(batch_np, mesh)

    t = time.perf_counter()
    compiled = train_step.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - t
    if preset.get("compile_only"):
        return {"compile_s": compile_s}
    mem = {}
    try:
        ma = compiled.memory_analysis()
        mem = {k: int(getattr(ma, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes") if hasattr(ma, k)}
    except Exception:  # noqa: BLE001 (not every backend reports it)
        pass

    metrics = None
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, gbatch)
    jax.block_until_ready((state, metrics))
    t = time.perf_counter()
    state, metrics = compiled(state, gbatch)
    jax.block_until_ready((state, metrics))
    one_ms = (time.perf_counter() - t) * 1e3
    n = int(min(preset["max_steps"], max(1, np.ceil(preset["target_ms"] / max(one_ms, 1e-3)))))
    means = []
    for _ in range(preset["repeats"]):
        t = time.perf_counter()
        for _ in range(n):
            state, metrics = compiled(state, gbatch)
        jax.block_until_ready((state, metrics))
        means.append((time.perf_counter() - t) / n * 1e3)
    step_ms = float(np.median(means))
    loss = float(metrics["loss"])
    prof = None
    if preset.get("profile"):
        box = {"state": state}

        def one_step():
            box["state"], m = compiled(box["state"], gbatch)
            return m

        prof = common.profile_summary(one_step, int(preset["profile"]),
                                      os.path.join(ROOT, ".cache", f"prof_{model}_{impl}"))
    return {"step_ms": step_ms, "step_ms_min": min(means), "step_ms_max": max(means),
            "n_steps": n, "repeats": preset["repeats"], "steps_per_s": 1e3 / step_ms,
            "samples_per_s": batch * 1e3 / step_ms,
            "input_steps_per_s": batch * length * 1e3 / step_ms,
            "compile_s": compile_s, "init_s": init_s, "loss_finite": bool(np.isfinite(loss)),
            "param_count": state_lib.param_count(state.params),
            "compiled_bytes": (sum(v for k, v in mem.items() if k != "alias_size_in_bytes")
                               if mem else None),
            "memory_analysis": mem, "peak_bytes_in_use": common.peak_memory_bytes(),
            **({"profile": prof} if prof else {})}


def run_job(job: dict, preset: dict, out: str | None = None, deadline: float | None = None):
    """Runs the job's points in order; a model's sweep stops at its first failure or when the
    deadline is near. Writes the records to `out` after every point (a killed child keeps
    what it finished)."""
    recs = []
    for length in job["lengths"]:
        rec = {"part": job["part"], "model": job["model"], "impl": job["impl"],
               "length": length, "batch": job["batch"]}
        if deadline is not None and time.time() > deadline - 5:
            rec["skipped"] = "time budget spent"
        elif recs and ("error" in recs[-1] or "skipped" in recs[-1]):
            rec["skipped"] = f"after the failure at length {recs[-1]['length']}"
        else:
            common.guarded(rec, lambda length=length: measure_point(
                job["model"], job["impl"], length, job["batch"], preset))
        recs.append(rec)
        print(f"[train] {rec['part']} {rec['model']} {rec['impl']} L={length} B={rec['batch']}: "
              + (f"{rec['step_ms']:.2f} ms/step, compile {rec['compile_s']:.1f} s"
                 if "step_ms" in rec else rec.get("error", rec.get("skipped", ""))[:300]),
              flush=True)
        if out:
            common.write_json(out, recs)
    return recs


def _child(job, preset_name, timeout, tmpdir, deadline, profile=0, dtype="float32",
           compile_only=False):
    tag = f"{job['part']}_{job['model']}_{job['impl']}" + (
        f"_compile{job['lengths'][0]}" if compile_only else "")
    path = os.path.join(tmpdir, f"train_child_{tag}.json")
    if os.path.exists(path):
        os.remove(path)
    spec = dict(job=job, preset=preset_name, deadline=deadline, profile=profile, dtype=dtype,
                compile_only=compile_only)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--out", path]
    err = None
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0:
            err = f"child exit {proc.returncode}: {proc.stderr[-600:]}"
    except subprocess.TimeoutExpired:
        err = f"child over its {timeout:.0f} s limit"
    recs = []
    if os.path.exists(path):
        with open(path) as fh:
            recs = json.load(fh)
        os.remove(path)
    done = {r["length"] for r in recs}
    for length in job["lengths"]:
        if length in done:
            continue
        rec = {"part": job["part"], "model": job["model"], "impl": job["impl"],
               "length": length, "batch": job["batch"]}
        if err:  # the first point the child did not finish is the one that broke it
            rec["error"], err = err, None
        else:
            rec["skipped"] = "not reached (the child ended before it)"
        recs.append(rec)
    return recs


# ------------------------------------------------------------------------------ analysis
def fit_slopes(records, lengths) -> dict:
    """model -> {"slope_upper": slope over the longer half, "slope_all", "points"}."""
    upper = set(sorted(lengths)[len(lengths) // 2 - (1 if len(lengths) % 2 == 0 else 0):])
    out = {}
    for model in dict.fromkeys(r["model"] for r in records if r["part"] == "scaling"):
        pts = sorted((r["length"], r["step_ms"]) for r in records
                     if r["part"] == "scaling" and r["model"] == model and "step_ms" in r)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        up = [(x, y) for x, y in pts if x in upper]
        out[model] = {"slope_all": common.loglog_slope(xs, ys),
                      "slope_upper": common.loglog_slope([p[0] for p in up], [p[1] for p in up]),
                      "fit_lengths_upper": sorted(x for x, _ in up), "points": len(pts)}
    return out


def plot_scaling(records, slopes, path, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    allx, ally = [], []
    for model, s in slopes.items():
        pts = sorted((r["length"], r["step_ms"]) for r in records
                     if r["part"] == "scaling" and r["model"] == model and "step_ms" in r)
        if not pts:
            continue
        xs, ys = zip(*pts)
        allx += xs
        ally += ys
        slope, where = s.get("slope_upper"), ""
        if slope is None and s.get("slope_all") is not None:  # too few long points (e.g. OOM)
            slope, where = s["slope_all"], f", up to {max(xs)}"
        label = model + (f" (slope {slope:.2f}{where})" if slope is not None else "")
        failed = [r for r in records if r["part"] == "scaling" and r["model"] == model
                  and "error" in r]
        if failed:
            why = "out of memory" if "RESOURCE_EXHAUSTED" in failed[0]["error"] else "failed"
            label += f"; {why} at {failed[0]['length']}"
        ax.plot(xs, ys, "o-", label=label)
    if allx:
        x0, x1 = min(allx), max(allx)
        y_mid = float(np.exp(np.median(np.log(ally))))
        x_mid = float(np.exp(np.median(np.log(allx))))
        xs = np.array([x0, x1], float)
        ax.plot(xs, y_mid * xs / x_mid, "k--", lw=1, label="linear reference (slope 1)")
        ax.plot(xs, y_mid * (xs / x_mid) ** 2, "k:", lw=1, label="quadratic (slope 2)")
        ax.set_ylim(min(ally) / 3, max(ally) * 3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("input steps per sequence")
    ax.set_ylabel("train step time (ms)")
    ax.set_title(title or "train-step cost vs sequence length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result) -> str:
    recs = result["records"]
    lines = []
    tp = [r for r in recs if r["part"] == "throughput"]
    xla = {r["model"]: r.get("step_ms") for r in tp if r["impl"] == "xla"}
    for r in tp:
        r["speedup_vs_xla"] = (xla[r["model"]] / r["step_ms"]
                               if xla.get(r["model"]) and r.get("step_ms") else None)
        r["peak_GiB"] = (r["peak_bytes_in_use"] / 2 ** 30 if r.get("peak_bytes_in_use")
                         else None)
        r["status"] = "ok" if "step_ms" in r and r.get("loss_finite") else (
            "NONFINITE" if "step_ms" in r else r.get("error", r.get("skipped", ""))[:40])
    if tp:
        lines.append("=== training throughput (median step; batch %s, %s input steps) ===" % (
            tp[0]["batch"], tp[0]["length"]))
        lines.append(common.table(tp, [
            ("model", "model", "s"), ("impl", "impl", "s"), ("step_ms", "ms/step", ".2f"),
            ("steps_per_s", "steps/s", ".2f"), ("samples_per_s", "samples/s", ".1f"),
            ("compile_s", "compile s", ".1f"), ("peak_GiB", "peak GiB", ".2f"),
            ("param_count", "params", "d"), ("speedup_vs_xla", "vs xla", ".2f"),
            ("status", "status", "s")]))
    prof = [r for r in tp if r.get("profile") and "device_busy_ms" in r["profile"]]
    if prof:
        cats = sorted({c for r in prof for c in r["profile"]["by_category_ms"]})
        rows = [{"model": r["model"], "impl": r["impl"], "wall": r["profile"]["wall_ms"],
                 "busy": r["profile"]["device_busy_ms"], "n": r["profile"]["kernels_per_step"],
                 **r["profile"]["by_category_ms"]} for r in prof]
        lines.append("=== profile: ms per step (wall, device busy, kernel time by category), "
                     "kernels per step ===")
        lines.append(common.table(rows, [("model", "model", "s"), ("impl", "impl", "s"),
                                         ("wall", "wall", ".2f"), ("busy", "busy", ".2f"),
                                         ("n", "kernels", ".0f")]
                                  + [(c, c, ".2f") for c in cats]))
    sc = [r for r in recs if r["part"] == "scaling"]
    if sc:
        lengths = sorted({r["length"] for r in sc})
        rows = []
        for model, s in result.get("slopes", {}).items():
            row = {"model": model, "slope": s.get("slope_upper"), "slope_all": s.get("slope_all")}
            for r in sc:
                if r["model"] == model:
                    row[str(r["length"])] = r.get("step_ms", "fail" if "error" in r else "-")
            rows.append(row)
        lines.append("=== train-step ms vs input length (batch %s); slope = log-log fit over "
                     "the longer half ===" % sc[0]["batch"])
        cols = ([("model", "model", "s")] + [(str(n), str(n), ".1f") for n in lengths]
                + [("slope", "slope", ".2f"), ("slope_all", "slope(all)", ".2f")])
        lines.append(common.table(rows, cols))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="throughput,scaling", help="throughput,scaling")
    p.add_argument("--smoke", action="store_true",
                   help="preset cpu-smoke, inline, two models per part unless --models")
    p.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    p.add_argument("--models", default="", help="comma list (default: the part's models)")
    p.add_argument("--impls", default="pallas,xla", help="throughput part")
    p.add_argument("--scaling-impl", default="auto")
    p.add_argument("--lengths", default="", help="comma list of input lengths (scaling)")
    p.add_argument("--inline", action="store_true", help="no child processes")
    p.add_argument("--job-timeout", type=float, default=300.0, help="throughput job limit")
    p.add_argument("--budget-s", type=float, default=540.0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="config.model.dtype: compute dtype of the models (params stay float32)")
    p.add_argument("--profile", type=int, default=0,
                   help="trace this many steps per point after timing (jax.profiler): device "
                        "busy time and kernel time by category in the JSON and table")
    p.add_argument("--compile-workers", type=int, default=0,
                   help="scaling: first compile every point in this many parallel processes "
                        "into a persistent compilation cache (CPU-bound, so it overlaps), then "
                        "time the points one at a time from the cache; the cold compile time "
                        "is kept as compile_s_cold")
    p.add_argument("--out", default="")
    p.add_argument("--plot", default="", help="comma list of JSONs: merge + plot, no runs")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.smoke:
        opts.preset, opts.inline = "cpu-smoke", True
    return opts


def main(argv=None) -> dict:
    opts = parse(argv)
    if opts.child:
        spec = json.loads(opts.child)
        preset = dict(PRESETS[spec["preset"]], profile=spec.get("profile", 0),
                      dtype=spec.get("dtype", "float32"),
                      compile_only=spec.get("compile_only", False))
        recs = run_job(spec["job"], preset, opts.out, spec["deadline"])
        return {"records": recs}
    t0 = time.time()
    out = opts.out or common.default_out("train_smoke.json" if opts.smoke else "train.json")
    png = os.path.splitext(out)[0] + "_scaling.png"
    if opts.plot:
        recs = []
        for path in opts.plot.split(","):
            with open(path) as fh:
                recs += [r for r in json.load(fh)["records"] if r["part"] == "scaling"]
        result = {"records": recs, "merged_from": opts.plot.split(",")}
        _finish_scaling(result, png)
        common.write_json(out, result)
        print(report(result))
        return result

    preset = dict(PRESETS[opts.preset], profile=opts.profile, dtype=opts.dtype)
    parts = set(filter(None, opts.part.split(",")))
    only = set(filter(None, opts.models.split(",")))
    lengths = ([int(x) for x in opts.lengths.split(",") if x] or list(preset["lengths"]))
    jobs = []

    def chosen(part, models):
        if only:
            return [m for m in models if m in only]
        return SMOKE_MODELS[part] if opts.smoke else models

    if "throughput" in parts:
        for model in chosen("throughput", THROUGHPUT_MODELS):
            for impl in filter(None, opts.impls.split(",")):
                jobs.append(dict(part="throughput", model=model, impl=impl,
                                 lengths=[preset["length"]], batch=preset["batch"]))
    if "scaling" in parts:
        for model in chosen("scaling", SCALING_MODELS):
            jobs.append(dict(part="scaling", model=model, impl=opts.scaling_impl,
                             lengths=lengths, batch=preset["scaling_batch"]))
    result = {"device": common.device_info(), "preset": opts.preset, "preset_values": preset,
              "dtype": opts.dtype,
              "method": ("library train step (build_model, create_train_state, make_train_step); "
                         "compile = lower+compile; 2 warm-up steps; median over repeats of "
                         "(N back-to-back steps, one block_until_ready) / N"),
              "records": []}
    print(f"[train] {result['device']} preset {opts.preset}", flush=True)
    tmpdir = os.path.dirname(os.path.abspath(out))
    os.makedirs(tmpdir, exist_ok=True)
    deadline = t0 + opts.budget_s
    cold = {}
    if opts.compile_workers > 0 and not opts.inline:
        cold = _precompile([j for j in jobs if j["part"] == "scaling"], opts, tmpdir, deadline)
        result["precompile"] = {"workers": opts.compile_workers, "wall_s": time.time() - t0}
    for i, job in enumerate(jobs):
        left = deadline - time.time()
        # Scaling sweeps share the time left evenly, so one slow model cannot starve the next;
        # a sweep stops starting points at its share's end.
        job_deadline = (time.time() + left / (len(jobs) - i) if job["part"] == "scaling"
                        else deadline)
        if left < 20:
            result["records"] += [dict(part=job["part"], model=job["model"], impl=job["impl"],
                                       length=n, batch=job["batch"], skipped="time budget spent")
                                  for n in job["lengths"]]
            continue
        if opts.inline:
            result["records"] += run_job(job, preset, None, job_deadline)
        else:
            # A scaling sweep stops itself at its deadline (a point in flight may run on until
            # the hard limit); a throughput job gets --job-timeout.
            limit = min(opts.job_timeout, left - 5) if job["part"] == "throughput" else left - 5
            result["records"] += _child(job, opts.preset, limit, tmpdir, job_deadline,
                                        opts.profile, opts.dtype)
        for rec in result["records"]:
            if (rec["model"], rec["length"]) in cold and rec["part"] == "scaling":
                rec["compile_s_cold"] = cold[rec["model"], rec["length"]]
        common.write_json(out, result)
    if "scaling" in parts:
        _finish_scaling(result, png)
    result["wall_s"] = time.time() - t0
    text = report(result)
    common.write_json(out, result)
    print(f"\nwrote {out}" + (f" and {png}" if "scaling" in parts else ""))
    print(text)
    return result


def _precompile(jobs, opts, tmpdir, deadline) -> dict:
    """Compiles every (model, length) of the scaling jobs in `opts.compile_workers` parallel
    child processes into a persistent compilation cache shared through the environment, so the
    timed children load their executables instead of compiling one after another. Returns
    (model, length) -> cold compile seconds (points that failed here are timed, and fail,
    in the timed pass)."""
    from concurrent.futures import ThreadPoolExecutor
    cache = os.path.join(ROOT, ".cache", "jax_compile_cache")  # not beside --out ($OUT)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    # Longest first: they compile slowest, so the pool ends together.
    points = sorted(((job, n) for job in jobs for n in job["lengths"]), key=lambda p: -p[1])
    # Compilation must leave the timing pass most of the budget.
    stop = time.time() + 0.5 * (deadline - time.time())

    def one(point):
        job, n = point
        left = stop - time.time()
        if left < 10:
            return point, None
        recs = _child(dict(job, lengths=[n]), opts.preset, left, tmpdir, stop, 0, opts.dtype,
                      compile_only=True)
        return point, recs[0].get("compile_s")

    cold = {}
    with ThreadPoolExecutor(opts.compile_workers) as pool:
        for (job, n), secs in pool.map(one, points):
            print(f"[train] precompiled {job['model']} L={n}: "
                  + (f"{secs:.1f} s" if secs is not None else "no"), flush=True)
            if secs is not None:
                cold[job["model"], n] = secs
    return cold


def _finish_scaling(result, png):
    sc = [r for r in result["records"] if r["part"] == "scaling"]
    lengths = sorted({r["length"] for r in sc})
    result["slopes"] = fit_slopes(result["records"], lengths)
    result["scaling_png"] = png
    try:
        plot_scaling(result["records"], result["slopes"], png)
    except Exception as e:  # noqa: BLE001
        result["plot_error"] = repr(e)[:400]


if __name__ == "__main__":
    main()
