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

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

# The Triton backend of pallas_call is deprecated from jax 0.11 (Mosaic GPU is the future);
# it is the backend these kernels are written for.
# The warning's id is "jax-pallas-triton"; its text says "Pallas Triton backend is deprecated".
warnings.filterwarnings("ignore", message=".*jax-pallas-triton.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*",
                        category=DeprecationWarning)

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


def _pad_to(t, axis, size):
    """Zero-pads `axis` of t up to `size`."""
    if t.shape[axis] == size:
        return t
    widths = [(0, 0)] * t.ndim
    widths[axis] = (0, size - t.shape[axis])
    return jnp.pad(t, widths)


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
# Pallas GPU kernels (Triton backend).
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the Pallas kernels.

    chunk: the kernel's chunk length Q (a power of two >= 16). None: the caller's chunk_size
      rounded up to a power of two within [16, 128]. The result does not depend on the chunk
      (it only regroups exact arithmetic), so the kernel may use its own.
    num_warps_fwd / num_warps_bwd / num_stages: Triton launch parameters.
    bwd: "split3" (a sequential dL/dh pass; then one program per (batch, chunk, head) for
      dx, ddt, dz, dA, dD; then one per (batch, chunk, head block) for dB, dC), "split" (the
      last two fused into one program per (batch, chunk, head block)) or "fused" (one
      sequential program per (batch, head) does it all).
    bwd_heads: heads per program where dB, dC are summed over heads (rounded down to a
      divisor of the heads per group); they sum in registers, so only H / bwd_heads partials
      are written.
    num_warps_dstate / num_warps_dx: warps of the dL/dh pass and of the split3 dx pass
      (None: num_warps_fwd); num_warps_bwd is the dB/dC (and "split"/"fused") kernels'.
    short: the one-chunk path. When the whole sequence fits in one kernel chunk (L <= the
      chunk above), the kernel chunk becomes the smallest power of two >= max(L, 16), and
      two kernels run instead of four: a forward that saves no states (the entry state is
      the initial state or zero) and one backward program per (short_batch sequences, head
      block) with no dL/dh pass (the chunk-end cotangent is the final-state cotangent or
      zero). False: the general chunked kernels at every length.
    short_batch: sequences per program on the one-chunk path (a power of two), stacked as
      one (short_batch * Q)-row tile with a block-diagonal causal mask. None: 32 // Q (at
      least 1); measured on the H100 at (12800, 10, 4, 64, n64) f32, fwd+bwd: 2 per program
      1.04 ms, 4 1.66 ms, 8 7.5 ms (register spills). With an initial state or a returned
      final state it is 1 (those are per-sequence (P, N) products).
    num_warps_short_fwd / num_warps_short_bwd: warps of the one-chunk kernels. The one-chunk
      backward loops over bwd_heads heads of a group like the dB/dC pass.
    """
    chunk: int | None = None
    num_warps_fwd: int = 4
    num_warps_bwd: int = 8
    num_stages: int = 2
    bwd: str = "split3"
    bwd_heads: int = 32
    num_warps_dstate: int | None = None
    num_warps_dx: int | None = None
    short: bool = True
    short_batch: int | None = None
    num_warps_short_fwd: int = 4
    num_warps_short_bwd: int = 4

    def __post_init__(self):
        if self.bwd not in ("split3", "split", "fused"):
            raise ValueError(f"BlockSizes.bwd must be 'split3', 'split' or 'fused'; "
                             f"got {self.bwd=}")
        if self.bwd_heads < 1:
            raise ValueError(f"BlockSizes.bwd_heads must be >= 1; got {self.bwd_heads=}")
        sb = self.short_batch
        if sb is not None and (sb < 1 or sb & (sb - 1)):
            raise ValueError(f"BlockSizes.short_batch must be a power of two >= 1 or None; "
                             f"got {self.short_batch=}")

    @classmethod
    def get_default(cls) -> "BlockSizes":
        return cls()


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _kernel_chunk(chunk_size: int, block_sizes: BlockSizes) -> int:
    q = block_sizes.chunk if block_sizes.chunk is not None else chunk_size
    q = min(max(_next_pow2(q), 16), 128) if block_sizes.chunk is None else q
    if q < 16 or q & (q - 1):
        raise ValueError(f"BlockSizes.chunk must be a power of two >= 16 (Triton dot minimum); "
                         f"got {block_sizes.chunk=}")
    return q


def _compiler_params(num_warps, num_stages):
    # 0.10.2 and 0.11.x name it CompilerParams; older releases TritonCompilerParams.
    cls = getattr(pltr, "CompilerParams", None) or getattr(pltr, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def _dot(a, b, dims=((1,), (0,))):
    """2-D dot with float32 accumulation; both operands share a dtype (a Triton requirement)."""
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _chunk_common(dt, a, C, B, q):
    """Per-chunk quantities shared by the forward and backward kernels.

    dt: (Q,) f32  C, B: (Q, N)  ->  cs (Q,) inclusive cumsum of dt*A, total = cs_Q,
    causal (Q, Q) mask i >= j, decay (Q, Q) = exp(cs_i - cs_j) on the causal part, else 0,
    cb (Q, Q) = C B^T (f32 accumulation).
    """
    dA = dt * a
    cs = jnp.cumsum(dA)
    total = jnp.sum(dA)           # cs_Q as a reduction: Triton cannot index a loaded value
    idx = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    jdx = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    causal = idx >= jdx
    # Mask the exponent, never the product: exp(cs_i) * exp(-cs_j) overflows within a chunk.
    decay = jnp.exp(jnp.where(causal, cs[:, None] - cs[None, :], -jnp.inf))
    cb = _dot(C, B, ((1,), (1,)))
    return cs, total, causal, decay, cb


def _ssd_fwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, h0_ref,
                    y_ref, hT_ref, st_ref, *, q, nc, rep):
    """One program per (batch, head): a sequential pass over the chunks (Mamba-2 sec. 6).

    x, z, y: (B, Lp, H, P)  dt: (B, Lp, H) f32  B, C: (B, Lp, G, N)  D: (H, P) f32
    h0, hT: (B, H, P, N) f32  st: (B, nc, H, P, N) chunk-entry states (only for the backward).
    Per chunk: y = (C B^T o decay) (dt x) + exp(cs) C h^T + D x, gated by silu(z);
    h <- exp(cs_Q) h + (exp(cs_Q - cs) dt x)^T B. Fusing the state pass with the output
    keeps the state in registers: no (B, nc, H, P, N) round trip through memory.
    """
    bi, hi = pl.program_id(0), pl.program_id(1)
    gi = hi // rep
    a = a_ref[hi]
    d = d_ref[hi, :]
    dot_dtype = x_ref.dtype

    def body(c, h):
        t = pl.ds(pl.multiple_of(c * q, q), q)
        x = x_ref[bi, t, hi, :]
        dt = dt_ref[bi, t, hi]
        Bc = b_ref[bi, t, gi, :]
        Cc = c_ref[bi, t, gi, :]
        cs, total, _, decay, cb = _chunk_common(dt, a, Cc, Bc, q)
        xf = x.astype(jnp.float32)
        xdt = xf * dt[:, None]
        y = _dot((cb * decay).astype(dot_dtype), xdt.astype(dot_dtype))
        y = y + jnp.exp(cs)[:, None] * _dot(Cc, h.astype(dot_dtype), ((1,), (1,)))
        y = y + d[None, :] * xf
        if z_ref is not None:
            zf = z_ref[bi, t, hi, :].astype(jnp.float32)
            y = y * (zf * jax.nn.sigmoid(zf))
        y_ref[bi, t, hi, :] = y.astype(y_ref.dtype)
        if st_ref is not None:
            st_ref[bi, c, hi, :, :] = h.astype(st_ref.dtype)
        w = jnp.exp(total - cs)
        return jnp.exp(total) * h + _dot((xdt * w[:, None]).astype(dot_dtype), Bc,
                                         ((0,), (0,)))

    hT_ref[bi, hi, :, :] = jax.lax.fori_loop(0, nc, body, h0_ref[bi, hi, :, :])


def _ssd_bwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, st_ref, dy_ref, dhT_ref,
                    dx_ref, ddt_ref, db_ref, dc_ref, dz_ref, da_ref, dd_ref, dh0_ref,
                    *, q, nc, rep):
    """One program per (batch, head): the chunks in reverse, carrying dL/dh (P, N) in f32.

    Shapes as in `_ssd_fwd_kernel`; dy: (B, Lp, H, P); outputs dx, dz like x; ddt: (B, Lp, H);
    dB, dC: (B, Lp, H, N) per-head partials (summed over a group's heads in XLA);
    dA: (B, H, 16) (16 copies: Triton stores power-of-two vectors); dD: (B, H, P);
    dh0: (B, H, P, N).
    d(dA) is formed without cancellation: for cs_i - cs_j the pairs (i >= k > j) are summed
    with an in-kernel exclusive cumsum and a causal mask (as the Triton SSD original does),
    never as out * dout - ddt * dt.
    """
    bi, hi = pl.program_id(0), pl.program_id(1)
    gi = hi // rep
    a = a_ref[hi]
    d = d_ref[hi, :]
    dot_dtype = x_ref.dtype
    f32 = jnp.float32

    def body(i, carry):
        dh, da_acc, dd_acc = carry
        c = nc - 1 - i
        t = pl.ds(pl.multiple_of(c * q, q), q)
        x = x_ref[bi, t, hi, :]
        dt = dt_ref[bi, t, hi]
        Bc = b_ref[bi, t, gi, :]
        Cc = c_ref[bi, t, gi, :]
        h_prev = st_ref[bi, c, hi, :, :].astype(f32)
        dout = dy_ref[bi, t, hi, :].astype(f32)
        cs, total, causal, decay, cb = _chunk_common(dt, a, Cc, Bc, q)
        ecs = jnp.exp(cs)
        xf = x.astype(f32)
        xdt = xf * dt[:, None]
        m = cb * decay
        if z_ref is not None:
            # Recompute the pre-gate output (cheaper than storing it in the forward).
            zf = z_ref[bi, t, hi, :].astype(f32)
            y = _dot(m.astype(dot_dtype), xdt.astype(dot_dtype))
            y = y + ecs[:, None] * _dot(Cc, h_prev.astype(dot_dtype), ((1,), (1,)))
            y = y + d[None, :] * xf
            sz = jax.nn.sigmoid(zf)
            dz_ref[bi, t, hi, :] = (dout * y * sz * (1.0 + zf * (1.0 - sz))).astype(
                dz_ref.dtype)
            dout = dout * zf * sz
        dd_acc = dd_acc + jnp.sum(dout * xf, axis=0)
        dout_c = dout.astype(dot_dtype)
        # Intra-chunk term y = M (dt x), M = C B^T o decay.
        dm = _dot(dout_c, xdt.astype(dot_dtype), ((1,), (1,)))              # (Q, Q)
        dxdt = _dot(m.astype(dot_dtype), dout_c, ((0,), (0,)))              # (Q, P)
        dcb = (dm * decay).astype(dot_dtype)
        dC = _dot(dcb, Bc)
        dB = _dot(dcb, Cc, ((0,), (0,)))
        # Inter-chunk term y_i += exp(cs_i) h_prev C_i.
        dC_inter = ecs[:, None] * _dot(dout_c, h_prev.astype(dot_dtype))   # (Q, N)
        dC = dC + dC_inter
        t_inter = jnp.sum(dC_inter * Cc.astype(f32), axis=1)                # d/dcs_i
        dh_from_out = _dot((dout * ecs[:, None]).astype(dot_dtype), Cc, ((0,), (0,)))
        # State write h = exp(cs_Q) h_prev + sum_j exp(cs_Q - cs_j) (dt x)_j B_j^T.
        w = jnp.exp(total - cs)
        dh_c = dh.astype(dot_dtype)
        bdh = _dot(Bc, dh_c, ((1,), (1,)))                                  # (Q, P)
        dxdt = dxdt + w[:, None] * bdh
        dB = dB + w[:, None] * _dot(xdt.astype(dot_dtype), dh_c)
        f_write = w * jnp.sum(xdt * bdh, axis=1)
        s_prev = jnp.exp(total) * jnp.sum(dh * h_prev)
        # d(dA_k): cs_i depends on dA_k for k <= i.
        e = dm * m                                                           # pair (i, j)
        excl = jnp.cumsum(e, axis=1) - e                                     # sum_{j<k} e_ik
        dda = jnp.sum(jnp.where(causal, excl + t_inter[:, None], 0.0), axis=0)
        dda = dda + (jnp.cumsum(f_write) - f_write) + s_prev
        ddt_ref[bi, t, hi] = a * dda + jnp.sum(xf * dxdt, axis=1)
        dx_ref[bi, t, hi, :] = (dxdt * dt[:, None] + d[None, :] * dout).astype(dx_ref.dtype)
        db_ref[bi, t, hi, :] = dB.astype(db_ref.dtype)
        dc_ref[bi, t, hi, :] = dC.astype(dc_ref.dtype)
        dh = jnp.exp(total) * dh + dh_from_out
        return dh, da_acc + jnp.sum(dda * dt), dd_acc

    p = x_ref.shape[-1]
    init = (dhT_ref[bi, hi, :, :], jnp.zeros((), f32), jnp.zeros((p,), f32))
    dh, da, dd = jax.lax.fori_loop(0, nc, body, init)
    dh0_ref[bi, hi, :, :] = dh
    da_ref[bi, hi, :] = jnp.full((16,), da, f32)
    dd_ref[bi, hi, :] = dd


def _ssd_bwd_dstate_kernel(dt_ref, a_ref, c_ref, z_ref, dy_ref, dhT_ref, dst_ref, dh0_ref,
                           *, q, nc, rep):
    """Split backward, pass 1: one program per (batch, head), chunks in reverse.

    dt: (B, Lp, H) f32  C: (B, Lp, G, N)  dy: (B, Lp, H, P)  dhT, dh0: (B, H, P, N) f32
    dst: (B, nc, H, P, N) = dL/dh at the END of each chunk. The adjoint of the state pass:
    dh_{c-1} = exp(cs_Q) dh_c + (exp(cs) o dy_core)^T C, with dy_core = dy silu(z).
    Shaped like the forward pass, so it costs about what the forward does.
    """
    bi, hi = pl.program_id(0), pl.program_id(1)
    gi = hi // rep
    a = a_ref[hi]
    f32 = jnp.float32
    dot_dtype = c_ref.dtype

    def body(i, dh):
        c = nc - 1 - i
        t = pl.ds(pl.multiple_of(c * q, q), q)
        dst_ref[bi, c, hi, :, :] = dh.astype(dst_ref.dtype)
        dt = dt_ref[bi, t, hi]
        Cc = c_ref[bi, t, gi, :]
        dA = dt * a
        cs = jnp.cumsum(dA)
        total = jnp.sum(dA)
        dout = dy_ref[bi, t, hi, :].astype(f32)
        if z_ref is not None:
            zf = z_ref[bi, t, hi, :].astype(f32)
            dout = dout * zf * jax.nn.sigmoid(zf)
        g = (dout * jnp.exp(cs)[:, None]).astype(dot_dtype)
        return jnp.exp(total) * dh + _dot(g, Cc, ((0,), (0,)))

    dh0_ref[bi, hi, :, :] = jax.lax.fori_loop(0, nc, body, dhT_ref[bi, hi, :, :])


def _ssd_bwd_chunk_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, st_ref, dst_ref,
                          dy_ref, dx_ref, ddt_ref, db_ref, dc_ref, dz_ref, da_ref, dd_ref,
                          *, q, hb, rep):
    """Split backward, pass 2: one program per (batch, chunk, block of hb heads of one group).

    x, z, dy, dx, dz: (B, Lp, H, P)  dt, ddt: (B, Lp, H) f32  B, C: (B, Lp, G, N)
    st / dst: (B, nc, H, P, N) chunk-entry states / dL/dh at chunk ends
    dB, dC: (B, Lp, H // hb, N) f32 partials per head block  dA: (B, nc, H, 16)
    dD: (B, nc, H, P). With both states known every chunk is independent (Mamba-2 sec. 6 run
    backwards). C B^T is shared by the block's heads; dB, dC accumulate over them in f32:
    the intra-chunk parts as one (Q, Q) sum, d(C B^T), applied once after the head loop.
    d(dA) pairs (i >= k > j) are summed by an in-kernel exclusive cumsum under a causal mask
    (stable), never as out * dout - ddt * dt.
    """
    bi, c, blk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gi = (blk * hb) // rep
    f32 = jnp.float32
    dot_dtype = x_ref.dtype
    t = pl.ds(pl.multiple_of(c * q, q), q)
    Bc = b_ref[bi, t, gi, :]
    Cc = c_ref[bi, t, gi, :]
    Cf = Cc.astype(f32)
    cb = _dot(Cc, Bc, ((1,), (1,)))
    idx = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    jdx = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    causal = idx >= jdx

    def head(j, carry):
        dcb_acc, db_acc, dc_acc = carry
        hi = blk * hb + j
        a = a_ref[hi]
        d = d_ref[hi, :]
        x = x_ref[bi, t, hi, :]
        dt = dt_ref[bi, t, hi]
        h_prev = st_ref[bi, c, hi, :, :]
        dh = dst_ref[bi, c, hi, :, :]
        dout = dy_ref[bi, t, hi, :].astype(f32)
        dA = dt * a
        cs = jnp.cumsum(dA)
        total = jnp.sum(dA)
        decay = jnp.exp(jnp.where(causal, cs[:, None] - cs[None, :], -jnp.inf))
        ecs = jnp.exp(cs)
        xf = x.astype(f32)
        xdt = xf * dt[:, None]
        xdt_c = xdt.astype(dot_dtype)
        m = cb * decay
        if z_ref is not None:
            # Recompute the pre-gate output (cheaper than storing it in the forward).
            zf = z_ref[bi, t, hi, :].astype(f32)
            y = _dot(m.astype(dot_dtype), xdt_c)
            y = y + ecs[:, None] * _dot(Cc, h_prev.astype(dot_dtype), ((1,), (1,)))
            y = y + d[None, :] * xf
            sz = jax.nn.sigmoid(zf)
            dz_ref[bi, t, hi, :] = (dout * y * sz * (1.0 + zf * (1.0 - sz))).astype(
                dz_ref.dtype)
            dout = dout * zf * sz
        dd_ref[bi, c, hi, :] = jnp.sum(dout * xf, axis=0)
        dout_c = dout.astype(dot_dtype)
        # Intra-chunk term y = M (dt x), M = C B^T o decay.
        dm = _dot(dout_c, xdt_c, ((1,), (1,)))                               # (Q, Q)
        dxdt = _dot(m.astype(dot_dtype), dout_c, ((0,), (0,)))              # (Q, P)
        dcb_acc = dcb_acc + dm * decay
        # Inter-chunk term y_i += exp(cs_i) h_prev C_i.
        dc_inter = ecs[:, None] * _dot(dout_c, h_prev.astype(dot_dtype))   # (Q, N)
        t_inter = jnp.sum(dc_inter * Cf, axis=1)
        # State write h_c = exp(cs_Q) h_prev + sum_j exp(cs_Q - cs_j) (dt x)_j B_j^T.
        w = jnp.exp(total - cs)
        dh_c = dh.astype(dot_dtype)
        bdh = _dot(Bc, dh_c, ((1,), (1,)))                                  # (Q, P)
        dxdt = dxdt + w[:, None] * bdh
        db_acc = db_acc + w[:, None] * _dot(xdt_c, dh_c)
        f_write = w * jnp.sum(xdt * bdh, axis=1)
        s_prev = jnp.exp(total) * jnp.sum(dh.astype(f32) * h_prev.astype(f32))
        e = dm * m
        excl = jnp.cumsum(e, axis=1) - e                                     # sum_{j<k} e_ik
        dda = jnp.sum(jnp.where(causal, excl + t_inter[:, None], 0.0), axis=0)
        dda = dda + (jnp.cumsum(f_write) - f_write) + s_prev
        ddt_ref[bi, t, hi] = a * dda + jnp.sum(xf * dxdt, axis=1)
        dx_ref[bi, t, hi, :] = (dxdt * dt[:, None] + d[None, :] * dout).astype(dx_ref.dtype)
        da_ref[bi, c, hi, :] = jnp.full((16,), jnp.sum(dda * dt), f32)
        return dcb_acc, db_acc, dc_acc + dc_inter

    n = b_ref.shape[-1]
    init = (jnp.zeros((q, q), f32), jnp.zeros((q, n), f32), jnp.zeros((q, n), f32))
    dcb, db, dc = jax.lax.fori_loop(0, hb, head, init)
    dcb_c = dcb.astype(dot_dtype)
    db_ref[bi, t, blk, :] = db + _dot(dcb_c, Cc, ((0,), (0,)))
    dc_ref[bi, t, blk, :] = dc + _dot(dcb_c, Bc)


def _ssd_bwd_dx_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, st_ref, dst_ref,
                       dy_ref, dx_ref, ddt_ref, dz_ref, da_ref, dd_ref, *, q, rep):
    """Three-kernel backward, pass 2: one program per (batch, chunk, head), no accumulators.

    Shapes as in `_ssd_bwd_chunk_kernel`; writes dx, ddt, dz, dA (B, nc, H, 16), dD
    (B, nc, H, P). The (Q, N) products of the head-block kernel are replaced by (Q, P) ones
    (t_inter from C h_prev^T), which keeps the live set small enough not to spill at P=64,
    N=128; dB and dC come from `_ssd_bwd_dbc_kernel`.
    """
    bi, c, hi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gi = hi // rep
    f32 = jnp.float32
    dot_dtype = x_ref.dtype
    t = pl.ds(pl.multiple_of(c * q, q), q)
    Bc = b_ref[bi, t, gi, :]
    Cc = c_ref[bi, t, gi, :]
    a = a_ref[hi]
    d = d_ref[hi, :]
    x = x_ref[bi, t, hi, :]
    dt = dt_ref[bi, t, hi]
    h_prev = st_ref[bi, c, hi, :, :]
    dh = dst_ref[bi, c, hi, :, :]
    dout = dy_ref[bi, t, hi, :].astype(f32)
    cs, total, causal, decay, cb = _chunk_common(dt, a, Cc, Bc, q)
    ecs = jnp.exp(cs)
    xf = x.astype(f32)
    xdt = xf * dt[:, None]
    xdt_c = xdt.astype(dot_dtype)
    m = cb * decay
    ch = _dot(Cc, h_prev, ((1,), (1,)))                                     # (Q, P)
    if z_ref is not None:
        zf = z_ref[bi, t, hi, :].astype(f32)
        y = _dot(m.astype(dot_dtype), xdt_c) + ecs[:, None] * ch + d[None, :] * xf
        sz = jax.nn.sigmoid(zf)
        dz_ref[bi, t, hi, :] = (dout * y * sz * (1.0 + zf * (1.0 - sz))).astype(dz_ref.dtype)
        dout = dout * zf * sz
    dd_ref[bi, c, hi, :] = jnp.sum(dout * xf, axis=0)
    dout_c = dout.astype(dot_dtype)
    dm = _dot(dout_c, xdt_c, ((1,), (1,)))                                   # (Q, Q)
    dxdt = _dot(m.astype(dot_dtype), dout_c, ((0,), (0,)))                  # (Q, P)
    t_inter = ecs * jnp.sum(dout * ch, axis=1)                               # d/dcs_i
    w = jnp.exp(total - cs)
    bdh = _dot(Bc, dh, ((1,), (1,)))                                         # (Q, P)
    dxdt = dxdt + w[:, None] * bdh
    f_write = w * jnp.sum(xdt * bdh, axis=1)
    s_prev = jnp.exp(total) * jnp.sum(dh.astype(f32) * h_prev.astype(f32))
    e = dm * m
    excl = jnp.cumsum(e, axis=1) - e                                         # sum_{j<k} e_ik
    dda = jnp.sum(jnp.where(causal, excl + t_inter[:, None], 0.0), axis=0)
    dda = dda + (jnp.cumsum(f_write) - f_write) + s_prev
    ddt_ref[bi, t, hi] = a * dda + jnp.sum(xf * dxdt, axis=1)
    dx_ref[bi, t, hi, :] = (dxdt * dt[:, None] + d[None, :] * dout).astype(dx_ref.dtype)
    da_ref[bi, c, hi, :] = jnp.full((16,), jnp.sum(dda * dt), f32)


def _ssd_bwd_dbc_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, z_ref, st_ref, dst_ref, dy_ref,
                        db_ref, dc_ref, *, q, hb, rep):
    """Three-kernel backward, pass 3: dB, dC per (batch, chunk, block of hb heads of a group).

    dB = sum_h [ (d(C B^T)_h)^T C + (exp(cs_Q - cs) o dt x)_h dh_h ]
    dC = sum_h [ d(C B^T)_h B + (exp(cs) o dy_core)_h h_prev_h ]
    A matmul K-loop over the block's heads: only the three accumulators are carried.
    Outputs dB, dC: (B, Lp, H // hb, N) f32 partials.
    """
    bi, c, blk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gi = (blk * hb) // rep
    f32 = jnp.float32
    dot_dtype = x_ref.dtype
    t = pl.ds(pl.multiple_of(c * q, q), q)
    idx = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    jdx = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    causal = idx >= jdx

    def head(j, carry):
        dcb_acc, db_acc, dc_acc = carry
        hi = blk * hb + j
        a = a_ref[hi]
        dt = dt_ref[bi, t, hi]
        xdt = x_ref[bi, t, hi, :].astype(f32) * dt[:, None]
        dout = dy_ref[bi, t, hi, :].astype(f32)
        if z_ref is not None:
            zf = z_ref[bi, t, hi, :].astype(f32)
            dout = dout * zf * jax.nn.sigmoid(zf)
        dA = dt * a
        cs = jnp.cumsum(dA)
        total = jnp.sum(dA)
        decay = jnp.exp(jnp.where(causal, cs[:, None] - cs[None, :], -jnp.inf))
        dm = _dot(dout.astype(dot_dtype), xdt.astype(dot_dtype), ((1,), (1,)))
        u = (xdt * jnp.exp(total - cs)[:, None]).astype(dot_dtype)
        v = (dout * jnp.exp(cs)[:, None]).astype(dot_dtype)
        return (dcb_acc + dm * decay,
                db_acc + _dot(u, dst_ref[bi, c, hi, :, :]),
                dc_acc + _dot(v, st_ref[bi, c, hi, :, :]))

    n = b_ref.shape[-1]
    init = (jnp.zeros((q, q), f32), jnp.zeros((q, n), f32), jnp.zeros((q, n), f32))
    dcb, db, dc = jax.lax.fori_loop(0, hb, head, init)
    dcb_c = dcb.astype(dot_dtype)
    db_ref[bi, t, blk, :] = db + _dot(dcb_c, c_ref[bi, t, gi, :], ((0,), (0,)))
    dc_ref[bi, t, blk, :] = dc + _dot(dcb_c, b_ref[bi, t, gi, :])


def _pallas_call(kernel, out_shape, grid, num_warps, num_stages, interpret, name):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=interpret, name=name,
        compiler_params=None if interpret else _compiler_params(num_warps, num_stages))


def _fwd_call(x, dt, A, B, C, D, z, h0, *, q, bs, interpret, save_states):
    """Launches `_ssd_fwd_kernel` on padded operands; returns y, hT [, chunk-entry states]."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)]
    if save_states:
        # Stored in the input dtype: bf16 entry states halve the largest residual and stay
        # within the bf16 tolerance (they only feed C h^T and d(dA) terms of one chunk).
        out_shape.append(jax.ShapeDtypeStruct((b, nc, h, p, n), x.dtype))

    has_z = z is not None
    n_in = 7 + has_z

    def kernel(*refs):
        ins = list(refs[:6]) + [refs[6] if has_z else None, refs[n_in - 1]]
        outs = list(refs[n_in:]) + ([] if save_states else [None])
        _ssd_fwd_kernel(*ins, *outs, q=q, nc=nc, rep=h // g)

    args = [x, dt, A, B, C, D] + ([z] if z is not None else []) + [h0]
    return _pallas_call(kernel, out_shape, (b, h), bs.num_warps_fwd, bs.num_stages, interpret,
                        "ssd_fwd")(*args)


def _bwd_call(x, dt, A, B, C, D, z, states, dy, dhT, *, q, bs, interpret):
    """Launches `_ssd_bwd_kernel`; returns padded-shape gradients (per-head dB/dC partials)."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    part = x.dtype      # per-head dB/dC partials: f32 for f32 inputs, bf16 halves the traffic
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),                 # dx
                 jax.ShapeDtypeStruct((b, lp, h), jnp.float32),          # ddt
                 jax.ShapeDtypeStruct((b, lp, h, n), part),              # dB partials
                 jax.ShapeDtypeStruct((b, lp, h, n), part)]              # dC partials
    if z is not None:
        out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))        # dz
    out_shape += [jax.ShapeDtypeStruct((b, h, 16), jnp.float32),         # dA (16 copies)
                  jax.ShapeDtypeStruct((b, h, p), jnp.float32),          # dD
                  jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)]       # dh0
    has_z = z is not None

    def kernel(*refs):
        refs = list(refs)
        ins = refs[:6] + ([refs.pop(6)] if has_z else [None]) + refs[6:9]
        outs = refs[9:]
        outs = outs[:4] + ([outs.pop(4)] if has_z else [None]) + outs[4:]
        _ssd_bwd_kernel(*ins, *outs, q=q, nc=nc, rep=h // g)

    args = [x, dt, A, B, C, D] + ([z] if has_z else []) + [states, dy, dhT]
    res = _pallas_call(kernel, out_shape, (b, h), bs.num_warps_bwd, bs.num_stages, interpret,
                       "ssd_bwd")(*args)
    res = list(res)
    dz = res.pop(4) if has_z else None
    dx, ddt, dbp, dcp, da, dd, dh0 = res
    return dx, ddt, dbp, dcp, dz, da, dd, dh0


def _largest_divisor_at_most(v: int, cap: int) -> int:
    return max(k for k in range(1, min(v, cap) + 1) if v % k == 0)


def _dstate_call(dt, A, C, z, dy, dhT, *, states_dtype, q, bs, interpret):
    """Launches `_ssd_bwd_dstate_kernel`; returns dL/dh at every chunk end (B, nc, H, P, N)
    in states_dtype, and dh0 (B, H, P, N) f32."""
    b, lp, h, p = dy.shape
    g, n = C.shape[2:]
    nc = lp // q
    has_z = z is not None

    def kernel(*refs):
        refs = list(refs)
        ins = refs[:3] + ([refs.pop(3)] if has_z else [None]) + refs[3:5]
        _ssd_bwd_dstate_kernel(*ins, *refs[5:], q=q, nc=nc, rep=h // g)

    args = [dt, A, C] + ([z] if has_z else []) + [dy, dhT]
    return _pallas_call(
        kernel,
        [jax.ShapeDtypeStruct((b, nc, h, p, n), states_dtype),
         jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)],
        (b, h), bs.num_warps_dstate or bs.num_warps_fwd, bs.num_stages, interpret,
        "ssd_bwd_dstate")(*args)


def _bwd_split_call(x, dt, A, B, C, D, z, states, dy, dhT, *, q, bs, interpret):
    """Launches the two split-backward kernels; returns the same tuple as `_bwd_call`."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    rep = h // g
    hb = _largest_divisor_at_most(rep, bs.bwd_heads)
    has_z = z is not None
    f32 = jnp.float32

    dstates, dh0 = _dstate_call(dt, A, C, z, dy, dhT, states_dtype=states.dtype, q=q, bs=bs,
                                interpret=interpret)
    if bs.bwd == "split3":
        return _bwd_split3_rest(x, dt, A, B, C, D, z, states, dstates, dy, dh0, q=q, hb=hb,
                                bs=bs, interpret=interpret)

    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),                 # dx
                 jax.ShapeDtypeStruct((b, lp, h), f32),                  # ddt
                 jax.ShapeDtypeStruct((b, lp, h // hb, n), f32),         # dB partials
                 jax.ShapeDtypeStruct((b, lp, h // hb, n), f32)]         # dC partials
    if has_z:
        out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))        # dz
    out_shape += [jax.ShapeDtypeStruct((b, nc, h, 16), f32),             # dA (16 copies)
                  jax.ShapeDtypeStruct((b, nc, h, p), f32)]              # dD

    def chunk_kernel(*refs):
        refs = list(refs)
        ins = refs[:6] + ([refs.pop(6)] if has_z else [None]) + refs[6:9]
        outs = refs[9:]
        outs = outs[:4] + ([outs.pop(4)] if has_z else [None]) + outs[4:]
        _ssd_bwd_chunk_kernel(*ins, *outs, q=q, hb=hb, rep=rep)

    args = [x, dt, A, B, C, D] + ([z] if has_z else []) + [states, dstates, dy]
    res = list(_pallas_call(chunk_kernel, out_shape, (b, nc, h // hb), bs.num_warps_bwd,
                            bs.num_stages, interpret, "ssd_bwd_chunk")(*args))
    dz = res.pop(4) if has_z else None
    dx, ddt, dbp, dcp, da, dd = res
    return dx, ddt, dbp, dcp, dz, da.sum(1), dd.sum(1), dh0


def _bwd_split3_rest(x, dt, A, B, C, D, z, states, dstates, dy, dh0, *, q, hb, bs,
                     interpret):
    """Passes 2 and 3 of the three-kernel backward (after the dL/dh pass)."""
    dx, ddt, dz, da, dd = _dx_call(x, dt, A, B, C, D, z, states, dstates, dy, q=q, bs=bs,
                                   interpret=interpret)
    dbp, dcp = _dbc_call(x, dt, A, B, C, z, states, dstates, dy, q=q, hb=hb, bs=bs,
                         interpret=interpret)
    return dx, ddt, dbp, dcp, dz, da.sum(1), dd.sum(1), dh0


def _dx_call(x, dt, A, B, C, D, z, states, dstates, dy, *, q, bs, interpret):
    """Launches `_ssd_bwd_dx_kernel`: dx, ddt, dz, per-chunk dA (B, nc, H, 16), dD (B, nc, H, P)."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    rep = h // g
    has_z = z is not None
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),                 # dx
                 jax.ShapeDtypeStruct((b, lp, h), f32)]                  # ddt
    if has_z:
        out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))        # dz
    out_shape += [jax.ShapeDtypeStruct((b, nc, h, 16), f32),             # dA (16 copies)
                  jax.ShapeDtypeStruct((b, nc, h, p), f32)]              # dD

    def dx_kernel(*refs):
        refs = list(refs)
        ins = refs[:6] + ([refs.pop(6)] if has_z else [None]) + refs[6:9]
        outs = refs[9:]
        outs = outs[:2] + ([outs.pop(2)] if has_z else [None]) + outs[2:]
        _ssd_bwd_dx_kernel(*ins, *outs, q=q, rep=rep)

    args = [x, dt, A, B, C, D] + ([z] if has_z else []) + [states, dstates, dy]
    res = list(_pallas_call(dx_kernel, out_shape, (b, nc, h), bs.num_warps_dx or bs.num_warps_fwd,
                            bs.num_stages, interpret, "ssd_bwd_dx")(*args))
    dz = res.pop(2) if has_z else None
    dx, ddt, da, dd = res
    return dx, ddt, dz, da, dd


def _dbc_call(x, dt, A, B, C, z, states, dstates, dy, *, q, hb, bs, interpret):
    """Launches `_ssd_bwd_dbc_kernel`: dB, dC partials (B, Lp, H // hb, N) f32."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    has_z = z is not None

    def dbc_kernel(*refs):
        refs = list(refs)
        ins = refs[:5] + ([refs.pop(5)] if has_z else [None]) + refs[5:8]
        _ssd_bwd_dbc_kernel(*ins, *refs[8:], q=q, hb=hb, rep=h // g)

    args = [x, dt, A, B, C] + ([z] if has_z else []) + [states, dstates, dy]
    return _pallas_call(
        dbc_kernel, [jax.ShapeDtypeStruct((b, lp, h // hb, n), jnp.float32)] * 2,
        (b, nc, h // hb), bs.num_warps_bwd, bs.num_stages, interpret, "ssd_bwd_dbc")(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _ssd_core(x, dt, A, B, C, D, z, h0, q, bs, interpret):
    """Padded operands (Lp % q == 0, P and N powers of two >= 16) -> (y, hT)."""
    return _fwd_call(x, dt, A, B, C, D, z, h0, q=q, bs=bs, interpret=interpret,
                     save_states=False)


def _ssd_core_fwd(x, dt, A, B, C, D, z, h0, q, bs, interpret):
    y, hT, states = _fwd_call(x, dt, A, B, C, D, z, h0, q=q, bs=bs, interpret=interpret,
                              save_states=True)
    return (y, hT), (x, dt, A, B, C, D, z, states)


def _ssd_core_bwd(q, bs, interpret, res, cts):
    x, dt, A, B, C, D, z, states = res
    dy, dhT = cts
    call = _bwd_call if bs.bwd == "fused" else _bwd_split_call
    dx, ddt, dbp, dcp, dz, da, dd, dh0 = call(
        x, dt, A, B, C, D, z, states, dy.astype(x.dtype), dhT.astype(jnp.float32), q=q, bs=bs,
        interpret=interpret)
    b, lp, _, _ = x.shape
    g, n = B.shape[2:]
    # Sum the partials (per head or per head block) over each group's share: the partial axis
    # is ordered like the heads, and head h reads group h // (H // G).
    k = dbp.shape[2]
    dB = dbp.astype(jnp.float32).reshape(b, lp, g, k // g, n).sum(3).astype(B.dtype)
    dC = dcp.astype(jnp.float32).reshape(b, lp, g, k // g, n).sum(3).astype(C.dtype)
    return (dx, ddt, da[:, :, 0].sum(0).astype(A.dtype), dB, dC, dd.sum(0).astype(D.dtype),
            dz, dh0)


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


# --------------------------------------------------------------------------------------------
# The one-chunk path: the whole (padded) sequence is one kernel chunk (HiSS's low level).
# --------------------------------------------------------------------------------------------
def _short_mask(q, rows):
    """(T, T) causal mask of a tile of rows // q stacked sequences of q steps: i >= j within
    one sequence (block-diagonal)."""
    idx = jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 0)
    jdx = jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 1)
    causal = idx >= jdx
    if rows > q:
        causal = causal & (jax.lax.div(idx, q) == jax.lax.div(jdx, q))
    return causal


def _short_decay(dt, a, causal, q, rows):
    """dt (T,) f32 -> cs (T,) cumsum of dt*A within each sequence, decay (T, T) =
    exp(cs_i - cs_j) under the mask, else 0.

    The per-sequence cumsum is a masked row sum, never a cumsum over the tile minus the
    sequence's start: that difference of large sums would lose f32 digits of the decay.
    """
    dA = dt * a
    if rows == q:
        cs = jnp.cumsum(dA)
    else:
        cs = jnp.sum(jnp.where(causal, dA[None, :], 0.0), axis=1)
    decay = jnp.exp(jnp.where(causal, cs[:, None] - cs[None, :], -jnp.inf))
    return cs, decay


def _ssd_short_fwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, h0_ref,
                          y_ref, hT_ref, *, q, rows, rep):
    """One-chunk forward: one program per (rows // q sequences, head); no state pass.

    x, z, y: (B*Q, H, P)  dt: (B*Q, H) f32  B, C: (B*Q, G, N)  D: (H, P) f32
    h0, hT: (B, H, P, N) f32 or None (only with one sequence per program, rows == q).
    y = (C B^T o decay) (dt x) [+ exp(cs) C h0^T] + D x, gated by silu(z) (Mamba-2 sec. 6
    with a single chunk); nothing is saved for the backward.
    """
    pi, hi = pl.program_id(0), pl.program_id(1)
    gi = hi // rep
    a = a_ref[hi]
    d = d_ref[hi, :]
    f32 = jnp.float32
    dot_dtype = x_ref.dtype
    t = pl.ds(pl.multiple_of(pi * rows, rows), rows)
    x = x_ref[t, hi, :]
    dt = dt_ref[t, hi]
    Bc = b_ref[t, gi, :]
    Cc = c_ref[t, gi, :]
    cs, decay = _short_decay(dt, a, _short_mask(q, rows), q, rows)
    cb = _dot(Cc, Bc, ((1,), (1,)))
    xf = x.astype(f32)
    xdt = xf * dt[:, None]
    y = _dot((cb * decay).astype(dot_dtype), xdt.astype(dot_dtype))
    if h0_ref is not None:
        h0 = h0_ref[pi, hi, :, :]
        y = y + jnp.exp(cs)[:, None] * _dot(Cc, h0.astype(dot_dtype), ((1,), (1,)))
    y = y + d[None, :] * xf
    if z_ref is not None:
        zf = z_ref[t, hi, :].astype(f32)
        y = y * (zf * jax.nn.sigmoid(zf))
    y_ref[t, hi, :] = y.astype(y_ref.dtype)
    if hT_ref is not None:
        total = jnp.sum(dt * a)
        w = jnp.exp(total - cs)
        hT = _dot((xdt * w[:, None]).astype(dot_dtype), Bc, ((0,), (0,)))
        if h0_ref is not None:
            hT = hT + jnp.exp(total) * h0
        hT_ref[pi, hi, :, :] = hT


def _ssd_short_bwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, h0_ref, dy_ref,
                          dhT_ref, dx_ref, ddt_ref, db_ref, dc_ref, dz_ref, da_ref, dd_ref,
                          dh0_ref, *, q, rows, hb, rep):
    """One-chunk backward: one program per (rows // q sequences, block of hb heads of a group).

    Shapes as in `_ssd_short_fwd_kernel`; dy like x; dhT, dh0: (B, H, P, N) f32 or None.
    Outputs dx, dz like x; ddt: (B*Q, H); dB, dC: (B*Q, H // hb, N) partials per head block;
    dA: (B*Q // rows, H, 16) and dD: (B*Q // rows, H, P) per-program partials.
    The chunk's entry state is h0 (or zero) and its end cotangent dhT (or zero): no dL/dh
    pass, no state loads. d(C B^T) sums over the block's heads in registers. d(dA) as in
    `_ssd_bwd_kernel` (masked exclusive cumsum, no cancellation); the block-diagonal mask
    keeps every sum inside its sequence.
    """
    pi, blk = pl.program_id(0), pl.program_id(1)
    gi = (blk * hb) // rep
    f32 = jnp.float32
    dot_dtype = x_ref.dtype
    t = pl.ds(pl.multiple_of(pi * rows, rows), rows)
    Bc = b_ref[t, gi, :]
    Cc = c_ref[t, gi, :]
    cb = _dot(Cc, Bc, ((1,), (1,)))                  # shared by the block's heads
    causal = _short_mask(q, rows)
    has_h0, has_dhT = h0_ref is not None, dhT_ref is not None

    def head(j, carry):
        dcb_acc, db_acc, dc_acc = carry
        hi = blk * hb + j
        a = a_ref[hi]
        d = d_ref[hi, :]
        dt = dt_ref[t, hi]
        xf = x_ref[t, hi, :].astype(f32)
        dout = dy_ref[t, hi, :].astype(f32)
        cs, decay = _short_decay(dt, a, causal, q, rows)
        ecs = jnp.exp(cs)
        xdt = xf * dt[:, None]
        xdt_c = xdt.astype(dot_dtype)
        m = cb * decay
        if has_h0:
            h0 = h0_ref[pi, hi, :, :]
            h0_c = h0.astype(dot_dtype)
            ch = _dot(Cc, h0_c, ((1,), (1,)))                               # (T, P)
        if z_ref is not None:
            # Recompute the pre-gate output (cheaper than storing it in the forward).
            zf = z_ref[t, hi, :].astype(f32)
            y = _dot(m.astype(dot_dtype), xdt_c) + d[None, :] * xf
            if has_h0:
                y = y + ecs[:, None] * ch
            sz = jax.nn.sigmoid(zf)
            dz_ref[t, hi, :] = (dout * y * sz * (1.0 + zf * (1.0 - sz))).astype(dz_ref.dtype)
            dout = dout * zf * sz
        dd_ref[pi, hi, :] = jnp.sum(dout * xf, axis=0)
        dout_c = dout.astype(dot_dtype)
        dm = _dot(dout_c, xdt_c, ((1,), (1,)))                               # (T, T)
        dxdt = _dot(m.astype(dot_dtype), dout_c, ((0,), (0,)))              # (T, P)
        dcb_acc = dcb_acc + dm * decay
        e = dm * m
        excl = jnp.cumsum(e, axis=1) - e                                     # sum_{j<k} e_ik
        if has_h0:
            # Entry-state term y_i += exp(cs_i) h0 C_i.
            excl = excl + (ecs * jnp.sum(dout * ch, axis=1))[:, None]
            dc_acc = dc_acc + ecs[:, None] * _dot(dout_c, h0_c)            # (T, N)
            dh0 = _dot((dout * ecs[:, None]).astype(dot_dtype), Cc, ((0,), (0,)))
        dda = jnp.sum(jnp.where(causal, excl, 0.0), axis=0)
        if has_dhT:
            # State write hT = exp(cs_Q) h0 + sum_j exp(cs_Q - cs_j) (dt x)_j B_j^T.
            dh = dhT_ref[pi, hi, :, :]
            dh_c = dh.astype(dot_dtype)
            total = jnp.sum(dt * a)
            w = jnp.exp(total - cs)
            bdh = _dot(Bc, dh_c, ((1,), (1,)))                              # (T, P)
            dxdt = dxdt + w[:, None] * bdh
            db_acc = db_acc + w[:, None] * _dot(xdt_c, dh_c)
            f_write = w * jnp.sum(xdt * bdh, axis=1)
            dda = dda + (jnp.cumsum(f_write) - f_write)
            if has_h0:
                dda = dda + jnp.exp(total) * jnp.sum(dh * h0)
                dh0 = dh0 + jnp.exp(total) * dh
        if has_h0:
            dh0_ref[pi, hi, :, :] = dh0
        ddt_ref[t, hi] = a * dda + jnp.sum(xf * dxdt, axis=1)
        dx_ref[t, hi, :] = (dxdt * dt[:, None] + d[None, :] * dout).astype(dx_ref.dtype)
        da_ref[pi, hi, :] = jnp.full((16,), jnp.sum(dda * dt), f32)
        return dcb_acc, db_acc, dc_acc

    n = b_ref.shape[-1]
    zeros_qn = jnp.zeros((rows, n), f32)
    init = (jnp.zeros((rows, rows), f32), zeros_qn if has_dhT else None,
            zeros_qn if has_h0 else None)
    dcb, db, dc = jax.lax.fori_loop(0, hb, head, init)
    dcb_c = dcb.astype(dot_dtype)
    db_out = _dot(dcb_c, Cc, ((0,), (0,)))
    dc_out = _dot(dcb_c, Bc)
    if has_dhT:
        db_out = db_out + db
    if has_h0:
        dc_out = dc_out + dc
    db_ref[t, blk, :] = db_out.astype(db_ref.dtype)
    dc_ref[t, blk, :] = dc_out.astype(dc_ref.dtype)


def _short_rows(q: int, bs: BlockSizes, per_sequence: bool) -> int:
    """Rows per one-chunk program: short_batch (or 32 // q) sequences of q steps."""
    if per_sequence:
        return q
    sb = bs.short_batch if bs.short_batch is not None else max(1, 32 // q)
    return sb * q


def _short_fwd_call(x, dt, A, B, C, D, z, h0, *, q, rows, want_hT, bs, interpret):
    """Launches `_ssd_short_fwd_kernel` on flattened operands (B*Q rows); returns y [, hT]."""
    bq, h, p = x.shape
    g, n = B.shape[1:]
    has_z, has_h0 = z is not None, h0 is not None
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    if want_hT:
        out_shape.append(jax.ShapeDtypeStruct((bq // q, h, p, n), jnp.float32))

    def kernel(*refs):
        refs = list(refs)
        ins = refs[:6] + ([refs.pop(6)] if has_z else [None]) + (
            [refs.pop(6)] if has_h0 else [None])
        outs = refs[6:] + ([] if want_hT else [None])
        _ssd_short_fwd_kernel(*ins, *outs, q=q, rows=rows, rep=h // g)

    args = [x, dt, A, B, C, D] + ([z] if has_z else []) + ([h0] if has_h0 else [])
    res = _pallas_call(kernel, out_shape, (bq // rows, h), bs.num_warps_short_fwd,
                       bs.num_stages, interpret, "ssd_short_fwd")(*args)
    return tuple(res) if want_hT else res[0]


def _short_bwd_call(x, dt, A, B, C, D, z, h0, dy, dhT, *, q, rows, bs, interpret):
    """Launches `_ssd_short_bwd_kernel`; returns dx, ddt, dB/dC partials, dz, dA, dD, dh0."""
    bq, h, p = x.shape
    g, n = B.shape[1:]
    rep = h // g
    hb = _largest_divisor_at_most(rep, bs.bwd_heads)
    nprog = bq // rows
    has_z, has_h0, has_dhT = z is not None, h0 is not None, dhT is not None
    f32 = jnp.float32
    # Partials that are summed over head blocks in XLA stay f32; a single one per group is
    # the final dB / dC and takes the input dtype.
    part = x.dtype if h // hb == g else f32
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),                 # dx
                 jax.ShapeDtypeStruct((bq, h), f32),                     # ddt
                 jax.ShapeDtypeStruct((bq, h // hb, n), part),           # dB partials
                 jax.ShapeDtypeStruct((bq, h // hb, n), part)]           # dC partials
    if has_z:
        out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))        # dz
    out_shape += [jax.ShapeDtypeStruct((nprog, h, 16), f32),             # dA (16 copies)
                  jax.ShapeDtypeStruct((nprog, h, p), f32)]              # dD
    if has_h0:
        out_shape.append(jax.ShapeDtypeStruct(h0.shape, f32))           # dh0

    def kernel(*refs):
        refs = list(refs)
        ins = refs[:6] + ([refs.pop(6)] if has_z else [None]) + (
            [refs.pop(6)] if has_h0 else [None]) + [refs.pop(6)] + (
            [refs.pop(6)] if has_dhT else [None])
        outs = refs[6:]
        outs = outs[:4] + ([outs.pop(4)] if has_z else [None]) + outs[4:6] + (
            [outs[6]] if has_h0 else [None])
        _ssd_short_bwd_kernel(*ins, *outs, q=q, rows=rows, hb=hb, rep=rep)

    args = ([x, dt, A, B, C, D] + ([z] if has_z else []) + ([h0] if has_h0 else []) + [dy]
            + ([dhT] if has_dhT else []))
    res = list(_pallas_call(kernel, out_shape, (nprog, h // hb), bs.num_warps_short_bwd,
                            bs.num_stages, interpret, "ssd_short_bwd")(*args))
    dh0 = res.pop() if has_h0 else None
    dz = res.pop(4) if has_z else None
    dx, ddt, dbp, dcp, da, dd = res
    return dx, ddt, dbp, dcp, dz, da, dd, dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _ssd_short_core(x, dt, A, B, C, D, z, h0, q, rows, want_hT, bs, interpret):
    """Flattened one-chunk operands (B*Q rows, B*Q % rows == 0) -> y [, hT]."""
    return _short_fwd_call(x, dt, A, B, C, D, z, h0, q=q, rows=rows, want_hT=want_hT, bs=bs,
                           interpret=interpret)


def _ssd_short_core_fwd(x, dt, A, B, C, D, z, h0, q, rows, want_hT, bs, interpret):
    out = _short_fwd_call(x, dt, A, B, C, D, z, h0, q=q, rows=rows, want_hT=want_hT, bs=bs,
                          interpret=interpret)
    return out, (x, dt, A, B, C, D, z, h0)


def _ssd_short_core_bwd(q, rows, want_hT, bs, interpret, res, cts):
    x, dt, A, B, C, D, z, h0 = res
    dy, dhT = (cts if want_hT else (cts, None))
    dx, ddt, dbp, dcp, dz, da, dd, dh0 = _short_bwd_call(
        x, dt, A, B, C, D, z, h0, dy.astype(x.dtype),
        None if dhT is None else dhT.astype(jnp.float32), q=q, rows=rows, bs=bs,
        interpret=interpret)
    bq = x.shape[0]
    g, n = B.shape[1:]
    k = dbp.shape[1]
    dB = dbp.astype(jnp.float32).reshape(bq, g, k // g, n).sum(2).astype(B.dtype)
    dC = dcp.astype(jnp.float32).reshape(bq, g, k // g, n).sum(2).astype(C.dtype)
    return (dx, ddt, da[:, :, 0].sum(0).astype(A.dtype), dB, dC, dd.sum(0).astype(D.dtype),
            dz, dh0)


_ssd_short_core.defvjp(_ssd_short_core_fwd, _ssd_short_core_bwd)


def _ssd_short(xp, dt_eff, A, Bp, Cp, Dp, zp, h0, *, q, bs, interpret, want_hT):
    """Time-padded (B, Q, ...) operands -> y (B, Q, H, P) [, hT]: pads the batch to whole
    programs and flattens (batch, time) into rows (a free reshape)."""
    b, _, h, pp = xp.shape
    rows = _short_rows(q, bs, per_sequence=h0 is not None or want_hT)
    sb = rows // q
    bp = -(-b // sb) * sb

    def flat(t):
        return None if t is None else _pad_to(t, 0, bp).reshape(bp * q, *t.shape[2:])

    out = _ssd_short_core(flat(xp), flat(dt_eff), A, flat(Bp), flat(Cp), Dp, flat(zp), h0, q,
                          rows, want_hT, bs, interpret)
    y, hT = out if want_hT else (out, None)
    return y.reshape(bp, q, h, pp)[:b], hT


def ssd_pallas(x, dt, A, B, C, *, chunk_size, D=None, z=None, dt_bias=None,
               dt_softplus=False, initial_state=None, return_final_state=False,
               block_sizes=None, interpret=None):
    """SSD with the Pallas kernels (Triton backend); interpret mode when no GPU is present.

    x, z: (B, L, H, P)  dt: (B, L, H)  A: (H,)  B, C: (B, L, G, N)  D: (H,) or (H, P)
    The wrapper applies dt's bias and softplus in XLA (autodiff carries them), zero-pads
    time to a multiple of the kernel chunk (padded steps have dt = 0: no decay, no write) and
    P, N to powers of two >= 16 (Triton's smallest dot), then calls the fused kernels under
    `jax.custom_vjp`. Returns y (B, L, H, P) [, h_L (B, H, P, N) float32].
    Numerics: dot operands are x's dtype with f32 accumulation (f32 inputs run TF32 dots on
    the GPU, ~1e-3 relative; interpret mode on CPU is exact f32); the chunk-entry states kept
    for the backward are stored in x's dtype.
    A sequence that fits in one kernel chunk (L <= chunk, e.g. HiSS's low level) takes the
    one-chunk path (`BlockSizes.short`): no saved states, no dL/dh pass, several sequences
    per program.
    """
    b, l, h, p, g, n = _check_args(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_state)
    bs = block_sizes or BlockSizes.get_default()
    if interpret is None:
        interpret = not _on_gpu()
    q = _kernel_chunk(chunk_size, bs)
    short = bs.short and l <= q
    if short:
        # One chunk: the smallest power-of-two chunk that holds the sequence.
        q = max(16, _next_pow2(l))
    lp = -(-l // q) * q
    pp, nn = max(16, _next_pow2(p)), max(16, _next_pow2(n))
    f32 = jnp.float32
    dt_eff = _pad_to(_effective_dt(dt, dt_bias, dt_softplus), 1, lp)
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"ssd_pallas supports float32/bfloat16/float16 x; got {x.dtype=}")
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
    if short:
        h0 = (None if initial_state is None
              else _pad_to(_pad_to(initial_state.astype(f32), 2, pp), 3, nn))
        y, hT = _ssd_short(xp, dt_eff, A.astype(f32), Bp, Cp, Dp, zp, h0, q=q, bs=bs,
                           interpret=interpret, want_hT=return_final_state)
        y = y[:, :l, :, :p]
        return (y, hT[:, :, :p, :n]) if return_final_state else y
    h0 = (jnp.zeros((b, h, pp, nn), f32) if initial_state is None
          else _pad_to(_pad_to(initial_state.astype(f32), 2, pp), 3, nn))
    y, hT = _ssd_core(xp, dt_eff, A.astype(f32), Bp, Cp, Dp, zp, h0, q, bs, interpret)
    y = y[:, :l, :, :p]
    return (y, hT[:, :, :p, :n]) if return_final_state else y
