"""CPU smoke runs of benchmarks/kernels.py, benchmarks/train.py and the HiSS grid at tiny sizes.

Each script's smallest mode runs in-process; the tests assert that the JSON / markdown outputs
exist and that every row holds finite numbers (or an explicit skip / failure where one is
forced).
"""
import json
import math
import os

import pytest

from benchmarks import kernels as kernels_bench
from benchmarks import train as train_bench
from configs import mamba2
from hiss_jax.experiments import grid
from tests.train import standins


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_kernels_smoke_every_row_timed_and_finite(tmp_path):
    out = tmp_path / "kernels.json"
    # Kept inside the CPU budget: fwd_bwd compiles the forward too, the fwd mode and the SSD
    # are covered below by xla, and the SSD's Pallas path runs in the train smoke (flat Mamba2).
    result = kernels_bench.main(["--smoke", "--out", str(out), "--impls", "pallas,xla",
                                 "--dtypes", "bfloat16", "--modes", "fwd_bwd",
                                 "--ops", "selective_scan"])
    with open(out) as f:
        saved = json.load(f)
    assert saved["records"] == json.loads(json.dumps(result["records"]))
    assert _finite(saved["copy"]["GBps"]) and saved["copy"]["GBps"] > 0
    recs = saved["records"]
    assert {(r["op"], r["impl"], r["mode"]) for r in recs} == {
        (op, impl, mode) for op in ("selective_scan",) for impl in ("pallas", "xla")
        for mode in ("fwd_bwd",)}
    for r in recs:
        assert "error" not in r, r
        assert r["finite"] is True, r
        for key in ("ms", "ms_min", "ms_max", "GBps", "pct_copy", "speedup_vs_xla"):
            assert _finite(r[key]) and r[key] > 0, (key, r)
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["bytes"] > 0
    xla = [r for r in recs if r["impl"] == "xla"]
    assert all(r["speedup_vs_xla"] == pytest.approx(1.0) for r in xla)

    fwd = kernels_bench.main(["--smoke", "--out", str(tmp_path / "fwd.json"), "--impls", "xla",
                              "--dtypes", "float32", "--modes", "fwd", "--ops", "ssd"])
    (r,) = fwd["records"]
    assert r["mode"] == "fwd" and "error" not in r and _finite(r["GBps"]) and r["GBps"] > 0


def test_kernels_ref_above_max_len_is_a_noted_skip(tmp_path):
    out = tmp_path / "kernels.json"
    result = kernels_bench.main(["--smoke", "--out", str(out), "--impls", "ref",
                                 "--ref-max-len", "8", "--ops", "ssd"])
    assert len(result["records"]) == 4  # 2 dtypes x 2 modes
    assert all("ref skipped" in r["skipped"] and "ms" not in r for r in result["records"])
    assert any("ref" in n for n in result["notes"])
    assert "skip" in kernels_bench.report(result)


def test_train_smoke_throughput_and_scaling(tmp_path):
    out = tmp_path / "train.json"
    tp = train_bench.main(["--smoke", "--part", "throughput", "--models", "flat_mamba2",
                           "--out", str(out)])
    recs = tp["records"]
    assert [(r["model"], r["impl"]) for r in recs] == [("flat_mamba2", "pallas"),
                                                        ("flat_mamba2", "xla")]
    for r in recs:
        assert "error" not in r, r
        assert r["loss_finite"] is True
        for key in ("step_ms", "steps_per_s", "samples_per_s", "compile_s", "speedup_vs_xla"):
            assert _finite(r[key]) and r[key] > 0, (key, r)
        assert r["param_count"] > 0
    assert recs[0]["param_count"] == recs[1]["param_count"]  # same config, only the impl differs
    with open(out) as f:
        assert len(json.load(f)["records"]) == 2

    out2 = tmp_path / "scaling.json"
    sc = train_bench.main(["--smoke", "--part", "scaling", "--models", "flat_transformer",
                           "--lengths", "100,200", "--out", str(out2)])
    assert [r["length"] for r in sc["records"]] == [100, 200]
    assert all(_finite(r.get("step_ms")) for r in sc["records"]), sc["records"]
    assert _finite(sc["slopes"]["flat_transformer"]["slope_all"])
    png = os.path.splitext(out2)[0] + "_scaling.png"
    assert os.path.getsize(png) > 0 and "plot_error" not in sc
    merged = train_bench.main(["--plot", str(out2), "--out", str(tmp_path / "merged.json")])
    assert merged["slopes"] == sc["slopes"]


