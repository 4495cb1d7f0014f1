"""Discretisations of Mamba's selective SSM, and a Mamba stack that can use them.

Shapes: u, delta, z: (B, L, Di)  A: (Di, N) real, negative  B, C: (B, L, N)  D, delta_bias: (Di,)
state h: (B, Di, N) float32.  Per channel d, state n, with dt = softplus(delta + delta_bias):

    h_t = A_bar_t * h_{t-1} + B_bar_t * u_t,   y_t = C_t . h_t + D u_t  (y *= silu(z))
    'approx_zoh' (what Mamba and `kernels.selective_scan` compute, Gu & Dao 2023, Sec. 3.5):
                 A_bar = exp(dt A),                    B_bar = dt B
    'zoh'        (exact zero-order hold, Gu & Dao 2023, eq. 4):
                 A_bar = exp(dt A),                    B_bar = (exp(dt A) - 1) / A * B
    'bilinear'   (Tustin, S4 eq. 3):
                 A_bar = (1 + dt A / 2) / (1 - dt A / 2),  B_bar = dt / (1 - dt A / 2) * B

A is diagonal per channel, so every form is elementwise in (d, n); exact ZOH and bilinear give a
B_bar per (channel, state), which the selective-scan kernel (one dt B_t per state) does not take.
`selective_scan_disc` is the pure-JAX associative scan for all three; for 'approx_zoh' it equals
`kernels.selective_scan` (tests/tasks/test_discretization.py).

`DiscMambaStack` is `MambaStack` with a `disc` field: 'approx_zoh' keeps the kernel path; the other
two run `selective_scan_disc` (and the same math in `step`).  It lives here until
`hiss_jax/models/mamba.py` takes the field itself (docs/TASKS.md, "Change requests").

`DiscS4Stack` is `S4Stack` that also takes disc='approx_zoh' (A_bar = exp(dt A), B_bar = dt B; S4
itself offers 'bilinear' and exact 'zoh'): kernel and step through the dense path for 'dplr'
(expm of the DPLR matrix, as S4's exact 'zoh') and elementwise for 'diag'.  It lives here until
`hiss_jax/models/ssm_math.py` adds 'approx_zoh' to `DISCRETIZATIONS`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from hiss_jax.models import ssm_math
from hiss_jax.models.mamba import MambaMixer, MambaStack, conv_step, causal_depthwise_conv
from hiss_jax.models.s4 import LAYER_NORM_EPS, S4Block, S4Layer, S4Stack, _check_s4_options

MAMBA_DISCS = ("approx_zoh", "zoh", "bilinear")


def _check_disc(disc: str) -> None:
    if disc not in MAMBA_DISCS:
        raise ValueError(f"{disc=} is not a Mamba discretisation; use one of {MAMBA_DISCS} "
                         f"(config: model.mamba.disc)")


def discretize(dt, A, disc: str):
    """dt: (..., Di, 1)  A: (Di, N) -> (A_bar, B_scale): (..., Di, N); B_bar = B_scale * B."""
    _check_disc(disc)
    dta = dt * A
    if disc == "approx_zoh":
        return jnp.exp(dta), jnp.broadcast_to(dt, dta.shape)
    if disc == "zoh":
        # expm1(dt A) / A == dt * expm1(x) / x with x = dt A: accurate as dt A -> 0.
        return jnp.exp(dta), jnp.expm1(dta) / A
    denom = 1.0 - dta / 2
    return (1.0 + dta / 2) / denom, dt / denom


def selective_scan_disc(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                        delta_softplus=False, disc="approx_zoh", initial_state=None,
                        return_final_state=False):
    """Associative scan of the selective SSM under `disc` (module docstring).

    u, delta, z: (B, L, Di)  A: (Di, N)  B, C: (B, L, N)  D, delta_bias: (Di,)
    initial_state: (B, Di, N).  Returns y (B, L, Di) in u's dtype [, h_L (B, Di, N) float32].
    """
    _check_disc(disc)
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, L, Di); got {u.shape=}, {delta.shape=}")
    b, l, di = u.shape
    if A.shape[0] != di or B.shape != (b, l, A.shape[1]) or C.shape != B.shape:
        raise ValueError(f"need A (Di={di}, N), B and C (B, L, N); got {A.shape=}, {B.shape=}, "
                         f"{C.shape=} (grouped B/C are not supported here)")
    f32 = jnp.result_type(jnp.float32, u.dtype)
    dt = delta.astype(f32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(f32)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    a, scale = discretize(dt[..., None], A.astype(f32), disc)  # (b, l, di, n)
    x = scale * (u.astype(f32)[..., None] * B.astype(f32)[:, :, None, :])
    if initial_state is not None:
        x = x.at[:, 0].add(a[:, 0] * initial_state.astype(f32))

    def combine(left, right):
        a1, x1 = left
        a2, x2 = right
        return a1 * a2, a2 * x1 + x2

    _, h = jax.lax.associative_scan(combine, (a, x), axis=1)
    y = jnp.einsum("bldn,bln->bld", h, C.astype(f32))
    if D is not None:
        y = y + D.astype(f32) * u.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    y = y.astype(u.dtype)
    return (y, h[:, -1]) if return_final_state else y


class DiscMambaMixer(MambaMixer):
    """`MambaMixer` with a selectable discretisation (`disc`, module docstring)."""
    disc: str = "approx_zoh"

    def __call__(self, x):
        _check_disc(self.disc)
        if self.disc == "approx_zoh":
            return super().__call__(x)
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"DiscMambaMixer expects x (B, L, {self.d_model}), got {x.shape=}")
        xs, z = jnp.split(self.in_proj(x), 2, axis=-1)
        xs = jax.nn.silu(causal_depthwise_conv(xs, self.conv_weight, self.conv_bias))
        dt, b, c = self._split_x_proj(xs)
        a = -jnp.exp(self.A_log.astype(jnp.float32))
        y = selective_scan_disc(xs, self.dt_proj(dt), a, b, c, self.D, z=z,
                                delta_bias=self.dt_bias, delta_softplus=True, disc=self.disc)
        return self.out_proj(y.astype(x.dtype))

    def step(self, state, x_t):
        """x_t: (B, d_model) -> (state, y_t (B, d_model)), the recurrence under `disc`."""
        xs, z = jnp.split(self.in_proj(x_t), 2, axis=-1)
        conv, xs = conv_step(state["conv"], xs, self.conv_weight, self.conv_bias)
        xs = jax.nn.silu(xs)
        dt, b, c = self._split_x_proj(xs)
        delta = jax.nn.softplus(self.dt_proj(dt).astype(jnp.float32) + self.dt_bias)
        a_bar, scale = discretize(delta[..., None], -jnp.exp(self.A_log.astype(jnp.float32)),
                                  self.disc)
        u = xs.astype(jnp.float32)
        h = a_bar * state["ssm"] + scale * u[..., None] * b.astype(jnp.float32)[:, None, :]
        y = jnp.einsum("bdn,bn->bd", h, c.astype(jnp.float32)) + self.D * u
        y = y * jax.nn.silu(z.astype(jnp.float32))
        return {"conv": conv, "ssm": h}, self.out_proj(y.astype(x_t.dtype))


class DiscMambaStack(MambaStack):
    """`MambaStack` whose mixers use `disc`.  x: (B, L, d_model) -> (B, L, d_model)."""
    disc: str = "approx_zoh"

    def setup(self):
        _check_disc(self.disc)
        if self.n_layers < 1:
            raise ValueError(f"DiscMambaStack needs n_layers >= 1, got {self.n_layers=}")
        self.norms = [nn.LayerNorm(epsilon=1e-5) for _ in range(self.n_layers)]
        self.mixers = [DiscMambaMixer(d_model=self.d_model, d_state=self.d_state,
                                      d_conv=self.d_conv, expand=self.expand,
                                      dt_rank=self.dt_rank, dt_min=self.dt_min,
                                      dt_max=self.dt_max, n_layers=self.n_layers,
                                      scan_impl=self.scan_impl, disc=self.disc)
                       for _ in range(self.n_layers)]
        self.norm_f = nn.LayerNorm(epsilon=1e-5)


S4_DISCS = ("bilinear", "zoh", "approx_zoh")


class ApproxZohS4Layer(S4Layer):
    """`S4Layer` with A_bar = exp(dt A), B_bar = dt B (parent built with disc='zoh').

    u: (B, L, H) -> y: (B, L, H) float32;  kernel K: (H, L);  state (B, H, N2) complex.
    """

    def _discrete(self):
        """-> (dA, dB, c, dense): dense dA (H, N, N) / dB (H, N) for 'dplr', (H, N2) for 'diag'."""
        lam, p, b, c, dt = self._continuous()
        if self.mode == "diag":
            return jnp.exp(dt[:, None] * lam), dt[:, None] * b, c, False
        a_f, b_f = ssm_math.dplr_dense(lam, p, b)
        da, _ = ssm_math.discretize_dense(a_f, b_f, dt, "zoh")
        return da, dt[:, None] * b_f, c, True

    def kernel(self, length: int):
        da, db, c, dense = self._discrete()
        if not dense:
            return ssm_math.vandermonde_kernel(da, db, c, length)
        return ssm_math.dense_kernel(da, db, jnp.concatenate([c, jnp.conj(c)], -1), length)

    def step(self, state, u_t):
        da, db, c, dense = self._discrete()
        u32 = u_t.astype(jnp.float32)
        if dense:
            n2 = self.d_state // 2
            state, y = ssm_math.dense_half_step(state, u32, da[:, :n2], db[:, :n2], c)
        else:
            state, y = ssm_math.diag_step(state, u32, da, db, c)
        return state, y + self.D * u32


class _ApproxZohS4Block(S4Block):
    def setup(self):
        self.ssm = ApproxZohS4Layer(self.d_model, self.d_state, self.mode, "zoh", self.dt_min,
                                    self.dt_max, self.diag_init)
        self.drop = nn.Dropout(self.dropout)
        self.out = nn.Dense(2 * self.d_model)


class DiscS4Stack(S4Stack):
    """`S4Stack` whose `disc` may also be 'approx_zoh'.  x: (B, L, d_model) -> (B, L, d_model);
    same parameter tree as `S4Stack`."""

    def setup(self):
        if self.disc not in S4_DISCS:
            raise ValueError(f"{self.disc=} is not an S4 discretisation; use one of {S4_DISCS} "
                             f"(config: model.s4.disc)")
        if self.disc != "approx_zoh":
            return super().setup()
        if self.n_layers < 1:
            raise ValueError(f"{self.n_layers=} must be >= 1")
        _check_s4_options(self.d_model, self.d_state, self.mode, "zoh", self.dt_min,
                          self.dt_max, self.diag_init)
        self.norms = [nn.LayerNorm(epsilon=LAYER_NORM_EPS) for _ in range(self.n_layers)]
        self.blocks = [_ApproxZohS4Block(self.d_model, self.dropout, self.d_state, self.mode,
                                         "zoh", self.dt_min, self.dt_max, self.diag_init)
                       for _ in range(self.n_layers)]
        self.drop = nn.Dropout(self.dropout)
