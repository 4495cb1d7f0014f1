"""HiSS with full S4 (DPLR, HiPPO-LegS) blocks at both levels.

    python train.py --config configs/s4.py            # HiSS S4 -> S4, synthetic IMU
    python train.py --config configs/s4.py:flat       # flat S4 (d 128, 6 layers, dropout 0.1)
    python train.py --config configs/s4.py:tiny       # seconds-long smoke run
"""
from configs import base


def get_config(arg=None):
    return base.family_config("s4", arg, d_model=64, n_layers=2, dropout=0.1,
                              flat_d_model=128, flat_n_layers=6, flat_dropout=0.1)
