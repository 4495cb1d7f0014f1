"""SSD scan (Mamba-2, "state space duality"; Dao & Gu 2024, arXiv 2405.21060).

Shape legend used throughout:
    x, z: (B, L, H, P)   dt: (B, L, H)   A: (H,)   B, C: (B, L, G, N)
    D: (H,) or (H, P)    dt_bias: (H,)   state: (B, H, P, N) float32
Per head (head h reads group h // (H // G)):
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        (Mamba-2 paper, eq. 1 / sec. 6)
    y_t = h_t C_t + D * x_t ;  y_t *= silu(z_t) when z is given

Implementations (`impl`):
    "ref"     sequential `lax.scan` over time: the spec (`ssd_reference`).
    "xla"     the chunked SSD algorithm (paper sec. 6 / listing 1) in plain JAX (`ssd_chunked`).
    "pallas"  the Pallas GPU kernels (Triton backend) under `jax.custom_vjp`.
    "auto"    pallas on GPU, xla elsewhere.
`ssd_associative_reference` is a third reference: a `jax.lax.associative_scan` over time.
State and all accumulation are float32; the output has x's dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_IMPLS = ("ref", "xla", "pallas", "auto")


# --------------------------------------------------------------------------------------------
# Argument checking and preprocessing shared by every implementation.
# --------------------------------------------------------------------------------------------
def _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state):
    """Validates the shapes of the `ssd` contract; returns (b, l, h, p, g, n)."""
    if x.ndim != 4:
        raise ValueError(f"x must be (batch, length, n_heads, head_dim); got {x.shape=}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be (batch, length, n_heads) = {(b, l, h)}; got {dt.shape=}")
    if A.shape != (h,):
        raise ValueError(f"A must be (n_heads,) = {(h,)}; got {A.shape=}")
    if B.ndim != 4 or B.shape[:2] != (b, l):
        raise ValueError(f"B must be (batch, length, n_groups, d_state) with "
                         f"{(b, l)=} leading; got {B.shape=}")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {B.shape}; got {C.shape=}")
    g, n = B.shape[2:]
    if g < 1 or h % g != 0:
        raise ValueError(f"n_heads={h} is not divisible by n_groups={g}; "
                         f"pick n_groups among the divisors of n_heads")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size=}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be (n_heads,) = {(h,)} or (n_heads, head_dim) = {(h, p)}; "
                         f"got {D.shape=}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {x.shape}; got {z.shape=}")
    if dt_bias is not None and dt_bias.shape != (h,):
        raise ValueError(f"dt_bias must be (n_heads,) = {(h,)}; got {dt_bias.shape=}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state must be (batch, n_heads, head_dim, d_state) = "
                         f"{(b, h, p, n)}; got {initial_state.shape=}")
    return b, l, h, p, g, n


def _effective_dt(dt, dt_bias, dt_softplus):
    """dt (B, L, H) -> float32 step after the bias and the optional softplus."""
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    return dt


def _finish(y, x, D, z):
    """y (B, L, H, P) float32 -> y + D x, gated by silu(z), in x's dtype."""
    xf = x.astype(jnp.float32)
    if D is not None:
        Df = D.astype(jnp.float32)
        y = y + (Df[:, None] if D.ndim == 1 else Df) * xf
    if z is not None:
        zf = z.astype(jnp.float32)
        y = y * (zf * jax.nn.sigmoid(zf))
    return y.astype(x.dtype)


def _heads_to_groups(t, g):
    """(..., H, X) -> (..., G, H // G, X): head h reads group h // (H // G)."""
    *lead, h, last = t.shape
    return t.reshape(*lead, g, h // g, last)


# --------------------------------------------------------------------------------------------
# References.
# --------------------------------------------------------------------------------------------
def ssd_reference(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                  initial_state=None, return_final_state=False):
    """The spec: a sequential `lax.scan` over time of the Mamba-2 recurrence.

    x, z: (B, L, H, P)  dt: (B, L, H)  A: (H,)  B, C: (B, L, G, N)  state: (B, H, P, N) f32
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t + D x_t (Mamba-2 paper, eq. 1).
    """
    b, l, h, p, g, n = _check_args(x, dt, A, B, C, 1, D, z, dt_bias, initial_state)
    dt = _effective_dt(dt, dt_bias, dt_softplus)
    Af = A.astype(jnp.float32)
    rep = h // g
    # Broadcast groups to heads once; the reference favours clarity over memory.
    Bh = jnp.repeat(B.astype(jnp.float32), rep, axis=2)
    Ch = jnp.repeat(C.astype(jnp.float32), rep, axis=2)
    h0 = (jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))

    def step(state, inp):
        x_t, dt_t, B_t, C_t = inp
        decay = jnp.exp(dt_t * Af)[:, :, None, None]
        state = decay * state + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        y_t = jnp.einsum("bhpn,bhn->bhp", state, C_t, precision="highest")
        return state, y_t

    xs = (jnp.moveaxis(x.astype(jnp.float32), 1, 0), jnp.moveaxis(dt, 1, 0),
          jnp.moveaxis(Bh, 1, 0), jnp.moveaxis(Ch, 1, 0))
    h_last, ys = jax.lax.scan(step, h0, xs)
    y = _finish(jnp.moveaxis(ys, 0, 1), x, D, z)
    return (y, h_last) if return_final_state else y


