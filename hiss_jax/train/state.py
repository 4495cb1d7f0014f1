"""TrainState, optimizer, device mesh and shardings.

The state is built from `jax.eval_shape` of the init function (no memory touched), its shardings
derived from the abstract tree, then created by the same function jitted with `out_shardings`.
Params are replicated unless the model annotates them with logical axis names
(`nn.with_logical_partitioning`); those are mapped to mesh axes by `config.mesh.rules`.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hiss_jax.train.config_check import mesh_shape


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # model parameters (plain arrays, logical-axis boxes removed)
    opt_state: Any  # optax state
    rng: jax.Array  # uint32 (2,) key; dropout at step s uses fold_in(rng, s)


def make_mesh(config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    data, model = mesh_shape(config, len(devices))
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def ssm_param_names() -> tuple[str, ...]:
    try:
        from hiss_jax.models import SSM_PARAM_NAMES
    except ImportError:
        return ()
    return tuple(SSM_PARAM_NAMES)


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def param_labels(params, ssm_names=None):
    """'ssm' for SSM dynamics leaves (by leaf name), 'decay' for other matrices, 'no_decay' else.

    Biases, norm scales and other vectors are not weight-decayed (the usual AdamW practice).
    """
    names = set(ssm_param_names() if ssm_names is None else ssm_names)

    def label(path, leaf):
        if _leaf_name(path) in names:
            return "ssm"
        return "decay" if jnp.ndim(leaf) >= 2 else "no_decay"
    return jax.tree_util.tree_map_with_path(label, params)


def make_schedule(optim, total_steps: int, peak: float):
    if optim.schedule == "constant":
        if optim.warmup_steps:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, peak, optim.warmup_steps),
                 optax.constant_schedule(peak)],
                [optim.warmup_steps])
        return optax.constant_schedule(peak)
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, optim.warmup_steps, max(total_steps, optim.warmup_steps + 1),
        end_value=peak * optim.end_lr_ratio)


def make_optimizer(optim, total_steps: int, ssm_names=None):
    """Adam/AdamW with a schedule; SSM dynamics params get their own lr and no weight decay.

    Returns (tx, schedule); `schedule(step)` is the lr of the non-SSM params.
    """
    schedule = make_schedule(optim, total_steps, optim.lr)
    ssm_schedule = make_schedule(optim, total_steps, optim.ssm_lr or optim.lr)
    adam = dict(b1=optim.b1, b2=optim.b2, eps=optim.eps)
    if optim.name == "adamw":
        decay = optax.adamw(schedule, weight_decay=optim.weight_decay, **adam)
    else:
        decay = optax.adam(schedule, **adam)
    tx = optax.multi_transform(
        {"decay": decay, "no_decay": optax.adam(schedule, **adam),
         "ssm": optax.adam(ssm_schedule, **adam)},
        lambda params: param_labels(params, ssm_names))
    if optim.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), tx)
    return tx, schedule


def state_shardings(abstract_state: TrainState, param_shardings, tx, mesh: Mesh) -> TrainState:
    """Shardings of every state leaf: opt-state moments follow their params, the rest replicated."""
    replicated = NamedSharding(mesh, P())
    # multi_transform leaves MaskedNode (an empty subtree) where a param belongs to another group
    masked = optax.transforms._masking.MaskedNode
    opt = optax.tree_map_params(
        tx, lambda v, s: v if isinstance(v, masked) else s, abstract_state.opt_state,
        param_shardings, transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (NamedSharding, masked)))
    return TrainState(step=replicated, params=param_shardings, opt_state=opt, rng=replicated)


def create_train_state(model, tx, mesh: Mesh, rules, seed: int, input_shape) -> tuple:
    """Returns (state, shardings). input_shape: (1, L, D_in) of a dummy input for init."""

    def init(rng):
        params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
        x = jnp.zeros(input_shape, jnp.float32)
        variables = model.init({"params": params_rng, "dropout": dropout_rng}, x,
                               deterministic=True)
        params = nn.meta.unbox(variables["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=state_rng)

    def boxed_params(rng):
        return model.init({"params": rng, "dropout": rng}, jnp.zeros(input_shape, jnp.float32),
                          deterministic=True)["params"]

    rng = jax.random.PRNGKey(seed)
    with nn.logical_axis_rules(rules):
        abstract_boxed = jax.eval_shape(boxed_params, rng)
        logical = nn.get_partition_spec(abstract_boxed)
        param_shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
        abstract = jax.eval_shape(init, rng)
        shardings = state_shardings(abstract, param_shardings, tx, mesh)
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def abstract_with_shardings(state_or_abstract, shardings):
    """ShapeDtypeStructs carrying shardings: the target orbax restores into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state_or_abstract, shardings)


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
