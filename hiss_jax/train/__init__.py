"""Training system: config checks, TrainState, sharded steps, loop, orbax checkpoints, plots."""
from hiss_jax.train.loop import train_and_evaluate
from hiss_jax.train.state import TrainState

__all__ = ["train_and_evaluate", "TrainState"]
