"""CSP-Bench loader: resampling, preprocessing, splits, file layouts and malformed files."""
import dataclasses
import os

import h5py
import numpy as np
import pytest

from hiss_jax import data
from hiss_jax.data import csp, presets
from tests.data.helpers import copy_renamed, make_cfg, write_h5

# A preset with identity statistics, so loaded values can be checked against raw signals.
IDENTITY = presets.Preset(
    name="test:identity", input_keys=("a",), target_keys=("p",),
    make_input=lambda e: np.asarray(e["a"], np.float64),
    make_target=lambda e: np.asarray(e["p"], np.float64),
    target_mode="delta", input_stats=lambda r: presets.fixed(r, mean=0.0, std=1.0),
    target_stats=lambda r: presets.fixed(r, mean=0.0, std=1.0), split="sequential",
    target_names=("dp",))


def _linear_file(path, durations, a_hz=137.0, p_hz=23.0):
    """Episodes of linear signals a = 2 t + 1 (2 cols), p = -3 t (1 col) on jittered clocks."""
    rng = np.random.default_rng(0)
    mods = {}
    for m, hz, fn in (("a", a_hz, lambda t: np.stack([2 * t + 1, -t], -1)),
                      ("p", p_hz, lambda t: -3 * t[:, None])):
        ts, rows, offs = [], [], [0]
        for e, dur in enumerate(durations):
            t = 100.0 * e + rng.uniform(0, 0.05) + np.arange(int((dur + 0.3) * hz)) / hz
            t = t + rng.uniform(-0.2, 0.2, len(t)) / hz  # clock jitter, still increasing
            ts.append(t)
            rows.append(fn(t))
            offs.append(offs[-1] + len(t))
        mods[m] = (np.concatenate(ts), np.concatenate(rows), np.array(offs), hz)
    return write_h5(path, mods)


def test_resample_linear_is_exact_on_linear_signals():
    rng = np.random.default_rng(1)
    ts = np.sort(rng.uniform(0, 10, 200))
    data_ = np.stack([3 * ts - 2, 0.5 * ts], -1)
    grid = np.linspace(ts[0], ts[-1], 77)
    out = csp.resample_linear(ts, data_, grid)
    np.testing.assert_allclose(out, np.stack([3 * grid - 2, 0.5 * grid], -1), atol=1e-10)


def test_align_episode_common_window_floor_and_grid():
    a_t = 5.0 + np.arange(0, 7.5, 0.01)       # 5.00 .. 12.49
    p_t = 5.3 + np.arange(0, 7.0, 0.04)       # 5.30 .. 12.26
    ep = csp.align_episode({"a": (a_t, a_t[:, None]), "p": (p_t, p_t[:, None] * 2)},
                           {"a": 50, "p": 5})
    # Overlap 5.30 .. 12.26 = 6.96 s -> 6 whole seconds, grids start at the common start.
    assert ep["a"].shape == (300, 1) and ep["p"].shape == (30, 1)
    np.testing.assert_allclose(ep["a"][:, 0], 5.3 + np.arange(300) / 50, atol=1e-9)
    np.testing.assert_allclose(ep["p"][:, 0], 2 * (5.3 + np.arange(30) / 5), atol=1e-9)
    capped = csp.align_episode({"a": (a_t, a_t[:, None]), "p": (p_t, p_t[:, None])},
                               {"a": 50, "p": 5}, max_seconds=4)
    assert capped["a"].shape == (200, 1) and capped["p"].shape == (20, 1)


def test_with_deltas_and_target_transforms():
    x = np.array([[1.0, 10.0], [3.0, 10.0], [6.0, 7.0]])
    np.testing.assert_array_equal(csp.with_deltas(x),
                                  [[1, 10, 0, 0], [3, 10, 2, 0], [6, 7, 3, -3]])
    y = np.array([[2.0], [5.0], [4.0]])
    np.testing.assert_array_equal(csp.target_transform(y, "delta"), [[0], [3], [-1]])
    np.testing.assert_array_equal(csp.target_transform(y, "relative"), [[0], [3], [2]])
    np.testing.assert_array_equal(csp.target_transform(y, "absolute"), y)


