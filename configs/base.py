"""Base config shared by every family file; not launched directly.

Every family file (`configs/s4.py`, `mamba.py`, `mamba2.py`, `lstm.py`, `transformer.py`) and
the CSP-Bench presets (`configs/csp.py`) start from `get_config()` here and change a few fields.
Any field can be overridden on the command line, e.g.
    python train.py --config configs/mamba2.py --config.model.low.kind=lstm \
        --config.train.batch_size=32
"""
import ml_collections

FAMILIES = ("s4", "mamba", "mamba2", "lstm", "transformer")


def level_config(kind: str = "mamba2", d_model: int = 64, n_layers: int = 2,
                                  dropout: float = 0.0) -> ml_collections.ConfigDict:
    """One level (low / high / flat): the chosen family plus the settings of every family.

    Carrying every family's settings lets `--config.model.low.kind=lstm` work without an edit.
    """
    c = ml_collections.ConfigDict()
    c.kind = kind  # block family: 's4' | 'mamba' | 'mamba2' | 'lstm' | 'transformer'
    c.d_model = d_model  # width of the residual stream (LSTM: hidden size)
    c.n_layers = n_layers  # number of blocks
    c.dropout = dropout  # dropout rate inside the blocks (0 disables; Mamba blocks use none)

    c.s4 = ml_collections.ConfigDict()
    c.s4.d_state = 64  # state size N (complex: N/2 conjugate pairs), HiPPO-LegS init
    c.s4.mode = "dplr"  # 'dplr' = full S4 (diagonal plus low rank, as in HiSS) | 'diag' = S4D
    c.s4.disc = "bilinear"  # discretisation: 'bilinear' | 'zoh' (exact) | 'approx_zoh' (dt B)
    c.s4.dt_min = 1e-3  # smallest initial step size (log-uniform init)
    c.s4.dt_max = 1e-1  # largest initial step size
    c.s4.diag_init = "lin"  # S4D (mode 'diag') eigenvalue init: 'lin' | 'inv' | 'legs'

    c.mamba = ml_collections.ConfigDict()
    c.mamba.d_state = 16  # state size per channel
    c.mamba.d_conv = 4  # causal depthwise conv width
    c.mamba.expand = 2  # d_inner = expand * d_model
    c.mamba.dt_rank = 0  # rank of the dt projection; 0 = ceil(d_model / 16)
    c.mamba.dt_min = 1e-3  # smallest initial dt (log-uniform, stored via inverse softplus)
    c.mamba.dt_max = 1e-1  # largest initial dt
    c.mamba.disc = "approx_zoh"  # discretisation: 'approx_zoh' (kernel) | 'zoh' | 'bilinear'

    c.mamba2 = ml_collections.ConfigDict()
    c.mamba2.d_state = 64  # state size per head
    c.mamba2.d_conv = 4  # causal depthwise conv width
    c.mamba2.expand = 2  # d_inner = expand * d_model
    c.mamba2.headdim = 64  # cap on channels per head: the largest divisor of d_inner <= it
    c.mamba2.n_groups = 1  # B/C groups; must divide the number of heads
    c.mamba2.chunk_size = 64  # SSD chunk length (the scan's block, not the HiSS chunk)

    c.lstm = ml_collections.ConfigDict()  # no extra settings: Dense -> LSTM stack -> Dense

    c.transformer = ml_collections.ConfigDict()
    c.transformer.n_heads = 2  # attention heads; must divide d_model
    c.transformer.d_ff = 128  # feed-forward hidden width
    return c


