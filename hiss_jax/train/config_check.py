"""Start-up validation of a config: an impossible value fails naming the key, the value, the fix.

Unknown keys (`--config.model.low.foo=1`) are already rejected by ml_collections when the flags
are parsed, with a bare AttributeError; `train.py` rewords it (see `explain_flag_error`).
"""
from __future__ import annotations

import ml_collections

FAMILIES = ("s4", "mamba", "mamba2", "lstm", "transformer")
MODEL_TYPES = ("hiss", "flat", "multibranch")
IMPLS = ("auto", "ref", "xla", "pallas")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
S4_MODES = ("dplr", "diag")
S4_DISCS = ("bilinear", "zoh", "approx_zoh")
MAMBA_DISCS = ("approx_zoh", "zoh", "bilinear")
DTYPES = ("float32", "bfloat16")  # config.model.dtype (hiss_jax.models.registry.DTYPES)
# Used when hiss_jax.data cannot be imported.
_DEFAULT_DATASETS = ("synthetic:imu", "synthetic:tactile", "csp:marker_writing",
                     "csp:intrinsic_slip", "csp:joystick", "csp:ronin", "csp:vector",
                     "csp:totalcapture")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


def dataset_names() -> tuple[str, ...]:
    try:
        from hiss_jax.data import PRESETS
    except ImportError:
        return _DEFAULT_DATASETS
    return tuple(sorted(PRESETS))


def _one_of(key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"config.{key}={value!r} is not allowed; use one of {list(allowed)}")