def test_loader_on_linear_raw_file(tmp_path):
    path = _linear_file(tmp_path / "lin_processed.h5", durations=[4.5, 3.2, 6.3, 2.1, 5.5])
    ds = data.load_dataset(make_cfg(file=path), preset=IDENTITY)
    assert ds.info.layout == "raw" and ds.info.chunk_size == 10
    # floor(overlap) -> 4, 3, 6, 2, 5 s; sequential 80/20 -> train eps 0-3, val ep 4.
    np.testing.assert_array_equal(ds.train.lengths, [20, 15, 30, 10])
    np.testing.assert_array_equal(ds.val.lengths, [25])
    assert ds.train.inputs.shape == (4, 300, 4) and ds.train.targets.shape == (4, 30, 1)
    assert ds.val.inputs.shape == (1, 300, 4)  # padded to the max over both splits
    np.testing.assert_array_equal(ds.train.mask.sum(1), ds.train.lengths)
    x, y = ds.train.episode(1)
    assert x.shape == (150, 4) and y.shape == (15, 1)
    # Inputs: a = 2t + 1 at 50 Hz -> deltas 2/50 = 0.04 except the zero first row; the
    # second column -t -> deltas -0.02.
    np.testing.assert_allclose(x[1:, 2], 0.04, atol=1e-5)
    np.testing.assert_allclose(x[1:, 3], -0.02, atol=1e-5)
    assert x[0, 2] == 0 and x[0, 3] == 0
    # Target p = -3t at 5 Hz -> deltas -0.6 with a zero first row.
    np.testing.assert_allclose(y[1:, 0], -0.6, atol=1e-5)
    assert y[0, 0] == 0
    # Padding is zero beyond each episode's length.
    assert np.all(ds.train.inputs[1, 150:] == 0) and np.all(ds.train.targets[1, 15:] == 0)


def test_raw_and_resampled_layouts_agree(tmp_path, imu_raw):
    resampled = str(tmp_path / "synthetic_imu_imu50p5.h5")
    csp.resample_file(imu_raw, resampled, presets.PRESETS["csp:vector"])
    raw_ds = data.load_dataset(make_cfg(name="csp:vector", file=imu_raw))
    res_ds = data.load_dataset(make_cfg(name="csp:vector", file=resampled))
    assert raw_ds.info.layout == "raw" and res_ds.info.layout == "resampled"
    with h5py.File(resampled) as f:
        assert float(f["acce_frequency"][()]) == 50 and float(f["pose_frequency"][()]) == 5
        assert f["acce"].shape[0] == 10 * f["pose"].shape[0]
    for split in ("train", "val"):
        a, b = getattr(raw_ds, split), getattr(res_ds, split)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_allclose(a.inputs, b.inputs, atol=2e-4)
        np.testing.assert_allclose(a.targets, b.targets, atol=2e-4)
    np.testing.assert_allclose(raw_ds.info.input_std, res_ds.info.input_std, rtol=1e-5)


def test_vector_rules_and_file_search(tmp_path, imu_raw):
    folder = tmp_path / "vector"
    folder.mkdir()
    os.symlink(imu_raw, folder / "vector_processed.h5")
    ds = data.load_dataset(make_cfg(name="csp:vector", dir=str(tmp_path)))
    assert ds.info.files == (str(folder / "vector_processed.h5"),)
    # VECtor: input mean 0, std (max - min) / 5 over the training rows -> each normalised
    # training column spans exactly 5.
    x = ds.train.inputs[np.repeat(ds.train.mask, 10, axis=1)]
    np.testing.assert_array_equal(ds.info.input_mean, 0)
    np.testing.assert_allclose(x.max(0) - x.min(0), 5.0, rtol=1e-4)
    assert ds.info.input_dim == 12 and ds.info.output_dim == 3
    assert ds.info.target_names == ("dx", "dy", "dz")
    # The resampled file wins once it exists.
    csp.resample_file(imu_raw, str(folder / "vector_imu50p5.h5"), presets.PRESETS["csp:vector"])
    assert data.load_dataset(make_cfg(name="csp:vector", dir=str(tmp_path))).info.layout == "resampled"


