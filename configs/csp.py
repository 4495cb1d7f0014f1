"""CSP-Bench presets: the paper's best HiSS pair per dataset and its training defaults.

Adam 1e-4 constant, no weight decay or clipping, batch 4, 300 epochs, seed 5, fp32; the best
validation checkpoint is kept (HiSS, Bhirangi et al. 2024, Table 2 / appendix).

    python train.py --config configs/csp.py:vector --config.data.dir=/data/csp
    python train.py --config configs/csp.py:marker_writing --config.data.dir=/data/csp
    python train.py --config configs/csp.py:ronin,tiny --config.data.dir=/data/csp   # smoke run
Datasets: marker_writing, intrinsic_slip, joystick, ronin, vector, totalcapture.
"""
from configs import base

# dataset -> ((low kind, d_model, n_layers), (high kind, d_model, n_layers)), from the paper.
BEST = {
    "marker_writing": (("s4", 256, 6), ("mamba", 128, 6)),
    "intrinsic_slip": (("s4", 256, 6), ("mamba", 256, 4)),
    "joystick": (("s4", 256, 4), ("mamba", 256, 4)),
    "ronin": (("s4", 256, 6), ("s4", 128, 6)),
    "totalcapture": (("s4", 256, 6), ("mamba", 128, 4)),
    "vector": (("mamba", 32, 4), ("mamba", 64, 4)),
}
S4_DROPOUT = 0.1  # S4 stacks use dropout 0.1 (the paper's S4 default); Mamba blocks have none


def get_config(arg=None):
    words = base.parse_arg(arg, tuple(BEST) + ("tiny",))
    names = words & set(BEST)
    if len(names) != 1:
        raise ValueError(f"configs/csp.py needs exactly one dataset, got arg {arg!r}; "
                         f"use one of {sorted(BEST)}, e.g. configs/csp.py:vector")
    name = names.pop()
    config = base.get_config()  # paper training defaults: Adam 1e-4 constant, batch 4, 300 epochs
    (lk, ld, ln), (hk, hd, hn) = BEST[name]
    config.model.low = base.level_config(lk, ld, ln, S4_DROPOUT if lk == "s4" else 0.0)
    config.model.high = base.level_config(hk, hd, hn, S4_DROPOUT if hk == "s4" else 0.0)
    config.model.flat = base.level_config(lk, ld, ln, S4_DROPOUT if lk == "s4" else 0.0)
    config.data.name = f"csp:{name}"
    if "tiny" in words:
        data = config.data.to_dict()
        base.apply_tiny(config)
        config.data.update(data)  # keep the real dataset; only the model and step count shrink
        config.train.num_steps = 4
        config.train.eval_every = 2
    return config
