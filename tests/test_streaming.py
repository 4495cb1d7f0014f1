"""Streaming inference equals the parallel forward (hiss_jax.streaming).

Every HiSS pair (25), every flat model (5) and a multi-branch model are streamed one sample at a
time over a recording whose length is NOT a multiple of the chunk (the final partial chunk must
emit nothing) and compared with the parallel forward within the float32 tolerance.  The parallel
references of the pairs come from the two halves of the model (`chunk_features`,
`predict_from_features`), compiled once per family, to keep compilation within the test budget.
"""
import itertools

import jax
import jax.numpy as jnp
import pytest

from hiss_jax.models import build_model
from hiss_jax.replay import replay_episode
from hiss_jax.streaming import StreamingPredictor, stream
from tests.conftest import assert_close
# The tiny configs, inputs and the per-family compiled halves are shared with the model tests, so
# a process running both compiles each half once.
from tests.models.test_hiss import (D_IN, D_OUT, FAMILIES, K, T, _high_half, _inputs, _low_half,
                                    tiny_model_cfg)

L = K * T + 2  # two samples of a chunk that never completes


@pytest.fixture(autouse=True)
def _ieee_float32_matmuls():
    """The float32 tolerances assume IEEE float32 matmuls; GPUs default to TF32."""
    with jax.default_matmul_precision("highest"):
        yield


def recording():
    """(4, L, D_IN): the model tests' inputs plus a partial final chunk."""
    extra = jax.random.normal(jax.random.PRNGKey(9), (4, L - K * T, D_IN))
    return jnp.concatenate([_inputs(), extra], axis=1)


PAIRS = list(itertools.product(FAMILIES, FAMILIES))


@pytest.mark.parametrize("low,high", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_stream_hiss_pair_equals_parallel(low, high):
    model = build_model(tiny_model_cfg("hiss", low=low, high=high), input_dim=D_IN,
                        output_dim=D_OUT, scan_impl="ref")
    x = recording()
    p_low, feats = _low_half(low, model)[0](jax.random.PRNGKey(2), x[:, :K * T])
    p_high, y_ref, _, _ = _high_half(high, model)(jax.random.PRNGKey(3), feats)
    params = {**p_low, **p_high}  # {"low": ...} and {"high": ..., "head": ...}
    assert set(params) == {"low", "high", "head"}
    y = stream(model, params, x)
    assert y.shape == (4, T, D_OUT)
    assert_close(y, y_ref, jnp.float32, what=f"stream vs parallel, {low} -> {high}")


@pytest.mark.parametrize("kind", FAMILIES)
def test_stream_flat_equals_parallel(kind):
    model = build_model(tiny_model_cfg("flat", flat=kind), input_dim=D_IN, output_dim=D_OUT,
                        scan_impl="ref")
    x = recording()

    def run(key, x):
        p = model.init(key, x)["params"]
        return p, model.apply({"params": p}, x)

    params, y_ref = jax.jit(run)(jax.random.PRNGKey(1), x[:, :K * T])
    y = stream(model, params, x)
    assert y.shape == (4, T, D_OUT)
    assert_close(y, y_ref, jnp.float32, what=f"stream vs parallel, flat {kind}")


def test_stream_multibranch_equals_parallel():
    cfg = tiny_model_cfg("multibranch", low="mamba2", high="lstm")
    cfg.branches.acc = [0, 2]
    cfg.branches.gyro = [2, 3]
    model = build_model(cfg, input_dim=D_IN, output_dim=D_OUT)
    x = recording()
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x[:, :K * T])
    y_ref = jax.jit(model.apply)(variables, x[:, :K * T])
    assert_close(stream(model, variables["params"], x), y_ref, jnp.float32,
                 what="stream vs parallel, multibranch")


def test_blocks_empty_pushes_and_reset():
    model = build_model(tiny_model_cfg("hiss", low="lstm", high="transformer"), input_dim=D_IN,
                        output_dim=D_OUT)
    x = recording()
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x[:, :K * T])
    y_ref = jax.jit(model.apply)(variables, x[:, :K * T])
    predictor = StreamingPredictor(model, variables["params"], batch_size=4, max_len=L)
    first = predictor.push(x[:, :K - 1])  # one sample short of a chunk: nothing yet
    assert first.shape == (4, 0, D_OUT)
    # blocks of 3 cross chunk boundaries at different offsets
    rest = [predictor.push(x[:, i:i + 3]) for i in range(K - 1, L, 3)]
    y = jnp.concatenate([first] + rest, axis=1)
    assert_close(y, y_ref, jnp.float32, what="block pushes")
    assert predictor.position == L % K
    predictor.reset()
    again = jnp.concatenate([predictor.push(x[:, i]) for i in range(L)], axis=1)
    assert_close(again, y_ref, jnp.float32, what="after reset")
    with pytest.raises(ValueError, match="push expects"):
        predictor.push(jnp.zeros((3, D_IN)))


def test_replay_episode_matches_parallel():
    model = build_model(tiny_model_cfg("hiss", low="lstm", high="lstm"), input_dim=D_IN,
                        output_dim=D_OUT, scan_impl="ref")
    x = recording()[:1]
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x[:, :K * T])
    y_ref = jax.jit(model.apply)(variables, x[:, :K * T])[0]
    targets = jnp.zeros((T, D_OUT))
    res = replay_episode(model, variables["params"], x[0], targets, block=3)
    assert res["predictions_emitted"] == T and res["samples"] == L
    assert_close(jnp.asarray(res["predictions"]), y_ref, jnp.float32, what="replay")
    assert res["rel_err_vs_parallel"] <= 1e-5
    assert abs(res["mse"] - float(jnp.mean(y_ref ** 2))) <= 1e-5 * (1 + res["mse"])
    assert res["latency"]["push_with_prediction"]["n"] >= 1

