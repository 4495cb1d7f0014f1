"""Synthetic generators: format, determinism, physics, caching and learnability."""
import os

import h5py
import numpy as np
import pytest

from hiss_jax import data
from hiss_jax.data import csp, synthetic
from tests.data.helpers import make_cfg


def _valid_rows(split):
    m = split.mask
    return split.inputs[np.repeat(m, split.inputs.shape[1] // m.shape[1], axis=1)], split.targets[m]


@pytest.mark.parametrize("name,d_in,d_out", [("synthetic:imu", 12, 3), ("synthetic:tactile", 60, 2)])
def test_synthetic_sets_load_with_shapes_masks_and_stats(tmp_path, name, d_in, d_out):
    ds = data.load_dataset(make_cfg(name=name, cache_dir=str(tmp_path), n_episodes=10,
                                    episode_seconds=6))
    assert ds.train.inputs.shape == (8, 300, d_in) and ds.train.inputs.dtype == np.float32
    assert ds.train.targets.shape == (8, 30, d_out) and ds.val.targets.shape == (2, 30, d_out)
    assert ds.train.mask.dtype == bool and ds.train.mask.all() and ds.val.mask.all()
    assert (ds.info.input_dim, ds.info.output_dim, ds.info.chunk_size) == (d_in, d_out, 10)
    assert ds.info.input_mean.shape == (d_in,) and ds.info.target_std.shape == (d_out,)
    assert len(ds.info.target_names) == d_out and ds.info.layout == "raw"
    x, y = _valid_rows(ds.train)
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(x.std(0, ddof=1), 1, atol=1e-3)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(y.std(0, ddof=1), 1, atol=1e-3)
    # Position deltas start at zero in every episode.
    np.testing.assert_allclose(ds.train.targets[:, 0],
                               np.broadcast_to(-ds.info.target_mean / ds.info.target_std,
                                               (8, d_out)), rtol=1e-5)


def test_generator_is_deterministic_and_seeded(tmp_path):
    a = synthetic.write_synthetic("tactile", str(tmp_path / "a.h5"), seed=1, n_episodes=3,
                                  episode_seconds=2)
    b = synthetic.write_synthetic("tactile", str(tmp_path / "b.h5"), seed=1, n_episodes=3,
                                  episode_seconds=2)
    c = synthetic.write_synthetic("tactile", str(tmp_path / "c.h5"), seed=2, n_episodes=3,
                                  episode_seconds=2)
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(c) as fc:
        assert sorted(fa.keys()) == sorted(
            m + s for m in ("kinova", "tactile")
            for s in ("", "_timestamps", "_episode_ids", "_frequency"))
        for k in fa.keys():
            np.testing.assert_array_equal(fa[k][()], fb[k][()])
        assert not np.array_equal(fa["tactile"][()], fc["tactile"][()])
        assert fa["tactile"].shape[1] == 30 and fa["kinova"].shape[1] == 7
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))  # atomic writes cleaned up
    with pytest.raises(ValueError, match="kind="):
        synthetic.write_synthetic("sonar", str(tmp_path / "x.h5"))
    with pytest.raises(ValueError, match="episode_seconds=2.5"):
        synthetic.write_synthetic("imu", str(tmp_path / "x.h5"), episode_seconds=2.5)


def test_imu_physics_at_rest_orientation_and_gravity():
    """Specific force in the body frame: |f| ~ g when the acceleration is small; gyro
    integrates to the orientation change; pose quaternions are unit."""
    rng = np.random.default_rng([0, 0])
    ep = synthetic._imu_episode(rng, 4.0, 0.0)
    t, acce, _ = ep["acce"]
    _, gyro, _ = ep["gyro"]
    tp, pose, _ = ep["pose"]
    np.testing.assert_allclose(np.linalg.norm(pose[:, 3:], axis=1), 1, atol=1e-9)
    # Mean specific force is gravity rotated into the body frame (upward, ~9.81).
    assert 9.0 < np.linalg.norm(acce.mean(0)) < 10.6 and acce.mean(0)[2] > 9.0
    # Gyro integration matches the orientation change between two poses (small angles).
    from scipy.spatial.transform import Rotation
    r0, r1 = Rotation.from_quat(pose[0, 3:]), Rotation.from_quat(pose[60, 3:])
    sl = (t >= tp[0]) & (t < tp[60])
    integrated = gyro[sl].sum(0) / 100.0
    np.testing.assert_allclose(integrated, (r0.inv() * r1).as_rotvec(), atol=0.03)


def test_euler_helpers_match_scipy_and_finite_differences():
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(0)
    e, de = rng.uniform(-1, 1, (20, 3)), rng.normal(size=(20, 3))
    np.testing.assert_allclose(synthetic.euler_zyx_matrix(e),
                               Rotation.from_euler("ZYX", e).as_matrix(), atol=1e-12)
    h = 1e-6
    fd = (Rotation.from_euler("ZYX", e - h * de).inv()
          * Rotation.from_euler("ZYX", e + h * de)).as_rotvec() / (2 * h)
    np.testing.assert_allclose(synthetic.body_rates_zyx(e, de), fd, atol=1e-7)


