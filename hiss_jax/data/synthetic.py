"""Synthetic sensor sets written in the CSP-Bench raw (`_processed`) HDF5 layout.

Shapes written per modality m: `m: (S, D_m)` float32, `m_timestamps: (S,)` float64 seconds,
`m_episode_ids: (E + 1,)`, `m_frequency: ()`; the loader (csp.py) aligns and resamples them
exactly like a real CSP-Bench file.

'imu' (mirrors VECtor; modalities acce (3), gyro (3) at 100 Hz, pose (7 = xyz + quat xyzw)
at 30 Hz): a smooth 3-D trajectory starting at rest at the origin (velocity: random
sinusoids per axis, periods 2-10 s, under a 1.5 s raised-cosine start ramp; position by
integration), and a smooth orientation (yaw/pitch/roll sums of slow sinusoids
starting at zero yaw, so the world frame is the initial heading and the target is
observable from the IMU).  The IMU reports
    specific force  f_b = R^T (a_w - g_w),  g_w = (0, 0, -9.81) m/s^2,
    angular rate    w_b = vee(R^T dR/dt)  (closed form from the Euler angle rates),
each with a per-episode constant bias and white noise.  Velocity is the integral of the
acceleration from rest and, after the ramp, also a fixed linear filter of the recent
acceleration (per sinusoid, v is a -90 degree phase shift of a scaled by 1 / w), so 0.2 s
position deltas are recoverable from the causal IMU history.

'tactile' (mirrors Marker Writing; modalities tactile (30) at 100 Hz, kinova (7) at 30 Hz):
a magnet dipole m (mostly along z, small per-episode tilt) gliding 3-4 mm above a 5 x 2 grid
of 3-axis magnetometers (4 mm x 6 mm pitch, like ReSkin), field in microtesla
    B(r) = mu0 / (4 pi) (3 (m . r) r / |r|^5 - m / |r|^3),   r = sensor - magnet,
plus a per-episode ambient offset, a slow linear drift and white noise.  The target is the
magnet position in mm (kinova xyz + identity quaternion).

Both generators are seeded and deterministic: episode e uses default_rng([seed, e]).
Each modality starts at a random sub-sample offset so the loader's alignment is exercised;
episodes last episode_seconds + 0.6 s so the aligned overlap floors to episode_seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import h5py
import numpy as np
from scipy.spatial.transform import Rotation

GENERATOR_VERSION = 4  # bump when the generated data change; part of the cache key
KINDS = ("imu", "tactile")
DEFAULT_N_EPISODES = 200
DEFAULT_EPISODE_SECONDS = 20.0
GRAVITY = 9.81


def _sines(rng, n_axes, n_terms, f_lo, f_hi):
    """-> freq (A, K) Hz, phase (A, K): random sums of sinusoids, one row per axis."""
    return rng.uniform(f_lo, f_hi, (n_axes, n_terms)), rng.uniform(0, 2 * np.pi, (n_axes, n_terms))


def euler_zyx_matrix(e: np.ndarray) -> np.ndarray:
    """e: (n, 3) [yaw, pitch, roll] -> (n, 3, 3) body-to-world R = Rz(yaw) Ry(pitch) Rx(roll).

    The intrinsic 'ZYX' convention of scipy's Rotation.from_euler, built directly because it
    is ~10x faster for the per-sample rotations of the generator.
    """
    cy, sy = np.cos(e[:, 0]), np.sin(e[:, 0])
    cp, sp = np.cos(e[:, 1]), np.sin(e[:, 1])
    cr, sr = np.cos(e[:, 2]), np.sin(e[:, 2])
    return np.stack([
        np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], -1),
        np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], -1),
        np.stack([-sp, cp * sr, cp * cr], -1)], axis=-2)


def body_rates_zyx(e: np.ndarray, de: np.ndarray) -> np.ndarray:
    """e, de: (n, 3) ZYX Euler angles [yaw, pitch, roll] and rates -> (n, 3) body angular rate.

    omega_b = vee(R^T dR/dt) = [roll' - yaw' sin(pitch),
                                pitch' cos(roll) + yaw' cos(pitch) sin(roll),
                                -pitch' sin(roll) + yaw' cos(pitch) cos(roll)].
    """
    cp, sp = np.cos(e[:, 1]), np.sin(e[:, 1])
    cr, sr = np.cos(e[:, 2]), np.sin(e[:, 2])
    dy, dp, dr = de[:, 0], de[:, 1], de[:, 2]
    return np.stack([dr - dy * sp, dp * cr + dy * cp * sr, -dp * sr + dy * cp * cr], -1)


def _imu_episode(rng: np.random.Generator, seconds: float, t_base: float) -> dict:
    """-> {m: (timestamps (S_m,), rows (S_m, D_m), rate)}: acce (S, 3), gyro (S, 3) at
    100 Hz, pose (S', 7) at 30 Hz; see the module docstring for the model."""
    imu_hz, pose_hz = 100, 30
    extra = 0.6  # overlap of seconds + ~0.55 s floors to `seconds` after alignment
    t_imu = rng.uniform(0, 1 / imu_hz) + np.arange(int((seconds + extra) * imu_hz)) / imu_hz
    t_pose = rng.uniform(0, 1 / pose_hz) + np.arange(int((seconds + extra) * pose_hz)) / pose_hz

    # Velocity: per axis K sinusoids of EQUAL velocity amplitude (0.1-0.35 m/s, z smaller),
    # 0.1-0.5 Hz, under a raised-cosine envelope over the first 1.5 s so every episode starts
    # at rest.  From rest, velocity is the integral of the acceleration, and after the ramp it
    # is also a stationary linear filter of recent acceleration: either route generalises,
    # where a nonzero start velocity could only be memorised per training episode.
    k, ramp = 4, 1.5
    freq, phase = _sines(rng, 3, k, 0.1, 0.5)
    w = 2 * np.pi * freq
    v_amp = rng.uniform(0.1, 0.35, (3, k)) * np.array([[1.0], [1.0], [0.4]])

    def envelope(t):  # (n,) and its time derivative
        x = np.clip(t / ramp, 0.0, 1.0)
        e = 0.5 * (1 - np.cos(np.pi * x))
        de = np.where(t < ramp, 0.5 * np.pi / ramp * np.sin(np.pi * x), 0.0)
        return e[:, None], de[:, None]

    def vel_and_acc(t):  # (n, 3) each, world frame
        arg = w * t[:, None, None] + phase
        s_ = np.einsum("ak,tak->ta", v_amp, np.sin(arg))
        ds = np.einsum("ak,tak->ta", v_amp * w, np.cos(arg))
        e, de = envelope(t)
        return e * s_, de * s_ + e * ds

    # Position: trapezoid rule at 1 kHz through the ramp (error ~1e-8 m), closed form after
    # it, where the envelope is 1: p(t) = p(ramp) + sum V / w (cos(w ramp + phi) - cos(w t + phi)).
    t_ramp = np.linspace(0.0, ramp, 1501)
    v_ramp, _ = vel_and_acc(t_ramp)
    p_ramp = np.concatenate([np.zeros((1, 3)), np.cumsum(
        0.5 * (v_ramp[1:] + v_ramp[:-1]) * (t_ramp[1] - t_ramp[0]), axis=0)])

    def pos(t):
        late = p_ramp[-1] + np.einsum("ak,tak->ta", v_amp / w, np.cos(w * ramp + phase)
                                      - np.cos(w * np.maximum(t, ramp)[:, None, None] + phase))
        early = np.stack([np.interp(t, t_ramp, p_ramp[:, a]) for a in range(3)], axis=-1)
        return np.where((t < ramp)[:, None], early, late)

    # Orientation: yaw wanders by ~0.2 rad from 0, pitch/roll by ~0.05 rad (ZYX Euler angles).
    o_freq, o_phase = _sines(rng, 3, 2, 0.05, 0.4)
    o_w = 2 * np.pi * o_freq
    o_amp = rng.uniform(0.5, 1.0, (3, 2)) * np.array([[0.12], [0.03], [0.03]])
    # yaw(0) = 0 makes the world frame the initial heading (yaw is unobservable from an IMU);
    # the initial pitch/roll stay random since gravity reveals them.
    yaw0 = np.einsum("k,k->", o_amp[0], np.sin(o_phase[0]))

    def euler_and_rate(t):  # (n, 3) [yaw, pitch, roll] and their time derivatives
        arg = o_w * t[:, None, None] + o_phase
        e = np.einsum("ak,tak->ta", o_amp, np.sin(arg)) - np.array([yaw0, 0.0, 0.0])
        return e, np.einsum("ak,tak->ta", o_amp * o_w, np.cos(arg))

    e, de = euler_and_rate(t_imu)
    r = euler_zyx_matrix(e)  # body -> world
    _, acc = vel_and_acc(t_imu)
    f_body = np.einsum("tji,tj->ti", r, acc + np.array([0.0, 0.0, GRAVITY]))  # R^T (a - g)
    acce = f_body + rng.normal(0, 0.01, 3) + rng.normal(0, 0.05, f_body.shape)
    gyro = (body_rates_zyx(e, de) + rng.normal(0, 0.002, 3)
            + rng.normal(0, 0.004, f_body.shape))
    quat = Rotation.from_euler("ZYX", euler_and_rate(t_pose)[0]).as_quat()
    pose = np.concatenate([pos(t_pose), quat], axis=-1)
    return {"acce": (t_base + t_imu, acce, imu_hz), "gyro": (t_base + t_imu, gyro, imu_hz),
            "pose": (t_base + t_pose, pose, pose_hz)}


# Sensor grid of the tactile set: 5 x 2 magnetometers, positions in mm, z = 0.
_SENSORS_MM = np.array([[x, y, 0.0] for y in (-3.0, 3.0) for x in (-8.0, -4.0, 0.0, 4.0, 8.0)])
_MU0_4PI = 1e-7  # mu0 / (4 pi), T m / A


def dipole_field(sensors_m: np.ndarray, magnet_m: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """sensors_m: (S, 3)  magnet_m: (n, 3)  moment: (3,) A m^2 -> B: (n, S, 3) tesla.

    B = mu0 / (4 pi) (3 (m . r) r / |r|^5 - m / |r|^3), r = sensor - magnet.
    """
    r = sensors_m[None, :, :] - magnet_m[:, None, :]
    d = np.linalg.norm(r, axis=-1, keepdims=True)
    m_dot_r = np.einsum("nsc,c->ns", r, moment)[..., None]
    return _MU0_4PI * (3 * m_dot_r * r / d ** 5 - moment / d ** 3)


def _tactile_episode(rng: np.random.Generator, seconds: float, t_base: float) -> dict:
    """-> {m: (timestamps (S_m,), rows (S_m, D_m), rate)}: tactile (S, 30) microtesla at
    100 Hz, kinova (S', 7) [magnet xyz mm, identity quaternion] at 30 Hz."""
    tac_hz, kin_hz = 100, 30
    extra = 0.6
    t_tac = rng.uniform(0, 1 / tac_hz) + np.arange(int((seconds + extra) * tac_hz)) / tac_hz
    t_kin = rng.uniform(0, 1 / kin_hz) + np.arange(int((seconds + extra) * kin_hz)) / kin_hz
    # Writing-like xy motion (mm): 3 sinusoids per axis at 0.08-0.5 Hz, within the grid;
    # height 3-4 mm above the sensors varies with "pressure".
    freq, phase = _sines(rng, 3, 3, 0.08, 0.5)
    amp = rng.uniform(0.5, 1.0, (3, 3)) * np.array([[3.0], [1.6], [0.15]])
    centre = np.array([rng.uniform(-2, 2), rng.uniform(-1, 1), 3.5])

    def magnet_mm(t):
        return centre + np.einsum("ak,tak->ta", amp, np.sin(2 * np.pi * freq * t[:, None, None] + phase))

    tilt, azim = rng.uniform(0, 0.15), rng.uniform(0, 2 * np.pi)
    # |m| = 1.7e-4 A m^2: ~800 uT straight below at 3.5 mm, ~1200 uT at the closest 3.05 mm.
    moment = 1.7e-4 * np.array([np.sin(tilt) * np.cos(azim), np.sin(tilt) * np.sin(azim), np.cos(tilt)])
    b = dipole_field(_SENSORS_MM * 1e-3, magnet_mm(t_tac) * 1e-3, moment) * 1e6  # (n, 10, 3) uT
    b = b.reshape(len(t_tac), -1)
    ambient = rng.normal(0, 20.0, 30)  # geomagnetic + nearby iron, per episode
    drift = rng.normal(0, 8.0, 30) * (t_tac / seconds)[:, None]  # temperature-like slow drift
    tactile = b + ambient + drift + rng.normal(0, 1.5, b.shape)
    kin = magnet_mm(t_kin)
    kinova = np.concatenate([kin, np.tile([0.0, 0.0, 0.0, 1.0], (len(kin), 1))], axis=-1)
    return {"tactile": (t_base + t_tac, tactile, tac_hz), "kinova": (t_base + t_kin, kinova, kin_hz)}


_EPISODE_FNS = {"imu": _imu_episode, "tactile": _tactile_episode}


def write_synthetic(kind: str, path: str, seed: int = 0, n_episodes: int = DEFAULT_N_EPISODES,
                    episode_seconds: float = DEFAULT_EPISODE_SECONDS) -> str:
    """Writes a synthetic set in the raw CSP-Bench layout to `path` (atomically) -> path.

    kind: 'imu' or 'tactile'.  Deterministic in (kind, seed, n_episodes, episode_seconds).
    """
    if kind not in _EPISODE_FNS:
        raise ValueError(f"unknown synthetic {kind=}; allowed {list(KINDS)}")
    if int(n_episodes) < 2:
        raise ValueError(f"{n_episodes=} must be >= 2 (one training and one validation episode)")
    if float(episode_seconds) < 1:
        raise ValueError(f"{episode_seconds=} must be >= 1 (one whole second per episode)")
    if float(episode_seconds) != int(episode_seconds):
        raise ValueError(f"{episode_seconds=} must be a whole number of seconds (the loader "
                         f"floors episodes to whole seconds)")
    streams: dict[str, list] = {}
    for e in range(int(n_episodes)):
        rng = np.random.default_rng([int(seed), e])
        # Unix-like episode start times check that resampling works in relative time.
        ep = _EPISODE_FNS[kind](rng, float(episode_seconds), 1.7e9 + 1000.0 * e)
        for m, (ts, data, hz) in ep.items():
            streams.setdefault(m, []).append((ts, data, hz))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".h5.tmp", dir=directory)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for m, eps in streams.items():
                f.create_dataset(m, data=np.concatenate([d for _, d, _ in eps]).astype(np.float32))
                f.create_dataset(m + "_timestamps", data=np.concatenate([t for t, _, _ in eps]))
                f.create_dataset(m + "_episode_ids",
                                 data=np.concatenate([[0], np.cumsum([len(t) for t, _, _ in eps])]))
                f.create_dataset(m + "_frequency", data=float(eps[0][2]))
            f.attrs["generator"] = json.dumps(
                {"kind": kind, "seed": int(seed), "n_episodes": int(n_episodes),
                 "episode_seconds": float(episode_seconds), "version": GENERATOR_VERSION})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


DEFAULT_CACHE_DIR = "~/.cache/hiss_jax"


def cache_dir(data_cfg: Any = None) -> str:
    """config.data.cache_dir if set to another folder, else $HISS_JAX_CACHE, else the default.

    A config that spells out the default (~/.cache/hiss_jax) still yields to the env var, so
    CI and sandboxes can redirect every run without editing configs.
    """
    configured = getattr(data_cfg, "cache_dir", None) if data_cfg is not None else None
    if configured and configured != DEFAULT_CACHE_DIR:
        return os.path.expanduser(configured)
    return os.path.expanduser(os.environ.get("HISS_JAX_CACHE") or DEFAULT_CACHE_DIR)


def synthetic_path(kind: str, data_cfg: Any = None) -> str:
    """Cache path for a synthetic set; the name hashes every generator parameter."""
    params = _params(kind, data_cfg)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir(data_cfg), f"synthetic_{kind}_{key}_processed.h5")


def _params(kind: str, data_cfg: Any) -> dict:
    def get(field, default):
        v = getattr(data_cfg, field, None) if data_cfg is not None else None
        return default if v is None else v
    return {"kind": kind, "seed": int(get("seed", 0)),
            "n_episodes": int(get("n_episodes", DEFAULT_N_EPISODES)),
            "episode_seconds": float(get("episode_seconds", DEFAULT_EPISODE_SECONDS)),
            "version": GENERATOR_VERSION}


def ensure_synthetic(kind: str, data_cfg: Any = None) -> str:
    """-> path of the cached synthetic set, generating it on first use."""
    path = synthetic_path(kind, data_cfg)
    if not os.path.isfile(path):
        p = _params(kind, data_cfg)
        write_synthetic(kind, path, p["seed"], p["n_episodes"], p["episode_seconds"])
    return path
