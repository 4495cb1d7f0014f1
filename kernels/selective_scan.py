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
    "pallas"  the Pallas GPU kernels (Triton backend) under `jax.custom_vjp`
              (interpret mode when no GPU is present).
    "auto"    pallas on GPU, xla elsewhere.
State and all accumulation are float32; the output has u's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_IMPLS = ("ref", "xla", "pallas", "auto")


# --------------------------------------------------------------------------------------------
# Argument checking and preprocessing shared by every implementation.
# --------------------------------------------------------------------------------------------
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


def _discretize(delta, delta_bias, delta_softplus):
    """delta (+ bias, softplus) in float32: the step size of eq. 4."""
    dt = delta.astype(jnp.float32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(jnp.float32)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    return dt


def _finish(y, u, D, z):
    """y + D u, gated by silu(z); float32 in, float32 out."""
    if D is not None:
        y = y + D.astype(jnp.float32) * u.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y


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
    f32 = jnp.float32
    dt = _discretize(delta, delta_bias, delta_softplus)
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
    f32 = jnp.float32
    dt = _discretize(delta, delta_bias, delta_softplus).reshape(b, l, g, di // g, 1)
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
def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                   delta_softplus=False, initial_state=None, return_final_state=False,
                   impl="auto"):
    """Mamba-1 selective scan (Gu & Dao 2023, Algorithm 2, eq. 2a-2b).

    u, delta, z: (B, L, Di)  A: (Di, N)  B, C: (B, L, N) or (B, L, G, N)  D, delta_bias: (Di,)
    initial_state: (B, Di, N).  Returns y (B, L, Di) in u's dtype
    [, h_L (B, Di, N) float32 when `return_final_state`].
        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t . h_t + D u_t ;
        y *= silu(z)
    `impl`: "ref" (sequential lax.scan), "xla" (associative scan), "pallas" (GPU kernel,
    interpret mode on CPU), "auto" (pallas on GPU, xla elsewhere).
    """
    if impl not in _IMPLS:
        raise ValueError(f"unknown {impl=}; choose one of {_IMPLS}")
    _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if impl == "auto":
        impl = "pallas" if _on_gpu() else "xla"
    kwargs = dict(delta_softplus=delta_softplus, initial_state=initial_state,
                  return_final_state=return_final_state)
    if impl == "ref":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, **kwargs)
    if impl == "xla":
        return selective_scan_associative(u, delta, A, B, C, D, z, delta_bias, **kwargs)
    raise NotImplementedError("selective_scan impl='pallas' is not written yet; "
                              "use impl='xla' or impl='ref'")
