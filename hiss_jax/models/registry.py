"""The registry: level kind -> Stack class, model type -> builder.  The ONLY place that dispatches
on `kind` / `type` strings (STYLE.md).

A level config (`configs/base.py:level_config`) carries `kind`, `d_model`, `n_layers`, `dropout`
and one sub-dict per family; `make_stack` passes exactly the chosen family's sub-dict to its Stack
(plus `scan_impl` for the Stacks that take one), so `--config.model.low.kind=lstm` needs no edit.
Every field of that sub-dict is a Stack field, e.g. `mamba.disc` -> `MambaStack.disc` and
`s4.disc` -> `S4Stack.disc` (discretisations: `hiss_jax.models.ssm_math`).

Model-wide settings reach every Stack the same way: `scan_impl` (config.kernels.impl) and `dtype`
(config.model.dtype, the compute dtype of activations and projections; `DTYPES`), each passed to
the Stacks that have the field.  Parameters stay float32 whatever `dtype` is.
"""
import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
from flax import linen as nn

from hiss_jax.models.hiss import FlatModel, HierarchicalModel, LevelModel, MultiBranchModel
from hiss_jax.models.lstm import LSTMStack
from hiss_jax.models.mamba import MambaStack
from hiss_jax.models.mamba2 import Mamba2Stack
from hiss_jax.models.s4 import S4_SSM_PARAM_NAMES, S4Stack
from hiss_jax.models.transformer import TransformerStack

STACKS = {
    "s4": S4Stack,
    "mamba": MambaStack,
    "mamba2": Mamba2Stack,
    "lstm": LSTMStack,
    "transformer": TransformerStack,
}

# Leaf names of SSM dynamics parameters: own learning rate, no weight decay (STYLE.md, Training).
MAMBA_SSM_PARAM_NAMES = ("A_log", "dt_bias", "D")
SSM_PARAM_NAMES = tuple(dict.fromkeys(MAMBA_SSM_PARAM_NAMES + tuple(S4_SSM_PARAM_NAMES)))

# config.model.dtype -> compute dtype; 'float32' (the default) reproduces the float32-only models.
DTYPES = ("float32", "bfloat16")