def test_fixed_split_and_yaw_augmentation(tmp_path, imu_raw):
    folder = tmp_path / "ronin"
    folder.mkdir()
    copy_renamed(imu_raw, folder / "ronin_processed_train.h5", {"pose": "tango_pose"})
    with h5py.File(imu_raw) as f:  # a validation file of 3 episodes: the first 3 of imu_raw
        n = {m: int(f[m + "_episode_ids"][3]) for m in ("acce", "gyro", "pose")}
        write_h5(folder / "ronin_processed_test.h5", {
            ("tango_pose" if m == "pose" else m): (
                f[m + "_timestamps"][:n[m]], f[m][:n[m]], f[m + "_episode_ids"][:4],
                f[m + "_frequency"][()]) for m in n})
    ds = data.load_dataset(make_cfg(name="csp:ronin", dir=str(tmp_path)))
    assert len(ds.train) == 10 and len(ds.val) == 3  # fixed split: whole files
    assert ds.info.output_dim == 2 and ds.info.augment == "yaw"
    # The same episodes normalise identically in both files.
    np.testing.assert_allclose(ds.val.inputs, ds.train.inputs[:3], atol=1e-6)

    rng = np.random.default_rng(0)
    mask = ds.train.mask.copy()
    mask[0, 20:] = False  # pretend episode 0 is shorter: its tail must stay zero
    xi = ds.train.inputs * np.repeat(mask, 10, axis=1)[..., None]
    yi = ds.train.targets * mask[..., None]
    xa, ya = data.augment_batch(ds.info, xi, yi, mask, rng)
    phys = lambda v, m, s: v * s + m  # noqa: E731
    px = phys(xi, ds.info.input_mean, ds.info.input_std)[:, :200]
    pa = phys(xa, ds.info.input_mean, ds.info.input_std)[:, :200]
    # Rotation about z keeps every 3-vector's horizontal norm and z component.
    for g in range(4):
        sl = slice(3 * g, 3 * g + 2)
        np.testing.assert_allclose(np.linalg.norm(pa[..., sl], axis=-1),
                                   np.linalg.norm(px[..., sl], axis=-1), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(pa[..., 3 * g + 2], px[..., 3 * g + 2], rtol=1e-4, atol=1e-4)
    assert not np.allclose(pa[..., :2], px[..., :2], atol=1e-2)
    assert np.all(xa[0, 200:] == 0) and np.all(ya[0, 20:] == 0)
    ty = phys(yi, ds.info.target_mean, ds.info.target_std)[mask]
    ta = phys(ya, ds.info.target_mean, ds.info.target_std)[mask]
    np.testing.assert_allclose(np.linalg.norm(ta, axis=-1), np.linalg.norm(ty, axis=-1),
                               rtol=1e-3, atol=1e-5)
    # No augmentation configured -> the batch comes back unchanged.
    plain = dataclasses.replace(ds.info, augment=None)
    xb, yb = data.augment_batch(plain, xi, yi, mask, rng)
    assert xb is xi and yb is yi


def test_split_indices_sequential_and_random():
    seq = presets.PRESETS["csp:vector"]
    tr, va = csp.split_indices(10, seq)
    np.testing.assert_array_equal(tr, np.arange(8))
    np.testing.assert_array_equal(va, [8, 9])
    rnd = presets.PRESETS["csp:joystick"]
    tr1, va1 = csp.split_indices(50, rnd)
    tr2, va2 = csp.split_indices(50, rnd)
    np.testing.assert_array_equal(tr1, tr2)
    np.testing.assert_array_equal(va1, va2)
    assert len(tr1) == 40 and len(va1) == 10
    assert sorted(np.concatenate([tr1, va1]).tolist()) == list(range(50))
    assert not np.array_equal(tr1, np.arange(40))  # shuffled, not sequential
    perm = np.random.default_rng(0).permutation(50)
    np.testing.assert_array_equal(va1, np.sort(perm[40:]))
    with pytest.raises(ValueError, match="n_episodes"):
        csp.split_indices(1, seq)


def test_preset_rules():
    rows = np.random.default_rng(0).normal(3.0, 2.0, (500, 4))
    m, s = presets.mean_std(rows, scale=3.0)
    np.testing.assert_allclose(m, rows.mean(0))
    np.testing.assert_allclose(s, 3 * rows.std(0, ddof=1))
    _, s = presets.mean_std(rows, tie=(1, 0), zero_mean=True)
    assert s[1] == s[0]
    m, s = presets.zero_range(np.random.default_rng(1).uniform(0, 2, (100, 200)),
                              unit_cols=(39, 156))
    assert np.all(m == 0) and np.all(s[39:156] == 1) and np.all(s[:39] != 1)
    m, s = presets.fixed(rows, mean=0.0, std=1000.0)
    assert np.all(s == 1000) and np.all(m == 0)
    # Intrinsic slip: a rotation of 0.3 rad about y relative to the first frame.
    from scipy.spatial.transform import Rotation
    r0 = Rotation.from_euler("z", 0.7)
    quats = np.stack([r0.as_quat(), (Rotation.from_euler("y", 0.3) * r0).as_quat()])
    pose = np.concatenate([[[1.0, 2.0, 3.0], [1.5, 2.0, 2.0]], quats], axis=-1)
    np.testing.assert_allclose(presets.slip_pose({"kinova": pose}), [[0, 0, 0], [0.5, -1.0, 0.3]],
                               atol=1e-12)
    np.testing.assert_array_equal(presets.clipped("xela", 1000.0, {"xela": [[2e3, -5e3, 4.0]]}),
                                  [[1000.0, -1000.0, 4.0]])


def test_every_csp_preset_has_consistent_names():
    for name, p in presets.PRESETS.items():
        assert p.chunk_size == 10, name
        if name.startswith("csp:"):
            assert p.folder and p.resampled_suffix, name
    assert len(presets.PRESETS["csp:totalcapture"].input_keys) == 26
    assert len(presets.PRESETS["csp:totalcapture"].target_names) == 63


# ---------------------------------- malformed input ----------------------------------------
def _good(tmp_path, name="f.h5"):
    return _linear_file(tmp_path / name, durations=[3.5, 3.5])


def _mutate(path, key, value):
    with h5py.File(path, "a") as f:
        del f[key]
        f.create_dataset(key, data=value)


def test_unknown_name_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match=r"csp:vector.*synthetic:imu|synthetic:imu.*csp:vector"):
        data.load_dataset(make_cfg(name="csp:nope"))
    with pytest.raises(FileNotFoundError, match=r"config\.data\.dir") as e:
        data.load_dataset(make_cfg(name="csp:vector", dir=str(tmp_path)))
    assert os.path.join(str(tmp_path), "vector", "vector_imu50p5.h5") in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"config\.data\.dir is empty"):
        data.load_dataset(make_cfg(name="csp:vector"))
    with pytest.raises(FileNotFoundError, match=r"config\.data\.file='/no/such\.h5'"):
        data.load_dataset(make_cfg(name="csp:vector", file="/no/such.h5"))


