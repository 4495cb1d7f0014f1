"""Orbax checkpoints: periodic (resume) and best-by-validation, each an atomic CheckpointManager.

<workdir>/checkpoints/<step>/{state,meta}   the last `max_to_keep` periodic saves
<workdir>/best/<step>/{state,meta}          the single best validation state
Orbax writes each step to a temporary directory and renames it when complete, and removes old
steps only after the new one is final, so a crash mid-save leaves the previous checkpoint intact.
meta (JSON): step, best_val, best_step, epoch; the batch order is a pure function of the step.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def _manager(directory: str, max_to_keep: int, best: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        best_fn=(lambda m: m["val_mse"]) if best else None, best_mode="min",
        # synchronous: the small HiSS states save in milliseconds, and the next train_step
        # donates the state buffers
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "meta"))


class Checkpoints:
    def __init__(self, workdir: str, max_to_keep: int):
        self.latest = _manager(os.path.join(workdir, "checkpoints"), max_to_keep, best=False)
        self.best = _manager(os.path.join(workdir, "best"), 1, best=True)

    def save(self, state, meta: dict, *, best_val: float | None = None) -> None:
        """Periodic save; with best_val also (re)places the best checkpoint."""
        step = int(meta["step"])
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta))
        if step not in self.latest.all_steps():
            self.latest.save(step, args=args)
        if best_val is not None and step not in self.best.all_steps():
            self.best.save(step, args=args, metrics={"val_mse": float(best_val)})

    def restore_latest(self, abstract_state):
        """(state, meta) of the last periodic save, or None when there is none."""
        return _restore(self.latest, self.latest.latest_step(), abstract_state)

    def restore_best(self, abstract_state):
        return _restore(self.best, self.best.best_step(), abstract_state)

    def close(self):
        self.latest.close()
        self.best.close()


def _restore(manager, step, abstract_state):
    if step is None:
        return None
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


def restore_params_from(path: str, abstract_params):
    """Params from another run (`config.train.init_from`): a workdir (its best checkpoint, else
    its latest) or a CheckpointManager directory. Shapes must match the current model."""
    path = os.path.abspath(os.path.expanduser(path))
    candidates = [os.path.join(path, "best"), os.path.join(path, "checkpoints"), path]
    for directory in candidates:
        if not os.path.isdir(directory):
            continue
        manager = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                        options=ocp.CheckpointManagerOptions(read_only=True))
        step = manager.latest_step()
        if step is None:
            manager.close()
            continue
        raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        manager.close()
        params = raw["state"]["params"]
        want = jax.tree_util.tree_structure(abstract_params)
        got = jax.tree_util.tree_structure(params)
        if want != got:
            raise ValueError(f"config.train.init_from={path!r}: the checkpoint's parameter tree "
                             f"does not match the model ({got} vs {want}); use a run of the same "
                             "model config")

        def put(x, a):
            if tuple(np.shape(x)) != tuple(a.shape):
                raise ValueError(f"config.train.init_from={path!r}: parameter shape "
                                 f"{np.shape(x)} != model's {a.shape}")
            return jax.device_put(np.asarray(x, a.dtype), a.sharding)
        return jax.tree.map(put, params, abstract_params), directory
    raise FileNotFoundError(f"config.train.init_from={path!r} holds no checkpoint (looked in "
                            f"{candidates}); point it at a workdir or a checkpoints folder")
