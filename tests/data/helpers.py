"""Helpers for the data tests: tiny configs and hand-made CSP-Bench files."""
import types

import h5py
import numpy as np


def make_cfg(**kw):
    """A config.data stand-in with attribute access (load_dataset takes any such object)."""
    base = dict(name="synthetic:imu", dir="", file="", val_file="", cache_dir="", seed=0,
                n_episodes=10, episode_seconds=6)
    base.update(kw)
    return types.SimpleNamespace(**base)


def write_h5(path, modalities):
    """modalities: {m: (timestamps (S,), data (S, D), offsets (E + 1,), frequency)}."""
    with h5py.File(path, "w") as f:
        for m, (ts, data, offsets, freq) in modalities.items():
            f.create_dataset(m, data=np.asarray(data))
            f.create_dataset(m + "_timestamps", data=np.asarray(ts))
            f.create_dataset(m + "_episode_ids", data=np.asarray(offsets))
            f.create_dataset(m + "_frequency", data=freq)
    return str(path)


def copy_renamed(src, dst, renames):
    """Copies a CSP-Bench file, renaming modalities ({old: new}), e.g. pose -> tango_pose."""
    with h5py.File(src, "r") as fi, h5py.File(dst, "w") as fo:
        for key in fi.keys():
            new = key
            for old, nm in renames.items():
                if key == old or key.startswith(old + "_"):
                    new = nm + key[len(old):]
            fo.create_dataset(new, data=fi[key][()])
    return str(dst)
