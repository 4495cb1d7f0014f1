"""S4 (full DPLR/NPLR) and S4D (diagonal) block stacks, with a streaming step.

Shapes: x (B, L, H) with H = d_model; N = d_state (real state size), N2 = N // 2 stored
conjugate-pair representatives; one SSM per channel.

Papers: S4 (Gu, Goel, Re 2022, arXiv 2111.00396) Algorithm 1; S4D (Gu et al. 2022,
arXiv 2206.11893); HiSS (Bhirangi et al. 2024, arXiv 2402.10211) uses full S4 with rank 1,
d_state 64, bilinear discretisation and kernel length = sequence length.

SSM dynamics parameters (leaf names, listed in `S4_SSM_PARAM_NAMES`; route them to their own
learning rate without weight decay):
  log_dt    (H,)         log step size, uniform in [log dt_min, log dt_max]
  log_A_re  (H, N2)      real part of Lambda through A_re = -exp(log_A_re), init -1/2
  A_im      (H, N2)      imaginary part of Lambda
  P         (H, N2, 2)   low-rank term p (complex as [re, im]); 'dplr' mode only
  B         (H, N2, 2)   input vector (complex as [re, im])
  C         (H, N2, 2)   output row (complex as [re, im]); the TRUE C of the recurrence.
                         The convolution derives C~ = C (I - A_bar^L) for each length L, so the
                         convolution and `step` agree for every length.
  D         (H,)         skip connection
The other leaves are `kernel` / `bias` (Dense) and `scale` / `bias` (LayerNorm).

Kernels: 'dplr' + 'bilinear' by Cauchy + Woodbury at the roots of unity then irfft (S4
Algorithm 1); 'dplr' + 'zoh' / 'approx_zoh' by Krylov doubling of the dense discrete matrix (exp
of a DPLR matrix is not DPLR); 'diag' by Vandermonde. Convolution by FFT of length 2L (causal).
Discretisations (`ssm_math.DISCRETIZATIONS`): 'bilinear', exact 'zoh', and 'approx_zoh'
(A_bar = exp(dt A), B_bar = dt B, as Mamba).
Streaming steps (same parameters, same discretisation): 'dplr' + 'bilinear' O(N) per channel
via Woodbury, 'dplr' + 'zoh' / 'approx_zoh' O(N^2) with the dense matrix, 'diag' O(N).
Numerics: in float32 the 'zoh' expm of dt A (||A|| ~ N^2 / 2 for LegS) is the least accurate
piece, about 4e-5 absolute at d_state 64 and dt 0.1; bilinear is about 100x tighter.
Mixed precision (`dtype`, config.model.dtype): the blocks' GELU / GLU Dense and their inputs run
in `dtype` (e.g. bfloat16; parameters stay float32); the SSM kernel (complex64), the FFT
convolution and the D skip run in float32 on the input cast up, and the LayerNorms and the
residual stream stay float32.  `dtype=None` computes in the input's dtype.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hiss_jax.models import ssm_math

S4_SSM_PARAM_NAMES = ("log_dt", "log_A_re", "A_im", "P", "B", "C", "D")
S4_MODES = ("dplr", "diag")
LAYER_NORM_EPS = 1e-5  # PyTorch nn.LayerNorm default, as in the HiSS reference code.


def _as_complex(x):
    """(..., 2) float [re, im] -> (...) complex."""
    return jax.lax.complex(x[..., 0], x[..., 1])


def _tiled_complex_init(values: np.ndarray):
    """Initialiser copying one complex (N2,) vector to every channel, stored as (H, N2, 2)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        h, n2, _ = shape
        v = np.broadcast_to(values, (h, n2))
        return jnp.asarray(np.stack([v.real, v.imag], axis=-1), dtype)

    return init


def _complex_normal_init(key, shape, dtype=jnp.float32):
    # Unit-variance complex normal: real and imaginary parts each of variance 1/2.
    return jax.random.normal(key, shape, dtype) * np.sqrt(0.5)


def _check_s4_options(d_model, d_state, mode, disc, dt_min, dt_max, diag_init):
    if d_model < 1:
        raise ValueError(f"{d_model=} must be >= 1")
    if d_state < 2 or d_state % 2:
        raise ValueError(f"{d_state=} must be even and >= 2 (conjugate pairs are stored)")
    if mode not in S4_MODES:
        raise ValueError(f"{mode=} is not a known S4 mode; use one of {S4_MODES}")
    if disc not in ssm_math.DISCRETIZATIONS:
        raise ValueError(f"{disc=} is not known; use one of {ssm_math.DISCRETIZATIONS}")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min=}, {dt_max=}")
    if diag_init not in ("legs", "lin", "inv"):
        raise ValueError(f"{diag_init=} is not known; use one of ('legs', 'lin', 'inv')")


