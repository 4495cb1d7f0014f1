"""CSP-Bench HDF5 format: reading, validation, alignment/resampling and preprocessing.

Shapes: a file holds, for each modality m, `m: (S_m, D_m)` (all episodes concatenated),
`m_timestamps: (S_m,)` seconds, `m_episode_ids: (E + 1,)` cumulative offsets (0 ... S_m) and
`m_frequency: ()` Hz.  The loader returns padded splits
`inputs: (N, L, D_in)  targets: (N, T, D_out)  mask: (N, T)` with L = chunk_size * T
(chunk_size = 10: 50 Hz inputs, 5 Hz targets; HiSS paper, Sec. 3-4).

Pipeline per episode (paper App. B, official create_dataset.py and Task/CSPDataset):
  1. raw `<name>_processed.h5`: align the modalities (latest start to earliest end), floor
     the overlap to whole seconds (optionally capped), resample by linear interpolation onto
     `t0 + k / f` (inputs 50 Hz, targets 5 Hz).  An already-resampled file
     (`<name>_<suffix>.h5`) is used as stored, trimmed so that L = chunk_size * T.
  2. input = preset.make_input(...) with first differences appended (zero first row), then
     clipped to +-3000; target = preset.make_target(...) as deltas / relative / absolute.
  3. split (sequential 80/20, random 80/20 with seed 0, or a fixed validation file);
     statistics from the training split by the preset's rules; normalise; zero-pad to the
     longest episode of either split; mask marks the valid target steps.

One deliberate difference from the official resampler: all modalities of an episode share
one time grid starting at the common start t0, where the official code starts each modality
at its own first sample at or after t0 (a sub-sample shift per modality).  Padding is zero
AFTER normalisation (the official code pads raw zeros, which normalise to -mean/std); with
causal models and masked loss the padded tail never touches a valid output.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Optional, Sequence

import h5py
import numpy as np

from hiss_jax.data.presets import Preset, get_preset


class DataFormatError(ValueError):
    """A CSP-Bench HDF5 file does not follow the format (missing key, bad lengths, NaN)."""


# ------------------------------------------------------------------------------------------
# Containers.
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Modality:
    """data: (S, D) float64  timestamps: (S,) float64  offsets: (E + 1,) int64."""
    name: str
    data: np.ndarray
    timestamps: np.ndarray
    offsets: np.ndarray
    frequency: float

    @property
    def n_episodes(self) -> int:
        return len(self.offsets) - 1

    def episode(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """-> timestamps (S_i,), data (S_i, D) of episode i."""
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.timestamps[s:e], self.data[s:e]


@dataclasses.dataclass
class Split:
    """inputs: (N, L, D_in) float32  targets: (N, T, D_out) float32  mask: (N, T) bool.

    L = chunk_size * T; rows past `lengths[i]` target steps (and chunk_size * lengths[i]
    input steps) are zero.  `episode_ids[i]` is the episode's index in its source file.
    """
    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    episode_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)

    def episode(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """-> inputs (L_i, D_in), targets (T_i, D_out) of episode i, unpadded."""
        if not 0 <= i < len(self):
            raise IndexError(f"episode index {i=} out of range for a split of {len(self)} episodes")
        t = int(self.lengths[i])
        k = self.inputs.shape[1] // self.targets.shape[1]
        return self.inputs[i, :k * t], self.targets[i, :t]


@dataclasses.dataclass
class Info:
    """Dataset facts.  input_mean/std: (D_in,)  target_mean/std: (D_out,)  (float32)."""
    name: str
    input_dim: int
    output_dim: int
    chunk_size: int
    input_mean: np.ndarray
    input_std: np.ndarray
    target_mean: np.ndarray
    target_std: np.ndarray
    target_names: tuple[str, ...]
    input_hz: int
    target_hz: int
    max_target_len: int
    layout: str                       # 'raw' (resampled on load) or 'resampled'
    files: tuple[str, ...]
    dropped_episodes: tuple[int, ...]  # source indices with < 1 s of aligned data
    augment: Optional[str] = None

    def unnormalize_targets(self, y: np.ndarray) -> np.ndarray:
        """y: (..., D_out) normalised -> physical units."""
        return np.asarray(y) * self.target_std + self.target_mean


@dataclasses.dataclass
class Dataset:
    train: Split
    val: Split
    info: Info


# ------------------------------------------------------------------------------------------
# Reading and validation.
# ------------------------------------------------------------------------------------------
_FIELDS = ("", "_timestamps", "_episode_ids", "_frequency")


def _modalities_in(f: h5py.File) -> list[str]:
    return sorted(k for k in f.keys() if not any(k.endswith(s) for s in _FIELDS[1:]))


def _first_nonfinite(a: np.ndarray) -> tuple[int, int]:
    bad = np.argwhere(~np.isfinite(a.reshape(len(a), -1)))
    return int(bad[0, 0]), int(bad[0, 1])


def read_modalities(path: str, keys: Sequence[str]) -> dict[str, Modality]:
    """Reads and validates modalities `keys` of a CSP-Bench file -> {m: Modality}.

    Raises DataFormatError naming the key, the row/column or the offending lengths.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such CSP-Bench file: {path}")
    out = {}
    with h5py.File(path, "r") as f:
        for m in keys:
            missing = [m + s for s in _FIELDS if m + s not in f]
            if missing:
                raise DataFormatError(
                    f"{path}: missing dataset(s) {missing} for modality {m!r}; the file holds "
                    f"modalities {_modalities_in(f)} (keys {sorted(f.keys())}). Each modality "
                    f"needs '{m}', '{m}_timestamps', '{m}_episode_ids' and '{m}_frequency'.")
            data = np.asarray(f[m][()], np.float64)
            ts = np.asarray(f[m + "_timestamps"][()], np.float64)
            offsets_raw = np.asarray(f[m + "_episode_ids"][()])
            freq = np.asarray(f[m + "_frequency"][()], np.float64)
            out[m] = _validate(path, m, data, ts, offsets_raw, freq)
    n_eps = {m: mod.n_episodes for m, mod in out.items()}
    if len(set(n_eps.values())) > 1:
        raise DataFormatError(f"{path}: modalities disagree on the number of episodes "
                              f"({n_eps}); every '<m>_episode_ids' needs the same length")
    return out