def test_train_scaling_precompile_pass_fills_the_cache_the_timed_pass_loads(tmp_path,
                                                                             monkeypatch):
    # _precompile sets the cache variables for its children; keep them out of later tests.
    for var in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    out = tmp_path / "scaling.json"
    sc = train_bench.main(["--part", "scaling", "--preset", "cpu-smoke", "--models",
                           "flat_mamba2", "--lengths", "100,200", "--compile-workers", "2",
                           "--out", str(out)])
    recs = sc["records"]
    assert [r["length"] for r in recs] == [100, 200]
    for r in recs:
        assert _finite(r.get("step_ms")) and _finite(r.get("compile_s_cold")), r
        # The timed child found the executable in the cache the parallel pass wrote.
        assert r["compile_s"] < r["compile_s_cold"], r


def test_slope_fit_recovers_linear_and_quadratic():
    lengths = [1000, 2000, 4000, 8000]
    recs = [{"part": "scaling", "model": m, "length": n, "step_ms": c * n ** p}
            for m, c, p in (("lin", 1e-3, 1), ("quad", 1e-6, 2)) for n in lengths]
    recs.append({"part": "scaling", "model": "lin", "length": 16000, "error": "OOM"})
    slopes = train_bench.fit_slopes(recs, lengths + [16000])
    assert slopes["lin"]["slope_all"] == pytest.approx(1.0)
    assert slopes["quad"]["slope_upper"] == pytest.approx(2.0)


def _grid_config():
    config = grid.smoke_config(mamba2.get_config())
    config.train.update(num_steps=2, eval_every=2, log_every=1)
    return config


def test_grid_trains_records_failure_and_resumes(tmp_path):
    config = _grid_config()
    # n_heads=3 does not divide d_model=16: every transformer level is a config error.
    for level in (config.model.low, config.model.high, config.model.flat):
        level.transformer.n_heads = 3
    data = standins.make_dataset(n_train=4, n_val=2, t=4)
    pairs = ("lstm-lstm", "flat-transformer")
    lines = []
    records, code = grid.run_grid(config, str(tmp_path), pairs, dataset=data, log=lines.append)
    assert code == grid.EXIT_FAILED
    by_id = {r["id"]: r for r in records}
    ok, bad = by_id["lstm-lstm"], by_id["flat-transformer"]
    assert ok["status"] == "ok"
    for key in ("val_mse", "zero_mse", "ratio", "wall_s"):
        assert _finite(ok[key]) and ok[key] > 0, (key, ok)
    assert ok["steps"] == 2 and ok["params"] > 0
    assert bad["status"] == "failed" and "n_heads" in bad["error"]
    assert os.path.exists(tmp_path / "flat-transformer" / "error.txt")
    assert not os.path.exists(tmp_path / "lstm-lstm" / "checkpoints")
    md = (tmp_path / "grid.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2 and "lstm-lstm" in rows[0] and "failed" in rows[1]
    with open(tmp_path / "grid.json") as f:
        assert [r["id"] for r in json.load(f)["records"]] == ["lstm-lstm", "flat-transformer"]

    # Rerun: the finished pair is skipped, the failed one retried (and fails again).
    mtime = os.path.getmtime(tmp_path / "lstm-lstm" / "summary.json")
    again, code2 = grid.run_grid(config, str(tmp_path), pairs, dataset=data, log=lines.append)
    assert code2 == grid.EXIT_FAILED
    assert {r["id"]: r["status"] for r in again} == {"lstm-lstm": "ok",
                                                    "flat-transformer": "failed"}
    assert next(r for r in again if r["id"] == "lstm-lstm").get("resumed") is True
    assert os.path.getmtime(tmp_path / "lstm-lstm" / "summary.json") == mtime
    assert next(r for r in again if r["id"] == "lstm-lstm")["val_mse"] == ok["val_mse"]

    # A spent --max_total_seconds leaves 'pending' rows and exit code 3 (rerun to go on).
    pend, code3 = grid.run_grid(config, str(tmp_path), ("lstm-lstm", "flat-lstm"), dataset=data,
                                max_total_seconds=1e-9, log=lines.append)
    assert code3 == grid.EXIT_PENDING
    assert [(r["id"], r["status"]) for r in pend] == [("lstm-lstm", "ok"), ("flat-lstm", "pending")]
    assert not os.path.exists(tmp_path / "flat-lstm")


def test_grid_nan_summary_is_a_failure_row(tmp_path):
    run = tmp_path / "s4-mamba"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 3,
                                                   "loss": float("nan")}) + "\n")
    rec = grid.record_from_summary("s4-mamba", str(run), {
        "best_val_mse": 0.5, "zero_baseline_mse": 1.0, "ratio_to_zero": 0.5, "wall_s": 1.0,
        "steps": 4, "param_count": 10})
    assert rec["status"] == "nan" and "step 3" in rec["error"]
    (run / "metrics.jsonl").write_text("")
    rec = grid.record_from_summary("s4-mamba", str(run), {"best_val_mse": float("nan"),
                                                          "zero_baseline_mse": 1.0,
                                                          "ratio_to_zero": float("nan")})
    assert rec["status"] == "nan"
    md = grid.markdown([rec, {"id": "flat-s4", "status": "ok", "val_mse": 0.1}])
    assert md.index("flat-s4") < md.index("s4-mamba")


