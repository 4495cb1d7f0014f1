"""Timing, bandwidth and reporting helpers shared by benchmarks/kernels.py and benchmarks/train.py.

Timing method (jax has no device-event API): the function is jitted and warmed up (two calls,
so compilation and first-run allocation stay out), then `repeats` times we issue `n_calls`
back-to-back calls and block once on the last output; the per-call mean of each repeat is
(host time) / n_calls, which on an otherwise idle device is the device time plus launch gaps
that the asynchronous dispatch hides behind the queue. We report the median over repeats, and
the spread (min, max) so that a difference smaller than the spread reads as noise (METHOD.md).
`n_calls` adapts to the function: enough calls that one repeat lasts about `target_ms`.
Input sets may rotate (`arg_sets` of length > 1) so repeated calls do not all hit a warm L2.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
import traceback
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def time_calls(fn: Callable, arg_sets: Sequence[Sequence[Any]], *, repeats: int = 5,
               target_ms: float = 200.0, max_calls: int = 100, warmup: int = 2) -> dict:
    """Median per-call time (ms) of `fn` (already jitted) over `repeats` bursts.

    arg_sets: one or more argument tuples, used in rotation. Returns {"ms": median,
    "ms_min", "ms_max", "n_calls", "repeats"}.
    """
    out = None
    for i in range(max(warmup, 1)):
        out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    t = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    one_ms = (time.perf_counter() - t) * 1e3
    n_calls = int(min(max_calls, max(1, math.ceil(target_ms / max(one_ms, 1e-3)))))
    means = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(n_calls):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        means.append((time.perf_counter() - t) / n_calls * 1e3)
    return {"ms": statistics.median(means), "ms_min": min(means), "ms_max": max(means),
            "n_calls": n_calls, "repeats": repeats}


def tree_nbytes(tree) -> int:
    """Bytes of every array leaf of a pytree (each read or written once)."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Measured device-memory bandwidth of an elementwise pass (read n bytes, write n bytes).

    `-x` on a float32 array: XLA emits one streaming kernel that cannot be folded away (unlike a
    copy or `x * 1`), so bytes moved = 2 * nbytes. Returns {"GBps", "ms", "nbytes"}.
    """
    n = max(nbytes // 4, 1024)
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
    f = jax.jit(lambda v: -v)
    t = time_calls(f, [(x,)], repeats=repeats, target_ms=100.0)
    moved = 2 * 4 * n
    return {"GBps": moved / (t["ms"] * 1e-3) / 1e9, "ms": t["ms"], "nbytes_moved": moved}


def device_info() -> dict:
    d = jax.devices()[0]
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "device_kind": getattr(d, "device_kind", str(d)), "n_devices": jax.device_count()}


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on device 0 since the process started (None where not reported)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 (CPU backends may not implement it)
        return None
    if not stats:
        return None
    v = stats.get("peak_bytes_in_use")
    return int(v) if v is not None else None


def guarded(record: dict, fn: Callable[[], dict]) -> dict:
    """Runs fn(); merges its dict into record, or records the error (one failure never stops
    the run)."""
    try:
        record.update(fn())
    except Exception as e:  # noqa: BLE001
        record["error"] = f"{type(e).__name__}: {e}"[:800]
        record["trace"] = traceback.format_exc()[-2000:]
    return record


def default_out(name: str) -> str:
    """benchmarks/results/<name>, or $OUT/<name> on the device machine (files come back)."""
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], name)
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


def fmt(v, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def table(rows: Sequence[dict], cols: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table. cols: (key, header, format spec)."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([fmt(r.get(k), spec) for k, _, spec in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def loglog_slope(xs, ys) -> float | None:
    """Least-squares slope of log(y) on log(x) (None with fewer than 2 finite points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys)
           if y is not None and x > 0 and y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return None
    lx, ly = np.array(pts).T
    return float(np.polyfit(lx, ly, 1)[0])


# Kernel-name categories for profile summaries (first match wins; matched lower-case).
PROFILE_CATEGORIES = (
    ("pallas scan", ("ssd", "selective", "_scan_")),
    ("matmul", ("gemm", "cutlass", "xmma", "cublas", "dot", "matmul", "sm90")),
    ("copy/transpose", ("memcpy", "memset", "copy", "transpose")),
    ("reduce", ("reduce",)),
    ("fusion/other", ("",)),
)


def _category(name: str) -> str:
    low = name.lower()
    return next(cat for cat, keys in PROFILE_CATEGORIES if any(k in low for k in keys))


def profile_summary(run: Callable[[], Any], n_steps: int, log_dir: str, top: int = 15) -> dict:
    """Runs `run()` n_steps times under jax.profiler and summarises the device kernels from the
    Perfetto trace: per step, device busy time (union of kernel intervals), kernel count and time
    per category and for the `top` kernels by time.  busy_ms << wall ms means the device waits on
    the host (launch-bound); a large share of one category names the bottleneck."""
    import glob
    import gzip
    import shutil

    shutil.rmtree(log_dir, ignore_errors=True)
    jax.block_until_ready(run())
    t = time.perf_counter()
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        out = None
        for _ in range(n_steps):
            out = run()
        jax.block_until_ready(out)
    wall_ms = (time.perf_counter() - t) * 1e3 / n_steps
    paths = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        return {"error": f"no perfetto trace under {log_dir}"}
    with gzip.open(paths[0]) as fh:
        data = json.load(fh)
    events = data["traceEvents"] if isinstance(data, dict) else data
    shutil.rmtree(log_dir, ignore_errors=True)
    return {"wall_ms": wall_ms, **summarise_trace(events, n_steps, top)}


def summarise_trace(events, n_steps: int, top: int = 15) -> dict:
    """Chrome/Perfetto trace events -> per-step device busy ms, kernel ms by category and name."""
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev_pids = {p for p, n in procs.items() if "gpu" in n.lower() or "/device:" in n.lower()}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in dev_pids
               and "dur" in e]
    if not kernels:
        return {"error": f"no device events (processes: {sorted(procs.values())})"}
    # union of [ts, ts + dur) over every stream: time the device had any kernel running
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels)
    busy, end = 0.0, -math.inf
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    by_name, by_cat = {}, {}
    for e in kernels:
        n = e["name"]
        by_name[n] = by_name.get(n, 0.0) + float(e["dur"])
        c = _category(n)
        by_cat[c] = by_cat.get(c, 0.0) + float(e["dur"])
    per = 1e-3 / n_steps  # us in total -> ms per step
    return {"n_steps": n_steps, "device_busy_ms": busy * per,
            "kernels_per_step": len(kernels) / n_steps,
            "kernel_ms": sum(by_name.values()) * per,
            "by_category_ms": {k: v * per for k, v in sorted(by_cat.items(), key=lambda x: -x[1])},
            "top_kernels_ms": [(k, v * per) for k, v in
                               sorted(by_name.items(), key=lambda x: -x[1])[:top]]}
