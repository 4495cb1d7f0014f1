"""Opt-in mixed precision: config.model.dtype = 'bfloat16' (activations and projections in bf16;
parameters, norms' statistics, softmax, residual streams, scan / LSTM / S4 states and the head in
float32), and the default 'float32' reproducing the float32-only models bit for bit.

Every flat family and three HiSS pairs (five families between them) are checked: parameters
float32 with the float32 model's tree, output float32 and finite, output and gradients within the
bf16 row of the tolerance table of the float32 model on the same parameters; 'float32' and a
config without the field equal, exactly, the model built from the modules' defaults (dtype None,
the code path that predates the setting).  Streaming in bf16 (Mamba, Mamba2) tracks the parallel
bf16 forward.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from hiss_jax.models import FlatModel, HierarchicalModel, LevelModel, build_model, make_stack
from hiss_jax.streaming import stream
from hiss_jax.train.config_check import ConfigError, check_config
from tests.conftest import assert_close
from tests.models.test_hiss import D_IN, D_OUT, FAMILIES, K, T, _inputs, tiny_model_cfg

CASES = ([("flat", {"flat": kind}) for kind in FAMILIES]
         + [("hiss", {"low": "s4", "high": "mamba2"}),
            ("hiss", {"low": "lstm", "high": "transformer"}),
            ("hiss", {"low": "mamba", "high": "mamba"})])
IDS = [f"{t}-" + "-".join(levels.values()) for t, levels in CASES]


@pytest.fixture(autouse=True)
def _ieee_float32_matmuls():
    """The float32 reference must be IEEE float32 (GPUs default to TF32) for the bf16 error to
    be the bf16 error."""
    with jax.default_matmul_precision("highest"):
        yield


def _cfg(model_type, levels, dtype=None):
    cfg = tiny_model_cfg(model_type, **levels)
    if dtype is not None:
        cfg.dtype = dtype
    return cfg


def _module_defaults(cfg):
    """The model as built before config.model.dtype existed: every module at its default
    dtype (None: compute in the input's dtype, float32 here)."""
    def stack(level):
        return make_stack(level).clone(dtype=None)
    if cfg.type == "flat":
        level = LevelModel(stack=stack(cfg.flat), embed_features=cfg.flat.d_model,
                           out_features=D_OUT)
        return FlatModel(level=level, chunk_size=K)
    low = LevelModel(stack=stack(cfg.low), embed_features=cfg.low.d_model,
                     out_features=cfg.high.d_model)
    return HierarchicalModel(low=low, high=stack(cfg.high), chunk_size=K, output_dim=D_OUT)


def _forward_and_grad(model, params, x):
    """-> (y, d mean(y^2) / d params), jitted."""
    def run(p):
        y, pull = jax.vjp(lambda q: model.apply(q, x), p)
        return y, pull(2 * y / y.size)[0]
    return jax.jit(run)(params)


def _flat_leaves(tree):
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])


def _assert_finite(tree, what):
    for leaf in jax.tree_util.tree_leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), f"{what}: NaN or inf"


def _assert_equal(a, b, what):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), what
    for u, v in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=what)


@pytest.mark.parametrize("model_type,levels", CASES, ids=IDS)
def test_bfloat16_tracks_float32_and_float32_is_unchanged(model_type, levels):
    x = _inputs()
    key = jax.random.PRNGKey(1)
    reference = _module_defaults(_cfg(model_type, levels))
    params = jax.jit(reference.init)(key, x)
    y_ref, g_ref = _forward_and_grad(reference, params, x)

    # The default: no field and 'float32' both give exactly the pre-existing model.
    for dtype in (None, "float32"):
        model = build_model(_cfg(model_type, levels, dtype), input_dim=D_IN, output_dim=D_OUT)
        y, g = _forward_and_grad(model, params, x)
        _assert_equal(y, y_ref, f"model.dtype={dtype!r} output vs the float32 model")
        _assert_equal(g, g_ref, f"model.dtype={dtype!r} gradients vs the float32 model")

    bf16 = build_model(_cfg(model_type, levels, "bfloat16"), input_dim=D_IN, output_dim=D_OUT)
    # Parameters stay float32, in the float32 model's tree (checkpoints load either way).
    shapes = jax.eval_shape(bf16.init, key, x)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
    for s, p in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(params)):
        assert s.dtype == jnp.float32 and s.shape == p.shape

    y16, g16 = _forward_and_grad(bf16, params, x)
    assert y16.dtype == jnp.float32 and y16.shape == (4, T, D_OUT)
    _assert_finite(y16, "bf16 output")
    _assert_finite(g16, "bf16 gradients")
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(g16))
    assert_close(y16, y_ref, jnp.bfloat16, what=f"{model_type} {levels} bf16 vs float32")
    assert_close(_flat_leaves(g16), _flat_leaves(g_ref), jnp.bfloat16, kind="grad",
                 what=f"{model_type} {levels} bf16 vs float32 gradients")
    # The activations really are bf16: the outputs are not the float32 ones.
    assert not np.array_equal(np.asarray(y16), np.asarray(y_ref))


STREAM_CASES = [("flat", {"flat": "mamba"}), ("flat", {"flat": "mamba2"}),
                ("hiss", {"low": "mamba2", "high": "mamba"})]


@pytest.mark.parametrize("model_type,levels", STREAM_CASES,
                         ids=[f"{t}-" + "-".join(lv.values()) for t, lv in STREAM_CASES])
def test_bfloat16_streaming_step_tracks_parallel(model_type, levels):
    model = build_model(_cfg(model_type, levels, "bfloat16"), input_dim=D_IN, output_dim=D_OUT)
    x = _inputs()

    def run(key, x):
        p = model.init(key, x)["params"]
        return p, model.apply({"params": p}, x)

    params, y_ref = jax.jit(run)(jax.random.PRNGKey(1), x)
    y = stream(model, params, x)
    assert y.shape == (4, T, D_OUT) and y.dtype == jnp.float32
    assert_close(y, y_ref, jnp.bfloat16, what=f"bf16 stream vs parallel, {model_type} {levels}")


def test_unknown_dtype_is_rejected_naming_the_allowed_ones():
    config = get_config()
    assert config.model.dtype == "float32"
    check_config(config, 1)
    config.model.dtype = "bfloat16"
    check_config(config, 1)
    config.model.dtype = "float16"
    with pytest.raises(ConfigError, match=r"config.model.dtype='float16' is not allowed; "
                                          r"use one of \['float32', 'bfloat16'\]"):
        check_config(config, 1)
    with pytest.raises(ValueError, match=r"model.dtype='float16'.*\['float32', 'bfloat16'\]"):
        build_model(_cfg("flat", {"flat": "lstm"}, "float16"), input_dim=D_IN, output_dim=D_OUT)