def test_grid_pairs_cover_25_plus_5_and_reject_unknown():
    pairs = grid.all_pairs()
    assert len(pairs) == 30 == len(set(pairs))
    assert sum(p.startswith("flat-") for p in pairs) == 5
    assert grid.parse_pairs("s4-mamba,flat-lstm") == ("s4-mamba", "flat-lstm")
    with pytest.raises(ValueError, match="unknown pair"):
        grid.parse_pairs("s4-gru")
    cfg = grid.pair_config(mamba2.get_config(), "s4-transformer")
    assert (cfg.model.type, cfg.model.low.kind, cfg.model.high.kind) == ("hiss", "s4",
                                                                          "transformer")
    assert grid.pair_config(cfg, "flat-lstm").model.flat.kind == "lstm"


def test_kernels_lower_only_reaches_triton_at_the_llm_shapes(tmp_path):
    result = kernels_bench.main(["--lower-only", "--shapes", "llm,llm_q256", "--dtypes",
                                 "bfloat16", "--out", str(tmp_path / "lower.json")])
    assert {(r["op"], r["shape"], r["mode"]) for r in result["records"]} == {
        (op, shape, mode) for op, shape in (("selective_scan", "llm"), ("ssd", "llm_q256"))
        for mode in ("fwd", "fwd_bwd")}
    for r in result["records"]:
        assert "error" not in r, r
        assert r["lowered_cuda"] and r["triton_calls"] > 0, r


def test_grid_worker_argv_drops_the_per_worker_flags():
    argv = ["--smoke", "--workers=4", "--pairs", "s4-s4", "--workdir=/x", "--worker",
            "--max_total_seconds", "9", "--config.train.num_steps=3"]
    assert grid._worker_argv(argv) == ["--smoke", "--config.train.num_steps=3"]


