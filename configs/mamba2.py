"""HiSS with Mamba2 (SSD) blocks at both levels: the main job.

    python train.py --config configs/mamba2.py                 # HiSS, synthetic IMU, < 10 min CPU
    python train.py --config configs/mamba2.py:flat            # flat Mamba2 baseline
    python train.py --config configs/mamba2.py:tiny            # seconds-long smoke run
    python train.py --config configs/mamba2.py --config.data.name=csp:vector \
        --config.data.dir=/data/csp
"""
from configs import base


def get_config(arg=None):
    # d_state 32 and headdim 32 (4 heads at d_model 64, expand 2): the synthetic task needs a
    # small state. The SSD block length matches each level's sequence: 10 steps per chunk at the
    # low level, the 40-step training window at the high level (a 64 block would pad 10 -> 64 and
    # run ~3x slower on CPU).
    return base.family_config(
        "mamba2", arg, d_model=64, n_layers=2, dropout=0.0,
        flat_d_model=64, flat_n_layers=2, flat_dropout=0.0,
        settings={"mamba2": {"d_state": 32, "headdim": 32}},
        level_settings={"low": {"mamba2": {"chunk_size": 10}},
                        "high": {"mamba2": {"chunk_size": 40}}})
