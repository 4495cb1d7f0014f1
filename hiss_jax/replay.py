"""Replay a recorded episode through the streaming predictor, as a deployed model would see it.

    python -m hiss_jax.replay --workdir runs/mamba2 --episode 3 [--split val] [--block 1]
                              [--out replay.json] [--plot replay.png]

Loads the run's config (<workdir>/config.json), its dataset and its best (else latest) checkpoint,
feeds episode N of the split one sample at a time (or `--block` samples per push) to
`hiss_jax.streaming.StreamingPredictor`, and reports: predictions vs the parallel forward (they
must agree to float rounding), MSE against the targets (normalised, the training metric), and the
wall-clock latency of each push: per sample (low level only) and at chunk ends (the prediction's
latency).  The first push of each kind is excluded from the latency statistics (compilation).
Writes the predictions (JSON) and a plot of the streamed vs true trajectories (PNG), by default
as <workdir>/replay_<split>_<episode>.{json,png}.

Shapes: episode inputs (L, D_in) at the input rate, targets (T, D_out), T = L // chunk_size.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hiss_jax.streaming import StreamingPredictor


def _quantiles_us(times) -> dict:
    if not times:
        return {"n": 0}
    t = np.asarray(times) * 1e6
    return {"n": int(t.size), "median_us": float(np.median(t)),
            "p90_us": float(np.percentile(t, 90)), "p99_us": float(np.percentile(t, 99)),
            "max_us": float(t.max())}


def replay_episode(model, params, inputs, targets=None, *, block: int = 1) -> dict:
    """Stream one episode and compare with the parallel forward.

    inputs: (L, D_in) normalised model inputs;  targets: (T, D_out) normalised or None.
    -> dict with 'predictions' (T, D_out) list, 'rel_err_vs_parallel', 'max_abs_diff_vs_parallel',
    'mse' (when targets are given), 'latency' per sample / chunk end.
    """
    inputs = np.asarray(inputs, np.float32)
    if inputs.ndim != 2:
        raise ValueError(f"replay_episode expects inputs (L, D_in), got {inputs.shape=}")
    if block < 1:
        raise ValueError(f"{block=} must be >= 1")
    k = int(model.chunk_size)
    length = inputs.shape[0]
    n_chunks = length // k
    predictor = StreamingPredictor(model, params, batch_size=1, max_len=length)
    preds, sample_t, chunk_t = [], [], []
    seen_sample = seen_chunk = False
    for start in range(0, length, block):
        x = jnp.asarray(inputs[None, start:start + block])
        t0 = time.perf_counter()
        y = predictor.push(x)
        jax.block_until_ready((y, predictor.low_state, predictor.high_state))
        dt = time.perf_counter() - t0
        emitted = y.shape[1] > 0
        # the first push of each kind compiles; keep it out of the latency statistics
        if emitted:
            if seen_chunk:
                chunk_t.append(dt)
            seen_chunk = True
            preds.append(np.asarray(y[0]))
        else:
            if seen_sample:
                sample_t.append(dt)
            seen_sample = True
    streamed = (np.concatenate(preds, axis=0) if preds
                else np.zeros((0, 0), np.float32))
    result = {"samples": int(length), "chunk_size": k, "predictions_emitted": int(len(streamed)),
              "block": int(block)}
    if n_chunks:
        parallel = np.asarray(jax.jit(model.apply)({"params": params},
                                                   jnp.asarray(inputs[None, :n_chunks * k]))[0])
        diff = streamed - parallel
        result["max_abs_diff_vs_parallel"] = float(np.abs(diff).max())
        result["rel_err_vs_parallel"] = float(np.linalg.norm(diff)
                                              / max(np.linalg.norm(parallel), 1e-30))
        if targets is not None:
            tgt = np.asarray(targets, np.float32)[:n_chunks]
            result["mse"] = float(np.mean((streamed[:len(tgt)] - tgt) ** 2))
    result["latency"] = {"push_without_prediction": _quantiles_us(sample_t),
                         "push_with_prediction": _quantiles_us(chunk_t),
                         "device": str(jax.devices()[0])}
    result["predictions"] = streamed.tolist()
    return result


def load_run(workdir: str):
    """<workdir> -> (config, dataset, model, params) of a training run (best checkpoint first)."""
    from flax import linen as nn

    from hiss_jax.data import load_dataset
    from hiss_jax.models import build_model
    from hiss_jax.train.checkpoint import restore_params_from

    workdir = os.path.abspath(os.path.expanduser(workdir))
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --workdir must be a training run directory "
                                "(train.py writes config.json there)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    dataset = load_dataset(config.data)
    info = dataset.info
    model = build_model(config.model, input_dim=info.input_dim, output_dim=info.output_dim,
                        scan_impl=config.kernels.impl)
    x = jnp.zeros((1, 2 * int(config.model.chunk_size), info.input_dim), jnp.float32)
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"])
    params, _ = restore_params_from(workdir, abstract)
    return config, dataset, model, params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hiss_jax.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="training run directory")
    parser.add_argument("--episode", type=int, required=True, help="episode index in the split")
    parser.add_argument("--split", choices=("train", "val"), default="val")
    parser.add_argument("--block", type=int, default=1, help="samples per push (default 1)")
    parser.add_argument("--out", default="", help="JSON result with the predictions "
                        "(default <workdir>/replay_<split>_<episode>.json)")
    parser.add_argument("--plot", default="", help="PNG of streamed vs true trajectories "
                        "(default <workdir>/replay_<split>_<episode>.png)")
    args = parser.parse_args(argv)

    _, dataset, model, params = load_run(args.workdir)
    split = getattr(dataset, args.split)
    inputs, targets = split.episode(args.episode)
    result = replay_episode(model, params, inputs, targets, block=args.block)
    result.update(workdir=os.path.abspath(args.workdir), split=args.split, episode=args.episode,
                  target_names=list(dataset.info.target_names))
    stem = os.path.join(os.path.abspath(args.workdir), f"replay_{args.split}_{args.episode}")
    out, plot = args.out or stem + ".json", args.plot or stem + ".png"
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    streamed = np.asarray(result["predictions"], np.float32).reshape(-1, targets.shape[-1])
    if len(streamed):
        from hiss_jax.train.plots import plot_trajectories
        n = len(streamed)
        plot_trajectories(plot, streamed[None], np.asarray(targets, np.float32)[None, :n],
                          np.ones((1, n), bool), dataset.info,
                          title=f"streamed replay: {args.split} episode {args.episode}")
    summary = {k: v for k, v in result.items() if k != "predictions"}
    summary.update(predictions_json=out, plot=plot if len(streamed) else None)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