def test_missing_key_names_it_and_lists_keys(tmp_path):
    path = _good(tmp_path)
    with h5py.File(path, "a") as f:
        del f["p_timestamps"]
    with pytest.raises(data.DataFormatError, match=r"p_timestamps.*modalities \['a', 'p'\]"):
        data.load_dataset(make_cfg(file=path), preset=IDENTITY)


@pytest.mark.parametrize("key,row,col,bad", [("a", 17, 1, np.nan), ("p", 40, 0, np.inf),
                                             ("a_timestamps", 5, 0, np.nan)])
def test_nonfinite_values_report_their_location(tmp_path, key, row, col, bad):
    path = _good(tmp_path)
    with h5py.File(path) as f:
        arr = f[key][()].copy()
    if arr.ndim == 1:
        arr[row] = bad
    else:
        arr[row, col] = bad
    _mutate(path, key, arr)
    with pytest.raises(data.DataFormatError,
                       match=rf"non-finite value .* in '{key}' at row {row}, column {col} \(episode 0\)"):
        data.load_dataset(make_cfg(file=path), preset=IDENTITY)


def test_length_mismatches_and_bad_offsets(tmp_path):
    path = _good(tmp_path)
    with h5py.File(path) as f:
        ts, offs = f["a_timestamps"][()], f["a_episode_ids"][()]
    _mutate(path, "a_timestamps", ts[:-1])
    with pytest.raises(data.DataFormatError, match=r"'a_timestamps' has shape \(\d+,\) but 'a' has"):
        data.load_dataset(make_cfg(file=path), preset=IDENTITY)
    path = _good(tmp_path, "g.h5")
    _mutate(path, "a_episode_ids", np.array([0, offs[1], offs[2] - 3]))
    with pytest.raises(data.DataFormatError, match=r"runs from 0 to \d+ but 'a' has \d+ rows"):
        data.load_dataset(make_cfg(file=path), preset=IDENTITY)
    path = _good(tmp_path, "h.h5")
    _mutate(path, "a_episode_ids", np.array([0, offs[2] - 2, 5, offs[2]]))
    with pytest.raises(data.DataFormatError, match=r"not monotonic: offset\[1\]=\d+ > offset\[2\]=5"):
        data.load_dataset(make_cfg(file=path), preset=IDENTITY)
    path = _good(tmp_path, "i.h5")
    _mutate(path, "p_episode_ids", np.array([0, 10, 20, 30, 40])[:3])
    with pytest.raises(data.DataFormatError, match=r"'p_episode_ids' runs from 0 to 20"):
        data.load_dataset(make_cfg(file=path), preset=IDENTITY)