def test_grid_workers_run_in_parallel_processes_and_collect_rows(tmp_path):
    """--workers 2: each model in its own process; a worker that dies is a 'failed' row."""
    import subprocess
    import sys
    workdir = tmp_path / "g"
    (workdir / "flat-mamba").mkdir(parents=True)  # finished earlier: skipped, its row kept
    (workdir / "flat-mamba" / "summary.json").write_text(json.dumps(
        {"best_val_mse": 0.5, "zero_baseline_mse": 1.0, "ratio_to_zero": 0.5, "steps": 4}))
    proc = subprocess.run(
        [sys.executable, "-m", "hiss_jax.experiments.grid", "--smoke", "--workers=2",
         f"--workdir={workdir}", "--pairs=flat-lstm,lstm-transformer,flat-mamba",
         "--config.model.high.transformer.n_heads=3"],  # 3 heads do not divide d_model 16
        capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == grid.EXIT_FAILED, proc.stdout + proc.stderr
    with open(workdir / "grid.json") as f:
        rows = {r["id"]: r for r in json.load(f)["records"]}
    assert rows["flat-lstm"]["status"] == "ok" and math.isfinite(rows["flat-lstm"]["val_mse"])
    assert rows["flat-mamba"]["val_mse"] == 0.5
    assert rows["lstm-transformer"]["status"] == "failed", rows["lstm-transformer"]
    assert "n_heads" in rows["lstm-transformer"]["error"]
    assert (workdir / "flat-lstm" / "log.txt").exists()


def test_trace_summary_busy_time_is_the_union_of_kernel_intervals():
    from benchmarks import common
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "name": "PjitFunction", "ts": 0, "dur": 1000},  # host: ignored
        {"ph": "X", "pid": 2, "name": "_ssd_fwd_kernel", "ts": 0, "dur": 100},
        {"ph": "X", "pid": 2, "name": "gemm_fusion_dot", "ts": 50, "dur": 100},  # overlaps
        {"ph": "X", "pid": 2, "name": "loop_add_fusion", "ts": 400, "dur": 50},
    ]
    s = common.summarise_trace(events, n_steps=2)
    assert s["device_busy_ms"] == pytest.approx((150 + 50) / 2 / 1e3)
    assert s["kernel_ms"] == pytest.approx(250 / 2 / 1e3)
    assert s["kernels_per_step"] == 1.5
    assert s["by_category_ms"] == pytest.approx(
        {"pallas scan": 0.05, "matmul": 0.05, "fusion/other": 0.025})
    assert "error" in common.summarise_trace(events[:1], 1)


def test_profile_ncu_summaries_read_ncu_csv(tmp_path, capsys):
    """benchmarks/profile_ncu.py's readers on files in the layout ncu 2025.3 writes (the raw
    page: header, units, one row per kernel; the source page: a name row, a header, one row
    per SASS instruction; ==PROF== lines interleaved)."""
    from benchmarks import profile_ncu
    raw = tmp_path / "raw.csv"
    raw.write_text(
        '==PROF== Connected to process 1\n'
        '"ID","Kernel Name","gpu__time_duration.sum","launch__registers_per_thread",'
        '"smsp__issue_active.avg.pct_of_peak_sustained_active",'
        '"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",'
        '"smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio"\n'
        '"","","nsecond","register/thread","%","ratio","ratio"\n'
        '"0","selective_scan_mgpu_bwd","2,057,300","161","48.2","0.7","0.2"\n')
    recs = profile_ncu.summarize(str(raw))
    out = capsys.readouterr().out
    assert recs[0]["gpu__time_duration.sum"] == 2057300.0
    assert "| selective_scan_mgpu_bwd | 2057.3 | 161 | 48 | wait 0.7, short_scoreboard 0.2 |" \
        in out
    src = tmp_path / "src.csv"
    src.write_text(
        '==PROF== Disconnected from process 1\n'
        '"Kernel Name","ssd_bwd_dx",\n'
        '"Address","Source","Warp Stall Sampling (All Samples)","stall_wait","stall_long_sb",'
        '"stall_wait (Not Issued)"\n'
        '"0x10","      LDS.128 R4, [UR11+-0x103c]","30","10","20","9"\n'
        '"0x20","@P0   FMUL R29, R16, 0.69","10","0","10","0"\n')
    profile_ncu.summarize_source(str(src), top=5)
    out = capsys.readouterr().out
    assert "## ssd_bwd_dx: 2 instructions, 40 samples" in out
    assert "reasons: stall_long_sb 75%, stall_wait 25%" in out
    assert "LDS 1/75%" in out and "FMUL 1/25%" in out
