"""Streaming latency of HiSS and flat models (hiss_jax.streaming), one sample at a time.

    python benchmarks/streaming.py [--families mamba,mamba2,s4,lstm,transformer] [--types hiss,flat]
                                   [--batch 1] [--samples 400] [--window 500] [--out FILE]

For every family's config file (`configs/<family>.py`, default sizes: the same family at both
levels for 'hiss', the family's flat baseline for 'flat'), with freshly initialised parameters
and input / output widths of VECtor (12 -> 3, chunk 10):
  * push latency of a sample that completes no chunk (low level only) and of a chunk's last
    sample (low step + high step = the latency of a prediction): median / p90 / p99 over
    `--samples` pushes after warm-up, each push timed to `block_until_ready`;
  * the alternative without streaming state: re-running the parallel forward over the last
    `--window` samples (10 s at 50 Hz) at every chunk end (jit, mean of 20 calls).
Writes JSON to --out (default $OUT/streaming_<device>.json or ./streaming_<device>.json).

Sequence-length mode (the CPU benchmark of docs/STREAMING.md):

    python benchmarks/streaming.py --lengths 1000,10000,100000 \
        --out benchmarks/results/streaming_cpu.json

For every family / type and every length L (batch `--batch`, default 1):
  * streaming: the predictor's state is brought to position L - warm-up - `--timed` by a jitted
    `lax.scan` of the same `low_step` / `high_step` functions the predictor calls (the streaming
    recurrence fused, so reaching 100k samples takes seconds instead of 100k dispatches; the
    smallest length checks it against real pushes), then 2 chunks of real pushes warm up and the
    last `--timed` samples (default 200) are pushed one at a time through `StreamingPredictor`,
    each timed to `block_until_ready`: median / p99 per-sample latency at position ~L (every
    push; chunk-end pushes, which emit a prediction, also separately), and the bytes of the
    streaming state pytree (low + high state) at L;
  * recompute: the parallel forward over the whole window of L samples, jitted per L outside the
    timing, median over a few calls (at least `--min-reps`, at most `--max-reps`, stopping after
    `--rep-budget` seconds): its latency is the cost of one new prediction without streaming
    state; its memory is the compiled executable's `memory_analysis()` (argument + temp + output
    bytes), or, where XLA gives none, a params + input + output estimate ('memory_source').
`--caps` skips lengths above a cap per type:family (default: flat S4 to 1k, whose forward
recomputes its DPLR kernels at every call, ~17 s at 10k on a 2-core CPU; flat Transformer to 1k,
whose step attends over and copies a KV cache of L entries, ~56 ms per sample at 10k, and whose
forward takes ~16 s at 10k; flat LSTM to 10k).  A window whose first
(untimed) call takes longer than `--rep-budget` seconds is timed once more only.  Transformer
streaming state is a KV cache of max_len = L (flat) or L / chunk (HiSS high level): it grows with
L, and so does its step.
"""
import argparse
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hiss_jax.models import build_model  # noqa: E402
from hiss_jax.streaming import StreamingPredictor  # noqa: E402

INPUT_DIM, OUTPUT_DIM = 12, 3  # VECtor: acc + gyro with first differences -> xyz deltas


def _stats_us(times):
    t = np.asarray(times) * 1e6
    return {"n": int(t.size), "median_us": float(np.median(t)),
            "p90_us": float(np.percentile(t, 90)), "p99_us": float(np.percentile(t, 99))}


def model_config(family: str, model_type: str):
    import importlib
    module = importlib.import_module(f"configs.{family}")
    return module.get_config("flat" if model_type == "flat" else None)


