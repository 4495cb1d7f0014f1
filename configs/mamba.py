"""HiSS with Mamba (selective scan) blocks at both levels.

    python train.py --config configs/mamba.py                  # HiSS Mamba -> Mamba, synthetic IMU
    python train.py --config configs/mamba.py:flat             # flat Mamba (d 64, 2 layers)
    python train.py --config configs/mamba.py:tiny             # seconds-long smoke run
"""
from configs import base


def get_config(arg=None):
    return base.family_config("mamba", arg, d_model=64, n_layers=2, dropout=0.0,
                              flat_d_model=64, flat_n_layers=2, flat_dropout=0.0)
