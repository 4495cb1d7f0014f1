"""Mamba-2 blocks: the SSD mixer and the residual stack (Dao & Gu 2024, arXiv 2405.21060).

Shapes: x (B, L, d_model) -> (B, L, d_model);  d_inner = expand * d_model;  H heads of P = headdim
channels (H * P = d_inner);  G = n_groups;  N = d_state.
One mixer (Dao & Gu 2024, Sec. 7.1, Fig. 6):

    z, xBC, dt = in_proj(x)                 (B, L, d_inner), (B, L, d_inner + 2 G N), (B, L, H)
    xBC   = silu(causal_depthwise_conv(xBC))      width d_conv, with bias
    x, B, C = split(xBC)                          (B, L, H, P), (B, L, G, N), (B, L, G, N)
    y     = ssd(x, softplus(dt + dt_bias), A = -exp(A_log), B, C, D)   scalar decay per head
    y     = RMSNorm(y * silu(z))                  gated norm, one group per B/C group (Sec. 7.2)
    out   = out_proj(y)                           no bias

headdim: the config's `headdim` (64 by default) is an upper bound: P is the largest divisor of
d_inner that is <= headdim, so small HiSS widths (d_model 16 -> d_inner 32 -> P 32, one head) work
without editing the config.  n_groups must divide H.

The stack is the same as Mamba's (mamba_ssm MixerModel: add -> LayerNorm -> mixer, final
LayerNorm, eps 1e-5, float32 residual).  `init_state` / `step` stream the same parameters one step
at a time (conv buffer over xBC and the per-head state (B, H, P, N)).

Mixed precision (`dtype`, config.model.dtype): in_proj / out_proj, the conv output and the SSD
inputs x, dt, B, C run in `dtype` (e.g. bfloat16; parameters stay float32); the gated RMSNorm's
statistics, the LayerNorms, the residual stream and the SSD state stay float32.  `dtype=None`
computes in the input's dtype.
"""
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

import kernels
from hiss_jax.models.mamba import (_residual_stack, _residual_stack_step, causal_depthwise_conv,
                                   conv_init, conv_step, inverse_softplus_dt_init,
                                   torch_default_init)
from hiss_jax.models.norms import RMSNormGated


def pick_headdim(d_inner: int, headdim: int) -> int:
    """Largest divisor of d_inner that is <= headdim (the configured headdim is a cap)."""
    if headdim < 1:
        raise ValueError(f"{headdim=} must be >= 1")
    return max(p for p in range(1, min(headdim, d_inner) + 1) if d_inner % p == 0)


