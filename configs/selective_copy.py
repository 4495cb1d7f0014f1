"""Selective copying (Gu & Dao 2023, Sec. 4.1.1): a causal token model on generated data.

    python -m hiss_jax.tasks --config configs/selective_copy.py --workdir runs/selcopy_mamba
    python -m hiss_jax.tasks --config configs/selective_copy.py:s4 --workdir runs/selcopy_s4
    python -m hiss_jax.tasks --config configs/selective_copy.py:mamba,tiny   # CPU, minutes

arg words (comma-separated): a family ('mamba' default, 'mamba2', 's4', 'transformer', 'lstm')
sets model.kind; 'tiny' shrinks model, task and schedule for a CPU run.  Single fields go through
--config.x.y=..., e.g. --config.model.mamba.disc=zoh or --config.model.s4.disc=zoh.
Defaults: Mamba d_model 192 x 4 layers = 1.02M parameters, 128 noisy steps, 16 data tokens,
30-token vocabulary; held-out accuracy on 2048 sequences.
"""
import ml_collections

from configs.base import kernels_config, level_config, mesh_config, optim_config, parse_arg

FAMILIES = ("mamba", "mamba2", "s4", "transformer", "lstm")


def model_config(kind: str, d_model: int, n_layers: int) -> ml_collections.ConfigDict:
    """A level config (every family's settings) with the task-level extras."""
    c = level_config(kind, d_model, n_layers, 0.0)
    c.mamba2.headdim = 32  # channels per head (d_inner 384 -> 12 heads)
    c.s4.d_state = 64  # S4 state size (HiPPO-LegS, full DPLR)
    c.transformer.n_heads = 4  # attention heads
    c.transformer.d_ff = 2 * d_model  # feed-forward width
    return c


def get_config(arg=None) -> ml_collections.ConfigDict:
    words = parse_arg(arg, FAMILIES + ("tiny",))
    kinds = [w for w in words if w in FAMILIES]
    if len(kinds) > 1:
        raise ValueError(f"config arg {arg!r} names several families {kinds}; pick one")
    kind = kinds[0] if kinds else "mamba"
    config = ml_collections.ConfigDict()

    config.task = ml_collections.ConfigDict()
    config.task.name = "selective_copy"  # token task: 'selective_copy' | 'pig_latin'
    config.task.seq_len = 128  # noisy region length L (model input: L + n_data steps)
    config.task.n_data = 16  # data tokens to copy (= marker tokens)
    config.task.vocab_size = 30  # noise + marker + 28 data tokens
    config.task.n_eval = 2048  # held-out sequences (a seed stream training never draws)
    config.task.seed = 0  # data seed (train stream 2 * seed, held-out 2 * seed + 1)

    config.model = model_config(kind, 192, 4)  # embedding -> this Stack -> logits

    # the optimizer: configs/base.py's section with these fields replaced
    config.optim = optim_config(
        name="adamw",  # 'adam' | 'adamw'
        lr=1e-3,  # peak learning rate
        schedule="cosine",  # 'constant' | 'cosine' (warmup then cosine decay)
        warmup_steps=500,  # linear warmup steps
        end_lr_ratio=0.01,  # cosine: final lr / peak
        weight_decay=0.1,  # AdamW decay of matrices (not SSM dynamics, not vectors)
        ssm_lr=1e-3,  # lr of A_log, dt_bias, D, S4 log_dt, ... (no decay)
        b2=0.98,  # Adam beta2
        clip_norm=1.0,  # global-norm gradient clipping (0 = off)
    )

    config.train = ml_collections.ConfigDict()
    config.train.seed = 0  # init and dropout seed
    config.train.batch_size = 64  # training sequences per step
    config.train.eval_batch_size = 256  # held-out sequences per eval batch
    config.train.num_steps = 20000  # optimizer steps (1.28M fresh sequences)
    config.train.log_every = 100  # train metrics every this many steps
    config.train.eval_every = 1000  # held-out eval every this many steps

    config.mesh = mesh_config()  # data parallel over every device (configs/base.py)
    config.kernels = kernels_config()  # scan impl 'auto': pallas on GPU, xla elsewhere

    if "tiny" in words:
        apply_tiny(config)
    return config


def apply_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """CPU-sized run: 64 d_model x 2 layers, 64 noisy steps, 8 data tokens, 16-token vocabulary."""
    kind = config.model.kind
    config.model = model_config(kind, 64, 2)
    config.model.mamba2.headdim = 16
    config.model.s4.d_state = 32
    config.task.seq_len = 64
    config.task.n_data = 8
    config.task.vocab_size = 16
    config.task.n_eval = 512
    config.train.batch_size = 32
    config.train.num_steps = 3000
    config.train.eval_every = 250
    config.train.log_every = 50
    config.optim.lr = 2e-3
    config.optim.ssm_lr = 2e-3
    config.optim.warmup_steps = 200
    return config