def bench_one(family: str, model_type: str, batch: int, samples: int, window: int) -> dict:
    config = model_config(family, model_type)
    model = build_model(config.model, input_dim=INPUT_DIM, output_dim=OUTPUT_DIM,
                        scan_impl=config.kernels.impl)
    k = int(config.model.chunk_size)
    window = max(k, window - window % k)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, samples + 4 * k, INPUT_DIM)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(x[:, :2 * k]))["params"]
    predictor = StreamingPredictor(model, params, batch_size=batch, max_len=x.shape[1])
    t_compile = time.perf_counter()
    for i in range(2 * k):  # warm-up: compiles both step functions
        jax.block_until_ready(predictor.push(x[:, i]))
    t_compile = time.perf_counter() - t_compile
    plain, with_pred = [], []
    for i in range(2 * k, x.shape[1]):
        t0 = time.perf_counter()
        y = predictor.push(x[:, i])
        jax.block_until_ready((y, predictor.low_state, predictor.high_state))
        (with_pred if y.shape[1] else plain).append(time.perf_counter() - t0)
    fwd = jax.jit(lambda p, xw: model.apply({"params": p}, xw))
    xw = jnp.asarray(rng.standard_normal((batch, window, INPUT_DIM)).astype(np.float32))
    jax.block_until_ready(fwd(params, xw))
    t0 = time.perf_counter()
    for _ in range(20):
        out = fwd(params, xw)
    jax.block_until_ready(out)
    recompute = (time.perf_counter() - t0) / 20
    levels = (f"{config.model.flat.kind} d{config.model.flat.d_model}x{config.model.flat.n_layers}"
              if model_type == "flat" else
              f"{config.model.low.kind} d{config.model.low.d_model}x{config.model.low.n_layers} -> "
              f"{config.model.high.kind} d{config.model.high.d_model}x{config.model.high.n_layers}")
    return {"family": family, "type": model_type, "levels": levels, "batch": batch,
            "chunk_size": k, "scan_impl": config.kernels.impl, "warmup_s": t_compile,
            "push_sample": _stats_us(plain), "push_prediction": _stats_us(with_pred),
            "recompute_window": {"samples": window, "mean_us": recompute * 1e6}}


# Longest L per type:family in lengths mode (keeps the CPU run to minutes; see the docstring).
DEFAULT_CAPS = "flat:transformer=1000,flat:s4=1000,flat:lstm=10000"
CAP_WHY = {"s4": "the flat S4 (d128x6, DPLR) forward recomputes its length-L kernels every call: "
                 "~2 s at 1k and ~17 s at 10k on the loaded 2-core CPU",
           "transformer": "KV cache of L (flat) or L / chunk (HiSS) entries: the step and the "
                          "fast-forward grow with L; full attention in the forward (L^2)",
           "lstm": "sequential forward at the full rate; time"}


def _tree_bytes(tree) -> int:
    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(tree)))


def _levels(config, model_type: str) -> str:
    if model_type == "flat":
        f = config.model.flat
        return f"{f.kind} d{f.d_model}x{f.n_layers}"
    lo, hi = config.model.low, config.model.high
    return f"{lo.kind} d{lo.d_model}x{lo.n_layers} -> {hi.kind} d{hi.d_model}x{hi.n_layers}"


def _fast_forward_fn(model, params, low0, reset_low: bool):
    """jit(low_state, high_state, xs (B, n_chunks, k, D)) -> states after streaming xs: the
    predictor's per-sample / per-chunk recurrence as one fused lax.scan."""
    variables = {"params": params}

    def run(low, high, xs):
        def chunk(carry, xc):  # xc: (B, k, D)
            low, high = carry

            def sample(state, x_t):
                return model.apply(variables, state, x_t, method="low_step")

            low, feats = jax.lax.scan(sample, low, jnp.swapaxes(xc, 0, 1))
            high, _ = model.apply(variables, high, feats[-1], method="high_step")
            if reset_low:
                low = low0
            return (low, high), None

        (low, high), _ = jax.lax.scan(chunk, (low, high), jnp.moveaxis(xs, 1, 0))
        return low, high

    return jax.jit(run)


def _max_abs_diff(a, b) -> float:
    diffs = [float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))  # complex: modulus
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
             if np.size(x)]
    return max(diffs) if diffs else 0.0


