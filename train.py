"""Train and evaluate HiSS / flat baselines.

    python train.py --config configs/mamba2.py [--workdir runs/mamba2] [--config.optim.lr=1e-3]
    python train.py --config configs/csp.py:vector --config.data.dir=/data/csp

The workdir defaults to runs/<config file stem>[_<arg>]; a run found there is resumed.
Multi-host: run the same command on every host with --multihost (cluster auto-detection) or
--coordinator=host0:1234 --num_processes=N --process_id=i; each host feeds its rows of the batch.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from hiss_jax.train.config_check import explain_flag_error

config_flags.DEFINE_config_file("config", "configs/mamba2.py", "Config file[:arg].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default runs/<config stem>[_<arg>]).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (multi-host launch).")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (default: auto-detected or "
                    "JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (default: auto-detected).")
flags.DEFINE_integer("process_id", None, "This process's index (default: auto-detected).")


def default_workdir(config_path: str) -> str:
    path, _, arg = config_path.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", stem + ("_" + arg.replace(",", "_") if arg else ""))


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; -v 0 shows it
        logging.set_verbosity(logging.WARNING)
    import jax
    f = flags.FLAGS
    if f.multihost or f.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # None lets jax detect SLURM / Open MPI / TPU / Kubernetes settings
        jax.distributed.initialize(f.coordinator, f.num_processes, f.process_id)
    from hiss_jax.train import train_and_evaluate
    workdir = flags.FLAGS.workdir or default_workdir(flags.FLAGS["config"].config_filename)
    train_and_evaluate(flags.FLAGS.config, workdir)


if __name__ == "__main__":
    try:
        app.run(main)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names an unknown key
        message = explain_flag_error(e, sys.argv[1:])
        if message is None:
            raise
        raise SystemExit(message) from e
