"""Hardware counters (Nsight Compute) of the scan kernels at the issues' shape L, one device call.

    python3 benchmarks/profile_ncu.py --ops ss,ss_peer,ssd,ssd_peer      # on the GPU machine

runs itself under `ncu --clock-control none` (child mode), each op's forward (y) and
forward+backward (jax.grad of sum(y), bf16 inputs, every float input) exactly once, so every
kernel of those programs is profiled once; writes the raw CSV to $OUT/ncu_<ops>.csv and prints,
per kernel: time, registers, achieved occupancy, issue-slot use, instructions, the busiest
pipes, shared-memory wavefronts and bank conflicts, DRAM use and the largest warp-stall
reasons (cycles per issued instruction). `--summarize FILE.csv` re-prints a saved CSV.

    python3 benchmarks/profile_ncu.py --ops ss --source 'selective_scan_mgpu'
    PROFILE_SHAPE=S python3 benchmarks/profile_ncu.py --ops ss     # the scan at shape S

instead samples warp stalls per SASS instruction (ncu's source page) of the kernels whose
name matches the regex, writes $OUT/ncu_source_<ops>.csv and prints each kernel's hottest
instructions (`--summarize-source FILE.csv` re-prints).

Ops: ss = kernels.selective_scan(impl="pallas") (Mosaic GPU on the H100), ss@k=v+k=v = the
Mosaic GPU kernels with those `MgpuBlockSizes` fields (ss@bwd_warpgroups=2), ss_peer = the peer
jax-linear-attention 0.1.0 mamba1, ssd = kernels.ssd(impl="pallas") at chunk 64, ssd_peer =
the peer's mamba2_ssd (benchmarks/gpu_selective_scan.py and gpu_ssd.py time the same calls).
Needs the peer wheel importable for the *_peer ops (benchmarks/NOTES_*.md: how to carry it).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Wanted metrics; those this ncu does not know are dropped (an unknown name aborts ncu).
METRICS = [
    "gpu__time_duration.sum",
    "launch__registers_per_thread",
    "launch__grid_size",
    "launch__block_size",
    "launch__occupancy_limit_registers",
    "launch__occupancy_limit_shared_mem",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "smsp__inst_executed.sum",
    "sm__cycles_elapsed.avg",
    "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_xu_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_shared_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active",
    "sm__inst_executed_pipe_uniform.avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
    "l1tex__throughput.avg.pct_of_peak_sustained_active",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__bytes.sum",
]
STALLS = ["barrier", "branch_resolving", "dispatch_stall", "drain", "imc_miss", "lg_throttle",
          "long_scoreboard", "math_pipe_throttle", "membar", "mio_throttle", "misc",
          "no_instruction", "not_selected", "selected", "short_scoreboard", "sleeping",
          "tex_throttle", "wait"]
METRICS += [f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio" for s in STALLS]

SHORT = {  # column title -> metric
    "us": "gpu__time_duration.sum",
    "regs": "launch__registers_per_thread",
    "grid": "launch__grid_size",
    "occ%": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "issue%": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "Minst": "smsp__inst_executed.sum",
    "fma%": "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
    "alu%": "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active",
    "xu%": "sm__pipe_xu_cycles_active.avg.pct_of_peak_sustained_active",
    "shm%": "sm__pipe_shared_cycles_active.avg.pct_of_peak_sustained_active",
    "lsu%": "sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active",
    "gmma%": "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "hmma%": "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "Mwf_shm": "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum",
    "Mconfl": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
    "dram%": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
}


def _ncu():
    exe = shutil.which("ncu")
    if exe is None:
        import glob
        found = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
        exe = found[-1] if found else None
    if exe is None:
        raise SystemExit("ncu (Nsight Compute) not found on PATH or under /opt/nvidia/nsight-compute")
    return exe


def _known(ncu):
    out = subprocess.run([ncu, "--query-metrics", "--devices", "0"], capture_output=True,
                         text=True).stdout
    bases = {line.split()[0] for line in out.splitlines() if line.strip()}
    keep = [m for m in METRICS if m.split(".")[0] in bases or m.startswith("launch__")]
    dropped = sorted(set(METRICS) - set(keep))
    return keep, dropped


# ---------------------------------------------------------------------------------------------
# Child: the programs to profile.
# ---------------------------------------------------------------------------------------------
TINY = os.environ.get("PROFILE_TINY") == "1"   # CPU dry run of the child (interpret mode)
SS_L = (2, 128, 128, 16) if TINY else (8, 4096, 2048, 16)
if os.environ.get("PROFILE_SHAPE") == "S":     # the shape S instead of L
    SS_L = (2, 128, 128, 16) if TINY else (64, 1024, 256, 16)


def _child(ops):
    import jax
    import jax.numpy as jnp
    from benchmarks import gpu_ssd as gssd
    from benchmarks.kernels import scan_inputs      # Mamba-1 init, as the kernel suite times

    def ss_inputs():
        return scan_inputs(0, *SS_L, jnp.bfloat16)

    def run_once(fn, args, tag):
        names = list(args)
        vals = [args[k] for k in names]

        def fwd(*v):
            return fn(**dict(zip(names, v)))[0]

        def loss(*v):
            return jnp.sum(fwd(*v).astype(jnp.float32))

        grad = jax.grad(loss, argnums=tuple(range(len(names))))
        for what, f in (("fwd", fwd), ("fwd+bwd", grad)):
            exe = jax.jit(f).lower(*vals).compile()
            t0 = time.time()
            jax.block_until_ready(exe(*vals))
            print(f"# {tag} {what}: ran once ({time.time() - t0:.2f} s under ncu)",
                  file=sys.stderr, flush=True)

    for op in ops:
        if op == "ss":
            from kernels import selective_scan

            def fn(**kw):
                return selective_scan(**kw, delta_softplus=True, return_final_state=True,
                                      impl="pallas")
            run_once(fn, ss_inputs(), op)
        elif op.startswith("ss@"):
            # ss@key=value+key=value: selective_scan_mgpu with those MgpuBlockSizes fields.
            from kernels.selective_scan_mgpu import MgpuBlockSizes, selective_scan_mgpu
            kv = dict(f.split("=") for f in op[3:].split("+"))
            bs = MgpuBlockSizes(**{k: _field(getattr(MgpuBlockSizes(), k), v)
                                   for k, v in kv.items()})

            def fn(**kw):
                return selective_scan_mgpu(**kw, delta_softplus=True, return_final_state=True,
                                           block_sizes=bs, interpret=TINY)
            run_once(fn, ss_inputs(), op)
        elif op == "ss_peer":
            from jla.ops.mosaic_gpu.mamba1 import mamba1

            def fn(u, delta, A, B, C, D, delta_bias):
                return mamba1(C, B, u, delta, A, d=D, dt_bias=delta_bias, dt_softplus=True,
                              output_final_state=True)
            run_once(fn, ss_inputs(), op)
        elif op == "ssd":
            from kernels import ssd

            def fn(**kw):
                return gssd.call(ssd, kw, chunk_size=64, impl="pallas", return_final_state=True)
            run_once(fn, gssd.inputs(jax.random.PRNGKey(0), **(
                dict(b=1, l=128, h=2, p=16, n=16, g=1) if TINY else gssd.SHAPES["L"])), op)
        elif op == "ssd_peer":
            from jla.layers.ssm import mamba2_ssd

            def fn(x, dt, A, B, C, D):
                return mamba2_ssd(x, dt, A, B, C, d=D, chunk_size=64, output_final_state=True)
            run_once(fn, gssd.inputs(jax.random.PRNGKey(0), **(
                dict(b=1, l=128, h=2, p=16, n=16, g=1) if TINY else gssd.SHAPES["L"])), op)
        else:
            raise SystemExit(f"--ops: unknown op {op!r}; choose from ss, ss_peer, ssd, ssd_peer")


# ---------------------------------------------------------------------------------------------
# Parent: run ncu, summarise.
# ---------------------------------------------------------------------------------------------
def _num(s):
    try:
        return float(str(s).replace(",", ""))
    except ValueError:
        return None


def summarize(path):
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith('"')]
    rows = list(csv.reader(lines))
    if len(rows) < 3:
        print(f"{path}: no kernel rows")
        return []
    head, _units, data = rows[0], rows[1], rows[2:]
    idx = {h: i for i, h in enumerate(head)}
    name_col = idx.get("Kernel Name", idx.get("Function Name"))
    out = []
    for r in data:
        rec = {"kernel": r[name_col]}
        for m in METRICS:
            if m in idx:
                rec[m] = _num(r[idx[m]])
        out.append(rec)
    cols = [c for c, m in SHORT.items() if any(rec.get(m) is not None for rec in out)]
    print("| kernel | " + " | ".join(cols) + " | top stalls (cycles/issue) |")
    print("|---" * (len(cols) + 2) + "|")
    for rec in out:
        vals = []
        for c in cols:
            v = rec.get(SHORT[c])
            if v is None:
                vals.append("")
            elif c == "us":
                vals.append(f"{v / 1e3:.1f}")
            elif c in ("Minst", "Mwf_shm", "Mconfl"):
                vals.append(f"{v / 1e6:.1f}")
            elif c in ("regs", "grid"):
                vals.append(f"{v:.0f}")
            else:
                vals.append(f"{v:.0f}")
        st = sorted(((rec.get(f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio")
                      or 0.0, s) for s in STALLS), reverse=True)[:5]
        stall = ", ".join(f"{s} {v:.1f}" for v, s in st if v > 0.05)
        print(f"| {rec['kernel'][:48]} | " + " | ".join(vals) + f" | {stall} |")
    return out


def _env():
    return dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
                XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"
                " --xla_gpu_enable_command_buffer=")


def _tag(ops):
    """The ops as a file-name part (letters, digits, _ and - only)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", "_".join(ops))[:80]


