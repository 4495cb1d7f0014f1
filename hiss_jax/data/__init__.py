"""Data: CSP-Bench HDF5 loading and preprocessing, synthetic sensor sets.

Shapes: `load_dataset(config.data)` -> Dataset with `train` / `val` Splits holding
`inputs (N, L, D_in)  targets (N, T, D_out)  mask (N, T)` (float32, float32, bool), L = chunk
size x T, zero-padded; `info` holds dims, statistics and target names.
"""
from hiss_jax.data.csp import (DataFormatError, Dataset, Info, Split, augment_batch,
                               load_dataset, load_episode, resample_file)
from hiss_jax.data.presets import PRESETS, Preset, get_preset
from hiss_jax.data.synthetic import ensure_synthetic, write_synthetic

__all__ = ["DataFormatError", "Dataset", "Info", "PRESETS", "Preset", "Split",
           "augment_batch", "ensure_synthetic", "get_preset", "load_dataset", "load_episode",
           "resample_file", "write_synthetic"]
