"""Pieces shared by the SSD implementations (`kernels.ssd` and its two Pallas modules).

Shape legend: x, z: (B, L, H, P)  dt: (B, L, H)  A: (H,)  B, C: (B, L, G, N)
D: (H,) or (H, P)  dt_bias: (H,)  state: (B, H, P, N) float32.
Holds the argument checks and preprocessing every implementation uses, `BlockSizes` (the
Pallas kernels' tiling) and the small Pallas helpers both kernel modules call. Imports no
other `kernels` module.
"""
from __future__ import annotations

import dataclasses
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
# Pallas (Triton backend): tiling and helpers.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the Pallas kernels.

    chunk: the kernel's chunk length Q (a power of two >= 16). None: the caller's chunk_size
      rounded up to a power of two within [16, 128] decides whether a sequence fits one chunk
      (the one-chunk path); the chunked kernels then run at most LONG_CHUNK = 64, the fastest
      measured on the H100 (at b8 L4096 h32 p64 n128 bf16, Q = 128 is 4x slower than 64:
      benchmarks/results/kernels_h100.json). The result does not depend on the chunk (it only
      regroups exact arithmetic), so the kernel may use its own.
    num_warps_fwd / num_warps_bwd / num_stages: Triton launch parameters (num_stages: of the
      chunked kernels; the one-chunk kernels take num_stages_short).
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
    short_pack: on the one-chunk path, stack sequences of L steps as they lie in memory
      ((B, L) flattened to B*L rows; masked loads and stores for the rows of a tile that hold
      no step of its sequences) instead of padding each to the kernel chunk (run 6's layout,
      short_batch sequences of Q rows): no time padding or output slicing in XLA, and at
      L = 10 three sequences per 32-row tile instead of two.
    short_rows: rows per one-chunk program tile when packing (a power of two >= 16); the
      tile holds max(1, short_rows // L) sequences (1 with an initial or final state) and
      grows to the next power of two when one sequence needs more. None: 32.
    short_fwd_heads: heads per one-chunk forward program (rounded down to a divisor of the
      heads per group); they share the loads of B, C and C B^T.
    short_unroll: unroll the one-chunk kernels' loops over heads (straight code the compiler
      may interleave) instead of a loop.
    state_store_at_exit: the chunked forward stores each chunk-entry state (the residual of
      the backward) at the end of the previous chunk's iteration, after its dots; False: at
      the start of the chunk's own. H100 run 9 at b8 L4096 h32 p64 n128 bf16, fwd+bwd: 2.074
      vs 2.110 ms (benchmarks/NOTES_ssd.md).
    dx_heads_fastest: launch the split3 dx pass (one program per batch, chunk and head) with
      the heads as the grid's fastest axis, so the programs that read one chunk's B and C
      run side by side and share them through L2; False: batch fastest (the order before
      session 5: Nsight Compute counted 1.9 GB of DRAM traffic for the pass's 0.9 GB of
      distinct data at b8 L4096 h32 p64 n128, benchmarks/results/ncu_run1.csv).
    fast_exp: the chunked kernels (forward, dx, dB/dC passes) form the (Q, Q) decay
      exp(cs_i - cs_j) as exp2 of log2(e)-scaled exponents (one MUFU.EX2 per element; expf
      costs ~8 instructions with its range reduction); 16-bit inputs only (with float32
      inputs it made the L backward 16% slower: run 14).
    dda_dot: the dx pass sums the pair terms of d(dA) as a 0/1-matrix product on the tensor
      cores (e split into two 16-bit parts) and a row sum, instead of a row cumsum of the
      (Q, Q) tile, two layout conversions and a cross-warp column sum; 16-bit inputs only
      (f32 inputs keep the cumsum: an f32 dot would run as TF32).
    s_prev: where the dx pass gets exp(cs_Q) <dL/dh_c, h_prev> of d(dA): "dx" (an elementwise
      product of the two (P, N) tiles, live in registers), "dot" (the trace of dh h_prev^T on
      the tensor cores, in the dx pass) or "dbc" (the same trace in the dB/dC pass, which
      then runs first and writes it per (batch, chunk, head)). f32 states (f32 inputs) keep
      the elementwise product in either place (an f32 dot would run as TF32).
      H100 runs 11-12 at b8 L4096 h32 p64 n128 bf16, fwd+bwd: the defaults (fast_exp,
      dda_dot, s_prev "dot") 1.767-1.773 ms; s_prev "dot" alone 1.785-1.786; all three off
      (the session-4 kernels) 1.913-1.920 (benchmarks/NOTES_ssd.md).
    dx_backend: the split3 dx pass on "mosaic" (`kernels.ssd_mgpu`: one warpgroup per
      (batch, chunk, head), TMA tiles, wgmma dots; jax >= 0.11.2, 16-bit inputs, chunk 64,
      head dim 64, no z: elsewhere the Triton kernel runs) or "triton"
      (`ssd_long._ssd_bwd_dx_kernel`). H100 runs 16-17 at b8 L4096 h32 p64 n128 bf16,
      fwd+bwd: 1.555-1.569 ms vs 1.765-1.771 (dx pass 0.48 vs 0.70 ms; NOTES_ssd.md).
    mgpu_dx_split_loads: the Mosaic dx kernel waits for its TMA copies in three groups (C, B
      and the decays' vectors; dy, x; the two states), starting each group's dots as soon as
      it lands; False: one barrier for all. Run 17: fwd+bwd at L 1.555 vs 1.570 ms.
    dbc_backend: the split3 dB/dC pass on "mosaic" (`kernels.ssd_mgpu.dbc_call`: one CTA of
      one warpgroup per (batch, chunk, group, 64 d_state columns), a loop over the group's
      heads with a ring of `mgpu_dbc_slots` TMA buffers, wgmma dots; dB, dC written in B's
      dtype, no partials; jax >= 0.11.2, 16-bit inputs, chunk 64, head dim 64, no z, s_prev
      not "dbc": elsewhere the Triton kernel runs) or "triton" (`_ssd_bwd_dbc_kernel`).
      H100 run 18 at b8 L4096 h32 p64 n128 bf16: dB/dC pass 0.319 vs 0.420 ms, fwd+bwd
      1.430 vs 1.560 ms (2 slots; 1 slot 1.443, 3 slots 1.437; NOTES_ssd.md).
    mgpu_dbc_slots: TMA buffers per head tile in the Mosaic dB/dC kernel (1: no prefetch).
    mgpu_fused: with both Mosaic passes, launch them as one kernel
      (`kernels.ssd_mgpu.dx_dbc_call`: per (batch, chunk) the dB/dC CTAs, then the dx CTAs),
      so the two kinds of CTA share the SMs and the chunk's tiles in L2. H100 run 19 at b8
      L4096 h32 p64 n128 bf16, fwd+bwd: 1.338 ms vs 1.430 apart (the two passes alone 0.686
      vs 0.486 + 0.318 ms); with 1 dB/dC slot 1.402.
    mgpu_dbc_lead: in that one launch, the dB/dC CTAs of (batch, chunk) group t + lead go
      out with the dx CTAs of group t (the first `lead` groups' dB/dC CTAs first of all; one
      grid axis): a dB/dC CTA loops over the group's heads and lasts ~10 dx CTAs, so with
      lead 0 the last groups' dB/dC CTAs start last and run on alone at the end; a long
      lead loses the L2 sharing of a chunk's tiles. H100 runs 21-22 at b8 L4096 h32 p64 n128
      bf16, fwd+bwd (with zero_states_inline): lead 8 1.308, 16 1.299, 24 1.301, 32 1.315,
      48 1.353 ms; lead 0 1.335-1.340; alone lead 32 1.321, 64 1.366, 128 1.386, 512 (every
      dB/dC CTA first) 1.427.
    zero_states_inline: the chunked kernels start from a zero state themselves when there is
      no initial state (forward) or no returned final state (the dL/dh pass), instead of
      reading (B, H, P, N) zeros arrays that XLA fills before each launch; the final state
      and dh0 are then not written either. H100 run 21 at L: fwd+bwd 1.329 vs 1.335-1.339.
    num_stages_short: Triton num_stages of the one-chunk kernels (their only loops are the
      head loops). Run 7 on the H100 at (12800, 10, 4, 64, n64), per layer: packed 32-row
      tiles with 4 heads per forward program and 1 stage (the defaults) take fwd 0.154 /
      bwd 0.519 ms in f32, 0.097 / 0.415 in bf16; run 6's padded layout 0.566 / 1.045 and
      0.309 / 0.829 (benchmarks/NOTES_ssd.md).
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
    short_pack: bool = True
    short_rows: int | None = None
    short_fwd_heads: int = 4
    short_unroll: bool = False
    num_stages_short: int = 1
    state_store_at_exit: bool = True
    dx_heads_fastest: bool = True
    fast_exp: bool = True
    dda_dot: bool = True
    s_prev: str = "dot"
    dx_backend: str = "mosaic"
    mgpu_dx_split_loads: bool = True
    dbc_backend: str = "mosaic"
    mgpu_dbc_slots: int = 2
    mgpu_fused: bool = True
    mgpu_dbc_lead: int = 16
    zero_states_inline: bool = True

    def __post_init__(self):
        if self.bwd not in ("split3", "split", "fused"):
            raise ValueError(f"BlockSizes.bwd must be 'split3', 'split' or 'fused'; "
                             f"got {self.bwd=}")
        if self.s_prev not in ("dx", "dot", "dbc"):
            raise ValueError(f"BlockSizes.s_prev must be 'dx', 'dot' or 'dbc'; "
                             f"got {self.s_prev=}")
        if self.dx_backend not in ("triton", "mosaic"):
            raise ValueError(f"BlockSizes.dx_backend must be 'triton' or 'mosaic'; "
                             f"got {self.dx_backend=}")
        if self.dbc_backend not in ("triton", "mosaic"):
            raise ValueError(f"BlockSizes.dbc_backend must be 'triton' or 'mosaic'; "
                             f"got {self.dbc_backend=}")
        if self.mgpu_dbc_slots < 1:
            raise ValueError(f"BlockSizes.mgpu_dbc_slots must be >= 1; got {self.mgpu_dbc_slots=}")
        if self.mgpu_dbc_lead < 0:
            raise ValueError(f"BlockSizes.mgpu_dbc_lead must be >= 0; got {self.mgpu_dbc_lead=}")
        if self.bwd_heads < 1:
            raise ValueError(f"BlockSizes.bwd_heads must be >= 1; got {self.bwd_heads=}")
        sb = self.short_batch
        if sb is not None and (sb < 1 or sb & (sb - 1)):
            raise ValueError(f"BlockSizes.short_batch must be a power of two >= 1 or None; "
                             f"got {self.short_batch=}")
        if self.short_fwd_heads < 1:
            raise ValueError(f"BlockSizes.short_fwd_heads must be >= 1; "
                             f"got {self.short_fwd_heads=}")
        if self.num_stages_short < 1:
            raise ValueError(f"BlockSizes.num_stages_short must be >= 1; "
                             f"got {self.num_stages_short=}")
        sr = self.short_rows
        if sr is not None and (sr < 16 or sr & (sr - 1)):
            raise ValueError(f"BlockSizes.short_rows must be a power of two >= 16 or None; "
                             f"got {self.short_rows=}")

    @classmethod
    def get_default(cls) -> "BlockSizes":
        return cls()


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


LONG_CHUNK = 64


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


def _pallas_call(kernel, ins, out_shape, grid, num_warps, num_stages, interpret, name):
    """Runs `kernel(*in_refs, *out_refs)` over `grid`. `ins` (arrays) and `out_shape`
    (ShapeDtypeStructs) list every ref slot of the kernel's signature in order, None where an
    optional operand or output is absent: only the present ones reach `pl.pallas_call`, the
    kernel gets None in the other slots, and the returned list has None there."""
    present = [a is not None for a in list(ins) + list(out_shape)]

    def body(*refs):
        it = iter(refs)
        kernel(*[next(it) if ok else None for ok in present])

    res = pl.pallas_call(
        body, out_shape=[s for s in out_shape if s is not None], grid=grid,
        interpret=interpret, name=name,
        compiler_params=None if interpret else _compiler_params(num_warps, num_stages))(
        *[a for a in ins if a is not None])
    it = iter(res)
    return [next(it) if s is not None else None for s in out_shape]


def _largest_divisor_at_most(v: int, cap: int) -> int:
    return max(k for k in range(1, min(v, cap) + 1) if v % k == 0)