def source(ncu, ops, regex, top):
    out_dir = os.environ.get("OUT", "/tmp")
    path = os.path.join(out_dir, f"ncu_source_{_tag(ops)}.csv")
    cmd = [ncu, "--clock-control", "none", "--target-processes", "all", "-k", f"regex:{regex}",
           "--section", "SourceCounters", "--section", "WarpStateStats", "--import-source",
           "no", "--page", "source", "--print-source", "sass", "--csv",
           sys.executable, os.path.abspath(__file__), "--child", "--ops", ",".join(ops)]
    t0 = time.time()
    with open(path, "w") as f:
        rc = subprocess.run(cmd, stdout=f, env=_env()).returncode
    print(f"# ncu source rc={rc} in {time.time() - t0:.0f} s -> {path}", flush=True)
    summarize_source(path, top)


def summarize_source(path, top):
    """Per kernel in the file: total sampled stalls by reason, then the `top` instructions
    with the most samples (address, SASS, samples, leading reasons)."""
    with open(path) as f:
        text = f.read()
    blocks = []
    for line in text.splitlines():
        if not line.startswith('"'):
            continue                      # ncu's ==PROF== / ==WARNING== lines
        row = next(csv.reader([line]))
        if row[0] == "Kernel Name":       # each kernel: a name row, a header row, the SASS
            blocks.append({"title": row[1], "rows": []})
        elif blocks:
            blocks[-1]["rows"].append(row)
    for b in blocks:
        rows = b["rows"]
        if len(rows) < 2:
            continue
        head = rows[0]
        idx = {h: i for i, h in enumerate(head)}
        samp = next((h for h in head if h.startswith("Warp Stall Sampling (All")), None)
        src = next((h for h in head if h in ("Source", "SASS")), head[1])
        if samp is None:
            print(b["title"], "- no sampling column; columns:", head[:12])
            continue
        reasons = [h for h in head if h.startswith("stall_") and "(Not Issued)" not in h]
        data = [r for r in rows[1:] if len(r) == len(head)]
        total = sum(_num(r[idx[samp]]) or 0 for r in data)
        print(f"\n## {b['title'][:100]}: {len(data)} instructions, {total:.0f} samples")
        by_reason = {h: sum(_num(r[idx[h]]) or 0 for r in data) for h in reasons}
        print("reasons:", ", ".join(f"{k} {v / max(total, 1):.0%}" for k, v in sorted(
            by_reason.items(), key=lambda kv: -kv[1])[:10] if v))
        ops = {}
        for r in data:
            op = r[idx[src]].split()[0] if r[idx[src]].split() else "?"
            if op.startswith("@"):
                op = r[idx[src]].split()[1]
            op = op.split(".")[0]
            c = ops.setdefault(op, [0, 0.0])
            c[0] += 1
            c[1] += _num(r[idx[samp]]) or 0
        print("opcodes (count, share of samples):", ", ".join(
            f"{k} {c[0]}/{c[1] / max(total, 1):.0%}" for k, c in sorted(
                ops.items(), key=lambda kv: -kv[1][1])[:16]))
        hot = sorted(data, key=lambda r: -(_num(r[idx[samp]]) or 0))[:top]
        for r in hot:
            rs = sorted(((_num(r[idx[h]]) or 0, h) for h in reasons), reverse=True)[:3]
            print(f"  {r[0]:>6s} {r[idx[src]][:60]:60s} {_num(r[idx[samp]]) or 0:7.0f}  "
                  + ", ".join(f"{h.replace('stall_', '')[:24]} {v:.0f}" for v, h in rs if v))


