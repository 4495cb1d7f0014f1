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

Modules: this file holds the public `ssd`, the references, the XLA path and `ssd_pallas`
(padding and dispatch); `kernels.ssd_long` the Pallas kernels for sequences of several
chunks; `kernels.ssd_short` those for a sequence that fits in one chunk;
`kernels.ssd_common` the argument checks, `BlockSizes` and the Pallas helpers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.ssd_common import (BlockSizes, _check_args, _effective_dt, _finish,
                                _kernel_chunk, _next_pow2, _pad_to, LONG_CHUNK)
from kernels.ssd_long import _ssd_core
from kernels.ssd_short import _ssd_short

__all__ = ["BlockSizes", "ssd", "ssd_associative_reference", "ssd_chunked", "ssd_pallas",
           "ssd_reference"]

_IMPLS = ("ref", "xla", "pallas", "auto")


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
    dt_eff = _pad_to(_effective_dt(dt, dt_bias, dt_softplus), 1, l_pad)   # pad AFTER softplus
    xf = _pad_to(x.astype(f32), 1, l_pad)
    Bf = _pad_to(B.astype(f32), 1, l_pad)
    Cf = _pad_to(C.astype(f32), 1, l_pad)
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


# --------------------------------------------------------------------------------------------
# Pallas GPU kernels (Triton backend): padding and dispatch.
# --------------------------------------------------------------------------------------------
def ssd_pallas(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None,
               dt_softplus=False, initial_state=None, return_final_state=False,
               block_sizes=None, interpret=None):
    """SSD with the Pallas kernels (Triton backend); interpret mode when no GPU is present.

    x, z: (B, L, H, P)  dt: (B, L, H)  A: (H,)  B, C: (B, L, G, N)  D: (H,) or (H, P)
    The wrapper applies dt's bias and softplus in XLA (autodiff carries them), zero-pads
    time to a multiple of the kernel chunk (padded steps have dt = 0: no decay, no write;
    not on the packed one-chunk path, whose kernels mask the rows instead) and P, N to powers
    of two >= 16 (Triton's smallest dot), then calls the fused kernels under
    `jax.custom_vjp`. Returns y (B, L, H, P) [, h_L (B, H, P, N) float32].
    Numerics: dot operands are x's dtype with f32 accumulation (f32 inputs run TF32 dots on
    the GPU, ~1e-3 relative; interpret mode on CPU is exact f32); the chunk-entry states kept
    for the backward are stored in x's dtype.
    A sequence that fits in one kernel chunk (L <= chunk, e.g. HiSS's low level) takes the
    one-chunk path (`BlockSizes.short`): no saved states, no dL/dh pass, several sequences
    per program (`kernels.ssd_short`).
    """
    b, l, h, p, g, n = _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state)
    bs = block_sizes or BlockSizes.get_default()
    if interpret is None:
        interpret = not _on_gpu()
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"ssd_pallas supports float32/bfloat16/float16 x; got {x.dtype=}")
    q = _kernel_chunk(chunk_size, bs)
    short = bs.short and l <= q
    if not short and bs.chunk is None:
        q = min(q, LONG_CHUNK)
    if short:
        # One chunk: the smallest power-of-two chunk that holds the sequence. The one-chunk
        # path pads time itself, and only in its run-6 layout (BlockSizes.short_pack=False).
        q = max(16, _next_pow2(l))
    lp = l if short else -(-l // q) * q
    pp, nn = max(16, _next_pow2(p)), max(16, _next_pow2(n))
    f32 = jnp.float32
    dt_eff = _pad_to(_effective_dt(dt, dt_bias, dt_softplus), 1, lp)
    # Triton dots need one operand dtype: B and C follow x.
    xp = _pad_to(_pad_to(x, 1, lp), 3, pp)
    Bp = _pad_to(_pad_to(B.astype(x.dtype), 1, lp), 3, nn)
    Cp = _pad_to(_pad_to(C.astype(x.dtype), 1, lp), 3, nn)
    if D is None:
        Dp = jnp.zeros((h, pp), f32)
    else:
        Dp = _pad_to(jnp.broadcast_to((D[:, None] if D.ndim == 1 else D).astype(f32), (h, p)),
                     1, pp)
    zp = None if z is None else _pad_to(_pad_to(z, 1, lp), 3, pp)
    h0 = (None if initial_state is None
          else _pad_to(_pad_to(initial_state.astype(f32), 2, pp), 3, nn))
    if short:
        y, hT = _ssd_short(xp, dt_eff, A.astype(f32), Bp, Cp, Dp, zp, h0, q=q, bs=bs,
                           interpret=interpret, want_hT=return_final_state)
    else:
        # zero_states_inline: no zeros arrays for a missing initial state or for the
        # cotangent of an unreturned final state (the kernels start from zero themselves).
        if h0 is None and not bs.zero_states_inline:
            h0 = jnp.zeros((b, h, pp, nn), f32)
        y, hT = _ssd_core(xp, dt_eff, A.astype(f32), Bp, Cp, Dp, zp, h0, q, bs, interpret,
                          return_final_state or not bs.zero_states_inline)
    if (lp, pp) != (l, p):
        y = y[:, :l, :, :p]
    if not return_final_state:
        return y
    return y, (hT if (pp, nn) == (p, n) else hT[:, :, :p, :n])
