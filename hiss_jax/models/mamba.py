"""Mamba (v1) blocks: selective SSM mixer and residual stack (Gu & Dao 2023, arXiv 2312.00752).

Shapes: x (B, L, d_model) -> (B, L, d_model);  d_inner = expand * d_model;  N = d_state;
R = dt_rank.  One mixer (Gu & Dao 2023, Sec. 3.4, Fig. 3, Algorithm 2):

    x, z  = in_proj(x)                         (B, L, d_inner) each, no bias
    x     = silu(causal_depthwise_conv(x))     width d_conv, with bias
    dt, B, C = x_proj(x)                       (B, L, R), (B, L, N), (B, L, N)
    delta = softplus(dt_proj(dt) + dt_bias)    (B, L, d_inner)
    y     = selective_scan(x, delta, A = -exp(A_log), B, C, D) * silu(z)
    out   = out_proj(y)                        no bias

Discretisation (`disc`, `hiss_jax.models.ssm_math`): 'approx_zoh' (default, Mamba's A_bar =
exp(dt A), B_bar = dt B) runs `kernels.selective_scan`; 'zoh' (exact) and 'bilinear' give a B_bar
per (channel, state), which the kernel does not take, and run `ssm_math.selective_scan_disc`
(pure-JAX associative scan, `scan_impl` unused, materialises (B, L, d_inner, N) float32).

The stack follows mamba_ssm's MixerModel, which HiSS uses: per layer `residual += hidden;
hidden = mixer(LayerNorm(residual))`, then a final LayerNorm of `residual + hidden`; LayerNorm eps
1e-5, residual kept in float32.  The SSM dynamics parameters are named `A_log`, `dt_bias`, `D`
so that the optimiser can route them by leaf name (own learning rate, no weight decay).

Mixed precision (`dtype`, config.model.dtype): the projections, the conv output and the scan's
inputs u, delta, B, C, z run in `dtype` (e.g. bfloat16; parameters stay float32); LayerNorm
statistics, the residual stream, the conv's multiply-adds and the scan state stay float32.
`dtype=None` computes in the input's dtype.

Streaming: `MambaStack.init_state(batch_size)` and `MambaStack.step(state, x_t)` run the same
parameters one time step at a time (conv buffer of the last d_conv - 1 inputs and the SSM state
h (B, d_inner, N) per layer); `step` over a sequence equals `__call__` up to float rounding.
"""
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

import kernels
from hiss_jax.models import ssm_math

# PyTorch's default nn.Linear / nn.Conv1d init (kaiming_uniform with a = sqrt(5)) is uniform with
# variance 1 / (3 fan_in); mamba_ssm keeps it for every projection except dt_proj.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def causal_depthwise_conv(x, weight, bias):
    """Causal depthwise 1-D convolution (Mamba's short conv, Gu & Dao 2023, Sec. 3.4).

    x: (B, L, C)  weight: (K, C)  bias: (C,) -> (B, L, C);
    y_t = bias + sum_k weight[k] * x_{t - K + 1 + k}, zeros before t = 0 (PyTorch's Conv1d with
    padding K - 1 and the tail cut off, weight[c, 0, k] == weight[k, c] here).
    """
    k = weight.shape[0]
    length = x.shape[1]
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (k - 1, 0), (0, 0)))
    # K is 4: K shifted multiply-adds beat a conv_general_dilated call at these sizes and are the
    # exact mirror of the streaming update in `conv_step`.
    y = bias.astype(jnp.float32)
    for i in range(k):
        y = y + xp[:, i:i + length] * weight[i].astype(jnp.float32)
    return y.astype(x.dtype)


def conv_step(conv_state, x_t, weight, bias):
    """One step of `causal_depthwise_conv`.

    conv_state: (B, K - 1, C) the previous K - 1 inputs, oldest first  x_t: (B, C)
    -> (new conv_state (B, K - 1, C), y_t (B, C)).
    """
    window = jnp.concatenate([conv_state, x_t[:, None].astype(conv_state.dtype)], axis=1)
    y = bias.astype(jnp.float32)
    for i in range(weight.shape[0]):
        y = y + window[:, i].astype(jnp.float32) * weight[i].astype(jnp.float32)
    return window[:, 1:], y.astype(x_t.dtype)


