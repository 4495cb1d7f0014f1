"""HiSS with causal Transformer blocks (sinusoidal position encoding, pre-norm) at both levels.

    python train.py --config configs/transformer.py            # HiSS Transformer -> Transformer
    python train.py --config configs/transformer.py:flat       # flat (d 128, 2 heads, 6 layers)
    python train.py --config configs/transformer.py:tiny       # seconds-long smoke run
"""
from configs import base


def get_config(arg=None):
    return base.family_config("transformer", arg, d_model=64, n_layers=2, dropout=0.1,
                              flat_d_model=128, flat_n_layers=6, flat_dropout=0.1)
