"""HiSS / flat / multi-branch models and the registry.

Compilation dominates on CPU, so the 25 low x high pairs are checked through their two halves:
`chunk_features` (the low level) compiled once per low family and `predict_from_features` (high
stack + head) once per high family, the pair's gradient being the chain of the two VJPs
(`__call__` is exactly their composition; `test_hierarchical_equals_parts_composed_by_hand` checks
that end to end).  The batch rows carry the base input and its perturbations, so one pass gives the
finite forward/gradient checks, causality, last-step selection and chunk independence together.
"""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from configs.base import level_config
from hiss_jax.models import (SSM_PARAM_NAMES, STACKS, FlatModel, HierarchicalModel,
                             MultiBranchModel, build_model, make_stack)
from tests.conftest import assert_close

FAMILIES = ("s4", "mamba", "mamba2", "lstm", "transformer")
K, T, D_IN, D_OUT = 4, 3, 3, 2  # chunk, chunks, input and output channels
L = K * T


@pytest.fixture(autouse=True)
def _ieee_float32_matmuls():
    """The float32 tolerances assume IEEE float32 matmuls; GPUs default to TF32."""
    with jax.default_matmul_precision("highest"):
        yield


def tiny_level(kind: str, d_model: int = 16) -> ml_collections.ConfigDict:
    c = level_config(kind, d_model, 1, 0.0)
    c.s4.d_state = 8
    c.mamba.d_state = 4
    c.mamba2.d_state = 8
    c.mamba2.headdim = 16
    c.mamba2.chunk_size = 4
    c.transformer.d_ff = 32
    return c


def tiny_model_cfg(model_type: str, low="mamba", high="mamba", flat="mamba"):
    c = ml_collections.ConfigDict()
    c.type = model_type
    c.chunk_size = K
    c.low = tiny_level(low, d_model=8)  # d_low != d_high catches width mix-ups
    c.high = tiny_level(high)
    c.flat = tiny_level(flat)
    c.branches = ml_collections.ConfigDict()
    return c


def _inputs():
    """Rows: 0 base; 1 perturbed from step K-1 (last step of chunk 0) on; 2 perturbed from step K
    (first step of chunk 1) on; 3 perturbed only inside chunk 1."""
    base = jax.random.normal(jax.random.PRNGKey(0), (L, D_IN))
    noise = jax.random.normal(jax.random.PRNGKey(1), (L, D_IN))
    t = jnp.arange(L)[:, None]
    rows = [base,
            base + noise * (t >= K - 1),
            base + noise * (t >= K),
            base + noise * ((t >= K) & (t < 2 * K))]
    return jnp.stack(rows)