def _field(default, text):
    """A MgpuBlockSizes field from text, typed as its default ("False" is False, not True)."""
    if isinstance(default, bool):
        if text not in ("True", "False"):
            raise ValueError(f"{text!r}: a bool field takes True or False")
        return text == "True"
    return type(default)(text)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="ss,ss_peer,ssd,ssd_peer")
    p.add_argument("--child", action="store_true")
    p.add_argument("--summarize")
    p.add_argument("--kernel-regex", default="",
                   help="ncu -k regex (default: every kernel of the programs)")
    p.add_argument("--source", help="kernel-name regex: per-instruction stall sampling")
    p.add_argument("--summarize-source")
    p.add_argument("--top", type=int, default=40)
    a = p.parse_args()
    ops = [o for o in a.ops.split(",") if o]
    if a.summarize:
        summarize(a.summarize)
        return
    if a.summarize_source:
        summarize_source(a.summarize_source, a.top)
        return
    if a.child:
        _child(ops)
        return
    ncu = _ncu()
    if a.source:
        source(ncu, ops, a.source, a.top)
        return
    metrics, dropped = _known(ncu)
    if dropped:
        print("# metrics this ncu does not know (dropped):", ", ".join(dropped), flush=True)
    out_dir = os.environ.get("OUT", "/tmp")
    path = os.path.join(out_dir, f"ncu_{_tag(ops)}.csv")
    env = _env()
    cmd = [ncu, "--clock-control", "none", "--target-processes", "all", "--csv", "--page",
           "raw", "--metrics", ",".join(metrics)]
    if a.kernel_regex:
        cmd += ["-k", f"regex:{a.kernel_regex}"]
    cmd += [sys.executable, os.path.abspath(__file__), "--child", "--ops", ",".join(ops)]
    t0 = time.time()
    with open(path, "w") as f:
        rc = subprocess.run(cmd, stdout=f, env=env).returncode
    print(f"# ncu rc={rc} in {time.time() - t0:.0f} s -> {path}", flush=True)
    summarize(path)
    if rc:
        raise SystemExit(rc)


if __name__ == "__main__":
    main()
