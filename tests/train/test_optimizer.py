import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import base
from hiss_jax.train import state as state_lib


def _optim(**kw):
    optim = base.get_config().optim
    optim.update(kw)
    return optim


def test_ssm_params_get_their_own_lr_and_no_weight_decay():
    params = {"dense": {"kernel": jnp.full((3, 3), 2.0), "bias": jnp.full((3,), 2.0)},
              "A_log": jnp.full((4,), 2.0)}
    tx, _ = state_lib.make_optimizer(
        _optim(name="adamw", lr=1e-2, ssm_lr=1e-3, weight_decay=0.5), 10, ssm_names=("A_log",))
    opt_state = tx.init(params)
    # zero gradients: only weight decay moves params, and only matrices outside the SSM group
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zeros, opt_state, params)
    np.testing.assert_allclose(upd["dense"]["kernel"], -1e-2 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(upd["dense"]["bias"], 0.0)
    np.testing.assert_array_equal(upd["A_log"], 0.0)
    # unit gradients: Adam's first step moves each param by its group's lr
    ones = jax.tree.map(jnp.ones_like, params)
    upd, _ = tx.update(ones, opt_state, params)
    np.testing.assert_allclose(upd["A_log"], -1e-3, rtol=1e-4)
    np.testing.assert_allclose(upd["dense"]["bias"], -1e-2, rtol=1e-4)
    np.testing.assert_allclose(upd["dense"]["kernel"], -1e-2 * (1 + 0.5 * 2.0), rtol=1e-4)


def test_cosine_schedule_warms_up_and_decays_to_the_end_ratio():
    _, sched = state_lib.make_optimizer(
        _optim(lr=1e-3, schedule="cosine", warmup_steps=10, end_lr_ratio=0.1), 100)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 1e-4, rtol=1e-5)
    _, const = state_lib.make_optimizer(_optim(lr=1e-4), 100)
    assert float(const(0)) == float(const(99)) == np.float32(1e-4)


def test_clipping_bounds_the_gradient_norm():
    params = {"w": jnp.zeros((4,))}
    tx, _ = state_lib.make_optimizer(_optim(lr=1.0, clip_norm=0.5, b1=0.9), 5, ssm_names=())
    _, opt_state = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
    # Adam's first moment after one step is (1 - b1) * the (clipped) gradient
    mus = [v for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "mu")
           if isinstance(v["w"], jax.Array)]  # the other groups hold MaskedNode
    assert len(mus) == 1
    np.testing.assert_allclose(float(jnp.linalg.norm(mus[0]["w"])), 0.1 * 0.5, rtol=1e-5)