def get_config(arg=None) -> ml_collections.ConfigDict:
    """Defaults: HiSS with Mamba2 at both levels on the synthetic IMU task."""
    del arg
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.type = "hiss"  # 'hiss' (low + high level) | 'flat' (one model) | 'multibranch'
    config.model.chunk_size = 10  # input steps per target step (frequency ratio; 10 in CSP-Bench)
    config.model.dtype = "float32"  # activations' compute dtype: 'float32' | 'bfloat16'; params f32
    config.model.low = level_config("mamba2", 64, 2)  # low level: runs inside each chunk
    config.model.high = level_config("mamba2", 64, 2)  # high level: runs over chunk features
    config.model.flat = level_config("mamba2", 64, 2)  # flat baseline (model.type='flat' only)
    # multibranch only: branch name -> [start, stop) input channel range, e.g. {'skin': [0, 30]}
    config.model.branches = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.name = "synthetic:imu"  # 'synthetic:imu' | 'synthetic:tactile' | 'csp:<dataset>'
    config.data.dir = ""  # CSP-Bench root holding <name>/<name>_*.h5 (csp:* only)
    config.data.file = ""  # explicit HDF5 file (raw _processed or resampled); overrides dir
    config.data.val_file = ""  # explicit validation file (fixed splits: RoNIN, TotalCapture)
    config.data.cache_dir = "~/.cache/hiss_jax"  # where built/resampled datasets are cached
    config.data.seed = 0  # seed of the synthetic generator and of random splits
    config.data.n_episodes = 200  # synthetic: number of episodes (train + val)
    config.data.episode_seconds = 20  # synthetic: length of one episode in seconds

    config.optim = optim_config()

    config.train = ml_collections.ConfigDict()
    config.train.seed = 5  # seed of init, dropout and batch order (paper: 5)
    config.train.batch_size = 4  # global training batch (paper: 4); divisible by the data axis
    config.train.eval_batch_size = 16  # validation batch; last one padded with mask 0
    config.train.num_epochs = 300.0  # training length in epochs (paper: 300) when num_steps = 0
    config.train.num_steps = 0  # training length in steps; > 0 overrides num_epochs
    config.train.window = 0  # train on random windows of this many target steps; 0 = full episodes
    config.train.eval_every = 0  # validate every this many steps; 0 = once per epoch
    config.train.checkpoint_every = 0  # resumable checkpoint every this many steps; 0 = each eval
    config.train.log_every = 50  # write train metrics every this many steps
    config.train.max_to_keep = 2  # periodic checkpoints kept (the best one is kept separately)
    config.train.init_from = ""  # run dir or checkpoint dir to take params from if workdir is new
    config.train.plot_episodes = 3  # validation episodes drawn in predictions.png (0 = no plot)
    config.train.progress = True  # show a tqdm progress bar

    config.mesh = mesh_config()
    config.kernels = kernels_config()
    return config


def optim_config(**values) -> ml_collections.ConfigDict:
    """The `optim` section: the paper's Adam 1e-4 constant, with `values` (existing keys only)
    replacing defaults, e.g. optim_config(name="adamw", lr=1e-3)."""
    c = ml_collections.ConfigDict()
    c.name = "adam"  # 'adam' | 'adamw' (decoupled weight decay)
    c.lr = 1e-4  # peak learning rate (paper: Adam 1e-4 constant)
    c.schedule = "constant"  # 'constant' | 'cosine' (warmup then cosine decay)
    c.warmup_steps = 0  # linear warmup steps (both schedules; 0 = none)
    c.end_lr_ratio = 0.0  # cosine: final lr as a fraction of the peak
    c.weight_decay = 0.0  # AdamW decay of non-SSM params (adamw only)
    c.ssm_lr = 0.0  # lr of SSM dynamics params (A_log, dt_bias, D, ...); 0 = same as lr
    c.b1 = 0.9  # Adam beta1
    c.b2 = 0.999  # Adam beta2
    c.eps = 1e-8  # Adam epsilon
    c.clip_norm = 0.0  # global-norm gradient clipping; 0 = off (paper: off)
    unknown = sorted(set(values) - set(c.keys()))
    if unknown:
        raise KeyError(f"optim_config: no field(s) {unknown}; fields: {sorted(c.keys())}")
    c.update(values)
    return c


