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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="mamba,mamba2,s4,lstm,transformer")
    parser.add_argument("--types", default="hiss,flat")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    tag = device.device_kind.replace(" ", "_").lower()
    out = args.out or os.path.join(os.environ.get("OUT", "."), f"streaming_{tag}.json")
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