def _validate(path, m, data, ts, offsets_raw, freq) -> Modality:
    if data.ndim == 0:
        raise DataFormatError(f"{path}: '{m}' is a scalar; expected (samples, channels)")
    data = data.reshape(len(data), -1)  # (S,) -> (S, 1); (S, a, b) sensor grids -> (S, a*b)
    if ts.ndim != 1 or len(ts) != len(data):
        raise DataFormatError(
            f"{path}: '{m}_timestamps' has shape {ts.shape} but '{m}' has {len(data)} rows; "
            f"timestamps need one entry per row")
    if offsets_raw.ndim != 1 or len(offsets_raw) < 2:
        raise DataFormatError(f"{path}: '{m}_episode_ids' has shape {offsets_raw.shape}; expected "
                              f"cumulative offsets (n_episodes + 1,) starting at 0")
    offsets = offsets_raw.astype(np.int64)
    if not np.array_equal(offsets, offsets_raw):
        raise DataFormatError(f"{path}: '{m}_episode_ids' holds non-integer offsets")
    if offsets[0] != 0 or offsets[-1] != len(data):
        raise DataFormatError(
            f"{path}: '{m}_episode_ids' runs from {offsets[0]} to {offsets[-1]} but '{m}' has "
            f"{len(data)} rows; offsets must start at 0 and end at the number of rows")
    dec = np.flatnonzero(np.diff(offsets) < 0)
    if len(dec):
        i = int(dec[0])
        raise DataFormatError(
            f"{path}: '{m}_episode_ids' is not monotonic: offset[{i}]={offsets[i]} > "
            f"offset[{i + 1}]={offsets[i + 1]}; offsets must be cumulative episode starts")
    if freq.size != 1 or not np.isfinite(freq).all() or float(freq.ravel()[0]) <= 0:
        raise DataFormatError(f"{path}: '{m}_frequency' = {freq!r}; expected one positive number")
    for arr, key in ((data, m), (ts[:, None], m + "_timestamps")):
        if not np.isfinite(arr).all():
            row, col = _first_nonfinite(arr)
            ep = int(np.searchsorted(offsets, row, side="right") - 1)
            raise DataFormatError(
                f"{path}: non-finite value {arr[row, col]} in '{key}' at row {row}, column "
                f"{col} (episode {ep}); clean or drop that episode before loading")
    return Modality(m, data, ts, offsets, float(freq.ravel()[0]))