def mesh_config() -> ml_collections.ConfigDict:
    """The `mesh` section: data parallel over every device, logical-axis sharding rules."""
    c = ml_collections.ConfigDict()
    c.data = -1  # devices on the 'data' axis (batch sharding); -1 = all remaining
    c.model = 1  # devices on the 'model' axis (parameter sharding by the rules)
    # logical axis name -> mesh axis (or None = replicated), for params annotated with logical axes
    c.rules = (("batch", "data"), ("embed", None), ("mlp", "model"), ("heads", "model"),
               ("state", None))
    return c


def kernels_config() -> ml_collections.ConfigDict:
    """The `kernels` section."""
    c = ml_collections.ConfigDict()
    # scan implementation: 'auto' (pallas on GPU, xla elsewhere) | 'ref' | 'xla' | 'pallas'
    c.impl = "auto"
    return c


def parse_arg(arg, allowed) -> set:
    """'flat,tiny' -> {'flat', 'tiny'}; an unknown word fails with the allowed ones."""
    words = {w.strip() for w in (arg or "").split(",") if w.strip()}
    unknown = words - set(allowed)
    if unknown:
        raise ValueError(f"config arg {arg!r}: unknown {sorted(unknown)}; allowed words are "
                                          f"{sorted(allowed)}, comma-separated (e.g. 'flat,tiny')")
    return words


def apply_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Seconds-long run: narrow one-layer models, a small synthetic set, a few steps."""
    for lvl in (config.model.low, config.model.high, config.model.flat):
        lvl.d_model = 16
        lvl.n_layers = 1
        lvl.s4.d_state = 8
        lvl.mamba.d_state = 4
        lvl.mamba2.d_state = 8
        lvl.mamba2.headdim = 8
        lvl.mamba2.chunk_size = 16
        lvl.transformer.d_ff = 32
    config.data.n_episodes = 12
    config.data.episode_seconds = 4
    config.train.batch_size = 4
    config.train.eval_batch_size = 4
    config.train.num_steps = 20
    config.train.window = 0
    config.optim.warmup_steps = 0
    config.train.eval_every = 10
    config.train.log_every = 5
    config.train.plot_episodes = 1
    return config


def family_config(kind: str, arg, *, d_model: int, n_layers: int, dropout: float,
                  flat_d_model: int, flat_n_layers: int, flat_dropout: float,
                  settings: dict | None = None,
                  level_settings: dict | None = None) -> ml_collections.ConfigDict:
    """HiSS with `kind` at both levels; arg words: 'flat' (flat baseline), 'tiny'.

    settings: {family: {field: value}} applied to every level before 'tiny';
    level_settings: {level: {family: {field: value}}} applied to one level after `settings`.
    """
    words = parse_arg(arg, ("flat", "tiny"))
    config = synthetic_training(get_config())
    config.model.low = level_config(kind, d_model, n_layers, dropout)
    config.model.high = level_config(kind, d_model, n_layers, dropout)
    config.model.flat = level_config(kind, flat_d_model, flat_n_layers, flat_dropout)
    for lvl in (config.model.low, config.model.high, config.model.flat):
        for family, fields in (settings or {}).items():
            lvl[family].update(fields)
    for level, families in (level_settings or {}).items():
        for family, fields in families.items():
            config.model[level][family].update(fields)
    if "flat" in words:
        config.model.type = "flat"
    if "tiny" in words:
        apply_tiny(config)
    return config


def synthetic_training(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Training defaults for the synthetic tasks: minutes on a CPU, not the paper's 300 epochs.

    The CSP-Bench presets (`configs/csp.py`) keep the paper's Adam 1e-4 / batch 4 instead.
    """
    config.optim.lr = 2e-3
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 50
    config.optim.clip_norm = 1.0
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.train.num_steps = 500  # mamba2: val MSE ~0.22 x zero baseline after 200-600 steps
    config.train.window = 40  # 8 s windows (400 input steps): 2.5x cheaper steps than 20 s episodes
    config.train.eval_every = 100
    config.train.log_every = 25
    return config