def test_short_episodes_are_dropped_and_recorded(tmp_path):
    path = _linear_file(tmp_path / "s.h5", durations=[3.5, 0.4, 2.5, 4.2, 3.1, 2.2])
    ds = data.load_dataset(make_cfg(file=path), preset=IDENTITY)
    assert ds.info.dropped_episodes == (1,)
    np.testing.assert_array_equal(ds.train.episode_ids, [0, 2, 3, 4])
    np.testing.assert_array_equal(ds.val.episode_ids, [5])


def test_load_episode_matches_split(tmp_path, imu_raw):
    cfg = make_cfg(name="csp:vector", file=imu_raw)
    ds = data.load_dataset(cfg)
    x, y = data.load_episode(cfg, "val", 1)
    np.testing.assert_array_equal(x, ds.val.inputs[1, :10 * ds.val.lengths[1]])
    np.testing.assert_array_equal(y, ds.val.targets[1, :ds.val.lengths[1]])
    with pytest.raises(ValueError, match="split="):
        data.load_episode(cfg, "test", 0)
    with pytest.raises(IndexError, match="out of range"):
        data.load_episode(cfg, "val", 99)


# ------------------------------ per-dataset rules end to end -------------------------------
def _as_dataset(tmp_path, imu_raw, folder, stem, renames):
    (tmp_path / folder).mkdir()
    copy_renamed(imu_raw, tmp_path / folder / f"{folder}_{stem}.h5", renames)
    return str(tmp_path)


def test_joystick_rules_relative_targets_fixed_stats_and_seeded_split(tmp_path, imu_raw):
    root = _as_dataset(tmp_path, imu_raw, "joystick_control_hiss_dataset", "processed",
                       {"acce": "xela", "pose": "extreme3d"})
    ds = data.load_dataset(make_cfg(name="csp:joystick", dir=root, seed=0))
    np.testing.assert_array_equal(ds.info.input_mean, 0)
    np.testing.assert_array_equal(ds.info.input_std, 1000)
    # Relative targets: the first step is zero before normalisation in every episode.
    first = ds.info.unnormalize_targets(ds.train.targets[:, 0])
    np.testing.assert_allclose(first, 0, atol=1e-6)
    y = ds.info.unnormalize_targets(ds.train.targets[ds.train.mask])
    np.testing.assert_allclose(ds.info.target_std, 2 * y.std(0, ddof=1), rtol=1e-4)
    other = data.load_dataset(make_cfg(name="csp:joystick", dir=root, seed=1))
    assert not np.array_equal(ds.val.episode_ids, other.val.episode_ids)


