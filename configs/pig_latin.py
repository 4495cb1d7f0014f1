"""Pig Latin translation: a character-level causal model over `source SOS target EOS`.

    python -m hiss_jax.tasks --config configs/pig_latin.py --workdir runs/piglatin_mamba
    python -m hiss_jax.tasks --config configs/pig_latin.py:mamba2 --workdir runs/piglatin_mamba2
    python -m hiss_jax.tasks --config configs/pig_latin.py:transformer --workdir runs/piglatin_tf
    python -m hiss_jax.tasks --config configs/pig_latin.py:mamba,tiny    # CPU, minutes

arg words: a family ('mamba' default, 'mamba2', 's4', 'transformer', 'lstm') sets model.kind;
'tiny' shrinks model and schedule.  Needs wordfreq (pip install wordfreq).  Exact-word accuracy is
measured on held-out words by greedy decoding with the Stack's streaming `step`.
"""
import ml_collections

from configs.base import kernels_config, mesh_config, optim_config, parse_arg
from configs.selective_copy import FAMILIES, model_config


def get_config(arg=None) -> ml_collections.ConfigDict:
    words = parse_arg(arg, FAMILIES + ("tiny",))
    kinds = [w for w in words if w in FAMILIES]
    if len(kinds) > 1:
        raise ValueError(f"config arg {arg!r} names several families {kinds}; pick one")
    kind = kinds[0] if kinds else "mamba"
    config = ml_collections.ConfigDict()

    config.task = ml_collections.ConfigDict()
    config.task.name = "pig_latin"  # token task: 'selective_copy' | 'pig_latin'
    config.task.n_words = 20000  # wordfreq English top-n list before filtering
    # '' = wordfreq's list; else a word-per-line file, most frequent first (for machines without
    # wordfreq: `python -m hiss_jax.tasks.pig_latin FILE` writes wordfreq's list to FILE)
    config.task.words_file = ""
    config.task.min_word_len = 2  # shortest word kept
    config.task.max_word_len = 16  # longest word kept
    config.task.n_hyphenated = 1000  # synthetic 'w1-w2' compounds of <= 7-letter list words
    config.task.test_fraction = 0.1  # held-out words (split by word, seeded)
    config.task.n_eval = 0  # held-out words scored (0 = all of them)
    config.task.seed = 0  # split and batch-order seed

    config.model = model_config(kind, 128, 4)  # embedding -> this Stack -> logits

    # the optimizer: configs/base.py's section with these fields replaced
    config.optim = optim_config(
        name="adamw",  # 'adam' | 'adamw'
        lr=2e-3,  # peak learning rate
        schedule="cosine",  # 'constant' | 'cosine' (warmup then cosine decay)
        warmup_steps=300,  # linear warmup steps
        end_lr_ratio=0.01,  # cosine: final lr / peak
        weight_decay=0.05,  # AdamW decay of matrices (not SSM dynamics, not vectors)
        ssm_lr=1e-3,  # lr of A_log, dt_bias, D, S4 log_dt, ... (no decay)
        b2=0.98,  # Adam beta2
        clip_norm=1.0,  # global-norm gradient clipping (0 = off)
    )

    config.train = ml_collections.ConfigDict()
    config.train.seed = 0  # init and dropout seed
    config.train.batch_size = 128  # training words per step (sampled with replacement)
    config.train.eval_batch_size = 512  # held-out words per eval / decode batch
    config.train.num_steps = 12000  # optimizer steps (~83 passes over ~18.5k training words)
    config.train.log_every = 100  # train metrics every this many steps
    config.train.eval_every = 1000  # held-out teacher-forced eval every this many steps

    config.mesh = mesh_config()  # data parallel over every device (configs/base.py)
    config.kernels = kernels_config()  # scan impl 'auto': pallas on GPU, xla elsewhere

    if "tiny" in words:
        config.model = model_config(kind, 64, 2)
        config.model.mamba2.headdim = 16
        config.model.s4.d_state = 32
        config.task.n_eval = 1000
        config.train.batch_size = 64
        config.train.eval_batch_size = 500
        config.train.num_steps = 1500
        config.train.eval_every = 500
        config.train.log_every = 50
    return config
