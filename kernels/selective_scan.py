"""Selective scan (Mamba-1; Gu & Dao 2023, arXiv 2312.00752, Algorithm 2 / eq. 2a-2b).

Shape legend used throughout:
    u, delta, z: (B, L, Di)   A: (Di, N)   D, delta_bias: (Di,)
    B, C: (B, L, N) or (B, L, G, N)   state h: (B, Di, N) float32
Per channel d (channel d reads group d // (Di // G)) and state n:
    delta_t = softplus(delta_t + delta_bias)       (bias / softplus optional)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (zero-order-hold, eq. 4 / 2a)
    y_t = C_t . h_t + D * u_t ;  y_t *= silu(z_t) when z is given             (eq. 2b)

Implementations (`impl`):
    "ref"     sequential `lax.scan` over time: the readable spec (`selective_scan_reference`).
    "xla"     `jax.lax.associative_scan` over the (decay, input) pairs
              (`selective_scan_associative`); materialises (B, L, Di, N) float32.
    "pallas"  the Pallas GPU kernels under `jax.custom_vjp`: on a GPU, with jax >= 0.11.2, the
              Mosaic GPU kernels of kernels/selective_scan_mgpu.py where they were measured
              to win (`_mosaic_applies`); otherwise the Triton kernels of
              kernels/selective_scan_triton.py (interpret mode when no GPU is present).
    "auto"    pallas on GPU, xla elsewhere.
State and all accumulation are float32 (the references switch to float64 when given float64
inputs, for error measurements); the output has u's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import selective_scan_mgpu
from kernels.selective_scan_common import (_acc_dtype, _as_groups, _check_args, _discretize,
                                           _finish, _on_gpu)
# The Triton kernels' public names, re-exported: `kernels.selective_scan` is where callers
# (tests, benchmarks) find the tile sizes and the direct Pallas entry point.
from kernels.selective_scan_triton import SHORT_LEN, BlockSizes, selective_scan_pallas

__all__ = ["BlockSizes", "SHORT_LEN", "selective_scan", "selective_scan_associative",
           "selective_scan_pallas", "selective_scan_reference"]

_IMPLS = ("ref", "xla", "pallas", "auto")


# --------------------------------------------------------------------------------------------
# References.
# --------------------------------------------------------------------------------------------
def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                             delta_softplus=False, initial_state=None,
                             return_final_state=False):
    """Sequential reference: one `lax.scan` step per time step (the spec).

    u, delta, z: (B, L, Di)  A: (Di, N)  B, C: (B, L, N) or (B, L, G, N)  D, delta_bias: (Di,)
    initial_state: (B, Di, N).  Returns y (B, L, Di) [, h_L (B, Di, N) float32].
    Implements eq. 2a-2b of Gu & Dao 2023 with the zero-order-hold A-discretisation and the
    Euler B-discretisation (delta * B), as mamba_ssm does.
    """
    b, l, di, g, n = _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    f32 = _acc_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dt = _discretize(delta, delta_bias, delta_softplus, f32)
    Bg = _as_groups(B).astype(f32)
    Cg = _as_groups(C).astype(f32)
    Ag = A.astype(f32).reshape(g, di // g, n)
    h0 = (jnp.zeros((b, di, n), f32) if initial_state is None
          else initial_state.astype(f32))

    def step(h, xs):
        dt_t, u_t, B_t, C_t = xs      # (b, di), (b, di), (b, g, n), (b, g, n)
        dt_g = dt_t.reshape(b, g, di // g, 1)
        u_g = u_t.reshape(b, g, di // g, 1)
        h = h.reshape(b, g, di // g, n)
        h = jnp.exp(dt_g * Ag) * h + dt_g * u_g * B_t[:, :, None, :]
        y_t = jnp.sum(h * C_t[:, :, None, :], axis=-1).reshape(b, di)
        return h.reshape(b, di, n), y_t

    xs = (jnp.swapaxes(dt, 0, 1), jnp.swapaxes(u.astype(f32), 0, 1),
          jnp.swapaxes(Bg, 0, 1), jnp.swapaxes(Cg, 0, 1))
    h_last, y = jax.lax.scan(step, h0, xs)
    y = _finish(jnp.swapaxes(y, 0, 1), u, D, z).astype(u.dtype)
    return (y, h_last) if return_final_state else y


def selective_scan_associative(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                               delta_softplus=False, initial_state=None,
                               return_final_state=False):
    """Parallel form: `jax.lax.associative_scan` over the affine maps h -> a h + x.

    u, delta, z: (B, L, Di)  A: (Di, N)  B, C: (B, L, N) or (B, L, G, N)  D, delta_bias: (Di,)
    initial_state: (B, Di, N).  Returns y (B, L, Di) [, h_L (B, Di, N) float32].
    Same math as `selective_scan_reference` (eq. 2a-2b); the pairs (a_t, x_t) compose as
    (a1, x1) then (a2, x2) = (a1 a2, a2 x1 + x2) (Blelloch 1990; S5, Smith et al. 2023).
    Memory: two (B, L, Di, N) float32 arrays plus the scan's temporaries.
    """
    b, l, di, g, n = _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    f32 = _acc_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dt = _discretize(delta, delta_bias, delta_softplus, f32).reshape(b, l, g, di // g, 1)
    u_g = u.astype(f32).reshape(b, l, g, di // g, 1)
    Bg = _as_groups(B).astype(f32)[:, :, :, None, :]
    Cg = _as_groups(C).astype(f32)
    a = jnp.exp(dt * A.astype(f32).reshape(g, di // g, n))        # (b, l, g, di/g, n)
    x = dt * u_g * Bg
    if initial_state is not None:
        # Folding h0 into the first input keeps the scan itself homogeneous.
        h0 = initial_state.astype(f32).reshape(b, g, di // g, n)
        x = x.at[:, 0].add(a[:, 0] * h0)

    def combine(left, right):
        a1, x1 = left
        a2, x2 = right
        return a1 * a2, a2 * x1 + x2

    _, h = jax.lax.associative_scan(combine, (a, x), axis=1)
    y = jnp.einsum("blgcn,blgn->blgc", h, Cg).reshape(b, l, di)
    y = _finish(y, u, D, z).astype(u.dtype)
    if return_final_state:
        return y, h[:, -1].reshape(b, di, n)
    return y


# --------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------
MOSAIC_MAX_STATE = 16   # _mosaic_applies: the d_state measured (16) and below


def _mosaic_applies(l, di, g, n) -> bool:
    """Whether impl="pallas" takes the Mosaic GPU kernels (kernels/selective_scan_mgpu.py)
    rather than the Triton ones: a GPU (compiled, not interpret mode; CPU cross-lowering keeps
    Triton), a jax with the Pallas Mosaic GPU API (>= 0.11.2), sequences longer than
    SHORT_LEN (short ones keep the measured short-sequence Triton default), at least 128
    channels per group (one 128-channel block per warpgroup; narrower groups are padded) and
    d_state <= MOSAIC_MAX_STATE. There the Mosaic forward and backward run
    (`MgpuBlockSizes()`); H100, b8 L4096 d2048 n16 / b64 L1024 d256 n16: forward 0.428 /
    0.116 ms against v5's 0.921 / 0.243, forward+backward 2.42 / 0.62 against 4.60 / 1.19
    (benchmarks/NOTES_selective_scan.md, runs mgpu1-22)."""
    if not _on_gpu() or l <= SHORT_LEN or di // g < 128 or n > MOSAIC_MAX_STATE:
        return False
    return selective_scan_mgpu.AVAILABLE


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                   delta_softplus=False, initial_state=None, return_final_state=False,
                   impl="auto"):
    """Mamba-1 selective scan (Gu & Dao 2023, Algorithm 2, eq. 2a-2b).

    u, delta, z: (B, L, Di)  A: (Di, N)  B, C: (B, L, N) or (B, L, G, N)  D, delta_bias: (Di,)
    initial_state: (B, Di, N).  Returns y (B, L, Di) in u's dtype
    [, h_L (B, Di, N) float32 when `return_final_state`].
        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t . h_t + D u_t ;
        y *= silu(z)
    `impl`: "ref" (sequential lax.scan), "xla" (associative scan), "pallas" (GPU kernels:
    Mosaic GPU where `_mosaic_applies`, else Triton; interpret mode on CPU), "auto" (pallas
    on GPU, xla elsewhere).
    """
    if impl not in _IMPLS:
        raise ValueError(f"unknown {impl=}; choose one of {_IMPLS}")
    b, l, di, g, n = _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if impl == "auto":
        impl = "pallas" if _on_gpu() else "xla"
    kwargs = dict(delta_softplus=delta_softplus, initial_state=initial_state,
                  return_final_state=return_final_state)
    if impl == "ref":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, **kwargs)
    if impl == "xla":
        return selective_scan_associative(u, delta, A, B, C, D, z, delta_bias, **kwargs)
    if _mosaic_applies(l, di, g, n):
        return selective_scan_mgpu.selective_scan_mgpu(u, delta, A, B, C, D, z, delta_bias,
                                                       **kwargs)
    return selective_scan_pallas(u, delta, A, B, C, D, z, delta_bias, **kwargs)