def test_intrinsic_slip_and_marker_writing_rules(tmp_path, imu_raw):
    root = _as_dataset(tmp_path, imu_raw, "intrinsic_slip_hiss_dataset", "processed",
                       {"acce": "tactile", "pose": "kinova"})
    ds = data.load_dataset(make_cfg(name="csp:intrinsic_slip", dir=root))
    assert ds.info.output_dim == 3 and ds.info.target_names == ("dx", "dz", "dtheta_y")
    np.testing.assert_array_equal(ds.info.target_mean, 0)
    assert ds.info.target_std[1] == ds.info.target_std[0]
    x = ds.train.inputs[np.repeat(ds.train.mask, 10, axis=1)]
    np.testing.assert_allclose(x.max(0) - x.min(0), 5.0, rtol=1e-4)  # (max - min) / 5
    os.rename(tmp_path / "intrinsic_slip_hiss_dataset", tmp_path / "marker_writing_hiss_dataset")
    os.rename(tmp_path / "marker_writing_hiss_dataset" / "intrinsic_slip_hiss_dataset_processed.h5",
              tmp_path / "marker_writing_hiss_dataset" / "marker_writing_hiss_dataset_processed.h5")
    ds = data.load_dataset(make_cfg(name="csp:marker_writing", dir=root))
    x = ds.train.inputs[np.repeat(ds.train.mask, 10, axis=1)]
    np.testing.assert_allclose(x.std(0, ddof=1), 1 / 3, rtol=1e-3)  # input std x3
    assert ds.info.output_dim == 2


def test_totalcapture_layout_and_rules(tmp_path):
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(0)
    p = presets.PRESETS["csp:totalcapture"]

    def file(path, n_eps):
        mods = {}
        for key in p.input_keys + p.target_keys:
            ts, rows, offs = [], [], [0]
            for e in range(n_eps):
                t = 50.0 * e + np.arange(0, 3.4, 1 / 60)
                if key.startswith("rot"):
                    r = Rotation.from_rotvec(0.3 * np.sin(t[:, None] + rng.uniform(0, 6, 3)))
                    rows.append(r.as_quat())
                else:
                    rows.append(rng.normal(0, 1, (len(t), 3)).cumsum(0))
                ts.append(t)
                offs.append(offs[-1] + len(t))
            mods[key] = (np.concatenate(ts), np.concatenate(rows), np.array(offs), 60.0)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return write_h5(path, mods)
    file(str(tmp_path / "total_capture" / "total_capture_processed.h5"), 3)
    file(str(tmp_path / "total_capture_test" / "total_capture_test_processed.h5"), 2)
    ds = data.load_dataset(make_cfg(name="csp:totalcapture", dir=str(tmp_path)))
    assert ds.train.inputs.shape == (3, 150, 234) and ds.val.inputs.shape == (2, 150, 234)
    assert ds.train.targets.shape == (3, 15, 63)
    np.testing.assert_array_equal(ds.info.input_std[39:156], 1)
    x = ds.train.inputs[np.repeat(ds.train.mask, 10, axis=1)]
    np.testing.assert_allclose((x.max(0) - x.min(0))[:39], 1.0, rtol=1e-4)  # std = max - min
    # Rotation columns are entries of unit rotation-matrix columns: |.| <= 1.
    assert np.all(np.abs(x[:, 39:117]) <= 1 + 1e-5)
    y = ds.info.unnormalize_targets(ds.train.targets[ds.train.mask])
    np.testing.assert_allclose(ds.info.target_std, 3 * y.std(0, ddof=1), rtol=1e-3)