def compute_dtype(name: str) -> jnp.dtype:
    """'float32' | 'bfloat16' -> the jnp dtype the modules compute activations in."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not a known compute dtype; allowed: "
                         f"{list(DTYPES)}")
    return jnp.dtype(name)


def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    return dict(cfg.to_dict()) if hasattr(cfg, "to_dict") else dict(cfg)


def make_stack(level_cfg, scan_impl: str = "auto", dtype: str = "float32") -> nn.Module:
    """Level config -> unbound Stack module (x (B, L, d_model) -> (B, L, d_model)), computing in
    `dtype` (config.model.dtype)."""
    kind = level_cfg["kind"]
    if kind not in STACKS:
        raise ValueError(f"unknown level kind {kind!r}; allowed kinds: {sorted(STACKS)}")
    cls = STACKS[kind]
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    sub = _as_dict(level_cfg.get(kind))
    unknown = sorted(set(sub) - fields)
    if unknown:
        raise ValueError(f"level.{kind} has settings {unknown} that {cls.__name__} does not take; "
                         f"its fields are {sorted(fields)}")
    # Model-wide settings reach every Stack from one place each; a per-level copy would be
    # silently overridden.
    model_wide = {"dtype": "config.model.dtype", "scan_impl": "config.kernels.impl"}
    clash = sorted(set(sub) & set(model_wide))
    if clash:
        key = clash[0]
        raise ValueError(f"level.{kind}.{key}={sub[key]!r} is a model-wide setting: set "
                         f"{model_wide[key]} instead and remove level.{kind}.{key}")
    kwargs = dict(d_model=int(level_cfg["d_model"]), n_layers=int(level_cfg["n_layers"]),
                  dropout=float(level_cfg["dropout"]), **sub)
    if "scan_impl" in fields:
        kwargs["scan_impl"] = scan_impl
    if "dtype" in fields:
        kwargs["dtype"] = compute_dtype(dtype)
    return cls(**kwargs)


def _build_hiss(model_cfg, input_dim: int, output_dim: int, scan_impl: str,
                dtype: str) -> nn.Module:
    del input_dim  # the low level's embed infers it
    d_high = int(model_cfg.high.d_model)
    low = LevelModel(stack=make_stack(model_cfg.low, scan_impl, dtype),
                     embed_features=int(model_cfg.low.d_model), out_features=d_high,
                     dtype=compute_dtype(dtype))
    return HierarchicalModel(low=low, high=make_stack(model_cfg.high, scan_impl, dtype),
                             chunk_size=int(model_cfg.chunk_size), output_dim=output_dim)


def _build_flat(model_cfg, input_dim: int, output_dim: int, scan_impl: str,
                dtype: str) -> nn.Module:
    del input_dim
    # The out Dense is the flat model's head: float32 predictions.
    level = LevelModel(stack=make_stack(model_cfg.flat, scan_impl, dtype),
                       embed_features=int(model_cfg.flat.d_model), out_features=output_dim,
                       dtype=compute_dtype(dtype), out_dtype=jnp.dtype(jnp.float32))
    return FlatModel(level=level, chunk_size=int(model_cfg.chunk_size))


def branch_ranges(branches: Mapping[str, Any], input_dim: int):
    """name -> [start, stop) mapping -> ((name, start, stop), ...) ordered by start, validated."""
    out = []
    for name, rng in _as_dict(branches).items():
        if len(rng) != 2:
            raise ValueError(f"branch {name!r}: expected [start, stop), got {rng!r}")
        start, stop = int(rng[0]), int(rng[1])
        if not 0 <= start < stop <= input_dim:
            raise ValueError(f"branch {name!r}: channel range [{start}, {stop}) does not lie "
                             f"inside the {input_dim} input channels; fix model.branches.{name}")
        out.append((name, start, stop))
    if not out:
        raise ValueError("model.type='multibranch' needs model.branches (name -> [start, stop))")
    return tuple(sorted(out, key=lambda b: (b[1], b[0])))


def _build_multibranch(model_cfg, input_dim: int, output_dim: int, scan_impl: str,
                       dtype: str) -> nn.Module:
    branches = branch_ranges(model_cfg.branches, input_dim)
    d_high = int(model_cfg.high.d_model)
    # One low model per branch, each with its own parameters (same low config).
    lows = tuple(LevelModel(stack=make_stack(model_cfg.low, scan_impl, dtype),
                            embed_features=int(model_cfg.low.d_model), out_features=d_high,
                            dtype=compute_dtype(dtype))
                 for _ in branches)
    return MultiBranchModel(branches=branches, lows=lows,
                            high=make_stack(model_cfg.high, scan_impl, dtype),
                            chunk_size=int(model_cfg.chunk_size), d_high=d_high,
                            output_dim=output_dim, dtype=compute_dtype(dtype))


MODEL_BUILDERS = {"hiss": _build_hiss, "flat": _build_flat, "multibranch": _build_multibranch}


def build_model(model_cfg, *, input_dim: int, output_dim: int,
                scan_impl: str = "auto") -> nn.Module:
    """config.model -> unbound linen model.  x (B, L, input_dim), L a multiple of chunk_size ->
    y (B, L // chunk_size, output_dim) float32.  Dropout rng name: 'dropout'.  model.dtype
    ('float32' when absent) is the compute dtype of the activations (`DTYPES`)."""
    model_type = model_cfg["type"]
    if model_type not in MODEL_BUILDERS:
        raise ValueError(f"unknown model.type {model_type!r}; allowed: {sorted(MODEL_BUILDERS)}")
    dtype = model_cfg.get("dtype", "float32")
    compute_dtype(dtype)  # fails early, naming the value and the allowed ones
    return MODEL_BUILDERS[model_type](model_cfg, int(input_dim), int(output_dim), scan_impl,
                                      dtype)