def ssd_associative_reference(x, dt, A, B, C, *, D=None, z=None, dt_bias=None,
                              dt_softplus=False, initial_state=None,
                              return_final_state=False):
    """The recurrence as a `jax.lax.associative_scan` over time (Blelloch; S5's form).

    x, z: (B, L, H, P)  dt: (B, L, H)  A: (H,)  B, C: (B, L, G, N)  state: (B, H, P, N) f32
    Elements (a_t, b_t) = (exp(dt_t A), dt_t x_t B_t^T) compose as
    (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2). Materialises every state: (B, L, H, P, N).
    """
    b, l, h, p, g, n = _check_args(x, dt, A, B, C, 1, D, z, dt_bias, initial_state)
    dt = _effective_dt(dt, dt_bias, dt_softplus)
    rep = h // g
    Bh = jnp.repeat(B.astype(jnp.float32), rep, axis=2)
    Ch = jnp.repeat(C.astype(jnp.float32), rep, axis=2)
    a = jnp.exp(dt * A.astype(jnp.float32))                                # (B, L, H)
    u = (dt[..., None] * x.astype(jnp.float32))[..., None] * Bh[:, :, :, None, :]
    if initial_state is not None:
        u = u.at[:, 0].add(a[:, 0, :, None, None] * initial_state.astype(jnp.float32))

    def combine(left, right):
        a1, b1 = left
        a2, b2 = right
        return a1 * a2, a2[..., None, None] * b1 + b2

    _, states = jax.lax.associative_scan(combine, (a, u), axis=1)
    y = jnp.einsum("blhpn,blhn->blhp", states, Ch, precision="highest")
    y = _finish(y, x, D, z)
    return (y, states[:, -1]) if return_final_state else y


# --------------------------------------------------------------------------------------------
# The chunked algorithm in plain JAX (impl="xla").
# --------------------------------------------------------------------------------------------
def _pad_length(t, l_pad):
    """Zero-pads axis 1 (time) up to l_pad."""
    if t.shape[1] == l_pad:
        return t
    widths = [(0, 0)] * t.ndim
    widths[1] = (0, l_pad - t.shape[1])
    return jnp.pad(t, widths)


def _segsum_decay(cs):
    """cs (..., Q) inclusive cumsum of dt*A -> (..., Q, Q) decay exp(cs_i - cs_j), i >= j, else 0.

    The difference is formed before the exp (never exp(cs_i) * exp(-cs_j), which overflows
    within one chunk); the causal mask is applied to the exponent, so the masked entries are
    exp(-inf) = 0 and carry no gradient.
    """
    q = cs.shape[-1]
    diff = cs[..., :, None] - cs[..., None, :]
    causal = jnp.tril(jnp.ones((q, q), bool))
    return jnp.exp(jnp.where(causal, diff, -jnp.inf))