def test_imu_positions_are_the_double_integral_of_the_imu():
    """Second differences of pose positions = R f + g (the world acceleration) within noise."""
    from scipy.spatial.transform import Rotation
    ep = synthetic._imu_episode(np.random.default_rng([0, 1]), 10.0, 0.0)
    tp, pose, _ = ep["pose"]
    ta, acce, _ = ep["acce"]
    dt = tp[1] - tp[0]
    acc_fd = (pose[2:, :3] - 2 * pose[1:-1, :3] + pose[:-2, :3]) / dt ** 2
    f = np.stack([np.interp(tp[1:-1], ta, acce[:, i]) for i in range(3)], -1)
    a_world = Rotation.from_quat(pose[1:-1, 3:]).apply(f) - [0.0, 0.0, synthetic.GRAVITY]
    err = acc_fd - a_world
    assert np.abs(err.mean(0)).max() < 0.03  # the per-episode bias is ~0.01 m/s^2
    assert err.std() < 0.08 and np.abs(acc_fd).max() > 0.5  # noise 0.05 vs real motion
    np.testing.assert_allclose(pose[0, :3], 0, atol=1e-4)  # starts at rest at the origin


def test_tactile_readings_stay_in_range_and_follow_the_magnet():
    ep = synthetic._tactile_episode(np.random.default_rng([0, 0]), 10.0, 0.0)
    _, tac, _ = ep["tactile"]
    _, kin, _ = ep["kinova"]
    # ReSkin-like magnitudes: well inside the +-3000 clip, and every channel moves.
    assert np.abs(tac).max() < 2000 and tac.std(0).min() > 3.0
    assert 3.0 < kin[:, 2].min() and kin[:, 2].max() < 4.0  # magnet height in mm
    assert np.ptp(kin[:, 0]) > 2.0 and np.ptp(kin[:, 1]) > 1.0  # it writes across the grid


def test_dipole_field_matches_closed_form():
    # On the moment's axis B = mu0/(4pi) 2 m / d^3; in the equatorial plane -mu0/(4pi) m / d^3.
    m = np.array([0.0, 0.0, 0.2])
    b = synthetic.dipole_field(np.array([[0, 0, 0.0], [0.004, 0, 0.003]]),
                               np.array([[0, 0, 0.003]]), m)
    np.testing.assert_allclose(b[0, 0], [0, 0, 1e-7 * 2 * 0.2 / 0.003 ** 3], rtol=1e-12)
    np.testing.assert_allclose(b[0, 1], [0, 0, -1e-7 * 0.2 / 0.004 ** 3], rtol=1e-12)


def test_cache_builds_once_and_keys_on_parameters(tmp_path, monkeypatch):
    cfg = make_cfg(cache_dir=str(tmp_path / "c"), n_episodes=4, episode_seconds=3)
    path = synthetic.ensure_synthetic("imu", cfg)
    assert os.path.isfile(path) and path.startswith(str(tmp_path / "c"))

    def fail(*a, **k):
        raise AssertionError("rebuilt a cached synthetic set")
    monkeypatch.setattr(synthetic, "write_synthetic", fail)
    assert synthetic.ensure_synthetic("imu", cfg) == path
    data.load_dataset(cfg)  # the loader reuses the cached file too
    bigger = make_cfg(cache_dir=str(tmp_path / "c"), n_episodes=5, episode_seconds=3)
    with pytest.raises(AssertionError, match="rebuilt"):
        synthetic.ensure_synthetic("imu", bigger)  # changed size -> new key -> rebuild
    monkeypatch.setenv("HISS_JAX_CACHE", str(tmp_path / "env"))
    assert synthetic.cache_dir(make_cfg(cache_dir="")) == str(tmp_path / "env")
    assert synthetic.cache_dir(make_cfg(cache_dir="~/.cache/hiss_jax")) == str(tmp_path / "env")
    assert synthetic.cache_dir(make_cfg(cache_dir=str(tmp_path / "c"))) == str(tmp_path / "c")
    monkeypatch.delenv("HISS_JAX_CACHE")
    assert synthetic.cache_dir(make_cfg(cache_dir="")) == os.path.expanduser("~/.cache/hiss_jax")


def _ridge_ratio(ds, history):
    """Val MSE of ridge regression from the last `history` chunk means + last sample of the
    normalised input to the normalised target, over the predict-zeros MSE."""
    def feats(split):
        xs, ys = [], []
        for i in range(len(split)):
            x, y = split.episode(i)
            t, d = len(y), x.shape[1]
            chunks = x.reshape(t, 10, d)
            padded = np.concatenate([np.zeros((history - 1, d)), chunks.mean(1)])
            hist = np.stack([padded[j:j + t] for j in range(history)], 1).reshape(t, -1)
            xs.append(np.concatenate([hist, chunks[:, -1], np.ones((t, 1))], 1))
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)
    xt, yt = feats(ds.train)
    xv, yv = feats(ds.val)
    w = np.linalg.solve(xt.T @ xt + 1e-2 * np.eye(xt.shape[1]), xt.T @ yt)
    return float(((xv @ w - yv) ** 2).mean() / (yv ** 2).mean())


def test_imu_set_is_learnable_from_history_but_not_from_one_chunk(tmp_path):
    ds = data.load_dataset(make_cfg(cache_dir=str(tmp_path), n_episodes=40, episode_seconds=20))
    long_history = _ridge_ratio(ds, history=10)
    one_chunk = _ridge_ratio(ds, history=1)
    assert long_history < 1 / 3, long_history  # 2 s of history: well below a third of zeros
    # Velocity needs history: one chunk leaves about twice the error (not trivial).
    assert one_chunk > 1.8 * long_history and one_chunk > 0.25, (one_chunk, long_history)