def inverse_softplus_dt_init(dt_min: float, dt_max: float, dt_init_floor: float = 1e-4):
    """Bias init for dt: dt ~ log-uniform[dt_min, dt_max] (floored), stored as softplus^-1(dt).

    Gu & Dao 2023, Sec. 3.6 / App. D; softplus^-1(dt) = dt + log(-expm1(-dt)).
    """
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, dt_init_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def conv_init(d_conv: int):
    """PyTorch's default depthwise Conv1d init: uniform(+-1 / sqrt(fan_in)), fan_in = d_conv."""
    bound = 1.0 / math.sqrt(d_conv)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def uniform_init(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class MambaMixer(nn.Module):
    """Selective SSM mixer (Gu & Dao 2023, Algorithm 2). x: (B, L, d_model) -> (B, L, d_model).

    A_log: (d_inner, N) = log(1..N) per channel (S4D-Real);  D: (d_inner,) = 1;
    dt_bias: (d_inner,) inverse-softplus of log-uniform dt in [dt_min, dt_max].
    """
    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    n_layers: int = 1  # only scales the out_proj init (mamba_ssm's prenorm-residual rescale)
    scan_impl: str = "auto"
    disc: str = "approx_zoh"  # 'approx_zoh' (kernel) | 'zoh' | 'bilinear' (module docstring)
    dtype: Any = None  # compute dtype of the projections; None = the input's dtype

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank if self.dt_rank > 0 else math.ceil(self.d_model / 16)

    def setup(self):
        d_inner, n, r = self.d_inner, self.d_state, self.rank
        self.in_proj = nn.Dense(2 * d_inner, use_bias=False, kernel_init=torch_default_init,
                                dtype=self.dtype)
        self.conv_weight = self.param("conv_weight", conv_init(self.d_conv), (self.d_conv, d_inner))
        self.conv_bias = self.param("conv_bias", conv_init(self.d_conv), (d_inner,))
        self.x_proj = nn.Dense(r + 2 * n, use_bias=False, kernel_init=torch_default_init,
                               dtype=self.dtype)
        # dt_proj's bias is `dt_bias`, kept apart so it is routed by name and handed to the scan
        # as delta_bias (mamba_ssm passes dt_proj.bias the same way).
        self.dt_proj = nn.Dense(d_inner, use_bias=False, kernel_init=uniform_init(r ** -0.5),
                                dtype=self.dtype)
        self.dt_bias = self.param("dt_bias", inverse_softplus_dt_init(self.dt_min, self.dt_max),
                                  (d_inner,))
        self.A_log = self.param(
            "A_log",
            lambda key, shape: jnp.log(jnp.broadcast_to(
                jnp.arange(1, n + 1, dtype=jnp.float32), shape)),
            (d_inner, n))
        self.D = self.param("D", nn.initializers.ones, (d_inner,), jnp.float32)
        # mamba_ssm's _init_weights: out_proj weights divided by sqrt(n_layers) after the default
        # init, i.e. variance 1 / (3 fan_in n_layers).
        self.out_proj = nn.Dense(
            self.d_model, use_bias=False,
            kernel_init=nn.initializers.variance_scaling(
                1.0 / (3.0 * max(self.n_layers, 1)), "fan_in", "uniform"),
            dtype=self.dtype)

    def _split_x_proj(self, x):
        r, n = self.rank, self.d_state
        x_dbl = self.x_proj(x)
        return x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]

    def __call__(self, x):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MambaMixer expects x (B, L, {self.d_model}), got {x.shape=}")
        xz = self.in_proj(x)
        xs, z = jnp.split(xz, 2, axis=-1)
        xs = jax.nn.silu(causal_depthwise_conv(xs, self.conv_weight, self.conv_bias))
        dt, b, c = self._split_x_proj(xs)
        delta = self.dt_proj(dt)
        a = -jnp.exp(self.A_log.astype(jnp.float32))
        if self.disc == "approx_zoh":
            y = kernels.selective_scan(xs, delta, a, b, c, self.D, z=z, delta_bias=self.dt_bias,
                                       delta_softplus=True, impl=self.scan_impl)
        else:
            y = ssm_math.selective_scan_disc(xs, delta, a, b, c, self.D, z=z,
                                             delta_bias=self.dt_bias, delta_softplus=True,
                                             disc=self.disc)
        return self.out_proj(y.astype(x.dtype))

    def init_state(self, batch_size: int, dtype=jnp.float32):
        """-> {'conv': (B, d_conv - 1, d_inner), 'ssm': (B, d_inner, N) float32}, all zeros."""
        return {"conv": jnp.zeros((batch_size, self.d_conv - 1, self.d_inner), dtype),
                "ssm": jnp.zeros((batch_size, self.d_inner, self.d_state), jnp.float32)}

    def step(self, state, x_t):
        """One time step. x_t: (B, d_model) -> (state, y_t (B, d_model)); the recurrence of
        Gu & Dao 2023, Eq. 2a-2b under `disc` (for 'approx_zoh': A-bar = exp(delta A) and Euler
        B-bar = delta B, as the kernel computes them).
        """
        xz = self.in_proj(x_t)
        xs, z = jnp.split(xz, 2, axis=-1)
        conv, xs = conv_step(state["conv"], xs, self.conv_weight, self.conv_bias)
        xs = jax.nn.silu(xs)
        dt, b, c = self._split_x_proj(xs)
        delta = jax.nn.softplus(self.dt_proj(dt).astype(jnp.float32) + self.dt_bias)
        a = -jnp.exp(self.A_log.astype(jnp.float32))
        a_bar, scale = ssm_math.discretize(delta[..., None], a, self.disc)
        u = xs.astype(jnp.float32)
        h = a_bar * state["ssm"] + scale * u[..., None] * b.astype(jnp.float32)[:, None, :]
        y = jnp.einsum("bdn,bn->bd", h, c.astype(jnp.float32)) + self.D * u
        y = y * jax.nn.silu(z.astype(jnp.float32))
        return {"conv": conv, "ssm": h}, self.out_proj(y.astype(x_t.dtype))


