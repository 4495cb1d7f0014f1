"""HiSS with LSTM blocks (Dense -> LSTM stack -> Dense) at both levels.

    python train.py --config configs/lstm.py            # HiSS LSTM -> LSTM, synthetic IMU
    python train.py --config configs/lstm.py:flat       # flat LSTM (128, 2 layers, dropout 0.1)
    python train.py --config configs/lstm.py:tiny       # seconds-long smoke run
"""
from configs import base


def get_config(arg=None):
    return base.family_config("lstm", arg, d_model=64, n_layers=2, dropout=0.1,
                              flat_d_model=128, flat_n_layers=2, flat_dropout=0.1)
