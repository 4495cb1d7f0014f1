"""Data tools: build synthetic sets, resample CSP-Bench files, summarise a dataset.

    python -m hiss_jax.data synth imu /tmp/synthetic_imu_processed.h5 --n_episodes 200 --seconds 20
    python -m hiss_jax.data resample csp:vector /data/csp/vector/vector_processed.h5 \
        /data/csp/vector/vector_imu50p5.h5
    python -m hiss_jax.data info csp:vector --dir /data/csp      # or: info synthetic:imu

`info` loads the dataset exactly as training does and prints split sizes, shapes, the
normalisation statistics and the layout it found.
"""
import argparse
import types

import numpy as np

from hiss_jax.data import PRESETS, csp, get_preset, load_dataset, write_synthetic


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hiss_jax.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write a synthetic set in the raw CSP-Bench layout")
    s.add_argument("kind", choices=["imu", "tactile"])
    s.add_argument("path")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n_episodes", type=int, default=200)
    s.add_argument("--seconds", type=int, default=20)
    r = sub.add_parser("resample", help="raw _processed.h5 -> resampled 50/5 Hz file")
    r.add_argument("name", choices=sorted(PRESETS))
    r.add_argument("src")
    r.add_argument("dst")
    i = sub.add_parser("info", help="load a dataset as training does and summarise it")
    i.add_argument("name", choices=sorted(PRESETS))
    for field in ("dir", "file", "val_file", "cache_dir"):
        i.add_argument(f"--{field}", default="")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--n_episodes", type=int, default=200)
    i.add_argument("--episode_seconds", type=int, default=20)
    a = parser.parse_args(argv)

    if a.cmd == "synth":
        print(write_synthetic(a.kind, a.path, a.seed, a.n_episodes, a.seconds))
    elif a.cmd == "resample":
        csp.resample_file(a.src, a.dst, get_preset(a.name))
        print(a.dst)
    else:
        cfg = types.SimpleNamespace(**{k: v for k, v in vars(a).items() if k != "cmd"})
        ds = load_dataset(cfg)
        info = ds.info
        np.set_printoptions(precision=4, suppress=True, linewidth=100)
        print(f"{info.name}: layout {info.layout}, files {list(info.files)}")
        for name in ("train", "val"):
            sp = getattr(ds, name)
            print(f"  {name}: {len(sp)} episodes, inputs {sp.inputs.shape}, targets "
                  f"{sp.targets.shape}, target steps {int(sp.lengths.min())}-"
                  f"{int(sp.lengths.max())}")
        print(f"  dropped episodes (< 1 s aligned): {list(info.dropped_episodes)}")
        print(f"  input mean {info.input_mean}\n  input std  {info.input_std}")
        print(f"  targets {info.target_names}\n  target mean {info.target_mean}\n"
              f"  target std  {info.target_std}")


if __name__ == "__main__":
    main()