def _differs(a, b):
    return not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _same(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _finite(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


_LOW, _HIGH = {}, {}


def _low_half(kind, model):
    """Jitted (init + chunk_features, VJP) of the low level, compiled once per family (per
    process; tests/test_streaming.py reuses them for its parallel references)."""
    if kind not in _LOW:
        feats = lambda p, x: model.apply({"params": p}, x, method="chunk_features")
        init_fwd = jax.jit(lambda key, x: (
            p := model.init(key, x, method="chunk_features")["params"], feats(p, x)))
        bwd = jax.jit(lambda p, x, ct: jax.vjp(lambda q: feats(q, x), p)[1](ct)[0])
        _LOW[kind] = (model.low, init_fwd, bwd)
    low, init_fwd, bwd = _LOW[kind]
    assert low == model.low  # the cached half is this pair's low level
    return init_fwd, bwd


def _high_half(kind, model):
    """Jitted init + forward + VJP of high stack + head, compiled once per family:
    (key, feats) -> (params, y, grads, d loss / d feats) with loss = sum(y ** 2)."""
    if kind not in _HIGH:
        def run(key, feats):
            p = model.init(key, feats, method="predict_from_features")["params"]
            fwd = lambda q, f: model.apply({"params": q}, f, method="predict_from_features")
            y, pull = jax.vjp(fwd, p, feats)
            g, ct = pull(2 * y)  # loss = sum(y ** 2)
            return p, y, g, ct
        _HIGH[kind] = (model.high, jax.jit(run))
    high, run = _HIGH[kind]
    assert high == model.high
    return run


PAIRS = list(itertools.product(FAMILIES, FAMILIES))


@pytest.mark.parametrize("low,high", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_every_hiss_pair_forward_grad_causal(low, high):
    model = build_model(tiny_model_cfg("hiss", low=low, high=high),
                        input_dim=D_IN, output_dim=D_OUT, scan_impl="ref")
    low_init_fwd, low_bwd = _low_half(low, model)
    high_run = _high_half(high, model)
    x = _inputs()
    p_low, feats = low_init_fwd(jax.random.PRNGKey(2), x)
    _, y, g_high, ct = high_run(jax.random.PRNGKey(3), feats)
    g_low = low_bwd(p_low, x, ct)
    assert feats.shape == (4, T, 16) and y.shape == (4, T, D_OUT)
    _finite(g_high)
    _finite(g_low)
    # low level: chunks are independent sequences from a zero state, reduced to their LAST step
    _same(feats[3, 0], feats[0, 0])
    _same(feats[3, 2], feats[0, 2])
    assert _differs(feats[3, 1], feats[0, 1])
    assert _differs(feats[1, 0], feats[0, 0])
    # causality: steps >= K leave chunk 0's prediction unchanged; chunk 1 reaches later ones
    _same(y[2, 0], y[0, 0])
    assert _differs(y[1, 0], y[0, 0])
    assert _differs(y[3, 2], y[0, 2])


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_flat_model_forward_grad_causal(kind):
    model = build_model(tiny_model_cfg("flat", flat=kind), input_dim=D_IN, output_dim=D_OUT,
                        scan_impl="ref")
    x = _inputs()

    def run(key):
        p = model.init(key, x)["params"]
        y, pull = jax.vjp(lambda q: model.apply({"params": q}, x), p)
        return y, pull(2 * y)[0]

    y, grads = jax.jit(run)(jax.random.PRNGKey(2))
    assert y.shape == (4, T, D_OUT)
    _finite(grads)
    # causality at step resolution across the chunk boundary: steps >= K do not reach chunk 0's
    # prediction, step K - 1 (the kept LAST step of chunk 0) does; the state runs on across chunks
    _same(y[2, 0], y[0, 0])
    assert _differs(y[1, 0], y[0, 0])
    assert _differs(y[3, 2], y[0, 2])


def test_hierarchical_equals_parts_composed_by_hand():
    model = build_model(tiny_model_cfg("hiss", low="lstm", high="mamba"),
                        input_dim=D_IN, output_dim=D_OUT, scan_impl="ref")
    assert isinstance(model, HierarchicalModel)
    x = _inputs()
    params = jax.jit(model.init)(jax.random.PRNGKey(3), x)["params"]
    assert set(params) == {"low", "high", "head"}

    def by_hand(p, x):
        low = model.low.apply({"params": p["low"]}, x.reshape(-1, K, D_IN))
        feats = low[:, -1].reshape(x.shape[0], T, -1)
        h = model.high.apply({"params": p["high"]}, feats)
        return nn.Dense(D_OUT).apply({"params": p["head"]}, h)

    y = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    assert_close(y, jax.jit(by_hand)(params, x), jnp.float32, what="model vs parts")


def test_multibranch_shapes_and_ranges():
    cfg = tiny_model_cfg("multibranch", low="lstm", high="lstm")
    cfg.branches.b = [1, 3]
    cfg.branches.a = [0, 1]
    model = build_model(cfg, input_dim=D_IN, output_dim=D_OUT)
    assert isinstance(model, MultiBranchModel)
    assert model.branches == (("a", 0, 1), ("b", 1, 3))  # ordered by start channel
    x = _inputs()
    variables = jax.jit(model.init)(jax.random.PRNGKey(4), x)
    params = variables["params"]
    assert {"lows_0", "lows_1", "merge", "high", "head"} <= set(params)
    assert params["merge"]["kernel"].shape == (2 * 16, 16)  # concat of d_high per branch -> d_high
    assert params["lows_0"]["embed"]["kernel"].shape == (1, 8)  # branch a sees 1 channel
    assert params["lows_1"]["embed"]["kernel"].shape == (2, 8)
    assert params["lows_1"]["out"]["kernel"].shape == (8, 16)  # d_low -> d_high
    y = jax.jit(model.apply)(variables, x)
    assert y.shape == (4, T, D_OUT) and bool(jnp.all(jnp.isfinite(y)))
    cfg.branches.c = [2, 5]
    with pytest.raises(ValueError, match=r"branch 'c': channel range \[2, 5\) does not lie"):
        build_model(cfg, input_dim=D_IN, output_dim=D_OUT)


@pytest.mark.parametrize("model_type", ["hiss", "flat"])
def test_bad_chunking_raises(model_type):
    model = build_model(tiny_model_cfg(model_type, low="lstm", high="lstm", flat="lstm"),
                        input_dim=D_IN, output_dim=D_OUT)
    with pytest.raises(ValueError, match=r"length=10 is not a positive multiple of chunk_size=4.*"
                                         r"8 or 12 steps"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10, D_IN)))


def test_registry_errors_and_names():
    with pytest.raises(ValueError, match=r"unknown level kind 'gru'; allowed kinds: \['lstm', "):
        make_stack(level_config("gru"))
    bad = tiny_level("mamba")
    bad.mamba.d_inner = 7
    with pytest.raises(ValueError, match=r"\['d_inner'\] that MambaStack does not take"):
        make_stack(bad)
    per_level = tiny_level("mamba2")
    per_level.mamba2.dtype = "bfloat16"
    with pytest.raises(ValueError, match=r"level.mamba2.dtype='bfloat16' is a model-wide "
                                         r"setting: set config.model.dtype instead"):
        make_stack(per_level)
    with pytest.raises(ValueError, match="unknown model.type 'deep'"):
        build_model(tiny_model_cfg("deep"), input_dim=1, output_dim=1)
    assert set(STACKS) == set(FAMILIES)
    assert {"A_log", "dt_bias", "D"} <= set(SSM_PARAM_NAMES)
    stack = make_stack(tiny_level("mamba2"), scan_impl="ref")
    assert stack.scan_impl == "ref" and stack.d_state == 8 and stack.chunk_size == 4
    flat = build_model(tiny_model_cfg("flat"), input_dim=D_IN, output_dim=D_OUT)
    assert isinstance(flat, FlatModel)
