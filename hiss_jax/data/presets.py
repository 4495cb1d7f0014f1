"""Per-dataset rules for CSP-Bench and the synthetic sensor sets.

Shapes: one episode's resampled modalities `arrays[m]: (L, D_m)` at the input rate (50 Hz) or
`(T, D_m)` at the target rate (5 Hz), L = chunk_size * T.  `make_input(arrays) -> (L, D_raw)`,
`make_target(arrays) -> (T, D_out)`; statistics rules take the stacked valid training rows
`(N, D)` and return `(mean (D,), std (D,))`.

Sources: the paper (arXiv 2402.10211, Sec. 4 and App. B) and the official per-dataset task
files of raunaqbhirangi/hiss (hiss/tasks/*.py, conf/dataset/*.yaml, conf/data_env/*.yaml),
read for modality keys, file names and normalisation rules; the code here is our own.

Choices where the official pipeline is silent or not reproducible without torch (each is
documented again on the preset it touches):
  * Statistics come from the TRAINING split only.  The official code computes them on the
    whole file before splitting (train + val); the paper's protocol and ours use train only.
  * Statistics are computed after clipping to +-3000 (the official code clips the padded
    tensor but takes statistics before clipping); they differ only where clipping bites.
  * Standard deviations use ddof=1 (torch.std default) and are floored at 1e-5, range-based
    scales as well (the official code leaves those unfloored; a constant column would divide
    by zero).
  * The random 80/20 split uses numpy.random.default_rng(0).permutation; torch's
    random_split(generator=manual_seed(0)) order cannot be reproduced without torch, so the
    episode membership of our random split differs from the official one.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Optional

import numpy as np
from scipy.spatial.transform import Rotation

Arrays = Mapping[str, np.ndarray]
StatsRule = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]

MIN_STD = 1e-5  # floor on every scale, as in the official Task.compute_*_shift_scale


# ------------------------------------------------------------------------------------------
# Normalisation rules: (N, D) stacked valid training rows -> (mean (D,), std (D,)).
# ------------------------------------------------------------------------------------------
def mean_std(rows: np.ndarray, *, scale: float = 1.0, tie: Optional[tuple[int, int]] = None,
             zero_mean: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """rows: (N, D) -> mean, std: (D,).  std = max(std_ddof1, 1e-5) * scale.

    `tie=(i, j)` copies std[j] into std[i] (Intrinsic Slip: std_z = std_x); `zero_mean` forces
    the mean to 0 (Intrinsic Slip targets).
    """
    mean = np.zeros(rows.shape[1]) if zero_mean else rows.mean(axis=0)
    std = np.maximum(rows.std(axis=0, ddof=1) if len(rows) > 1 else np.zeros(rows.shape[1]),
                     MIN_STD)
    if tie is not None:
        std[tie[0]] = std[tie[1]]
    return mean, std * scale


def zero_range(rows: np.ndarray, *, divisor: float = 1.0,
               unit_cols: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, np.ndarray]:
    """rows: (N, D) -> mean 0, std (max - min) / divisor: (D,).

    `unit_cols=(a, b)` sets std[a:b] = 1 (TotalCapture: rotation columns and the first 39
    delta columns of the 234-wide input, exactly the official slice 39:156).
    """
    std = np.maximum((rows.max(axis=0) - rows.min(axis=0)) / divisor, MIN_STD)
    if unit_cols is not None:
        std[unit_cols[0]:unit_cols[1]] = 1.0
    return np.zeros(rows.shape[1]), std


def fixed(rows: np.ndarray, *, mean: float, std: float) -> tuple[np.ndarray, np.ndarray]:
    """rows: (N, D) -> constant mean and std (Joystick: 0 and 1000)."""
    d = rows.shape[1]
    return np.full(d, float(mean)), np.full(d, float(std))


# ------------------------------------------------------------------------------------------
# Input / target extraction per dataset.
# ------------------------------------------------------------------------------------------
def concat(keys: tuple[str, ...], arrays: Arrays) -> np.ndarray:
    """arrays[k]: (L, D_k) -> (L, sum D_k), in the order of `keys`."""
    return np.concatenate([np.asarray(arrays[k], np.float64) for k in keys], axis=-1)


def columns(key: str, cols: slice, arrays: Arrays) -> np.ndarray:
    return np.asarray(arrays[key], np.float64)[:, cols]


def clipped(key: str, bound: float, arrays: Arrays) -> np.ndarray:
    # Joystick: Xela readings saturate; the official task clips them before the deltas.
    return np.clip(np.asarray(arrays[key], np.float64), -bound, bound)


def slip_pose(arrays: Arrays) -> np.ndarray:
    """kinova: (T, 7) [xyz, quat xyzw] -> (T, 3) [x - x0, z - z0, theta_y of R_t R_0^T].

    Intrinsic Slip target before the deltas: position relative to the first frame (in the
    world frame, as the official code) and the y component of the rotation vector of the
    orientation relative to the first frame.
    """
    pose = np.asarray(arrays["kinova"], np.float64)
    if pose.shape[1] < 7:
        raise ValueError(f"intrinsic slip needs kinova rows of [xyz, quaternion] (7 columns), "
                         f"got {pose.shape[1]=}")
    rot = Rotation.from_quat(pose[:, 3:7])
    rel = rot * rot[0].inv()
    rel_pos = pose[:, :3] - pose[:1, :3]
    return np.stack([rel_pos[:, 0], rel_pos[:, 2], rel.as_rotvec()[:, 1]], axis=-1)


TC_SENSORS = ("Head", "Sternum", "Pelvis", "L_UpArm", "R_UpArm", "L_LowArm", "R_LowArm",
              "L_UpLeg", "R_UpLeg", "L_LowLeg", "R_LowLeg", "L_Foot", "R_Foot")
TC_JOINTS = ("Hips", "Spine", "Spine1", "Spine2", "Spine3", "Neck", "Head", "RightShoulder",
             "RightArm", "RightForeArm", "RightHand", "LeftShoulder", "LeftArm",
             "LeftForeArm", "LeftHand", "RightUpLeg", "RightLeg", "RightFoot", "LeftUpLeg",
             "LeftLeg", "LeftFoot")


def totalcapture_input(arrays: Arrays) -> np.ndarray:
    """13 x acce (L, 3) and 13 x rot quaternion (L, 4) -> (L, 39 + 78 = 117).

    Rotation columns are the first two columns of each rotation matrix, row-major
    [R00, R01, R10, R11, R20, R21], as in the official task.  Quaternions were linearly
    interpolated by the resampling step; from_quat renormalises them.
    """
    acc = [np.asarray(arrays[f"acce_global_frame_{s}"], np.float64) for s in TC_SENSORS]
    rot = []
    for s in TC_SENSORS:
        q = np.asarray(arrays[f"rot_global_frame_{s}"], np.float64)
        rot.append(Rotation.from_quat(q).as_matrix()[:, :, :2].reshape(len(q), 6))
    return np.concatenate(acc + rot, axis=-1)


def totalcapture_target(arrays: Arrays) -> np.ndarray:
    """21 x pose (T, >=3) -> (T, 63) joint positions."""
    return np.concatenate([np.asarray(arrays[f"pose_{j}"], np.float64)[:, :3]
                           for j in TC_JOINTS], axis=-1)


# ------------------------------------------------------------------------------------------
# The preset record.
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Preset:
    """How one dataset becomes (inputs (L, D_in), targets (T, D_out)) sequences.

    Files: `<data.dir>/<folder>/<folder>_<resampled_suffix>.h5` (already at 50/5 Hz) or, if
    absent, `<data.dir>/<folder>/<folder>_<raw_suffix>.h5` (resampled on load).  A fixed split
    reads its validation episodes from the `val_*` file the same way.
    """
    name: str                              # config.data.name
    input_keys: tuple[str, ...]            # modalities resampled to input_hz
    target_keys: tuple[str, ...]           # modalities resampled to target_hz
    make_input: Callable[[Arrays], np.ndarray]   # episode -> (L, D_raw) before deltas
    make_target: Callable[[Arrays], np.ndarray]  # episode -> (T, D_out) before delta/relative
    target_mode: str                       # 'delta' (t - (t-1), zero first row) | 'relative' (minus first) | 'absolute'
    input_stats: StatsRule                 # applied to (inputs + deltas, clipped)
    target_stats: StatsRule
    split: str                             # 'sequential' | 'random' | 'fixed'
    target_names: tuple[str, ...]
    folder: str = ""                       # dataset folder under data.dir (and file stem)
    resampled_suffix: str = ""
    raw_suffix: str = "processed"
    val_folder: str = ""                   # fixed split only
    val_resampled_suffix: str = ""
    val_raw_suffix: str = ""
    max_seconds: Optional[float] = None    # cap on aligned episode length (RoNIN: 240 s)
    augment: Optional[str] = None          # 'yaw': random rotation about z of train batches
    synthetic: Optional[str] = None        # generator kind for 'synthetic:*' presets
    input_hz: int = 50
    target_hz: int = 5
    train_frac: float = 0.8
    split_seed: int = 0
    clip: float = 3000.0                   # after appending input deltas
    notes: str = ""                        # dataset-specific choices

    @property
    def chunk_size(self) -> int:
        return self.input_hz // self.target_hz

    def __post_init__(self):
        if self.input_hz % self.target_hz:
            raise ValueError(f"{self.input_hz=} is not a multiple of {self.target_hz=}")
        if self.target_mode not in ("delta", "relative", "absolute"):
            raise ValueError(f"{self.target_mode=} must be 'delta', 'relative' or 'absolute'")
        if self.split not in ("sequential", "random", "fixed"):
            raise ValueError(f"{self.split=} must be 'sequential', 'random' or 'fixed'")
        if self.split == "fixed" and not self.val_folder:
            raise ValueError(f"preset {self.name!r}: a fixed split needs val_folder")


_p = functools.partial

PRESETS: dict[str, Preset] = {}


def _register(p: Preset) -> Preset:
    PRESETS[p.name] = p
    return p


_register(Preset(
    name="csp:marker_writing",
    folder="marker_writing_hiss_dataset", resampled_suffix="rs50kn5",
    input_keys=("tactile",), target_keys=("kinova",),
    make_input=_p(concat, ("tactile",)), make_target=_p(columns, "kinova", slice(0, 2)),
    target_mode="delta", input_stats=_p(mean_std, scale=3.0), target_stats=mean_std,
    split="sequential", target_names=("dx", "dy"),
    notes="ReSkin 30 -> 60; kinova[:, :2] position deltas; input std x3."))

_register(Preset(
    name="csp:intrinsic_slip",
    folder="intrinsic_slip_hiss_dataset", resampled_suffix="rs50kn5",
    input_keys=("tactile",), target_keys=("kinova",),
    make_input=_p(concat, ("tactile",)), make_target=slip_pose,
    target_mode="delta", input_stats=_p(zero_range, divisor=5.0),
    target_stats=_p(mean_std, tie=(1, 0), zero_mean=True),
    split="random", target_names=("dx", "dz", "dtheta_y"),
    notes="(x, z, theta_y) relative to the first frame, then deltas; input mean 0 std "
          "(max-min)/5; target mean 0, std_z := std_x; random split by numpy rng(0)."))

_register(Preset(
    name="csp:joystick",
    folder="joystick_control_hiss_dataset", resampled_suffix="x50e5",
    input_keys=("xela",), target_keys=("extreme3d",),
    make_input=_p(clipped, "xela", 1000.0), make_target=_p(columns, "extreme3d", slice(0, 3)),
    target_mode="relative", input_stats=_p(fixed, mean=0.0, std=1000.0),
    target_stats=_p(mean_std, scale=2.0),
    split="random", target_names=("axis0", "axis1", "axis2"),
    notes="Xela clipped +-1000 before deltas; target axes[:3] minus first value (not deltas); "
          "input mean 0 std 1000; target std x2; random split by numpy rng(0)."))

_register(Preset(
    name="csp:ronin",
    folder="ronin", resampled_suffix="i50o5", raw_suffix="processed_train",
    val_folder="ronin", val_resampled_suffix="i50o5_test", val_raw_suffix="processed_test",
    input_keys=("acce", "gyro"), target_keys=("tango_pose",),
    make_input=_p(concat, ("acce", "gyro")), make_target=_p(columns, "tango_pose", slice(0, 2)),
    target_mode="delta", input_stats=_p(mean_std, scale=3.0), target_stats=mean_std,
    split="fixed", target_names=("dx", "dy"), max_seconds=240.0, augment="yaw",
    notes="global-frame acc+gyro 6 -> 12; tango xy deltas; input std x3; episodes capped at "
          "240 s; random yaw about z on train batches (augment_batch), validation untouched."))

_register(Preset(
    name="csp:vector",
    folder="vector", resampled_suffix="imu50p5",
    input_keys=("acce", "gyro"), target_keys=("pose",),
    make_input=_p(concat, ("acce", "gyro")), make_target=_p(columns, "pose", slice(0, 3)),
    target_mode="delta", input_stats=_p(zero_range, divisor=5.0), target_stats=mean_std,
    split="sequential", target_names=("dx", "dy", "dz"),
    notes="IMU 6 -> 12; pose[:, :3] position deltas; input mean 0 std (max-min)/5."))

_register(Preset(
    name="csp:totalcapture",
    folder="total_capture", resampled_suffix="imu50p5",
    val_folder="total_capture_test", val_resampled_suffix="imu50p5", val_raw_suffix="processed",
    input_keys=tuple(f"{k}_global_frame_{s}" for s in TC_SENSORS for k in ("acce", "rot")),
    target_keys=tuple(f"pose_{j}" for j in TC_JOINTS),
    make_input=totalcapture_input, make_target=totalcapture_target,
    target_mode="delta", input_stats=_p(zero_range, divisor=1.0, unit_cols=(39, 156)),
    target_stats=_p(mean_std, scale=3.0),
    split="fixed", target_names=tuple(f"{j}_d{a}" for j in TC_JOINTS for a in "xyz"),
    notes="13 IMUs x (3 acc + 6 rotation-matrix entries) = 117 -> 234; 21 joints x 3 deltas; "
          "input mean 0 std max-min with columns 39:156 std 1 (official slice); target std x3."))

# Synthetic sets mirror a CSP-Bench dataset's keys and rules so the same loader serves them.
_register(dataclasses.replace(
    PRESETS["csp:vector"], name="synthetic:imu", folder="", resampled_suffix="",
    synthetic="imu", input_stats=mean_std,
    notes="mirrors VECtor's keys and targets: acce+gyro 6 -> 12, pose xyz deltas 3, sequential "
          "80/20; the default rule (train mean / std) instead of VECtor's (max-min)/5, which "
          "would leave gravity as a +14 constant on normalised acce z.  Built into the cache "
          "by synthetic.write_synthetic."))

_register(dataclasses.replace(
    PRESETS["csp:marker_writing"], name="synthetic:tactile", folder="", resampled_suffix="",
    synthetic="tactile", input_stats=mean_std,
    notes="mirrors Marker Writing's keys and targets: 10 magnetometers x 3 axes = 30 -> 60, "
          "magnet xy deltas 2, sequential 80/20; the default rule (train mean / std, not x3) "
          "like synthetic:imu.  Built into the cache by synthetic.write_synthetic."))


def get_preset(name: str) -> Preset:
    """Looks a preset up by config.data.name, with an error listing the allowed names."""
    if name not in PRESETS:
        raise ValueError(f"unknown dataset {name=}; set config.data.name to one of "
                         f"{sorted(PRESETS)}")
    return PRESETS[name]