class Mamba2Mixer(nn.Module):
    """SSD mixer (Dao & Gu 2024, Sec. 7). x: (B, L, d_model) -> (B, L, d_model).

    A_log: (H,) = log(uniform[1, 16]);  D: (H,) = 1;  dt_bias: (H,) inverse-softplus of
    log-uniform dt in [1e-3, 1e-1].
    """
    d_model: int
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    n_groups: int = 1
    chunk_size: int = 64
    n_layers: int = 1  # only scales the out_proj init (mamba_ssm's prenorm-residual rescale)
    scan_impl: str = "auto"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dtype: Any = None  # compute dtype of the projections; None = the input's dtype

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def head_dim(self) -> int:
        return pick_headdim(self.d_inner, self.headdim)

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    def setup(self):
        d_inner, h, g, n = self.d_inner, self.n_heads, self.n_groups, self.d_state
        if g < 1 or h % g:
            raise ValueError(f"n_groups={g} must divide n_heads={h} (d_inner={d_inner}, "
                             f"headdim={self.head_dim}); set mamba2.n_groups to a divisor of {h}")
        conv_dim = d_inner + 2 * g * n
        self.in_proj = nn.Dense(2 * d_inner + 2 * g * n + h, use_bias=False,
                                kernel_init=torch_default_init, dtype=self.dtype)
        self.conv_weight = self.param("conv_weight", conv_init(self.d_conv),
                                      (self.d_conv, conv_dim))
        self.conv_bias = self.param("conv_bias", conv_init(self.d_conv), (conv_dim,))
        self.dt_bias = self.param("dt_bias", inverse_softplus_dt_init(self.dt_min, self.dt_max),
                                  (h,))
        self.A_log = self.param(
            "A_log",
            lambda key, shape: jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)),
            (h,))
        self.D = self.param("D", nn.initializers.ones, (h,), jnp.float32)
        self.norm = RMSNormGated(n_groups=g, eps=1e-5)
        self.out_proj = nn.Dense(
            self.d_model, use_bias=False,
            kernel_init=nn.initializers.variance_scaling(
                1.0 / (3.0 * max(self.n_layers, 1)), "fan_in", "uniform"),
            dtype=self.dtype)

    def _split_in(self, zxbcdt):
        d_inner, g, n = self.d_inner, self.n_groups, self.d_state
        z = zxbcdt[..., :d_inner]
        xbc = zxbcdt[..., d_inner:2 * d_inner + 2 * g * n]
        dt = zxbcdt[..., 2 * d_inner + 2 * g * n:]
        return z, xbc, dt

    def _split_xbc(self, xbc):
        d_inner, g, n = self.d_inner, self.n_groups, self.d_state
        lead = xbc.shape[:-1]
        x = xbc[..., :d_inner].reshape(*lead, self.n_heads, self.head_dim)
        b = xbc[..., d_inner:d_inner + g * n].reshape(*lead, g, n)
        c = xbc[..., d_inner + g * n:].reshape(*lead, g, n)
        return x, b, c

    def __call__(self, x):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2Mixer expects x (B, L, {self.d_model}), got {x.shape=}")
        bsz, length, _ = x.shape
        z, xbc, dt = self._split_in(self.in_proj(x))
        xbc = jax.nn.silu(causal_depthwise_conv(xbc, self.conv_weight, self.conv_bias))
        xs, b, c = self._split_xbc(xbc)
        a = -jnp.exp(self.A_log.astype(jnp.float32))
        y = kernels.ssd(xs, dt, a, b, c, chunk_size=self.chunk_size, D=self.D,
                        dt_bias=self.dt_bias, dt_softplus=True, impl=self.scan_impl)
        y = self.norm(y.reshape(bsz, length, self.d_inner).astype(x.dtype), z)
        return self.out_proj(y)

    def init_state(self, batch_size: int, dtype=jnp.float32):
        """-> {'conv': (B, d_conv - 1, d_inner + 2 G N), 'ssm': (B, H, P, N) float32}, zeros."""
        conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        return {"conv": jnp.zeros((batch_size, self.d_conv - 1, conv_dim), dtype),
                "ssm": jnp.zeros((batch_size, self.n_heads, self.head_dim, self.d_state),
                                 jnp.float32)}

    def step(self, state, x_t):
        """One time step. x_t: (B, d_model) -> (state, y_t (B, d_model)).

        h_t = exp(dt A) h_{t-1} + dt x_t B_t^T,  y_t = h_t C_t + D x_t  per head (Dao & Gu 2024,
        Eq. 1-2 with scalar A per head), then the gated norm and out_proj as in `__call__`.
        """
        z, xbc, dt = self._split_in(self.in_proj(x_t))
        conv, xbc = conv_step(state["conv"], xbc, self.conv_weight, self.conv_bias)
        xs, b, c = self._split_xbc(jax.nn.silu(xbc))
        # Heads read their B/C group: head i -> group i // (H // G).
        rep = self.n_heads // self.n_groups
        b = jnp.repeat(b.astype(jnp.float32), rep, axis=1)  # (B, H, N)
        c = jnp.repeat(c.astype(jnp.float32), rep, axis=1)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias)  # (B, H)
        a = -jnp.exp(self.A_log.astype(jnp.float32))
        u = xs.astype(jnp.float32)  # (B, H, P)
        h = (jnp.exp(dt * a)[..., None, None] * state["ssm"]
             + (dt[..., None] * u)[..., None] * b[:, :, None, :])
        y = jnp.einsum("bhpn,bhn->bhp", h, c) + self.D[:, None] * u
        y = self.norm(y.reshape(x_t.shape[0], self.d_inner).astype(x_t.dtype), z)
        return {"conv": conv, "ssm": h}, self.out_proj(y)


class Mamba2Stack(nn.Module):
    """n_layers Mamba-2 blocks as mamba_ssm's MixerModel. x: (B, L, d_model) -> (B, L, d_model).

    `dropout` is accepted for the shared level interface but unused (no dropout inside Mamba
    blocks, as in mamba_ssm).  `chunk_size` is the SSD scan's block length, not the HiSS chunk.
    """
    d_model: int
    n_layers: int
    dropout: float = 0.0
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    n_groups: int = 1
    chunk_size: int = 64
    scan_impl: str = "auto"
    dtype: Any = None  # compute dtype (config.model.dtype); None = the input's dtype

    def setup(self):
        if self.n_layers < 1:
            raise ValueError(f"Mamba2Stack needs n_layers >= 1, got {self.n_layers=}")
        self.norms = [nn.LayerNorm(epsilon=1e-5) for _ in range(self.n_layers)]
        self.mixers = [Mamba2Mixer(d_model=self.d_model, d_state=self.d_state, d_conv=self.d_conv,
                                   expand=self.expand, headdim=self.headdim,
                                   n_groups=self.n_groups, chunk_size=self.chunk_size,
                                   n_layers=self.n_layers, scan_impl=self.scan_impl,
                                   dtype=self.dtype)
                       for _ in range(self.n_layers)]
        self.norm_f = nn.LayerNorm(epsilon=1e-5)

    def __call__(self, x, *, deterministic: bool = True):
        del deterministic  # no dropout in Mamba-2 blocks
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2Stack expects x (B, L, {self.d_model}), got {x.shape=}")
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