class MambaStack(nn.Module):
    """n_layers Mamba blocks as mamba_ssm's MixerModel. x: (B, L, d_model) -> (B, L, d_model).

    `dropout` is accepted for the shared level interface but unused: mamba_ssm (and HiSS) put no
    dropout inside Mamba blocks.
    """
    d_model: int
    n_layers: int
    dropout: float = 0.0
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    scan_impl: str = "auto"
    disc: str = "approx_zoh"  # 'approx_zoh' (kernel) | 'zoh' | 'bilinear'
    dtype: Any = None  # compute dtype (config.model.dtype); None = the input's dtype

    def setup(self):
        if self.n_layers < 1:
            raise ValueError(f"MambaStack needs n_layers >= 1, got {self.n_layers=}")
        if self.disc not in ssm_math.DISCRETIZATIONS:
            raise ValueError(f"{self.disc=} is not a Mamba discretisation; use one of "
                             f"{ssm_math.DISCRETIZATIONS} (config: model.<level>.mamba.disc)")
        self.norms = [nn.LayerNorm(epsilon=1e-5) for _ in range(self.n_layers)]
        self.mixers = [MambaMixer(d_model=self.d_model, d_state=self.d_state, d_conv=self.d_conv,
                                  expand=self.expand, dt_rank=self.dt_rank, dt_min=self.dt_min,
                                  dt_max=self.dt_max, n_layers=self.n_layers,
                                  scan_impl=self.scan_impl, disc=self.disc, dtype=self.dtype)
                       for _ in range(self.n_layers)]
        self.norm_f = nn.LayerNorm(epsilon=1e-5)

    def __call__(self, x, *, deterministic: bool = True):
        del deterministic  # no dropout in Mamba blocks
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MambaStack expects x (B, L, {self.d_model}), got {x.shape=}")
        return _residual_stack(self.norms, self.mixers, self.norm_f, x,
                               lambda mixer, h: mixer(h), self.dtype)

    def init_state(self, batch_size: int, max_len: int | None = None) -> Any:
        """Per-layer streaming state: tuple of {'conv', 'ssm'} dicts, zeros.  `max_len` (the
        stream length, needed by the Transformer's KV cache) is accepted and unused: the state
        has a fixed size."""
        del max_len
        return tuple(m.init_state(batch_size) for m in self.mixers)

    def step(self, state, x_t):
        """x_t: (B, d_model) -> (state, y_t (B, d_model)); `step` over t equals `__call__`."""
        return _residual_stack_step(self.norms, self.mixers, self.norm_f, state, x_t, self.dtype)


def _residual_stack(norms, mixers, norm_f, x, call, dtype=None):
    """mamba_ssm MixerModel: residual += hidden; hidden = mixer(LN(residual)); at the end
    LN_f(residual + hidden).

    The residual stream is float32 (mamba_ssm's residual_in_fp32) so bf16 activations do not
    drift over layers; the LayerNorms see it in float32 (float32 statistics), and the mixers and
    the caller get their inputs in `dtype` (None = x's dtype).
    """
    dtype = x.dtype if dtype is None else dtype
    hidden, residual = x, None
    for norm, mixer in zip(norms, mixers):
        residual = (hidden.astype(jnp.float32) if residual is None
                    else residual + hidden.astype(jnp.float32))
        hidden = call(mixer, norm(residual).astype(dtype))
    residual = residual + hidden.astype(jnp.float32)
    return norm_f(residual).astype(dtype)


def _residual_stack_step(norms, mixers, norm_f, state, x_t, dtype=None):
    """One time step of `_residual_stack`; state is a tuple of per-layer mixer states."""
    dtype = x_t.dtype if dtype is None else dtype
    hidden, residual, new_state = x_t, None, []
    for norm, mixer, s in zip(norms, mixers, state):
        residual = (hidden.astype(jnp.float32) if residual is None
                    else residual + hidden.astype(jnp.float32))
        s, hidden = mixer.step(s, norm(residual).astype(dtype))
        new_state.append(s)
    residual = residual + hidden.astype(jnp.float32)
    return tuple(new_state), norm_f(residual).astype(dtype)
