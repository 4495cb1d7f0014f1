"""Train and evaluate a token task (selective copying, Pig Latin).

    python -m hiss_jax.tasks --config configs/selective_copy.py [--workdir runs/selcopy_mamba]
    python -m hiss_jax.tasks --config configs/pig_latin.py:transformer --config.train.num_steps=100

The workdir defaults to runs/tasks/<config stem>[_<arg>]; it receives metrics.jsonl,
results.json and the final state under checkpoints/.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/selective_copy.py", "Config file[:arg].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default runs/tasks/<config stem>[_<arg>]).")


def default_workdir(config_path: str) -> str:
    path, _, arg = config_path.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", "tasks", stem + ("_" + arg.replace(",", "_") if arg else ""))


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    from hiss_jax.tasks.train_tokens import train_and_evaluate
    workdir = flags.FLAGS.workdir or default_workdir(flags.FLAGS["config"].config_filename)
    train_and_evaluate(flags.FLAGS.config, workdir)


if __name__ == "__main__":
    app.run(main)