def ssd_chunked(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None,
                dt_softplus=False, initial_state=None, return_final_state=False):
    """The chunked SSD algorithm (Mamba-2 paper, sec. 6 and listing 1) in plain JAX.

    x, z: (B, L, H, P)  dt: (B, L, H)  A: (H,)  B, C: (B, L, G, N)  state: (B, H, P, N) f32
    Time is split into chunks of Q = chunk_size steps (padded with dt = 0 steps, which neither
    decay nor write the state). Per chunk: (1) cumsum cs of dt*A; (2) intra-chunk output
    (C B^T o decay) (dt x); (3) chunk state sum_j exp(cs_Q - cs_j) dt_j x_j B_j^T;
    (4) state passing across chunks h_c = exp(cs_Q) h_{c-1} + state_c; (5) inter-chunk output
    exp(cs_i) C_i h_{c-1}.
    """
    b, l, h, p, g, n = _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state)
    q = chunk_size
    nc = -(-l // q)
    l_pad = nc * q
    f32 = jnp.float32
    # Default precision: exact f32 on CPU; TF32 on GPU, the fair plain-XLA baseline there.
    hi = None
    dt_eff = _pad_length(_effective_dt(dt, dt_bias, dt_softplus), l_pad)   # pad AFTER softplus
    xf = _pad_length(x.astype(f32), l_pad)
    Bf = _pad_length(B.astype(f32), l_pad)
    Cf = _pad_length(C.astype(f32), l_pad)
    rep = h // g

    # Chunked views; heads split as (G, H/G) so group broadcasting is an einsum index.
    xc = xf.reshape(b, nc, q, g, rep, p)
    dtc = dt_eff.reshape(b, nc, q, g, rep)
    Bc = Bf.reshape(b, nc, q, g, n)
    Cc = Cf.reshape(b, nc, q, g, n)
    dA = dtc * A.astype(f32).reshape(g, rep)
    cs = jnp.cumsum(dA, axis=2)                                             # (b, c, q, g, r)
    cs_t = jnp.moveaxis(cs, 2, -1)                                          # (b, c, g, r, q)

    # (2) intra-chunk: y_i = sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j
    decay = _segsum_decay(cs_t)                                             # (b,c,g,r,q,q)
    cb = jnp.einsum("bcign,bcjgn->bcgij", Cc, Bc, precision=hi)
    dtx = dtc[..., None] * xc                                               # (b,c,q,g,r,p)
    y = jnp.einsum("bcgij,bcgrij,bcjgrp->bcigrp", cb, decay, dtx, precision=hi)

    # (3) chunk states from a zero entry state.
    decay_to_end = jnp.exp(cs_t[..., -1:] - cs_t)                           # (b,c,g,r,q)
    states = jnp.einsum("bcgrj,bcjgrp,bcjgn->bcgrpn", decay_to_end, dtx, Bc, precision=hi)

    # (4) state passing: a short sequential scan over chunks (nc steps).
    chunk_decay = jnp.exp(cs_t[..., -1])                                    # (b, c, g, r)
    h0 = (jnp.zeros((b, g, rep, p, n), f32) if initial_state is None
          else initial_state.astype(f32).reshape(b, g, rep, p, n))

    def pass_state(carry, inp):
        s_c, a_c = inp
        return a_c[..., None, None] * carry + s_c, carry     # emit the chunk's ENTRY state

    h_last, entry = jax.lax.scan(pass_state, h0,
                                 (jnp.moveaxis(states, 1, 0), jnp.moveaxis(chunk_decay, 1, 0)))
    entry = jnp.moveaxis(entry, 0, 1)                                       # (b,c,g,r,p,n)

    # (5) inter-chunk: y_i += exp(cs_i) C_i . h_entry
    y = y + jnp.einsum("bcign,bcgrpn,bcigr->bcigrp", Cc, entry, jnp.exp(cs), precision=hi)
    y = y.reshape(b, l_pad, h, p)[:, :l]
    y = _finish(y, x, D, z)
    return (y, h_last.reshape(b, h, p, n)) if return_final_state else y


# --------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------
def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


def ssd(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
        initial_state=None, return_final_state=False, impl="auto"):
    """Mamba-2 SSD scan.

    x, z: (B, L, H, P)  dt: (B, L, H)  A: (H,)  B, C: (B, L, G, N)  D: (H,) or (H, P)
    dt_bias: (H,)  initial_state: (B, H, P, N)
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t + D x_t ; y *= silu(z)
    (Mamba-2 paper, eq. 1 and the chunked algorithm of sec. 6). Head h reads group
    h // (H // G). Any length works (padded internally with dt = 0 steps).
    Returns y (B, L, H, P) in x's dtype [, h_L (B, H, P, N) float32].
    impl: "ref" (sequential scan), "xla" (chunked, plain JAX), "pallas" (GPU kernels; Pallas
    interpret mode without a GPU), "auto" (pallas on GPU, xla elsewhere).
    """
    if impl not in _IMPLS:
        raise ValueError(f"unknown {impl=}; expected one of {_IMPLS}")
    _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state)
    if impl == "auto":
        impl = "pallas" if _on_gpu() else "xla"
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                  initial_state=initial_state, return_final_state=return_final_state)
    if impl == "ref":
        return ssd_reference(x, dt, A, B, C, **kwargs)
    if impl == "xla":
        return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, **kwargs)
    return ssd_pallas(x, dt, A, B, C, chunk_size=chunk_size, **kwargs)


def ssd_pallas(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None,
               dt_softplus=False, initial_state=None, return_final_state=False,
               block_sizes=None, interpret=None):
    raise NotImplementedError("ssd impl='pallas' is not written yet; use impl='xla' or 'ref'")