# ------------------------------------------------------------------------------------------
# Alignment and resampling.
# ------------------------------------------------------------------------------------------
def resample_linear(ts: np.ndarray, data: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """ts: (S,) increasing  data: (S, D)  grid: (G,) -> (G, D), linear interpolation.

    Exact on signals linear in time; outside [ts[0], ts[-1]] extends the end segments
    linearly (the official resampler extrapolates too; our grids stay inside the overlap).
    """
    if len(ts) < 2:
        raise ValueError(f"need at least 2 samples to interpolate, got {len(ts)=}")
    i = np.clip(np.searchsorted(ts, grid, side="right") - 1, 0, len(ts) - 2)
    w = ((grid - ts[i]) / (ts[i + 1] - ts[i]))[:, None]
    return data[i] * (1.0 - w) + data[i + 1] * w


def _sorted_unique(ts: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Sensor logs repeat and occasionally reorder timestamps; as the official resampler, keep
    # the first sample of each distinct time in time order.
    uts, idx = np.unique(ts, return_index=True)
    return uts, data[idx]


def align_episode(streams: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  rates: Mapping[str, int], max_seconds: Optional[float] = None
                  ) -> Optional[dict[str, np.ndarray]]:
    """streams[m] = (ts (S_m,), data (S_m, D_m)), rates[m] Hz -> {m: (dur * rates[m], D_m)}.

    Common window [latest start, earliest end], floored to whole seconds `dur` (capped at
    max_seconds); every modality is sampled at t0 + k / rate.  None when dur < 1 s.
    """
    clean = {m: _sorted_unique(*s) for m, s in streams.items()}
    if any(len(ts) < 2 for ts, _ in clean.values()):
        return None
    t0 = max(ts[0] for ts, _ in clean.values())
    t1 = min(ts[-1] for ts, _ in clean.values())
    # 1e-6 s of slack so an overlap of 39.9999999999 s from float timestamps floors to 40.
    dur = math.floor(t1 - t0 + 1e-6)
    if max_seconds is not None:
        dur = min(dur, int(max_seconds))
    if dur < 1:
        return None
    out = {}
    for m, (ts, data) in clean.items():
        n = int(dur * rates[m])
        # Relative times (ts - t0) keep precision with unix-epoch timestamps.
        out[m] = resample_linear(ts - t0, data, np.arange(n) / rates[m])
    return out


def _is_resampled(mods: Mapping[str, Modality], rates: Mapping[str, int]) -> bool:
    """True when every modality is stored at its model rate on a regular grid."""
    for m, mod in mods.items():
        if abs(mod.frequency - rates[m]) > 1e-6 * rates[m]:
            return False
        for e in range(mod.n_episodes):
            ts, _ = mod.episode(e)
            if len(ts) > 1 and np.max(np.abs(np.diff(ts) * rates[m] - 1.0)) > 0.01:
                return False
    return True


def file_episodes(path: str, preset: Preset
                  ) -> tuple[list[Optional[dict[str, np.ndarray]]], str]:
    """Reads one file -> ([per episode {m: (rows at its rate, D_m)} or None if dropped], layout).

    layout is 'resampled' when the file is already at 50/5 Hz on regular grids (stored rows
    used as is, trimmed to L = chunk_size * T), else 'raw' (aligned and resampled here).
    """
    rates = {**{m: preset.input_hz for m in preset.input_keys},
             **{m: preset.target_hz for m in preset.target_keys}}
    mods = read_modalities(path, list(rates))
    n_eps = next(iter(mods.values())).n_episodes
    k = preset.chunk_size
    episodes: list[Optional[dict[str, np.ndarray]]] = []
    if _is_resampled(mods, rates):
        for e in range(n_eps):
            rows = {m: mod.episode(e)[1] for m, mod in mods.items()}
            t = min(min(len(rows[m]) for m in preset.target_keys),
                    min(len(rows[m]) for m in preset.input_keys) // k)
            if preset.max_seconds is not None:
                t = min(t, int(preset.max_seconds) * preset.target_hz)
            if t < 1:
                episodes.append(None)
                continue
            episodes.append({m: r[:t * (k if m in preset.input_keys else 1)]
                             for m, r in rows.items()})
        return episodes, "resampled"
    for e in range(n_eps):
        episodes.append(align_episode({m: mod.episode(e) for m, mod in mods.items()}, rates,
                                      preset.max_seconds))
    return episodes, "raw"


def resample_file(src: str, dst: str, preset: Preset) -> None:
    """Writes the official resampled layout of `src` (e.g. `<name>_processed.h5`) to `dst`.

    The counterpart of the official create_dataset step: per modality m, `m` at its model
    rate, `m_timestamps` (t0 + k / rate), `m_episode_ids`, `m_frequency`.  Dropped
    episodes (< 1 s of overlap) are left out.  Written to a temp file, then os.replace.
    """
    rates = {**{m: preset.input_hz for m in preset.input_keys},
             **{m: preset.target_hz for m in preset.target_keys}}
    mods = read_modalities(src, list(rates))
    data = {m: [] for m in rates}
    stamps = {m: [] for m in rates}
    for e in range(next(iter(mods.values())).n_episodes):
        streams = {m: mod.episode(e) for m, mod in mods.items()}
        ep = align_episode(streams, rates, preset.max_seconds)
        if ep is None:
            continue
        t0 = max(np.min(ts) for ts, _ in streams.values())
        for m, rows in ep.items():
            data[m].append(rows)
            stamps[m].append(t0 + np.arange(len(rows)) / rates[m])
    if not data[preset.input_keys[0]]:
        raise ValueError(f"{src}: no episode has >= 1 s where all of {list(rates)} overlap")
    tmp = f"{dst}.tmp{os.getpid()}"
    with h5py.File(tmp, "w") as f:
        for m in rates:
            f.create_dataset(m, data=np.concatenate(data[m]).astype(np.float32))
            f.create_dataset(m + "_timestamps", data=np.concatenate(stamps[m]))
            f.create_dataset(m + "_episode_ids",
                             data=np.concatenate([[0], np.cumsum([len(r) for r in data[m]])]))
            f.create_dataset(m + "_frequency", data=float(rates[m]))
    os.replace(tmp, dst)


# ------------------------------------------------------------------------------------------
# Preprocessing.
# ------------------------------------------------------------------------------------------
def with_deltas(x: np.ndarray) -> np.ndarray:
    """x: (L, D) -> (L, 2D) = [x, x_t - x_{t-1}] with a zero first difference row."""
    return np.concatenate([x, np.diff(x, axis=0, prepend=x[:1])], axis=-1)


def target_transform(y: np.ndarray, mode: str) -> np.ndarray:
    """y: (T, D) -> (T, D): 'delta' y_t - y_{t-1} (zero first row), 'relative' y_t - y_0."""
    if mode == "delta":
        return np.diff(y, axis=0, prepend=y[:1])
    if mode == "relative":
        return y - y[:1]
    return y


def preprocess_episode(ep: Mapping[str, np.ndarray], preset: Preset
                       ) -> tuple[np.ndarray, np.ndarray]:
    """{m: rows} -> inputs (L, D_in) with deltas and clipping, targets (T, D_out); float64."""
    x = preset.make_input(ep)
    y = preset.make_target(ep)
    if len(x) != preset.chunk_size * len(y):
        raise ValueError(f"{preset.name}: {len(x)=} input rows != {preset.chunk_size=} * "
                         f"{len(y)=} target rows; make_input / make_target must keep the rows")
    x = np.clip(with_deltas(x), -preset.clip, preset.clip)
    return x, target_transform(y, preset.target_mode)


def split_indices(n: int, preset: Preset) -> tuple[np.ndarray, np.ndarray]:
    """n episodes of one file -> (train ids, val ids), both sorted; sequential or random."""
    n_train = int(preset.train_frac * n)
    if n_train < 1 or n_train >= n:
        raise ValueError(f"{preset.name}: {n} usable episodes give {n_train} for training and "
                         f"{n - n_train} for validation at train_frac={preset.train_frac}; "
                         f"need at least one of each (raise config.data.n_episodes)")
    if preset.split == "random":
        perm = np.random.default_rng(preset.split_seed).permutation(n)
        return np.sort(perm[:n_train]), np.sort(perm[n_train:])
    return np.arange(n_train), np.arange(n_train, n)


def _pad(seqs: Sequence[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(seqs), length, seqs[0].shape[1]), np.float32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def _make_split(xs, ys, ids, info_args, t_max, chunk) -> Split:
    mean_x, std_x, mean_y, std_y = info_args
    xs = [(x - mean_x) / std_x for x in xs]
    ys = [(y - mean_y) / std_y for y in ys]
    lengths = np.array([len(y) for y in ys], np.int32)
    return Split(inputs=_pad(xs, chunk * t_max), targets=_pad(ys, t_max),
                 mask=np.arange(t_max)[None, :] < lengths[:, None],
                 lengths=lengths, episode_ids=np.asarray(ids, np.int32))


# ------------------------------------------------------------------------------------------
# Config -> files -> Dataset.
# ------------------------------------------------------------------------------------------
def _cfg(data_cfg: Any, field: str, default: Any) -> Any:
    """Attribute access with a default, for ConfigDicts, dataclasses and namespaces."""
    try:
        value = getattr(data_cfg, field)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


def resolve_file(data_dir: str, folder: str, resampled_suffix: str, raw_suffix: str,
                 dataset: str) -> str:
    """-> path of the resampled file if present, else of the raw `_processed` file.

    Looks in `<data_dir>/<folder>/` and, for a data_dir that already is the dataset
    folder, in `<data_dir>/`.
    """
    data_dir = os.path.expanduser(data_dir)
    names = [f"{folder}_{resampled_suffix}.h5", f"{folder}_{raw_suffix}.h5"]
    candidates = [os.path.join(d, n) for n in names
                  for d in (os.path.join(data_dir, folder), data_dir)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(
        f"{dataset}: no data file found; looked for {candidates}. Point config.data.dir "
        f"(--config.data.dir=/path/to/csp_bench) at the folder holding '{folder}/', or "
        f"config.data.file at the .h5 file itself.")


def _source_files(data_cfg: Any, preset: Preset) -> tuple[str, Optional[str]]:
    """-> (main file, validation file for fixed splits or None)."""
    if preset.synthetic is not None:
        from hiss_jax.data import synthetic  # late import: synthetic imports this module
        return synthetic.ensure_synthetic(preset.synthetic, data_cfg), None
    explicit = _cfg(data_cfg, "file", "")
    explicit_val = _cfg(data_cfg, "val_file", "")
    data_dir = _cfg(data_cfg, "dir", "")
    if explicit:
        main = os.path.expanduser(explicit)
        if not os.path.isfile(main):
            raise FileNotFoundError(f"{preset.name}: config.data.file={explicit!r} does not "
                                    f"exist; fix the path or clear it to search config.data.dir")
    else:
        if not data_dir:
            raise FileNotFoundError(
                f"{preset.name}: config.data.dir is empty; set it to the CSP-Bench root holding "
                f"'{preset.folder}/{preset.folder}_{preset.resampled_suffix}.h5' (or the raw "
                f"'_{preset.raw_suffix}.h5'), e.g. --config.data.dir=/data/csp_bench")
        main = resolve_file(data_dir, preset.folder, preset.resampled_suffix,
                            preset.raw_suffix, preset.name)
    if preset.split != "fixed":
        return main, None
    if explicit_val:
        val = os.path.expanduser(explicit_val)
        if not os.path.isfile(val):
            raise FileNotFoundError(f"{preset.name}: config.data.val_file={explicit_val!r} "
                                    f"does not exist")
        return main, val
    root = data_dir or os.path.dirname(os.path.dirname(main))
    return main, resolve_file(root, preset.val_folder, preset.val_resampled_suffix,
                              preset.val_raw_suffix, preset.name + " (validation)")


def load_dataset(data_cfg: Any, preset: Optional[Preset] = None) -> Dataset:
    """config.data -> Dataset(train, val, info); see the module docstring for the pipeline.

    data_cfg fields (attribute access; missing ones take defaults): name
    ('synthetic:imu'), dir, file, val_file, cache_dir, seed (synthetic generator and random
    split; 0 = the paper's split), n_episodes, episode_seconds (synthetic only).
    `preset` overrides the lookup by name (tests, custom datasets).
    """
    preset = preset or get_preset(_cfg(data_cfg, "name", "synthetic:imu"))
    if preset.split == "random":
        # config.data.seed picks the random split; its default 0 is the paper's split seed.
        preset = dataclasses.replace(preset, split_seed=int(_cfg(data_cfg, "seed", 0)))
    main, val_path = _source_files(data_cfg, preset)
    episodes, layout = file_episodes(main, preset)
    dropped = tuple(i for i, ep in enumerate(episodes) if ep is None)
    keep = [i for i, ep in enumerate(episodes) if ep is not None]
    pairs = {i: preprocess_episode(episodes[i], preset) for i in keep}
    if val_path is None:
        tr, va = split_indices(len(keep), preset)
        train_ids, val_ids = [keep[i] for i in tr], [keep[i] for i in va]
        train_xy = [pairs[i] for i in train_ids]
        val_xy = [pairs[i] for i in val_ids]
        files = (main,)
    else:
        val_eps, _ = file_episodes(val_path, preset)
        val_ids = [i for i, ep in enumerate(val_eps) if ep is not None]
        train_ids = keep
        train_xy = [pairs[i] for i in train_ids]
        val_xy = [preprocess_episode(val_eps[i], preset) for i in val_ids]
        files = (main, val_path)
        if not train_xy or not val_xy:
            raise ValueError(f"{preset.name}: {len(train_xy)} training and {len(val_xy)} "
                             f"validation episodes with >= 1 s of data in {files}")
    mean_x, std_x = preset.input_stats(np.concatenate([x for x, _ in train_xy]))
    mean_y, std_y = preset.target_stats(np.concatenate([y for _, y in train_xy]))
    t_max = max(len(y) for _, y in train_xy + val_xy)
    k = preset.chunk_size
    stats = (mean_x, std_x, mean_y, std_y)
    train = _make_split([x for x, _ in train_xy], [y for _, y in train_xy], train_ids, stats,
                        t_max, k)
    val = _make_split([x for x, _ in val_xy], [y for _, y in val_xy], val_ids, stats, t_max, k)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    info = Info(name=preset.name, input_dim=train.inputs.shape[-1],
                output_dim=train.targets.shape[-1], chunk_size=k,
                input_mean=f32(mean_x), input_std=f32(std_x),
                target_mean=f32(mean_y), target_std=f32(std_y),
                target_names=tuple(preset.target_names), input_hz=preset.input_hz,
                target_hz=preset.target_hz, max_target_len=t_max, layout=layout,
                files=files, dropped_episodes=dropped, augment=preset.augment)
    if len(info.target_names) != info.output_dim:
        raise AssertionError(f"{preset.name}: {len(info.target_names)=} != {info.output_dim=}")
    return dataset_checked(Dataset(train, val, info))


def dataset_checked(ds: Dataset) -> Dataset:
    for split_name in ("train", "val"):
        s = getattr(ds, split_name)
        for a, what in ((s.inputs, "inputs"), (s.targets, "targets")):
            if not np.isfinite(a).all():
                raise DataFormatError(f"{ds.info.name}: {split_name} {what} became non-finite "
                                      f"after normalisation (a zero or tiny scale?)")
    return ds


def _cfg_key(data_cfg: Any) -> tuple:
    fields = ("name", "dir", "file", "val_file", "cache_dir", "seed", "n_episodes",
              "episode_seconds")
    return tuple(repr(_cfg(data_cfg, f, None)) for f in fields)


_EPISODE_CACHE: dict[tuple, Dataset] = {}  # config key -> Dataset, for load_episode


def load_episode(data_cfg: Any, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """-> one episode's preprocessed inputs (L_i, D_in) and targets (T_i, D_out), unpadded.

    For streaming replay; the dataset is loaded once per config and kept (two configs).
    """
    if split not in ("train", "val"):
        raise ValueError(f"{split=} must be 'train' or 'val'")
    key = _cfg_key(data_cfg)
    if key not in _EPISODE_CACHE:
        while len(_EPISODE_CACHE) >= 2:  # a replay touches one or two configs at a time
            _EPISODE_CACHE.pop(next(iter(_EPISODE_CACHE)))
        _EPISODE_CACHE[key] = load_dataset(data_cfg)
    return getattr(_EPISODE_CACHE[key], split).episode(index)


# ------------------------------------------------------------------------------------------
# Training-time augmentation.
# ------------------------------------------------------------------------------------------
def augment_batch(info: Info, inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """inputs: (B, L, D_in)  targets: (B, T, D_out)  mask: (B, T) -> augmented copies.

    info.augment None: returned unchanged.  'yaw' (RoNIN): each sequence gets one angle
    ~ U[0, 2 pi); every consecutive 3-vector of the inputs (acc, gyro and their deltas) and
    the xy target rotate about z.  The rotation acts in physical units (the official
    transform runs before normalisation), so we unnormalise, rotate and renormalise; padded
    steps stay zero.
    """
    if info.augment is None:
        return inputs, targets
    if info.augment != "yaw":
        raise ValueError(f"unknown augmentation {info.augment=}")
    b, length, d_in = inputs.shape
    if d_in % 3 or targets.shape[-1] not in (2, 3):
        raise ValueError(f"yaw augmentation needs 3-vector inputs and xy(z) targets, got "
                         f"{d_in=}, {targets.shape[-1]=}")
    theta = rng.uniform(0.0, 2.0 * np.pi, size=b)
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]

    def rot(v):  # v: (B, n, 2 or 3) in physical units
        out = v.copy()
        out[..., 0] = c[..., 0] * v[..., 0] - s[..., 0] * v[..., 1]
        out[..., 1] = s[..., 0] * v[..., 0] + c[..., 0] * v[..., 1]
        return out

    x = inputs * info.input_std + info.input_mean
    x = rot(x.reshape(b, -1, 3)).reshape(b, length, d_in)
    x = (x - info.input_mean) / info.input_std
    y = (rot(targets * info.target_std + info.target_mean) - info.target_mean) / info.target_std
    in_mask = np.repeat(mask, inputs.shape[1] // mask.shape[1], axis=1)[..., None]
    return ((x * in_mask).astype(inputs.dtype), (y * mask[..., None]).astype(targets.dtype))


__all__ = ["DataFormatError", "Dataset", "Info", "Modality", "Split", "align_episode",
           "augment_batch", "file_episodes", "load_dataset", "load_episode",
           "preprocess_episode", "read_modalities", "resample_file", "resample_linear",
           "resolve_file", "split_indices", "target_transform", "with_deltas"]