def bench_lengths(family: str, model_type: str, batch: int, lengths, timed: int, min_reps: int,
                  max_reps: int, rep_budget: float, ff_block: int = 1000):
    """Yield one result dict per length L (see the module docstring, sequence-length mode)."""
    config = model_config(family, model_type)
    model = build_model(config.model, input_dim=INPUT_DIM, output_dim=OUTPUT_DIM,
                        scan_impl=config.kernels.impl)
    k = int(config.model.chunk_size)
    warm = 2 * k
    timed = max(k, timed - timed % k)
    ff_block = max(k, ff_block - ff_block % k)
    rng = np.random.default_rng(0)
    params = jax.jit(model.init)(jax.random.PRNGKey(0),
                                 jnp.zeros((batch, 2 * k, INPUT_DIM), jnp.float32))["params"]
    fwd = jax.jit(lambda p, xw: model.apply({"params": p}, xw))
    ff_cache = {}  # state shapes -> jitted fast-forward (SSM / LSTM states do not depend on L)
    for n, length in enumerate(sorted(lengths)):
        length = max(warm + timed, length - length % k)
        x = rng.standard_normal((batch, length, INPUT_DIM)).astype(np.float32)
        # ---- streaming ----
        t0 = time.perf_counter()
        predictor = StreamingPredictor(model, params, batch_size=batch, max_len=length)
        n_ff = length - warm - timed
        key = jax.tree_util.tree_map(lambda a: (np.shape(a), str(np.asarray(a).dtype)),
                                     (predictor.low_state, predictor.high_state))
        key = str(key)
        if key not in ff_cache:
            ff_cache[key] = _fast_forward_fn(model, params, predictor._low0,
                                             predictor.reset_low_each_chunk)
        ff = ff_cache[key]
        low, high = predictor.low_state, predictor.high_state
        start = 0
        while start < n_ff:  # the remainder first, then full blocks: two compiled shapes
            size = (n_ff - start) % ff_block or ff_block
            xs = x[:, start:start + size].reshape(batch, size // k, k, INPUT_DIM)
            low, high = ff(low, high, jnp.asarray(xs))
            start += size
        jax.block_until_ready((low, high))
        t_ff = time.perf_counter() - t0
        ff_check = None
        if n == 0:  # the fused fast-forward reaches the same state as real pushes
            ref = StreamingPredictor(model, params, batch_size=batch, max_len=length)
            ref.push(x[:, :n_ff])
            ff_check = _max_abs_diff((low, high), (ref.low_state, ref.high_state))
        predictor.low_state, predictor.high_state, predictor.position = low, high, 0
        for i in range(n_ff, n_ff + warm):  # compiles / warms the two step functions
            jax.block_until_ready(predictor.push(x[:, i]))
        every, with_pred = [], []
        for i in range(n_ff + warm, length):
            t1 = time.perf_counter()
            y = predictor.push(x[:, i])
            jax.block_until_ready((y, predictor.low_state, predictor.high_state))
            dt = time.perf_counter() - t1
            every.append(dt)
            if y.shape[1]:
                with_pred.append(dt)
        state_bytes = _tree_bytes((predictor.low_state, predictor.high_state))
        del predictor, low, high
        # ---- recompute the whole window ----
        xw = jnp.asarray(x)
        t2 = time.perf_counter()
        compiled = fwd.lower(params, xw).compile()
        t_compile = time.perf_counter() - t2
        mem, mem_source = None, "memory_analysis"
        try:
            m = compiled.memory_analysis()
            if m is not None:
                mem = {"argument_bytes": int(m.argument_size_in_bytes),
                       "temp_bytes": int(m.temp_size_in_bytes),
                       "output_bytes": int(m.output_size_in_bytes)}
        except Exception:  # backends without memory stats
            m = None
        if mem is None:
            mem_source = "estimate: params + input + output (no activations)"
            out_struct = jax.eval_shape(fwd, params, xw)
            mem = {"argument_bytes": _tree_bytes(params) + int(xw.nbytes), "temp_bytes": 0,
                   "output_bytes": int(np.prod(out_struct.shape)) * out_struct.dtype.itemsize}
        t3 = time.perf_counter()
        jax.block_until_ready(compiled(params, xw))  # first call: allocation, caches
        first_call = time.perf_counter() - t3
        reps_floor = 1 if first_call > rep_budget else min_reps  # long windows: keep reps small
        calls, t_start = [], time.perf_counter()
        while len(calls) < max_reps and (len(calls) < reps_floor
                                         or time.perf_counter() - t_start < rep_budget):
            t3 = time.perf_counter()
            jax.block_until_ready(compiled(params, xw))
            calls.append(time.perf_counter() - t3)
        del compiled, xw
        yield {"family": family, "type": model_type, "levels": _levels(config, model_type),
               "batch": batch, "chunk_size": k, "scan_impl": config.kernels.impl,
               "length": length, "timed_positions": [length - timed, length],
               "stream": {"per_sample": _stats_us(every), "prediction": _stats_us(with_pred),
                          "state_bytes": state_bytes, "fast_forward_s": t_ff,
                          "fast_forward_vs_push_max_abs_diff": ff_check},
               "recompute": {"n": len(calls), "median_ms": float(np.median(calls)) * 1e3,
                             "first_call_ms": first_call * 1e3,
                             "min_ms": float(np.min(calls)) * 1e3, "compile_s": t_compile,
                             "bytes": sum(mem.values()), "memory": mem,
                             "memory_source": mem_source}}


def main_lengths(args, out: str, device) -> int:
    lengths = [int(v) for v in args.lengths.split(",") if v.strip()]
    caps = {}
    for item in args.caps.split(","):
        if item.strip():
            name, value = item.split("=")
            caps[name.strip()] = int(value)
    results = {"jax": jax.__version__, "device": device.device_kind,
               "platform": device.platform, "cpu_count": os.cpu_count(),
               "load_average_at_start": list(os.getloadavg()), "mode": "lengths",
               "lengths": lengths, "timed_samples": args.timed, "caps": caps,
               "min_reps": args.min_reps, "max_reps": args.max_reps,
               "rep_budget_s": args.rep_budget, "runs": [], "skipped": [], "errors": []}
    header = (f"{'type':5s} {'levels':30s} {'L':>7s} {'stream med us':>13s} {'p99 us':>8s} "
              f"{'state bytes':>12s} {'recompute ms':>12s} {'recompute bytes':>15s}")
    print(header, flush=True)
    t_all = time.perf_counter()
    for model_type in args.types.split(","):
        for family in args.families.split(","):
            cap = caps.get(f"{model_type}:{family}")
            lens = [v for v in lengths if cap is None or v <= cap]
            skipped = sorted(set(lengths) - set(lens))
            if skipped:
                results["skipped"].append({"family": family, "type": model_type, "lengths": skipped,
                                           "cap": cap, "why": CAP_WHY.get(family, "--caps")})
            if not lens:
                continue
            try:
                for r in bench_lengths(family, model_type, args.batch, lens, args.timed,
                                       args.min_reps, args.max_reps, args.rep_budget):
                    results["runs"].append(r)
                    st, rc = r["stream"], r["recompute"]
                    print(f"{model_type:5s} {r['levels']:30s} {r['length']:7d} "
                          f"{st['per_sample']['median_us']:13.0f} {st['per_sample']['p99_us']:8.0f}"
                          f" {st['state_bytes']:12d} {rc['median_ms']:12.2f} {rc['bytes']:15d}",
                          flush=True)
                    with open(out, "w") as f:
                        json.dump(results, f, indent=1)
            except Exception as e:  # keep the other rows when one family fails
                results["errors"].append({"family": family, "type": model_type,
                                          "error": f"{type(e).__name__}: {e}"})
                print(f"{model_type} {family}: {type(e).__name__}: {e}", flush=True)
    results["total_s"] = time.perf_counter() - t_all
    results["load_average_at_end"] = list(os.getloadavg())
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"total {results['total_s']:.0f} s; wrote {out}")
    return 1 if results["errors"] else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="mamba,mamba2,s4,lstm,transformer")
    parser.add_argument("--types", default="hiss,flat")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--out", default="")
    parser.add_argument("--lengths", default="",
                        help="sequence-length mode, e.g. 1000,10000,100000 (see above)")
    parser.add_argument("--timed", type=int, default=200,
                        help="lengths mode: samples timed at the end of each length")
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--max-reps", type=int, default=10)
    parser.add_argument("--rep-budget", type=float, default=2.0,
                        help="lengths mode: seconds of recompute calls per length after min-reps")
    parser.add_argument("--caps", default=DEFAULT_CAPS,
                        help="lengths mode: 'type:family=max_L,...' (longer lengths skipped)")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    tag = device.device_kind.replace(" ", "_").lower()
    out = args.out or os.path.join(os.environ.get("OUT", "."), f"streaming_{tag}.json")
    if args.lengths:
        return main_lengths(args, out, device)
    results = {"jax": jax.__version__, "device": device.device_kind, "runs": [], "errors": []}
    for model_type in args.types.split(","):
        for family in args.families.split(","):
            try:
                r = bench_one(family, model_type, args.batch, args.samples, args.window)
                results["runs"].append(r)
                sample, pred, rec = r["push_sample"], r["push_prediction"], r["recompute_window"]
                print(f"{model_type:5s} {r['levels']:42s} sample {sample['median_us']:8.0f} us  "
                      f"prediction {pred['median_us']:8.0f} us (p99 {pred['p99_us']:.0f})  "
                      f"recompute {rec['samples']} samples {rec['mean_us']:8.0f} us", flush=True)
            except Exception as e:  # keep the other rows when one family fails
                results["errors"].append({"family": family, "type": model_type,
                                          "error": f"{type(e).__name__}: {e}"})
                print(f"{model_type} {family}: {type(e).__name__}: {e}", flush=True)
            with open(out, "w") as f:
                json.dump(results, f, indent=1)
    print(f"wrote {out}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