def _positive_int(key, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config.{key}={value!r} must be a positive integer")


def _check_level(key: str, lvl) -> None:
    _one_of(f"{key}.kind", lvl.kind, FAMILIES)
    _positive_int(f"{key}.d_model", lvl.d_model)
    _positive_int(f"{key}.n_layers", lvl.n_layers)
    if not 0.0 <= lvl.dropout < 1.0:
        raise ConfigError(f"config.{key}.dropout={lvl.dropout!r} must be in [0, 1)")
    if lvl.kind == "transformer":
        _positive_int(f"{key}.transformer.n_heads", lvl.transformer.n_heads)
        _positive_int(f"{key}.transformer.d_ff", lvl.transformer.d_ff)
        if lvl.d_model % lvl.transformer.n_heads:
            raise ConfigError(
                f"config.{key}.d_model={lvl.d_model} is not divisible by "
                f"config.{key}.transformer.n_heads={lvl.transformer.n_heads}; pick n_heads among "
                f"{[h for h in range(1, lvl.d_model + 1) if lvl.d_model % h == 0]}")
    elif lvl.kind == "s4":
        _one_of(f"{key}.s4.mode", lvl.s4.mode, S4_MODES)
        _one_of(f"{key}.s4.disc", lvl.s4.disc, S4_DISCS)
        _positive_int(f"{key}.s4.d_state", lvl.s4.d_state)
        if lvl.s4.d_state % 2:
            raise ConfigError(f"config.{key}.s4.d_state={lvl.s4.d_state} must be even "
                              "(the state is stored as conjugate pairs)")
        if not 0 < lvl.s4.dt_min <= lvl.s4.dt_max:
            raise ConfigError(f"config.{key}.s4.dt_min={lvl.s4.dt_min} and dt_max={lvl.s4.dt_max} "
                              "must satisfy 0 < dt_min <= dt_max")
    elif lvl.kind == "mamba":
        _one_of(f"{key}.mamba.disc", lvl.mamba.disc, MAMBA_DISCS)
        for f in ("d_state", "d_conv", "expand"):
            _positive_int(f"{key}.mamba.{f}", lvl.mamba[f])
        if lvl.mamba.dt_rank < 0:
            raise ConfigError(f"config.{key}.mamba.dt_rank={lvl.mamba.dt_rank} must be >= 0 "
                              "(0 = ceil(d_model / 16))")
        if not 0 < lvl.mamba.dt_min <= lvl.mamba.dt_max:
            raise ConfigError(f"config.{key}.mamba.dt_min={lvl.mamba.dt_min} and "
                              f"dt_max={lvl.mamba.dt_max} must satisfy 0 < dt_min <= dt_max")
    elif lvl.kind == "mamba2":
        m = lvl.mamba2
        for f in ("d_state", "d_conv", "expand", "headdim", "n_groups", "chunk_size"):
            _positive_int(f"{key}.mamba2.{f}", m[f])
        d_inner = m.expand * lvl.d_model
        # headdim is a cap (hiss_jax.models.mamba2.pick_headdim): the largest divisor of d_inner
        # that is <= headdim
        head = max(p for p in range(1, min(m.headdim, d_inner) + 1) if d_inner % p == 0)
        n_heads = d_inner // head
        if n_heads % m.n_groups:
            raise ConfigError(
                f"config.{key}.mamba2.n_groups={m.n_groups} must divide the number of heads "
                f"{n_heads} (d_inner {d_inner} / head dim {head}); use one of "
                f"{[g for g in range(1, n_heads + 1) if n_heads % g == 0]}")


def mesh_shape(config, n_devices: int) -> tuple[int, int]:
    """(data, model) sizes of the device mesh; -1 on one axis takes the remaining devices."""
    data, model = int(config.mesh.data), int(config.mesh.model)
    if data == -1 and model == -1:
        raise ConfigError("config.mesh.data and config.mesh.model cannot both be -1")
    if model == -1:
        model = n_devices // data if data > 0 and n_devices % data == 0 else 0
    if data == -1:
        data = n_devices // model if model > 0 and n_devices % model == 0 else 0
    if data <= 0 or model <= 0 or data * model != n_devices:
        raise ConfigError(
            f"config.mesh.data={config.mesh.data} x config.mesh.model={config.mesh.model} does "
            f"not match the {n_devices} available devices; set data * model = {n_devices} "
            "(e.g. --config.mesh.data=-1 --config.mesh.model=1)")
    return data, model


def check_config(config: ml_collections.ConfigDict, n_devices: int) -> None:
    """Raises ConfigError for the first impossible value."""
    m = config.model
    _one_of("model.type", m.type, MODEL_TYPES)
    _positive_int("model.chunk_size", m.chunk_size)
    _one_of("model.dtype", m.get("dtype", "float32"), DTYPES)
    levels = ("flat",) if m.type == "flat" else ("low", "high")
    for name in levels:
        _check_level(f"model.{name}", m[name])
    if m.type == "multibranch":
        if not m.branches:
            raise ConfigError("config.model.type='multibranch' needs config.model.branches "
                              "(name -> [start, stop) input channels), e.g. {'skin': [0, 30]}")
        for name, rng in m.branches.items():
            if len(rng) != 2 or not 0 <= rng[0] < rng[1]:
                raise ConfigError(f"config.model.branches.{name}={rng!r} must be [start, stop) "
                                  "with 0 <= start < stop")

    names = dataset_names()
    _one_of("data.name", config.data.name, names)
    if config.data.name.startswith("csp:") and not (config.data.dir or config.data.get("file")):
        raise ConfigError(f"config.data.name={config.data.name!r} reads CSP-Bench files: set "
                          "--config.data.dir=/path/to/csp (the folder holding <name>/<name>_*.h5) "
                          "or --config.data.file=/path/to/file.h5")

    _one_of("kernels.impl", config.kernels.impl, IMPLS)

    o = config.optim
    _one_of("optim.name", o.name, OPTIMIZERS)
    _one_of("optim.schedule", o.schedule, SCHEDULES)
    if not o.lr > 0:
        raise ConfigError(f"config.optim.lr={o.lr!r} must be > 0")
    for f in ("ssm_lr", "weight_decay", "clip_norm", "warmup_steps", "end_lr_ratio"):
        if o[f] < 0:
            raise ConfigError(f"config.optim.{f}={o[f]!r} must be >= 0")
    if o.weight_decay > 0 and o.name != "adamw":
        raise ConfigError(f"config.optim.weight_decay={o.weight_decay} needs "
                          "config.optim.name='adamw' (Adam has no decoupled weight decay)")

    t = config.train
    data_size, _ = mesh_shape(config, n_devices)
    for f in ("batch_size", "eval_batch_size"):
        _positive_int(f"train.{f}", t[f])
        if t[f] % data_size:
            raise ConfigError(
                f"config.train.{f}={t[f]} is not divisible by the data-axis size {data_size} "
                f"(config.mesh.data={config.mesh.data} on {n_devices} devices); use a multiple "
                f"of {data_size}")
    if t.num_steps < 0 or t.num_epochs < 0 or (t.num_steps == 0 and t.num_epochs <= 0):
        raise ConfigError(f"config.train.num_steps={t.num_steps} / num_epochs={t.num_epochs}: "
                          "set num_steps > 0, or num_steps = 0 and num_epochs > 0")
    for f in ("window", "eval_every", "checkpoint_every", "plot_episodes"):
        if t[f] < 0:
            raise ConfigError(f"config.train.{f}={t[f]} must be >= 0")
    _positive_int("train.log_every", t.log_every)
    _positive_int("train.max_to_keep", t.max_to_keep)
    for rule in config.mesh.rules:
        if len(rule) != 2 or rule[1] not in (None, "data", "model"):
            raise ConfigError(f"config.mesh.rules entry {rule!r} must be (logical_name, mesh_axis) "
                              "with mesh_axis in ['data', 'model', None]")


def check_against_data(config, info) -> None:
    """Checks that need the dataset: chunk size and multibranch channel ranges."""
    if config.model.chunk_size != info.chunk_size:
        raise ConfigError(
            f"config.model.chunk_size={config.model.chunk_size} differs from the dataset's "
            f"frequency ratio {info.chunk_size} ({info.name}); set "
            f"--config.model.chunk_size={info.chunk_size}")
    if config.model.type == "multibranch":
        for name, (start, stop) in config.model.branches.items():
            if stop > info.input_dim:
                raise ConfigError(f"config.model.branches.{name}=[{start}, {stop}) exceeds the "
                                  f"{info.input_dim} input channels of {info.name}")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """'configs/mamba2.py:flat,tiny' -> that file's get_config('flat,tiny') (as config_flags)."""
    import importlib.util
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_hiss_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def explain_flag_error(error, argv) -> str | None:
    """Names the unknown key of a `--config.a.b=v` override and the keys allowed there.

    ml_collections rejects an unknown override with a bare AttributeError("'b'") raised out of
    flag parsing; returns None when no override in argv explains it (the caller re-raises).
    """
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    try:
        config = load_config_file(spec or "configs/mamba2.py")
    except Exception:  # the config file itself is broken: let the original error through
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node = config
        for i, part in enumerate(path):
            if isinstance(node, ml_collections.ConfigDict) and part in node:
                node = node[part]
                continue
            parent = "config" + "".join("." + p for p in path[:i])
            allowed = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            return (f"Unknown config key in {arg!r} ({error!r}): {parent} has no field {part!r}. "
                    f"Allowed fields of {parent}: {allowed}.")
    return None
