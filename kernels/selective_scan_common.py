"""Argument checks and helpers shared by the selective-scan implementations.

`kernels.selective_scan` (references, dispatch), `kernels.selective_scan_triton` (Triton
kernels) and `kernels.selective_scan_mgpu` (Mosaic GPU kernels) import these; this module
imports no other `kernels` module. Shape legend: kernels/selective_scan.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Validates the shapes of the `selective_scan` contract; returns (b, l, di, g, n)."""
    if u.ndim != 3:
        raise ValueError(f"u must be (batch, length, d_inner); got {u.shape=}")
    b, l, di = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {u.shape}; got {delta.shape=}")
    if A.ndim != 2 or A.shape[0] != di:
        raise ValueError(f"A must be (d_inner, d_state) with d_inner={di}; got {A.shape=}")
    n = A.shape[1]
    if B.ndim not in (3, 4) or B.shape[:2] != (b, l) or B.shape[-1] != n:
        raise ValueError(f"B must be (batch, length, d_state) or (batch, length, n_groups, "
                         f"d_state) with {(b, l)=} leading and d_state={n} last; "
                         f"got {B.shape=}")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {B.shape}; got {C.shape=}")
    g = 1 if B.ndim == 3 else B.shape[2]
    if g < 1 or di % g != 0:
        raise ValueError(f"d_inner={di} is not divisible by n_groups={g}; "
                         f"pick n_groups among the divisors of d_inner")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (di,):
            raise ValueError(f"{name} must be (d_inner,) = {(di,)}; got {name}.shape={v.shape}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {u.shape}; got {z.shape=}")
    if initial_state is not None and initial_state.shape != (b, di, n):
        raise ValueError(f"initial_state must be (batch, d_inner, d_state) = {(b, di, n)}; "
                         f"got {initial_state.shape=}")
    return b, l, di, g, n


def _as_groups(x):
    """(B, L, N) -> (B, L, 1, N); (B, L, G, N) unchanged."""
    return x[:, :, None, :] if x.ndim == 3 else x


def _acc_dtype(*xs):
    """float32, or float64 when an input is float64 (the references then run in float64)."""
    return jnp.result_type(jnp.float32, *[x.dtype for x in xs if x is not None])


def _discretize(delta, delta_bias, delta_softplus, acc):
    """delta (+ bias, softplus) in the accumulation dtype: the step size of eq. 4."""
    dt = delta.astype(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(acc)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    return dt


def _finish(y, u, D, z):
    """y + D u, gated by silu(z), in y's (accumulation) dtype."""
    if D is not None:
        y = y + D.astype(y.dtype) * u.astype(y.dtype)
    if z is not None:
        y = y * jax.nn.silu(z.astype(y.dtype))
    return y


def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


def _round_up(x, m):
    return -(-x // m) * m


def _next_pow2(x):
    return 1 << max(0, (x - 1).bit_length())