class S4Layer(nn.Module):
    """The SSM of one S4 block: y = K * u + D u, one SSM per channel.

    u: (B, L, H) -> y: (B, L, H) float32.  K: (H, L) from the parameters (module docstring).
    mode 'dplr': full S4, HiPPO-LegS NPLR init, rank 1; kernel by Cauchy + Woodbury (S4
    Algorithm 1) for disc 'bilinear', by Krylov doubling of the dense discrete matrix for 'zoh'.
    mode 'diag': S4D, Vandermonde kernel (S4D eq. 5), init from `diag_init`.
    """

    d_model: int
    d_state: int = 64
    mode: str = "dplr"
    disc: str = "bilinear"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    diag_init: str = "lin"

    def setup(self):
        _check_s4_options(self.d_model, self.d_state, self.mode, self.disc, self.dt_min,
                          self.dt_max, self.diag_init)
        h, n2 = self.d_model, self.d_state // 2
        if self.mode == "dplr":
            lam, p, b, _ = ssm_math.hippo_legs_nplr(self.d_state)
        else:
            lam, b = ssm_math.s4d_init(self.d_state, self.diag_init)
        lo, hi = np.log(self.dt_min), np.log(self.dt_max)
        self.log_dt = self.param(
            "log_dt", lambda k, s: jax.random.uniform(k, s, jnp.float32, lo, hi), (h,))
        self.log_A_re = self.param(
            "log_A_re", lambda k, s: jnp.full(s, np.log(-lam.real), jnp.float32), (h, n2))
        self.A_im = self.param(
            "A_im", lambda k, s: jnp.broadcast_to(jnp.asarray(lam.imag, jnp.float32), s), (h, n2))
        if self.mode == "dplr":
            self.P = self.param("P", _tiled_complex_init(p), (h, n2, 2))
        self.B = self.param("B", _tiled_complex_init(b), (h, n2, 2))
        self.C = self.param("C", _complex_normal_init, (h, n2, 2))
        self.D = self.param("D", nn.initializers.normal(1.0), (h,))

    def _continuous(self):
        """Continuous parameters: Lambda, P (or None), B, C: (H, N2) complex; dt: (H,)."""
        lam = jax.lax.complex(-jnp.exp(self.log_A_re), self.A_im)
        p = _as_complex(self.P) if self.mode == "dplr" else None
        return lam, p, _as_complex(self.B), _as_complex(self.C), jnp.exp(self.log_dt)

    def kernel(self, length: int):
        """K: (H, L) real, K_k = C A_bar^k B_bar (S4 eq. 4)."""
        lam, p, b, c, dt = self._continuous()
        if self.mode == "diag":
            da, db = ssm_math.discretize_diag(lam, b, dt[:, None], self.disc)
            return ssm_math.vandermonde_kernel(da, db, c, length)
        if self.disc == "bilinear":
            c_tilde = ssm_math.dplr_c_tilde(lam, p, b, c, dt, length, self.disc)
            return ssm_math.dplr_kernel_bilinear(lam, p, b, c_tilde, dt, length)
        # Zero-order hold has no Woodbury form (exp of a DPLR matrix is not DPLR), so the
        # dense discrete matrix is powered directly.
        da, db = ssm_math.discretize_dplr(lam, p, b, dt, self.disc)
        c_f = jnp.concatenate([c, jnp.conj(c)], axis=-1)
        return ssm_math.dense_kernel(da, db, c_f, length)

    def __call__(self, u):
        if u.ndim != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"S4Layer expects u (B, L, {self.d_model}), got {u.shape}")
        k = self.kernel(u.shape[1])
        u32 = u.astype(jnp.float32)
        return ssm_math.causal_fft_conv(u32, k) + self.D * u32

    def init_state(self, batch_size: int):
        """Zero state x: (B, H, N2) complex (the conjugate half is implicit)."""
        return jnp.zeros((batch_size, self.d_model, self.d_state // 2), jnp.complex64)

    def step(self, state, u_t):
        """state: (B, H, N2) complex, u_t: (B, H) -> (state', y_t: (B, H) float32) (S4 eq. 3)."""
        lam, p, b, c, dt = self._continuous()
        u32 = u_t.astype(jnp.float32)
        if self.mode == "diag":
            da, db = ssm_math.discretize_diag(lam, b, dt[:, None], self.disc)
            state, y = ssm_math.diag_step(state, u32, da, db, c)
        elif self.disc == "bilinear":
            state, y = ssm_math.dplr_bilinear_step(state, u32, lam, p, b, c, dt)
        else:
            # exp of a DPLR matrix has no O(N) form: zero-order hold steps the dense matrix.
            da, db = ssm_math.discretize_dplr(lam, p, b, dt, self.disc)
            n2 = self.d_state // 2
            state, y = ssm_math.dense_half_step(state, u32, da[:, :n2], db[:, :n2], c)
        return state, y + self.D * u32


class S4Block(nn.Module):
    """S4 block (HiSS / S4 reference): y = GLU(Dense(H, 2H)(drop(GELU(drop(SSM(x)))))).

    x: (B, L, H) -> (B, L, H).
    """

    d_model: int
    dropout: float = 0.0
    d_state: int = 64
    mode: str = "dplr"
    disc: str = "bilinear"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    diag_init: str = "lin"
    dtype: Any = None  # compute dtype of the Dense; None = promote (the pre-existing behaviour)

    def setup(self):
        self.ssm = S4Layer(self.d_model, self.d_state, self.mode, self.disc, self.dt_min,
                           self.dt_max, self.diag_init)
        self.drop = nn.Dropout(self.dropout)
        self.out = nn.Dense(2 * self.d_model, dtype=self.dtype)

    def _post(self, y, dtype, deterministic):
        y = self.drop(y.astype(dtype), deterministic=deterministic)
        y = jax.nn.gelu(y, approximate=False)  # torch nn.GELU default (erf form)
        y = self.drop(y, deterministic=deterministic)
        return nn.glu(self.out(y), axis=-1)

    def __call__(self, x, *, deterministic: bool = True):
        return self._post(self.ssm(x), x.dtype, deterministic)

    def init_state(self, batch_size: int):
        return self.ssm.init_state(batch_size)

    def step(self, state, x_t):
        state, y = self.ssm.step(state, x_t)
        return state, self._post(y, x_t.dtype, True)


class S4Stack(nn.Module):
    """[pre-LayerNorm -> S4 block -> dropout -> residual] x n_layers, no final norm (HiSS).

    x: (B, L, d_model) -> (B, L, d_model).  Streaming: `init_state(batch_size)` then
    `step(state, x_t)` with x_t: (B, d_model), through `apply(..., method=...)`, using the same
    parameters as `__call__`. `max_len` is accepted by `init_state` for a uniform interface
    across families and ignored (the recurrence has no length limit).
    Fields mirror config.model.<level>.s4 (d_state, mode, disc, dt_min, dt_max); diag_init
    ('lin' | 'inv' | 'legs') picks the S4D init when mode == 'diag'.
    """

    d_model: int
    n_layers: int
    dropout: float = 0.0
    d_state: int = 64
    mode: str = "dplr"
    disc: str = "bilinear"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    diag_init: str = "lin"
    dtype: Any = None  # compute dtype (config.model.dtype); None = the input's dtype

    def setup(self):
        if self.n_layers < 1:
            raise ValueError(f"{self.n_layers=} must be >= 1")
        _check_s4_options(self.d_model, self.d_state, self.mode, self.disc, self.dt_min,
                          self.dt_max, self.diag_init)
        self.norms = [nn.LayerNorm(epsilon=LAYER_NORM_EPS) for _ in range(self.n_layers)]
        self.blocks = [
            S4Block(self.d_model, self.dropout, self.d_state, self.mode, self.disc,
                    self.dt_min, self.dt_max, self.diag_init, dtype=self.dtype)
            for _ in range(self.n_layers)
        ]
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, x, *, deterministic: bool = True):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"S4Stack expects x (B, L, d_model={self.d_model}), got {x.shape}")
        # Float32 residual stream (as mamba_ssm's residual_in_fp32); blocks see the compute dtype.
        dtype = x.dtype if self.dtype is None else self.dtype
        x = x.astype(jnp.float32)
        for norm, block in zip(self.norms, self.blocks):
            z = block(norm(x).astype(dtype), deterministic=deterministic)
            x = x + self.drop(z, deterministic=deterministic).astype(jnp.float32)
        return x.astype(dtype)

    def init_state(self, batch_size: int, max_len: int | None = None):
        """Per-layer SSM states, a list of (B, H, N2) complex zeros."""
        del max_len
        return [block.init_state(batch_size) for block in self.blocks]

    def step(self, state, x_t):
        """state from `init_state`, x_t: (B, d_model) -> (state', y_t: (B, d_model))."""
        if x_t.ndim != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"step expects x_t (B, d_model={self.d_model}), got {x_t.shape}")
        dtype = x_t.dtype if self.dtype is None else self.dtype
        x = x_t.astype(jnp.float32)
        new_state = []
        for norm, block, s in zip(self.norms, self.blocks, state):
            s, z = block.step(s, norm(x).astype(dtype))
            new_state.append(s)
            x = x + z.astype(jnp.float32)
        return new_state, x.astype(dtype)
