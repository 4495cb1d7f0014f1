"""Selective scan (Mamba-1) forward on the Pallas Mosaic GPU backend (experimental, Hopper).

Shape legend (as kernels/selective_scan.py):
    u, delta, z: (B, L, Di)   A: (Di, N)   D, delta_bias: (Di,)
    B, C: (B, L, N) or (B, L, G, N)   state h: (B, Di, N) float32
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t . h_t + D u_t ;  y *= silu(z)
(Gu & Dao 2023, arXiv 2312.00752, Algorithm 2 / eq. 2a-2b.)

Design (benchmarks/NOTES_selective_scan.md, "Mosaic GPU"): one thread block = one warpgroup of
128 threads per (batch, 128 channels), ONE CHANNEL PER THREAD, the N states of its channel in
registers, sequential over time. Tiles of `tile` steps of u, delta, [z], B and C are brought
into shared memory by the bulk-copy engine (TMA), `stages` tiles ahead of the recurrence, so
the dependent loop reads only registers and shared memory (the Triton kernels load rows from
global memory inside the loop: ~444 cycles per step). B_t[n], C_t[n] are warp-uniform scalar
shared-memory loads (broadcast, no bank conflicts; bf16 B/C converted to float32 once per tile);
exp2 with A pre-scaled by log2(e); y_t is stored straight to global memory (128 consecutive
channels per warpgroup and step). One warpgroup barrier per tile (before a slot is refilled)
is the only synchronisation of the forward. The kernels read the caller's arrays as they are
(no XLA pass before or after them) when the length is a multiple of the tile, each group's
width a multiple of 128 and d_state a power of 2 >= 8.

Backward (`jax.custom_vjp`), `MgpuBlockSizes.backward`: "mosaic" (default, d_state <= 16;
H100 run mgpu4: 24% faster than "triton"): the forward saves the state entering every
`bwd_chunk` (8) steps; the Mosaic backward walks tiles and chunks in reverse, recomputes a
chunk's states (as a_t h_{t-1}) into shared memory from the saved one (brought by TMA a
chunk ahead), then runs the adjoint recurrence one channel per thread. A block is four
warpgroups (`bwd_warpgroups`; two where shared memory is short: z, 4-byte inputs), each
running a quarter of the states of the same 128 channels (the per-state recurrences are
independent; the outputs that sum over states are exchanged as partial sums), with the
tile's dt computed once into shared memory (`bwd_dt_tile`, the next tile's inside this one)
and 16-byte shared-memory layouts (`bwd_vec_smem`); B and C reach it as float32 (one XLA
convert each, `bwd_bc_f32`). H100, run mgpu55: fwd+bwd 2.24 / 0.59 ms at L / S (2.42 / 0.62
in session 6; 2.61 / 0.67 with one warpgroup). The sums over channels (dB_t, dC_t: 2N per
step) go through a padded shared tile per warpgroup: each thread writes its terms as rows,
and after 64 / Np steps the rows are summed (with four warpgroups each warp sums the rows of
its own 32 channels, lane l row l, so that only a warp barrier guards the tile's reuse:
`bwd_warp_rows`; warp shuffles instead were 2% slower: session 8, run mgpu31); the warps'
parts are added by one warpgroup, which adds the sums into the group's with
`red.global.add` (`bwd_dbc_atomic`; zeroed by the state-saving forward, `fwd_zeroes`); the
sums across blocks left (dA, dD, dbias over the batch) and the casts run in one Triton
launch after it (`bwd_fused_sums`). Where the time went with one warpgroup (Nsight Compute
at the end of session 5, benchmarks/NOTES_selective_scan.md): the recompute ~31% (18 MUFU
ops per step), the adjoint ~48% (~290 instructions per step, issue-bound with one warp per
scheduler), the dB/dC reductions ~16%. "triton" (and
d_state > 16): the forward saves the state entering every 16 steps in the layout of
kernels/selective_scan_triton.py and its Triton backward (v5) runs on the same padded layout.

Contract: everything `kernels.selective_scan` accepts. The wrapper pads time to a multiple of
the tiles (padded steps get delta = 0 after softplus: identity steps), each group's channels to
a multiple of 128 (a block never straddles two groups) and d_state to a power of 2 >= 8 (the
loops run over the true N only). Widths far below 128 per group waste most of each block:
correct, not fast.

Needs jax >= 0.11.2 (`plgpu.kernel`, Lane lowering semantics, `InterpretGPUParams`);
`AVAILABLE` is False where the API is missing (the module still imports, e.g. on jax 0.10.2).
On CPU the kernel runs in Mosaic GPU interpret mode.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels import selective_scan_common as _common
from kernels import selective_scan_triton as _triton

try:  # jax 0.10.2 has plgpu, but not every piece used here (Lane semantics, interpret params).
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm, vector
    from jax.experimental.pallas import mosaic_gpu as plgpu
    AVAILABLE = all(hasattr(plgpu, a) for a in (
        "kernel", "copy_gmem_to_smem", "barrier_wait", "barrier_arrive", "wait_smem_to_gmem",
        "Barrier", "SMEM", "CompilerParams", "LoweringSemantics", "InterpretGPUParams",
        "inline_mgpu")) and hasattr(mgpu_utils, "inline_ptx")
    if AVAILABLE:
        _fields = {f.name for f in dataclasses.fields(plgpu.CompilerParams)}
        AVAILABLE = {"lowering_semantics", "unsafe_no_auto_barriers",
                     "approx_math"} <= _fields
except Exception:  # pragma: no cover - depends on the installed jax
    plgpu = mgpu_utils = None
    AVAILABLE = False

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
WIDTH = 128         # channels per block: one warpgroup, one channel per thread
TRITON_CHUNK = 16   # steps between saved states for the Triton backward (its chunk)
MAX_MGPU_BWD_STATE = 16   # padded d_state up to which the Mosaic backward runs


@dataclasses.dataclass(frozen=True)
class MgpuBlockSizes:
    """Tiling of the Mosaic GPU kernels."""
    # forward: steps per TMA tile (multiple of 16) and tiles in flight (shared-memory ring).
    # Run mgpu15: 64 x 2 takes the forward from 0.439 to 0.429 ms at L (half the tile
    # barriers) against 32 x 3; S unchanged (0.124).
    tile: int = 64
    stages: int = 2
    # forward: steps per loop iteration (divides 16). Run mgpu14: 8 is 3% faster than 4
    # (0.440 vs 0.454 ms at L) now that the state-saving forward loops over its chunks.
    unroll: int = 8
    # "mosaic" (default; d_state <= 16, else Triton): the Mosaic backward below (H100 run
    # mgpu17: fwd+bwd 2.61 / 0.67 ms at L / S, 161 registers; run mgpu4's first form 3.13 /
    # 0.81). "triton": the Triton backward (v5) of kernels/selective_scan_triton.py (run
    # mgpu4: 4.11 / 1.06 ms).
    backward: str = "mosaic"
    bwd_chunk: int = 8      # Mosaic backward: steps between saved states (recompute depth)
    bwd_tile: int = 32      # Mosaic backward: steps per TMA tile (multiple of bwd_chunk)
    bwd_stages: int = 2
    # Mosaic backward: the adjoint's steps per loop iteration (divides 4). Run mgpu12: 2 is
    # 33% slower (twice the loop code; 4 spilled in run mgpu4); with two warpgroups and the
    # dt tile (run mgpu19) 2 is 2% slower at L.
    bwd_unroll: int = 1
    # Mosaic backward: steps per iteration of the chunk's recompute loop (divides bwd_chunk;
    # the adjoint's is bwd_unroll). Run mgpu11: 2 (168 registers, no spills) -2.1% fwd+bwd
    # at L against 1; 4 and 8 no better than 1. Session 10 (runs mgpu45, mgpu47): 8 1% faster
    # at S, 0.5% slower at L (then the default by length). Session 11, with bwd_warp_rows and
    # bwd_bc_f32 (run mgpu53): 8 faster at L too, 2.242 / 2.243 against 2.255 / 2.255 ms.
    bwd_recompute_unroll: int = 8
    # False (default): bf16 B/C tiles are staged and converted per tile in the kernel, no XLA
    # pass; True: B and C are converted to float32 by XLA before the kernel, which then
    # stages f32 tiles. Run mgpu4 (32-step tiles): True faster, 0.472 vs 0.517 ms forward at
    # L; run mgpu16 (64-step tiles: half the conversions' barriers): equal at L (0.428-0.429)
    # and False faster at S (0.115 vs 0.121: the two XLA converts are ~5% of a short call).
    bc_f32: bool = False
    # Mosaic backward: warpgroups per block (1 or 2). 2: each warpgroup runs the recurrences
    # of half the states of the same 128 channels (the states' recurrences are independent;
    # only the outputs du, ddt, dz sum over states: each warpgroup writes its partial sums to
    # shared memory and one of them adds and stores them), so each scheduler has two warps
    # to interleave instead of one. Nsight Compute (session 6): alone, issue-slot use 48 ->
    # 59% but 21% more instructions (the per-channel work done twice): same kernel time.
    # Runs mgpu19-21, fwd+bwd at L / S with bwd_dt_tile: 1 warpgroup 2.604 / 0.674 ms, 2
    # 2.479 / 0.648 (dB/dC column parts summed by XLA) or 2.56 / 0.66 (combined in the
    # kernel, as now), 4 2.416-2.421 / 0.618-0.623 (the default; 8-step tiles; with z or
    # 4-byte inputs its shared memory does not fit and the kernel falls back to 2).
    bwd_warpgroups: int = 4
    # Mosaic backward: dt (softplus, mask) and the ddt factor sigmoid(x) of a tile computed
    # once per tile into float32 shared tiles (split between the warpgroups) instead of in
    # both the recompute and the adjoint step (and in both warpgroups). Run mgpu19, fwd+bwd
    # at L / S: 2 warpgroups + dt tile 2.479 / 0.648 ms (the default since); 1 warpgroup,
    # per step (session 5) 2.604 / 0.674; 2 warpgroups alone 2.627 / 0.683 (with adjoint
    # unroll 2); the dt tile alone 2.689 / 0.691 (its shared memory halves the tile). Session 7
    # (run mgpu26): with >= 2 stages the next tile's dt is computed inside this tile, before
    # its last reduction barrier (a second dt buffer; no barrier of its own).
    bwd_dt_tile: bool = True
    # Mosaic backward: shared-memory layouts for 16-byte accesses. The dB/dC tile's rows are
    # padded by 4 columns (not 1), so each thread's reduction reads 4 columns per load; and
    # with <= 4 states per warpgroup the recomputed states a_t h_{t-1} are stored lane-major
    # (thread, state), one 16-byte store and load per step instead of one per state.
    # Nsight Compute (session 7, W = 4): shared-memory instructions were ~35 per warp and
    # step of 147, "MIO throttle" 13% of the stall samples. Run mgpu23: 147 -> 135
    # instructions per warp and step; with bwd_lean_sync fwd+bwd 2.42 -> 2.37 ms at L
    # (either alone 2.40 / 2.41).
    bwd_vec_smem: bool = True
    # Mosaic backward: with several warpgroups the TMA copies issued by a warpgroup that
    # finalizes nothing (W = 4 without z: warpgroup 2); and no ring barrier before a refill
    # (the tile's last reduction barrier already orders every read of the slot). Session 7's
    # profile: the TMA issue (~100 instructions per tile) ran in warpgroup 0, which also
    # finalizes du, between two block barriers.
    bwd_lean_sync: bool = True
    # Mosaic backward: the sums across blocks (dB, dC over a group's channel blocks; dA, dD,
    # dbias over the batch) in one Triton launch (`_bwd_sums`) instead of XLA's four
    # kernels, three of them launch-bound (session 8, ncu run 11 at S: 9.0 + 11.6 us).
    # Session 9, ncu run 14 (with bwd_dbc_atomic): 6.2 / 11.4 us at L / S against XLA's
    # 16.2 / 18.0.
    bwd_fused_sums: bool = True
    # Mosaic backward: dB, dC added over a group's channel blocks in the kernel, one
    # `red.global.add.f32` per thread and reduction group into a zeroed (2, B, G, Lp, Np)
    # float32 array, instead of per-block partial sums (blocks-per-group times the bytes)
    # summed afterwards. Session 9, run mgpu38 and ncu run 14: fwd+bwd at L 2.308 vs
    # 2.327 ms (the 26 us block sum gone, +5 us in the backward); the same through shared
    # memory and TMA reductions (cp.reduce.async.bulk, a barrier and a bulk-read wait per
    # group in the combining warpgroup; run mgpu37, ncu run 13) cost +19 us in the backward
    # (2.320). The order of the additions varies between runs: dB, dC are not bitwise
    # reproducible (False is).
    bwd_dbc_atomic: bool = True
    # With bwd_dbc_atomic: the forward that saves states for the backward also zeroes the
    # dB/dC sums (a few 512-byte rows per block and tile) instead of XLA filling them before
    # the backward; they travel as a residual. Session 10 (ncu runs 16-17): the 5.2 us fill
    # gone at S for nothing in the forward; at L the 4.0 us fill for +3.3 us in the forward
    # (stored after the scan instead: +3.7).
    fwd_zeroes: bool = True
    # Mosaic backward: sum_n g a_t h_{t-1} A (the ddt term) in units of A log2(e), rescaled
    # once per step (one multiply more), so that A itself is not kept in registers next to
    # A log2(e): 4 of the 128 a thread has at four warpgroups (ptxas: 128, no spills either
    # way). Session 10, ncu run 17 at L: backward 1776.7 vs 1788.9 us with 0.8% more
    # instructions; run mgpu42: fwd+bwd 2.304 vs 2.311 / 2.314 ms at L.
    bwd_sa_log2: bool = True
    # Mosaic backward: B and C converted to float32 by XLA for the backward only (the forward
    # still reads the caller's bf16 tiles): no per-tile conversion pass and warpgroup barrier
    # in each warpgroup, and no staging tiles (W bwd_tile Np 8 bytes) in its shared memory.
    # Session 11, runs mgpu49-51, fwd+bwd at L: 2.287-2.291 vs 2.298-2.315 ms alone; with
    # bwd_warp_rows see there.
    bwd_bc_f32: bool = True
    # Mosaic backward (with >= 2 stages): the next tile's dt pass inside this tile (two dt
    # buffers, no barrier of its own; session 7, run mgpu26); False: at the tile's start into
    # one buffer, then a block barrier (half the dt tile's shared memory; session 11, run
    # mgpu50: with the entry states' memory halved too, a 16-step tile fit, and was no faster
    # than 8 steps with both as they are: 2.310 vs 2.305 ms).
    bwd_dt_ahead: bool = True
    # Mosaic backward, four warpgroups: the dB/dC tile laid out per warp (warpgroup, part =
    # warp, row, column = lane) and reduced by the warp that wrote it (lane l sums row l of
    # its part), so that reusing the tile for the next reduction group needs only a warp
    # barrier (bar.warp.sync) instead of a warpgroup barrier; the parts are combined across
    # the warps as before. With bwd_bc_f32 (whose per-tile conversion ends with the other
    # warpgroup barrier) the warps of a warpgroup no longer meet between block barriers:
    # session 11, runs mgpu52-55, fwd+bwd at L 2.244-2.259 ms with both, 2.296-2.299 with
    # this alone, 2.298-2.311 with neither; S 0.587-0.590 against 0.591-0.606.
    bwd_warp_rows: bool = True

    def __post_init__(self):
        if self.tile < 16 or self.tile % 16:
            raise ValueError(f"MgpuBlockSizes.tile={self.tile} must be a multiple of 16")
        if self.stages < 1 or self.bwd_stages < 1:
            raise ValueError(f"MgpuBlockSizes.stages={self.stages}, bwd_stages="
                             f"{self.bwd_stages} must be >= 1")
        if self.bwd_chunk not in (8, 16):
            raise ValueError(f"MgpuBlockSizes.bwd_chunk={self.bwd_chunk} must be 8 or 16")
        if self.unroll < 1 or 16 % self.unroll:
            raise ValueError(f"MgpuBlockSizes.unroll={self.unroll} must divide 16")
        if self.bwd_tile % self.bwd_chunk or self.tile % self.bwd_chunk:
            raise ValueError(f"MgpuBlockSizes.tile={self.tile} and bwd_tile={self.bwd_tile} "
                             f"must be multiples of bwd_chunk={self.bwd_chunk}")
        if self.bwd_unroll < 1 or 4 % self.bwd_unroll:
            raise ValueError(f"MgpuBlockSizes.bwd_unroll={self.bwd_unroll} must divide 4")
        if self.bwd_recompute_unroll < 1 or self.bwd_chunk % self.bwd_recompute_unroll:
            raise ValueError(f"MgpuBlockSizes.bwd_recompute_unroll={self.bwd_recompute_unroll}"
                             f" must divide bwd_chunk={self.bwd_chunk}")
        if self.bwd_warpgroups not in (1, 2, 4):
            raise ValueError(f"MgpuBlockSizes.bwd_warpgroups={self.bwd_warpgroups} must be 1, "
                             f"2 or 4")
        if self.backward not in ("mosaic", "triton"):
            raise ValueError(f"MgpuBlockSizes.backward={self.backward!r}: 'mosaic' or 'triton'")


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static description of one padded problem (hashable: a custom_vjp nondiff argument)."""
    length: int            # true length; steps >= length are identity steps
    lp: int                # padded length (multiple of tile and bwd_tile)
    tile: int
    stages: int
    unroll: int
    save_every: int        # steps between the states the forward saves for the backward
    n_state: int           # true d_state (the loops' states)
    np_: int               # padded d_state (rows of h0 / hL / hs; B|C row = 2 np_)
    blocks_per_group: int
    softplus: bool
    has_z: bool
    interpret: bool
    mosaic_bwd: bool       # False: the Triton backward (tcfg)
    bwd_tile: int
    bwd_stages: int
    bwd_unroll: int
    bwd_recompute_unroll: int
    bwd_warpgroups: int
    bwd_dt_tile: bool
    bwd_vec_smem: bool
    bwd_lean_sync: bool
    bwd_fused_sums: bool
    bwd_dbc_atomic: bool
    fwd_zeroes: bool
    bwd_sa_log2: bool
    bwd_bc_f32: bool
    bwd_dt_ahead: bool
    bwd_warp_rows: bool
    tcfg: object           # the Triton backward's _Cfg (kernels/selective_scan_triton.py) or None

    @property
    def has_sg(self):
        """bwd_dt_tile stores the ddt factor too: sigmoid(x) (softplus) and/or the length mask."""
        return self.bwd_dt_tile and (self.softplus or self.lp != self.length)

    @property
    def zero_dbc(self):
        """The state-saving forward zeroes the backward's dB/dC sums (fwd_zeroes)."""
        return self.mosaic_bwd and self.fwd_zeroes and self.bwd_dbc_atomic

    @property
    def dt_ahead(self):
        """The backward's next dt tile computed inside this tile (two dt buffers)."""
        return self.bwd_dt_tile and self.bwd_stages >= 2 and self.bwd_dt_ahead

    @property
    def warp_rows(self):
        """The backward's dB/dC tile reduced by the warps that wrote it: four warpgroups,
        32 rows (dC | dB, step, state) per reduction group, one per lane."""
        return self.bwd_warp_rows and self.bwd_warpgroups == 4 and self.bwd_vec_smem

    @property
    def lane_states(self):
        """The backward's recomputed states stored lane-major per warpgroup: (W, chunk, 128,
        Np / W), each thread's states in one 16-byte (or 8-byte) run; else (chunk, Np, 128)."""
        return self.bwd_vec_smem and self.np_ // self.bwd_warpgroups <= 4


def _pt_pad(vec_smem):
    """Padding columns of each row part of the backward's dB/dC tile: 4 keeps the reduction's
    4-column loads 16-byte aligned and conflict-free, 1 the scalar ones."""
    return 4 if vec_smem else 1


def _softplus(x):
    """log1p(exp(x)) from ex2 / lg2 (MUFU with approx_math): a 4-term series below e = 1/32
    (relative error < 2e-7), x itself above 20 (as kernels/selective_scan_triton.py's fast path)."""
    e = jnp.exp2(jnp.minimum(x, 20.0) * _LOG2E)
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0 - e * 0.25)))
    big = jnp.log2(1.0 + e) * (1.0 / _LOG2E)
    return jnp.where(x > 20.0, x, jnp.where(e < 0.03125, series, big))


def _sigmoid(x):
    # ex2 of a large argument is +inf and 1 / inf = 0: no clamp needed.
    return 1.0 / (1.0 + jnp.exp2(x * -_LOG2E))


def _barrier():
    """A warpgroup-wide barrier (bar.sync): waiting on no pending bulk stores is one, and
    automatic barriers are off (`unsafe_no_auto_barriers`)."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _block_sync(sbar, warpgroups):
    """A barrier of every warpgroup of the block. Compiled: `bar.sync` on a named barrier
    (15; Mosaic GPU's warpgroup barriers use 1..4) over all threads. Interpret mode (which
    cannot run inline PTX): the mbarrier `sbar`, on which every warpgroup arrives."""
    if sbar is not None:
        plgpu.barrier_arrive(sbar)
        plgpu.barrier_wait(sbar)
        return

    @plgpu.inline_mgpu()
    def bar_sync_all(ctx):
        del ctx
        mgpu_utils.inline_ptx(f"bar.sync 15, {warpgroups * WIDTH};", has_side_effects=True,
                              convergent=True)

    bar_sync_all()


def _warp_sync():
    """bar.warp.sync: the warp's shared-memory accesses before it are ordered before those
    after it (the compiler moves none across it)."""
    @plgpu.inline_mgpu()
    def warp_sync(ctx):
        del ctx
        mgpu_utils.inline_ptx("bar.warp.sync -1;", has_side_effects=True, convergent=True)

    warp_sync()


def _red_add(dst, val):
    """dst[...] += val (float32, 128 elements, one per thread of the warpgroup, the Lane
    layout of a 128-element array) by one `red.global.add.f32` per thread: no shared memory,
    no barrier, fire and forget."""
    shape = val.shape

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WG_STRIDED(shape, vec_size=1)))
    def red(ctx, ref, v):
        del ctx
        i64 = ir.IntegerType.get_signless(64)
        strides, _ = ir.MemRefType(ref.type).get_strides_and_offset()
        rem = arith.extui(i64, arith.remui(mgpu_utils.thread_idx(), mgpu_utils.c(WIDTH,
                                           ir.IntegerType.get_signless(32))))
        off = mgpu_utils.c(0, i64)
        for dim, stride in reversed(list(zip(shape, strides))):    # flat index -> offset
            idx = arith.remui(rem, mgpu_utils.c(dim, i64))
            rem = arith.divui(rem, mgpu_utils.c(dim, i64))
            off = arith.addi(off, arith.muli(idx, mgpu_utils.c(stride * 4, i64)))
        addr = arith.addi(llvm.ptrtoint(i64, mgpu_utils.memref_ptr(ref)), off)
        x = vector.extract(v.registers.flat[0], dynamic_position=[], static_position=[0])
        mgpu_utils.inline_ptx("red.global.add.f32 [$0], $1;", addr, x, has_side_effects=True)

    red(dst, val)


def _params():
    return plgpu.CompilerParams(
        lowering_semantics=plgpu.LoweringSemantics.Lane, approx_math=True,
        unsafe_no_auto_barriers=True)


def _ring(n_tiles, stages, issue, bar, body, carry):
    """Tiles 0..n_tiles-1 through a `stages`-deep ring of shared-memory slots filled by TMA
    (the forward; the backward runs its own ring, in reverse): `issue(tile, slot)` starts the
    copies of a tile (arriving on bar[slot]), `body(tile, slot, carry)` consumes it. One
    warpgroup barrier per tile orders the reads of tile i - 1 before the copy that refills
    its slot."""
    for i in range(min(stages - 1, n_tiles)):
        issue(i, i)

    def it(i, carry):
        slot = jax.lax.rem(i, stages)
        _barrier()
        nxt = i + stages - 1

        @pl.when(nxt < n_tiles)
        def _():
            issue(nxt, jax.lax.rem(nxt, stages))

        plgpu.barrier_wait(bar.at[slot])
        return body(i, slot, carry)

    return jax.lax.fori_loop(0, n_tiles, it, carry)


def _tile_copies(seq_refs, seq_smem, bar, bi, grp, cols, steps):
    """`issue(k, slot)` for `_ring`: TMA copies of tile k (`steps` rows) of the per-channel
    sequences (all refs but the last two: this block's `cols`) and of B, C (the last two: the
    block's group `grp`) into the slot's shared-memory buffers, arriving on bar[slot]."""
    def issue(k, slot):
        rows = pl.ds(k * steps, steps)
        for r, s_ in zip(seq_refs[:-2], seq_smem[:-2]):
            plgpu.copy_gmem_to_smem(r.at[bi, rows, cols], s_.at[slot], bar.at[slot])
        for r, s_ in zip(seq_refs[-2:], seq_smem[-2:]):
            plgpu.copy_gmem_to_smem(r.at[bi, rows, grp, :], s_.at[slot], bar.at[slot])
    return issue


def _zeros():
    return plgpu.layout_cast(jnp.zeros((WIDTH,), jnp.float32),
                             plgpu.Layout.WG_STRIDED((WIDTH,), vec_size=1))


@dataclasses.dataclass(frozen=True)
class _Ins:
    """Which optional inputs a kernel gets (static)."""
    z: bool
    d: bool
    bias: bool
    h0: bool
    bc_f32: bool           # B, C already float32 (read from the TMA tiles directly)


def _leader(w, fn, lead=0):
    """fn() in warpgroup `lead` only (w is None: a one-warpgroup kernel)."""
    if w is None:
        fn()
    else:
        pl.when(w == lead)(fn)


def _load_params(ins, refs, smem, pbar, cols, states):
    """TMA of the per-channel parameters (the forward); returns a2 (A log2(e) of the
    `states`), D, bias rows. (Read straight from global memory instead, as the backward does
    for want of shared memory, the forward measured 3-5% slower: session 7, run mgpu25.)"""
    a_ref, d_ref, bias_ref = refs
    a_s, d_s, bias_s = smem
    plgpu.copy_gmem_to_smem(a_ref.at[cols, :], a_s, pbar)
    if ins.d:
        plgpu.copy_gmem_to_smem(d_ref.at[cols], d_s, pbar)
    if ins.bias:
        plgpu.copy_gmem_to_smem(bias_ref.at[cols], bias_s, pbar)
    plgpu.barrier_wait(pbar)
    # Column n of the (128, Np) tile: thread d reads A[d, n] (a strided load, once).
    a2 = [a_s[pl.ds(0, WIDTH), n] * _LOG2E for n in states]
    return a2, (d_s[...] if ins.d else None), (bias_s[...] if ins.bias else None)


def _par_count(ins):
    return 1 + int(ins.d) + int(ins.bias)


def _bc_reader(ins, b_s, c_s, stage):
    """(b(slot, t, n), c(slot, t, n), per-tile staging hook) over the B, C tiles. bf16 tiles
    are converted to float32 once per tile into `stage` (one barrier), not at every use."""
    if ins.bc_f32:
        return (lambda slot, t, n: b_s[slot, t, n]), (lambda slot, t, n: c_s[slot, t, n]), None
    bf_s, cf_s = stage

    def convert(slot):
        bf_s[...] = b_s[slot].astype(jnp.float32)
        cf_s[...] = c_s[slot].astype(jnp.float32)
        _barrier()

    return (lambda slot, t, n: bf_s[t, n]), (lambda slot, t, n: cf_s[t, n]), convert


def _chain(xs, ys):
    """sum_i xs[i] ys[i] as one multiply-add chain (one instruction per term)."""
    acc = xs[0] * ys[0]
    for x, y in zip(xs[1:], ys[1:]):
        acc = acc + x * y
    return acc


def _dot(xs, ys, extra=None):
    """sum_i xs[i] ys[i] (+ extra) as two interleaved multiply-add chains: one FMA per term
    (a tree of products costs a multiply and an add per term) and half the dependent chain."""
    acc = [extra, None]
    for i, (x, y) in enumerate(zip(xs, ys)):
        acc[i % 2] = x * y if acc[i % 2] is None else acc[i % 2] + x * y
    return acc[0] if acc[1] is None else acc[0] + acc[1]


def _fwd_kernel(*refs, cfg: _Cfg, ins: _Ins, save_states: bool):
    """Forward of one (batch, 128-channel block): eq. 2a-2b, one channel per thread.

    GMEM refs: u, dt, [z]: (B, Lp, Dp)  B, C: (B, Lp, G, Np)  A: (Dp, Np) float32
    [D, delta_bias: (Dp,) float32]  [h0: (B, Np, Dp) float32]
    -> y: (B, Lp, Dp)  hL: (B, Np, Dp)  [hs: (B, Lp / save_every, Np, Dp)  [cfg.zero_dbc:
    the backward's dB/dC sums zeroed, (2, B, G, Lp Np / 128, 128): the rows of a (batch,
    group) split between the group's blocks, a few per tile]]
    SMEM scratch: u, dt, [z]: (stages, tile, 128)  B, C: (stages, tile, Np)
    [B, C float32 staging: (tile, Np)]  A: (128, Np)  D, bias: (128,)  [h0: (Np, 128)];
    barriers: one per stage, one for the parameters.
    """
    it = iter(refs)
    nseq = 4 + int(ins.z)
    seq_refs = [next(it) for _ in range(nseq)]       # u, dt, [z], B, C
    par_refs = (next(it), next(it) if ins.d else None, next(it) if ins.bias else None)
    h0_ref = next(it) if ins.h0 else None
    y_ref, hl_ref = next(it), next(it)
    hs_ref = next(it) if save_states else None
    zd_ref = next(it) if save_states and cfg.zero_dbc else None
    seq_smem = [next(it) for _ in range(nseq)]
    stage = None if ins.bc_f32 else (next(it), next(it))
    par_smem = (next(it), next(it) if ins.d else None, next(it) if ins.bias else None)
    h0_s = next(it) if ins.h0 else None
    bar, pbar = next(it), next(it)

    bi = jax.lax.axis_index("b")
    j = jax.lax.axis_index("d")
    grp = j // cfg.blocks_per_group
    cols = pl.ds(j * WIDTH, WIDTH)
    T, N, CH = cfg.tile, cfg.n_state, cfg.save_every

    issue = _tile_copies(seq_refs, seq_smem, bar, bi, grp, cols, T)

    if ins.h0:
        plgpu.copy_gmem_to_smem(h0_ref.at[bi, :, cols], h0_s, pbar)
    a2, dskip, bias = _load_params(ins, par_refs, par_smem, pbar, cols, range(N))
    zero = _zeros()
    h = tuple(h0_s[n, :] if ins.h0 else zero for n in range(N))
    u_s, dt_s = seq_smem[0], seq_smem[1]
    z_s = seq_smem[2] if ins.z else None
    bval, cval, convert = _bc_reader(ins, seq_smem[-2], seq_smem[-1], stage)
    masked = cfg.lp != cfg.length

    def step(t0, slot, t, h):
        x = dt_s[slot, t, :].astype(jnp.float32)
        if ins.bias:
            x = x + bias
        dt = _softplus(x) if cfg.softplus else x
        if masked:
            dt = jnp.where(t0 + t < cfg.length, dt, 0.0)
        u = u_s[slot, t, :].astype(jnp.float32)
        dtu = dt * u
        # B read inline (16 scalar loads): loading the B and C rows first (8 vector loads, 12
        # fewer instructions per step) measured 3-4% slower (run mgpu8).
        out = [jnp.exp2(dt * a2[n]) * h[n] + dtu * bval(slot, t, n) for n in range(N)]
        y = _dot(out, [cval(slot, t, n) for n in range(N)], dskip * u if ins.d else None)
        if ins.z:
            zt = z_s[slot, t, :].astype(jnp.float32)
            y = y * zt * _sigmoid(zt)
        y_ref[bi, t0 + t, cols] = y.astype(y_ref.dtype)
        return tuple(out)

    # Saving states: loops of CH steps, the state stored before each; else one loop per tile
    # (run mgpu5: 8-step loops cost the primal 9% at L).
    if not save_states:
        CH = T

    if zd_ref is not None:
        # Block jj = j % bpg zeroes rows jj, jj + bpg, ... of its (batch, group), per_tile
        # of them in each tile (ncu runs 15-17 at L: +3.3 us; all after the scan: +3.7).
        bpg, n_rows = cfg.blocks_per_group, zd_ref.shape[3]
        mine = -(-n_rows // bpg)
        per_tile = -(-mine // (cfg.lp // T))

        def zero_rows(k):
            for q in range(per_tile):
                r = j % bpg + (k * per_tile + q) * bpg

                @pl.when(r < n_rows)
                def _():
                    zd_ref[0, bi, grp, r, :] = zero
                    zd_ref[1, bi, grp, r, :] = zero

    def tile_body(k, slot, h):
        if convert is not None:
            convert(slot)
        t0 = k * T
        if zd_ref is not None:
            zero_rows(k)

        def chunk(q, h):
            if save_states:
                c = k * (T // CH) + q
                for n in range(cfg.np_):
                    hs_ref[bi, c, n, cols] = h[n] if n < N else zero
            return jax.lax.fori_loop(0, CH, lambda i, h: step(t0, slot, q * CH + i, h), h,
                                     unroll=min(cfg.unroll, CH))

        # The chunks as a loop (one copy of their code; run mgpu13).
        return jax.lax.fori_loop(0, T // CH, chunk, h) if T // CH > 1 else chunk(0, h)

    h = _ring(cfg.lp // T, cfg.stages, issue, bar, tile_body, h)
    for n in range(cfg.np_):
        hl_ref[bi, n, cols] = h[n] if n < N else zero


def _bwd_kernel(*refs, cfg: _Cfg, ins: _Ins, has_dhl: bool):
    """Backward of one (batch, 128-channel block), one channel per thread: tiles and chunks
    in reverse, each chunk's states recomputed from the state saved at its entry.

    Per step (adjoint g = dLoss/dh_t, accumulated backwards; a_t = exp(dt_t A)):
        g += C_t dy_t ;  dC_t = sum_d dy_t h_t ;  dB_t = sum_d g dt_t u_t
        du_t = D dy_t + dt_t sum_n g B_t ;  ddt_t = sum_n g (B_t u_t + A a_t h_{t-1})
        dA += g a_t h_{t-1} dt_t ;  g *= a_t
    dy_t = dout_t silu(z_t) does not depend on y, so each state's recurrence (recompute and
    adjoint) is independent of the others: with W = bwd_warpgroups > 1, warpgroup w runs
    states [w Np/W, (w + 1) Np/W) of the same channels; du, ddt, dz (sums over states) are
    written as per-warpgroup partial sums to shared memory, and after each reduction group
    (one block barrier) warpgroup k % W adds and stores output k (du, ddt, dz).
    dB_t, dC_t are sums over the block's channels (threads): each warpgroup writes its terms
    as one row per (dC | dB, step, state) of its (128 / W, W, 128 / W + pad) shared tile
    (row, column part, column), 64 / Np steps fill it, and then thread r sums part r % W of
    row r // W (the padding columns keep both phases free of bank conflicts).
    GMEM refs: u, dt, [z], dout: (B, Lp, Dp)  B, C: (B, Lp, G, Np)  A: (Dp, Np)  [D, bias]
    hs: (B, Lp / chunk, Np, Dp)  [dhL: (B, Np, Dp); absent when it is a symbolic zero]
    [bwd_dbc_atomic: dbc, the zeroed (2, B, G, Lp, Np) sums of dC | dB, added into in place]
    -> du, ddt, [dz]: (B, Lp, Dp)  [dbc: (2, B, n_blocks, Lp, Np) per-block partial sums of
    dC | dB (W > 1: the warpgroups' column parts added in the kernel by the last warpgroup,
    one group later), summed over the blocks of a group afterwards]
    dA^T: (B, Np, Dp)  dD, dbias: (B, W, 2, Dp)  dh0: (B, Np, Dp)
    """
    it = iter(refs)
    nseq = 5 + int(ins.z)
    seq_refs = [next(it) for _ in range(nseq)]       # u, dt, [z], dout, B, C
    par_refs = (next(it), next(it) if ins.d else None, next(it) if ins.bias else None)
    hs_ref = next(it)
    dhl_ref = next(it) if has_dhl else None
    acc_ref = next(it) if cfg.bwd_dbc_atomic else None     # zeroed (2, B, G, Lp, Np), in place
    du_ref, ddt_ref = next(it), next(it)
    dz_ref = next(it) if ins.z else None
    dbc_ref = acc_ref if cfg.bwd_dbc_atomic else next(it)
    dat_ref, ddb_ref, dh0_ref = next(it), next(it), next(it)
    seq_smem = [next(it) for _ in range(nseq)]
    stage = None if ins.bc_f32 else (next(it), next(it))
    h_s, pt_s, hst_s = next(it), next(it), next(it)
    W = cfg.bwd_warpgroups
    xch_s, comb_s = (next(it), next(it)) if W > 1 else (None, None)
    has_sg = cfg.has_sg
    dtf_s = next(it) if cfg.bwd_dt_tile else None
    sgf_s = next(it) if has_sg else None
    bar, hbar = next(it), next(it)
    sbar = next(it) if W > 1 and cfg.interpret else None

    bi = jax.lax.axis_index("b")
    j = jax.lax.axis_index("d")
    grp = j // cfg.blocks_per_group
    cols = pl.ds(j * WIDTH, WIDTH)
    T, N, NP, CH = cfg.bwd_tile, cfg.n_state, cfg.np_, cfg.save_every
    UQ = WIDTH // (2 * NP)           # steps per dB/dC reduction group
    f32 = jnp.float32
    masked = cfg.lp != cfg.length
    if W == 1:
        w, wi, RP = None, 0, NP
        states = list(range(N))      # the true states only
        sync = _barrier
    else:
        w = wi = jax.lax.axis_index("wg")
        RP = NP // W                 # this warpgroup's states (padded ones are zero: cheap)
        states = [w * RP + k for k in range(RP)]
        sync = functools.partial(_block_sync, sbar, W)
    K = len(states)
    CP = WIDTH // W                  # columns per part of the dB/dC tile
    # The warpgroup issuing the TMA copies: with bwd_lean_sync, one that finalizes no output
    # (output kind k: warpgroup k % W) and combines no dB/dC parts (warpgroup W - 1).
    busy = {k % W for k in range(2 + int(ins.z))} | {W - 1}
    idle = [v for v in range(W) if v not in busy]
    lead = idle[0] if cfg.bwd_lean_sync and idle else 0

    tile_issue = _tile_copies(seq_refs, seq_smem, bar, bi, grp, cols, T)

    def issue(k, slot):
        _leader(w, lambda: tile_issue(k, slot), lead)

    # A, D, bias straight from global memory, once per block (no shared memory to spare).
    a_ref, d_ref, bias_ref = par_refs
    a_raw = [a_ref[cols, n] for n in states]
    a2 = [a * _LOG2E for a in a_raw]
    dskip = d_ref[cols] if ins.d else None
    bias = bias_ref[cols] if ins.bias else None
    if ins.d and W > 1:
        dskip = dskip * jnp.where(w == 0, 1.0, 0.0)  # D dy and D u: in warpgroup 0's partials
    zero = _zeros()
    u_s, dt_s = seq_smem[0], seq_smem[1]
    z_s = seq_smem[2] if ins.z else None
    do_s = seq_smem[-3]
    if stage is not None and W > 1:                   # each warpgroup converts its own copy
        stage = (stage[0].at[w], stage[1].at[w])
    bval, cval, convert = _bc_reader(ins, seq_smem[-2], seq_smem[-1], stage)
    n_chunks = cfg.lp // CH

    def step_size(slot, db, tl, tg):
        # (x = dt + bias, dt after softplus and mask) of step tl of the tile; with
        # bwd_dt_tile, (the ddt factor sigmoid(x) masked, or None, dt) from the tile pass
        # (buffer db).
        if cfg.bwd_dt_tile:
            return (sgf_s[db, tl, :] if has_sg else None), dtf_s[db, tl, :]
        x = dt_s[slot, tl, :].astype(f32)
        if ins.bias:
            x = x + bias
        dt = _softplus(x) if cfg.softplus else x
        if masked:
            dt = jnp.where(tg < cfg.length, dt, 0.0)
        return x, dt

    def ddt_factor(ddt, x, tg):
        if cfg.bwd_dt_tile:
            return ddt * x if has_sg else ddt
        if cfg.softplus:
            ddt = ddt * _sigmoid(x)
        if masked:
            ddt = jnp.where(tg < cfg.length, ddt, 0.0)
        return ddt

    def dt_pass(t0, slot, db, then_sync):
        # bwd_dt_tile: warpgroup w computes steps [w T / W, (w + 1) T / W) of the tile in
        # `slot` into buffer db; a block barrier must follow before they are read (then_sync:
        # here; every thread reads only its own lane, so one warpgroup needs none).
        TW = T // W

        def one(i, _):
            tl = i + wi * TW
            x = dt_s[slot, tl, :].astype(f32)
            if ins.bias:
                x = x + bias
            dt = _softplus(x) if cfg.softplus else x
            if masked:
                keep = t0 + tl < cfg.length
                dt = jnp.where(keep, dt, 0.0)
            dtf_s[db, tl, :] = dt
            if has_sg:
                sg = _sigmoid(x) if cfg.softplus else zero + 1.0
                sgf_s[db, tl, :] = jnp.where(keep, sg, 0.0) if masked else sg
            return _

        jax.lax.fori_loop(0, TW, one, 0, unroll=2 if TW % 2 == 0 else 1)
        if then_sync and W > 1:
            sync()

    def issue_state(c):
        # The state entering chunk c by TMA into slot c % 2, a chunk ahead of its use
        # (register loads issued a chunk ahead were sunk by the compiler to their use:
        # Nsight Compute put 5.5% of the stall samples there; run mgpu10: -4.5% fwd+bwd).
        _leader(w, lambda: plgpu.copy_gmem_to_smem(hs_ref.at[bi, c, :, cols],
                                                   hst_s.at[c % 2], hbar.at[c % 2]), lead)

    def p_at(i, k, n):
        # Where step i's a_t h_{t-1} of state n (k-th of this warpgroup) lives in h_s.
        return (wi, i, slice(None), k) if cfg.lane_states else (i, n, slice(None))

    def recompute(t0, slot, db, base, i, h):
        # Store p_t = a_t h_{t-1} (what step t's gradient needs: h_t = p_t + dt u B_t, and
        # g a_t h_{t-1} = g p_t), then advance to h_t.
        tl = base + i
        _, dt = step_size(slot, db, tl, t0 + tl)
        dtu = dt * u_s[slot, tl, :].astype(f32)
        bs = [bval(slot, tl, n) for n in states]      # before the stores: vector loads (mgpu7)
        p = [jnp.exp2(dt * a2[k]) * h[k] for k in range(K)]
        for k, n in enumerate(states):       # lane_states: one 16-byte store (adjacent k)
            h_s[p_at(i, k, n)] = p[k]
        return tuple(p[k] + dtu * bs[k] for k in range(K))

    def put(ref, tg, ii, kind, val):
        # An output row: stored (one warpgroup), or this warpgroup's partial sum for the
        # group's finalize.
        if W == 1:
            ref[bi, tg, cols] = val.astype(ref.dtype)
        else:
            xch_s[(tg // UQ) % 2, w, kind, ii, :] = val

    def adjoint(t0, slot, db, base, gbase, i, carry):
        # Step base + i of the tile (i: index in the chunk), in the reduction group at gbase.
        g, dat, dd, dbias = carry
        tl, tg = base + i, t0 + base + i
        ii = base + i - gbase
        x, dt = step_size(slot, db, tl, tg)
        u = u_s[slot, tl, :].astype(f32)
        dout = do_s[slot, tl, :].astype(f32)
        dtu = dt * u
        bs = [bval(slot, tl, n) for n in states]
        cs = [cval(slot, tl, n) for n in states]
        p = [h_s[p_at(i, k, n)] for k, n in enumerate(states)]        # a_t h_{t-1}
        a = [jnp.exp2(dt * a2[k]) for k in range(K)]
        h = [p[k] + dtu * bs[k] for k in range(K)]
        if ins.z:
            zt = z_s[slot, tl, :].astype(f32)
            sig = _sigmoid(zt)
            y = _dot(h, cs, dskip * u if ins.d else None)
            put(dz_ref, tg, ii, 2, dout * y * sig * (1.0 + zt * (1.0 - sig)))
            dy = dout * zt * sig
        else:
            dy = dout
        row = ii * RP                                  # rows (dC | dB, step, state)
        g = [g[k] + cs[k] * dy for k in range(K)]
        for k in range(K):
            for r, val in ((row + k, dy * h[k]), (UQ * RP + row + k, g[k] * dtu)):  # dC, dB
                at = (wi, slice(None), r) if cfg.warp_rows else (wi, r, slice(None))
                pt_s[(*at, pl.ds(0, CP))] = val.reshape(W, CP)
        gah = [g[k] * p[k] for k in range(K)]
        # One FMA chain each (session 8, run mgpu34); sa in units of A log2(e) and rescaled
        # (bwd_sa_log2), or of A (A then held in registers too).
        gb = _chain(g, bs)
        sa = _chain(gah, a2) * _LN2 if cfg.bwd_sa_log2 else _chain(gah, a_raw)
        du = dt * gb
        if ins.d:
            du = du + dskip * dy
        ddt = ddt_factor(gb * u + sa, x, tg)
        put(du_ref, tg, ii, 0, du)
        put(ddt_ref, tg, ii, 1, ddt)
        return (tuple(g[k] * a[k] for k in range(K)),
                tuple(dat[k] + gah[k] * dt for k in range(K)), dd + dy * u, dbias + ddt)

    def finalize(tg0):
        # W > 1: the group's du, ddt, dz (kind k: warpgroup k % W) from the W partials.
        par = (tg0 // UQ) % 2
        outs = [(du_ref, 0), (ddt_ref, 1)] + ([(dz_ref, 2)] if ins.z else [])
        for who in range(W):
            mine = [(ref, kind) for ref, kind in outs if kind % W == who]
            if not mine:
                continue

            @pl.when(w == who)
            def _():
                for ref, kind in mine:
                    for ii in range(UQ):
                        tot = xch_s[par, 0, kind, ii, :]
                        for v in range(1, W):
                            tot = tot + xch_s[par, v, kind, ii, :]
                        ref[bi, tg0 + ii, cols] = tot.astype(ref.dtype)

    def store_dbc(gidx, tot):
        # The group's 128 sums, lanes in (dC | dB, step, state) order: this block's row of
        # the partials, or (bwd_dbc_atomic) added to the group's sums in global memory.
        tot = tot.reshape(2, UQ, NP)
        if not cfg.bwd_dbc_atomic:
            dbc_ref[:, bi, j, pl.ds(gidx * UQ, UQ), :] = tot
        elif cfg.interpret:   # no inline PTX there; its blocks run one after another
            dst = (slice(None), bi, grp, pl.ds(gidx * UQ, UQ), slice(None))
            dbc_ref[dst] = dbc_ref[dst] + tot
        else:
            _red_add(dbc_ref.at[:, bi, grp, pl.ds(gidx * UQ, UQ), :], tot)

    def combine(gidx):
        # W > 1: group gidx's dB/dC sums (every warpgroup's rows and parts in comb_s, as
        # (dC | dB, step, warpgroup, state of the warpgroup, part + 1 padding: the loads of
        # one part, a stride of W + 1, are free of bank conflicts) added over the parts.
        # warp_rows: (dC | dB, step, state + 4 padding) per part, free of bank conflicts
        # when written (a stride of 20 floats between steps, 80 between dC and dB).
        part = ((lambda q: comb_s[gidx % 2, q, :, :, pl.ds(0, NP)]) if cfg.warp_rows else
                (lambda q: comb_s[gidx % 2, :, :, :, :, q]))
        tot = part(0)
        for q in range(1, W):
            tot = tot + part(q)
        store_dbc(gidx, tot)

    def reduce_rows(tg0):
        # Thread r: part r % W of row r // W ((dC | dB, step, state), steps from tg0);
        # warp_rows: lane r % 32 of warp (part) r // 32 of row r % 32.
        sync()
        acc = [pt_s[wi, :, :, k] for k in range(4)]
        for k in range(4, CP):
            acc[k % 4] = acc[k % 4] + pt_s[wi, :, :, k]
        tot = (acc[0] + acc[1]) + (acc[2] + acc[3])
        gidx = tg0 // UQ
        if W == 1:
            store_dbc(gidx, tot)
        else:
            # This group's parts to comb_s; the previous group's (every warpgroup wrote them
            # before this group's barrier) combined by the last warpgroup, which finalizes
            # nothing when W = 4 and z is off (the work between two block barriers sets the
            # pace: run mgpu20, combining in a rotating warpgroup cost 3.5% at W = 2).
            if cfg.warp_rows:
                comb_s[gidx % 2, :, :, :, pl.ds(w * RP, RP)] = tot.reshape(W, 2, UQ, RP)
            else:
                comb_s[gidx % 2, :, :, w, :, pl.ds(0, W)] = tot.reshape(2, UQ, RP, W)
            prev = gidx + 1
            pl.when((prev < cfg.lp // UQ) & (w == W - 1))(lambda: combine(prev))
            finalize(tg0)
        if cfg.warp_rows and not cfg.interpret:
            _warp_sync()      # each warp reads and next writes only its own part
        else:
            _barrier()

    def chunk(k, t0, slot, db, q, carry, hook):
        # Chunk q of tile k; hook() runs before the chunk's last reduction barrier.
        base = q * CH
        c = k * (T // CH) + q
        plgpu.barrier_wait(hbar.at[c % 2])
        h_entry = tuple(hst_s[c % 2, n, :] for n in states)

        # Chunk c - 1's entry state into the other slot (last read at chunk c + 1's start;
        # every thread has since passed the reduction barriers of chunk c + 1).
        @pl.when(c > 0)
        def _():
            issue_state(c - 1)

        jax.lax.fori_loop(0, CH, lambda i, h: recompute(t0, slot, db, base, i, h), h_entry,
                          unroll=cfg.bwd_recompute_unroll)

        def group(gq, carry):     # UQ steps, then their dB/dC reduction
            gbase = base + gq * UQ
            carry = jax.lax.fori_loop(
                0, UQ, lambda ii, cr: adjoint(t0, slot, db, base, gbase,
                                              gbase - base + UQ - 1 - ii, cr),
                carry, unroll=min(cfg.bwd_unroll, UQ))
            if gq == 0 and hook is not None:
                hook()
            reduce_rows(t0 + gbase)
            return carry

        for gq in reversed(range(CH // UQ)):   # unrolled: as a loop 1-3% slower (mgpu13-14)
            carry = group(gq, carry)
        return carry

    # The tiles in reverse through a bwd_stages-deep ring of TMA slots (as `_ring`, which
    # the forward uses), with the next tile's dt pass (bwd_dt_tile, >= 2 stages) run inside
    # this tile, before its last reduction barrier: that barrier orders the dt writes before
    # the next tile's reads (and this buffer's previous reads, two tiles back, before them),
    # so no barrier of its own; the tile's copies are awaited there, once.
    n_tiles, S = cfg.lp // T, cfg.bwd_stages
    ahead = cfg.dt_ahead
    nq = T // CH

    def tile_of(i):
        return n_tiles - 1 - i

    def tile_iter(i, carry):
        slot, db = jax.lax.rem(i, S), (jax.lax.rem(i, 2) if ahead else 0)
        if not cfg.bwd_lean_sync:
            sync()
        # bwd_lean_sync: no barrier before the refill; every read of the slot (tile i - 1)
        # precedes the barrier opening that tile's last reduction group.
        nxt = i + S - 1

        @pl.when(nxt < n_tiles)
        def _():
            issue(tile_of(nxt), jax.lax.rem(nxt, S))

        if not ahead:
            plgpu.barrier_wait(bar.at[slot])
        if convert is not None:
            convert(slot)
        k = tile_of(i)
        t0 = k * T
        if cfg.bwd_dt_tile and not ahead:
            dt_pass(t0, slot, db, then_sync=True)
        hook = None
        if ahead:
            def hook():
                @pl.when(i + 1 < n_tiles)
                def _():
                    nslot = jax.lax.rem(i + 1, S)
                    plgpu.barrier_wait(bar.at[nslot])
                    dt_pass(tile_of(i + 1) * T, nslot, 1 - db, then_sync=False)
        # The chunks as a loop: one copy of their code. Unrolled (bwd_tile / bwd_chunk copies,
        # ~50 KB of loop code) it was 6% slower (run mgpu12: instruction-cache misses).
        if nq == 1:
            return chunk(k, t0, slot, db, 0, carry, hook)

        def chunk_it(qi, cr):
            q = nq - 1 - qi
            return chunk(k, t0, slot, db, q, cr,
                         None if hook is None else (lambda: pl.when(q == 0)(hook)))
        return jax.lax.fori_loop(0, nq, chunk_it, carry)

    g0 = tuple((dhl_ref[bi, n, cols] if has_dhl else zero) for n in states)
    issue_state(n_chunks - 1)
    for i in range(min(S - 1, n_tiles)):
        issue(tile_of(i), i)
    if ahead:            # the first tile's dt; each later tile's comes with the tile before
        plgpu.barrier_wait(bar.at[0])
        dt_pass(tile_of(0) * T, 0, 0, then_sync=True)
    g, dat, dd, dbias = jax.lax.fori_loop(
        0, n_tiles, tile_iter, (g0, tuple(zero for _ in range(K)), zero, zero))
    if W > 1:        # the last group's dB/dC parts
        sync()
        pl.when(w == W - 1)(lambda: combine(0))
    padded = range(N, NP) if W == 1 else ()
    for k, n in enumerate(states):
        dat_ref[bi, n, cols] = dat[k]
        dh0_ref[bi, n, cols] = g[k]
    for n in padded:
        dat_ref[bi, n, cols] = zero
        dh0_ref[bi, n, cols] = zero
    ddb_ref[bi, wi, 0, cols] = dd
    ddb_ref[bi, wi, 1, cols] = dbias


def _interpret(cfg):
    return plgpu.InterpretGPUParams() if cfg.interpret else None


def _ins(z, Bm, D, bias, h0):
    return _Ins(z=z is not None, d=D is not None, bias=bias is not None, h0=h0 is not None,
                bc_f32=Bm.dtype == jnp.float32)


def _common_scratch(ins, seq, T, S, np_, Bm, W=1):
    f32 = jnp.float32
    scratch = [plgpu.SMEM((S, T, WIDTH), x.dtype) for x in seq[:-2]]
    scratch += [plgpu.SMEM((S, T, np_), Bm.dtype), plgpu.SMEM((S, T, np_), Bm.dtype)]
    if not ins.bc_f32:   # float32 B, C staging: one per warpgroup
        shape = (T, np_) if W == 1 else (W, T, np_)
        scratch += [plgpu.SMEM(shape, f32), plgpu.SMEM(shape, f32)]
    return scratch


def _fwd_call(cfg, save_states, u, dt, z, Bm, Cm, A, D, bias, h0):
    ins = _ins(z, Bm, D, bias, h0)
    b, lp, dp = u.shape
    np_, T, S = cfg.np_, cfg.tile, cfg.stages
    f32 = jnp.float32
    seq = [u, dt] + ([z] if ins.z else []) + [Bm, Cm]
    pars = [A] + ([D] if ins.d else []) + ([bias] if ins.bias else [])
    out_type = [jax.ShapeDtypeStruct((b, lp, dp), u.dtype),
                jax.ShapeDtypeStruct((b, np_, dp), f32)]
    if save_states:
        out_type.append(jax.ShapeDtypeStruct((b, lp // cfg.save_every, np_, dp), f32))
    if save_states and cfg.zero_dbc:   # (Lp: a multiple of 16, Np of 8: whole 128-wide rows)
        groups = dp // (WIDTH * cfg.blocks_per_group)
        out_type.append(jax.ShapeDtypeStruct((2, b, groups, lp * np_ // WIDTH, WIDTH), f32))
    scratch = _common_scratch(ins, seq, T, S, np_, Bm)
    scratch += [plgpu.SMEM((WIDTH, np_), f32)]
    scratch += [plgpu.SMEM((WIDTH,), f32)] * (int(ins.d) + int(ins.bias))
    scratch += [plgpu.SMEM((np_, WIDTH), f32)] if ins.h0 else []
    scratch += [plgpu.Barrier(num_arrivals=len(seq), num_barriers=S),
                plgpu.Barrier(num_arrivals=_par_count(ins) + int(ins.h0))]
    kern = plgpu.kernel(
        functools.partial(_fwd_kernel, cfg=cfg, ins=ins, save_states=save_states),
        out_type=tuple(out_type), scratch_types=scratch, compiler_params=_params(),
        grid=(b, dp // WIDTH), grid_names=("b", "d"), interpret=_interpret(cfg),
        kernel_name="selective_scan_mgpu_fwd")
    return kern(*seq, *pars, *([h0] if ins.h0 else []))


def _bwd_call(cfg, res, dout, dhl):
    """The Mosaic backward; dhl None: the final state's cotangent is zero (not read)."""
    u, dt, z, Bm, Cm, A, D, bias, h0, hs, zeroed = res     # zeroed: cfg.zero_dbc, else None
    ins = _ins(z, Bm, D, bias, h0)
    b, lp, dp = u.shape
    np_, T, S, W = cfg.np_, cfg.bwd_tile, cfg.bwd_stages, cfg.bwd_warpgroups
    n_blocks = dp // WIDTH
    f32 = jnp.float32
    seq = [u, dt] + ([z] if ins.z else []) + [dout.astype(u.dtype), Bm, Cm]
    pars = [A] + ([D] if ins.d else []) + ([bias] if ins.bias else [])
    out_type = ([jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(dt.shape, dt.dtype)]
                + ([jax.ShapeDtypeStruct(z.shape, z.dtype)] if ins.z else [])
                + ([] if cfg.bwd_dbc_atomic else
                   [jax.ShapeDtypeStruct((2, b, n_blocks, lp, np_), f32)])
                + [jax.ShapeDtypeStruct((b, np_, dp), f32),
                   jax.ShapeDtypeStruct((b, W, 2, dp), f32),
                   jax.ShapeDtypeStruct((b, np_, dp), f32)])
    scratch = _common_scratch(ins, seq, T, S, np_, Bm, W)
    states = ((W, cfg.save_every, WIDTH, np_ // W) if cfg.lane_states
              else (cfg.save_every, np_, WIDTH))
    scratch += [plgpu.SMEM(states, f32),                                   # a_t h_{t-1}
                plgpu.SMEM((W, W, WIDTH // W, WIDTH // W + _pt_pad(cfg.bwd_vec_smem))
                           if cfg.warp_rows else
                           (W, WIDTH // W, W, WIDTH // W + _pt_pad(cfg.bwd_vec_smem)),
                           f32),                                           # dB/dC terms
                plgpu.SMEM((2, np_, WIDTH), f32)]                          # entry states
    if W > 1:     # partial du, ddt, [dz] and dB/dC parts of a group, double-buffered
        scratch += [plgpu.SMEM((2, W, 2 + int(ins.z), WIDTH // (2 * np_), WIDTH), f32),
                    plgpu.SMEM((2, W, 2, WIDTH // (2 * np_), np_ + 4) if cfg.warp_rows else
                               (2, 2, WIDTH // (2 * np_), W, np_ // W, W + 1), f32)]
    if cfg.bwd_dt_tile:   # dt [and sigmoid(x)] of the tile [and of the next one]
        scratch += [plgpu.SMEM((2 if cfg.dt_ahead else 1, T, WIDTH), f32)] * (1 + int(cfg.has_sg))
    scratch += [plgpu.Barrier(num_arrivals=len(seq), num_barriers=S),
                plgpu.Barrier(num_arrivals=1, num_barriers=2)]
    if W > 1 and cfg.interpret:
        scratch.append(plgpu.Barrier(num_arrivals=W))     # _block_sync in interpret mode
    threads = dict(num_threads=W, thread_name="wg") if W > 1 else {}
    kern = plgpu.kernel(
        functools.partial(_bwd_kernel, cfg=cfg, ins=ins, has_dhl=dhl is not None),
        out_type=tuple(out_type), scratch_types=scratch, compiler_params=_params(),
        grid=(b, n_blocks), grid_names=("b", "d"), interpret=_interpret(cfg),
        kernel_name="selective_scan_mgpu_bwd", **threads)
    acc = []
    if cfg.bwd_dbc_atomic:     # the sums of dC | dB per group (zeroed by the forward or here)
        shape = (2, b, n_blocks // cfg.blocks_per_group, lp, np_)
        acc = [jax.new_ref(jnp.zeros(shape, f32) if zeroed is None else zeroed.reshape(shape))]
    outs = kern(*seq, *pars, hs, *([] if dhl is None else [dhl.astype(f32)]), *acc)
    if cfg.bwd_dbc_atomic:
        outs = (*outs[:-3], jax.ref.freeze(acc[0]), *outs[-3:])
    return outs


SUMS_ELEMS = 4096   # _bwd_sums: elements of dA^T per load of the sums over the batch


def _sums_kernel(dbc_ref, dat_ref, ddb_ref, dc_ref, db_ref, da_ref, dd_ref, dbias_ref, *,
                 n_small, n_lt, rows, groups, bpg, cb, bb):
    """The backward's cross-block sums in one launch (Triton backend).

    Programs [0, n_small): cb channels each, summed over the batch (in masked loads of bb
    rows: one load for batches up to 64): dA (stored transposed, (Dp, Np)), dD (warpgroup
    0's dy u) and dbias (every warpgroup's). Programs [n_small, ...): (batch, group, `rows`
    steps): dC and dB, cast to their dtypes after adding the group's bpg per-block partial
    sums in a fixed order (bpg = 1 with bwd_dbc_atomic).
    """
    pid = pl.program_id(0)
    n_batch = dat_ref.shape[0]
    f32 = jnp.float32

    zero, one = jnp.int32(0), jnp.int32(1)   # (Python ints trip the interpret-mode load)

    @pl.when(pid < n_small)
    def _():
        cols = pl.ds(pid * cb, cb)

        def body(i, acc):
            a, d, s = acc
            r = pl.ds(i * bb, bb)
            ok = (i * bb + jax.lax.broadcasted_iota(jnp.int32, (bb,), 0)) < n_batch
            v = dat_ref.at[r, :, cols]
            a = a + jnp.sum(pltr.load(v, mask=jnp.broadcast_to(ok[:, None, None], v.shape),
                                      other=0.0), axis=0)
            v = ddb_ref.at[r, zero, zero, cols]
            d = d + jnp.sum(pltr.load(v, mask=jnp.broadcast_to(ok[:, None], v.shape),
                                      other=0.0), axis=0)
            v = ddb_ref.at[r, :, one, cols]
            s = s + jnp.sum(pltr.load(v, mask=jnp.broadcast_to(ok[:, None, None], v.shape),
                                      other=0.0), axis=(0, 1))
            return a, d, s

        zc = jnp.zeros((cb,), f32)
        a, d, s = jax.lax.fori_loop(0, pl.cdiv(n_batch, bb), body,
                                    (jnp.zeros((dat_ref.shape[1], cb), f32), zc, zc))
        da_ref[cols, :] = a.T
        dd_ref[cols] = d
        dbias_ref[cols] = s

    @pl.when(pid >= n_small)
    def _():
        q = pid - n_small
        lt, rest = q % n_lt, q // n_lt
        gi, bi = rest % groups, rest // groups
        t = pl.ds(lt * rows, rows)
        for k, out in ((0, dc_ref), (1, db_ref)):
            acc = dbc_ref[k, bi, gi * bpg, t, :]
            for m in range(1, bpg):
                acc = acc + dbc_ref[k, bi, gi * bpg + m, t, :]
            out[bi, t, gi, :] = acc.astype(out.dtype)


def _bwd_sums(cfg, dbc, dat, ddb, c_dtype, b_dtype):
    """dC, dB (B, Lp, G, Np), dA (Dp, Np), dD, dbias (Dp,) from the Mosaic backward's
    partials (dbc: (2, B, blocks, Lp, Np), or (2, B, G, Lp, Np) with bwd_dbc_atomic;
    dat: (B, Np, Dp); ddb: (B, W, 2, Dp)): one Triton launch in place of XLA's four."""
    _, b, n_rows, lp, np_ = dbc.shape
    dp = dat.shape[2]
    bpg = 1 if cfg.bwd_dbc_atomic else cfg.blocks_per_group
    groups = n_rows // bpg
    rows = math.gcd(lp, 64 if bpg <= 4 else 32)     # a power of 2 >= 16 (Lp: of TRITON_CHUNK)
    bb = min(_common._next_pow2(b), 64)
    cb = min(max(SUMS_ELEMS // (bb * np_), 1), WIDTH)   # a power of 2: divides Dp
    n_small, n_lt = dp // cb, lp // rows
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((b, lp, groups, np_), c_dtype),
                 jax.ShapeDtypeStruct((b, lp, groups, np_), b_dtype),
                 jax.ShapeDtypeStruct((dp, np_), f32),
                 jax.ShapeDtypeStruct((dp,), f32), jax.ShapeDtypeStruct((dp,), f32))
    return pl.pallas_call(
        functools.partial(_sums_kernel, n_small=n_small, n_lt=n_lt, rows=rows,
                          groups=groups, bpg=bpg, cb=cb, bb=bb),
        out_shape=out_shape, grid=(n_small + b * groups * n_lt,),
        compiler_params=_triton._compiler_params(4, 1), interpret=cfg.interpret,
        name="selective_scan_mgpu_bwd_sums")(dbc, dat, ddb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan_padded(cfg, u, dt, z, Bm, Cm, A, D, bias, h0):
    y, hl = _fwd_call(cfg, False, u, dt, z, Bm, Cm, A, D, bias, h0)
    return y, hl


def _scan_padded_fwd(cfg, *args):
    # symbolic_zeros: the arguments come as CustomVJPPrimal records.
    u, dt, z, Bm, Cm, A, D, bias, h0 = custom_vjp_primal_tree_values(args)
    y, hl, hs, *zeroed = _fwd_call(cfg, True, u, dt, z, Bm, Cm, A, D, bias, h0)
    zeroed = zeroed[0] if zeroed else None           # the dB/dC sums (cfg.zero_dbc)
    return (y, hl), (u, dt, z, Bm, Cm, A, D, bias, h0, hs, zeroed)


def _scan_padded_bwd(cfg, res, cts):
    u, dt, z, Bm, Cm, A, D, bias, h0, hs, _ = res
    dy, dhl = cts
    # Symbolic zeros (symbolic_zeros=True): the final state's cotangent is a SymbolicZero
    # whenever the caller uses y only (jax.grad of a loss on y): the Mosaic backward then
    # starts from g = 0 instead of reading an XLA-filled zero array (~4 us per call, session
    # 8, ncu run 11 at S). A zero dy (a loss on the final state only) is materialized.
    if isinstance(dy, SymbolicZero):
        dy = jnp.zeros(u.shape, u.dtype)
    if not cfg.mosaic_bwd:
        if isinstance(dhl, SymbolicZero):
            dhl = jnp.zeros(hs.shape[:1] + hs.shape[2:], jnp.float32)
        cts = dy, dhl
        # The Triton backward of kernels/selective_scan_triton.py on the same padded layout.
        f32 = jnp.float32
        zeros = jnp.zeros((A.shape[0],), f32)
        tres = (u, dt, z, Bm, Cm, A.T, zeros if D is None else D,
                zeros if bias is None else bias, hs)
        du, ddt, dz, dB, dC, dAT, dD, dbias, dh0 = _triton._scan_padded_bwd(cfg.tcfg, tres, cts)
        dA = dAT.T
    else:
        if cfg.bwd_bc_f32 and Bm.dtype != jnp.float32:
            res = (*res[:3], Bm.astype(jnp.float32), Cm.astype(jnp.float32), *res[5:])
        outs = _bwd_call(cfg, res, dy, None if isinstance(dhl, SymbolicZero) else dhl)
        du, ddt = outs[0], outs[1]
        dz = outs[2] if z is not None else None
        dbc, dat, ddb, dh0 = outs[-4:]
        if cfg.bwd_fused_sums:
            dC, dB, dA, dD, dbias = _bwd_sums(cfg, dbc, dat, ddb, Cm.dtype, Bm.dtype)
        else:
            # XLA: one pass over the blocks of each group, (dC | dB, b, G, blocks, Lp, Np)
            # -> (b, Lp, G, Np), and three small reductions over the batch.
            b, lp, _ = u.shape
            g = Bm.shape[2]
            dbc = dbc.reshape(2, b, g, -1, lp, cfg.np_).sum(3)
            dC, dB = (jnp.swapaxes(dbc[k], 1, 2).astype(m.dtype) for k, m in ((0, Cm), (1, Bm)))
            dA, dD, dbias = dat.sum(0).T, ddb[:, 0, 0].sum(0), ddb[:, :, 1].sum((0, 1))
    return (du, ddt, dz, dB, dC, dA,
            None if D is None else dD, None if bias is None else dbias,
            None if h0 is None else dh0)


_scan_padded.defvjp(_scan_padded_fwd, _scan_padded_bwd, symbolic_zeros=True)


SMEM_LIMIT = 225 * 1024    # H100: 227 KB per block; Pallas adds ~1 KB (seen: +1056 bytes)


def _fwd_smem_bytes(stages, tile, np_, u, z, B):
    """Shared memory of the Mosaic forward (scratch of _fwd_call) in bytes."""
    seq = 2 * jnp.dtype(u.dtype).itemsize + (jnp.dtype(z.dtype).itemsize if z is not None else 0)
    bc = 2 * np_ * max(jnp.dtype(B.dtype).itemsize, 2)
    staging = 0 if jnp.dtype(B.dtype) == jnp.float32 else tile * np_ * 4 * 2
    return stages * tile * (WIDTH * seq + bc) + staging + 2 * WIDTH * np_ * 4 + 2 * WIDTH * 4


def _bwd_smem_bytes(bs, tile, W, np_, u, z, B):
    """Shared memory of the Mosaic backward (scratch of _bwd_call) in bytes."""
    isz = jnp.dtype(u.dtype).itemsize
    seq = 3 * isz + (jnp.dtype(z.dtype).itemsize if z is not None else 0)   # u, dt, dout, z
    bdt = jnp.dtype(jnp.float32 if bs.bwd_bc_f32 else B.dtype)
    bc = 2 * np_ * max(bdt.itemsize, 2)
    staging = 0 if bdt == jnp.float32 else W * tile * np_ * 4 * 2
    xch = 0 if W == 1 else (2 * W * (2 + int(z is not None)) * WIDTH // (2 * np_) * WIDTH * 4
                            + 2 * WIDTH * (W + 1) * 4)
    dt_bufs = 2 if bs.bwd_dt_ahead and bs.bwd_stages >= 2 else 1     # as _Cfg.dt_ahead
    xch += dt_bufs * 2 * tile * WIDTH * 4 if bs.bwd_dt_tile else 0
    return (bs.bwd_stages * tile * (WIDTH * seq + bc) + staging
            + bs.bwd_chunk * np_ * WIDTH * 4 + WIDTH * (WIDTH + W * _pt_pad(bs.bwd_vec_smem)) * 4
            + 2 * np_ * WIDTH * 4 + xch)


def _round_up(x, m):
    return -(-x // m) * m


def selective_scan_mgpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                        delta_softplus=False, initial_state=None, return_final_state=False,
                        block_sizes: MgpuBlockSizes | None = None,
                        bwd_block_sizes: "_triton.BlockSizes | None" = None,
                        interpret: bool | None = None):
    """Selective scan on Mosaic GPU: forward and backward kernels under `jax.custom_vjp`
    (the Triton backward of kernels/selective_scan_triton.py for d_state > 16 or when asked for).

    u, delta, z: (B, L, Di)  A: (Di, N)  B, C: (B, L, N) or (B, L, G, N)  D, delta_bias: (Di,)
    initial_state: (B, Di, N).  Returns y (B, L, Di) [, h_L (B, Di, N) float32]; eq. 2a-2b.
    `interpret=None` runs Mosaic GPU (and Triton) interpret mode when no GPU is present.
    """
    if not AVAILABLE:
        raise NotImplementedError(
            f"selective_scan_mgpu needs the Pallas Mosaic GPU API of jax >= 0.11.2 "
            f"(jax {jax.__version__} lacks part of it); use kernels.selective_scan")
    b, l, di, g, n = _common._check_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    bs = block_sizes or MgpuBlockSizes()
    if interpret is None:
        interpret = not _common._on_gpu()
    f32 = jnp.float32
    cg = di // g
    cgp = _round_up(cg, WIDTH)
    # Mosaic backward: 2 Np rows per step fill the 128-row dB/dC tile, Np in {8, 16}.
    np_ = max(_common._next_pow2(n), 8)     # 8: a bf16 B/C row is one 16-byte TMA unit
    # The backward's shared memory (dominated by the recomputed states and the dB/dC tile)
    # must fit: halve its tile (to bwd_chunk), then its warpgroups; else the Triton backward.
    # (A bf16 B/C tile is converted by 128 threads: at least 128 / Np steps.)
    min_tile = max(bs.bwd_chunk, WIDTH // np_)
    bwd_tile, bwd_wgs = max(bs.bwd_tile, min_tile), bs.bwd_warpgroups
    while _bwd_smem_bytes(bs, bwd_tile, bwd_wgs, np_, u, z, B) > SMEM_LIMIT:
        if bwd_tile > min_tile:
            bwd_tile //= 2
        elif bwd_wgs > 1:
            bwd_tile, bwd_wgs = max(bs.bwd_tile, min_tile), bwd_wgs // 2
        else:
            break
    mosaic_bwd = (bs.backward == "mosaic" and n <= MAX_MGPU_BWD_STATE
                  and _bwd_smem_bytes(bs, bwd_tile, bwd_wgs, np_, u, z, B) <= SMEM_LIMIT)
    save_every = bs.bwd_chunk if mosaic_bwd else TRITON_CHUNK
    # Likewise the forward's ring (f32 inputs, long tiles): fewer stages, then shorter tiles.
    stages, tile = bs.stages, bs.tile
    while _fwd_smem_bytes(stages, tile, np_, u, z, B) > SMEM_LIMIT:
        if stages > 2:
            stages -= 1
        elif tile > 16 and (tile // 2) % save_every == 0:
            tile //= 2
        else:
            break
    lp = _round_up(l, math.lcm(tile, bwd_tile, TRITON_CHUNK))
    tcfg = None
    if not mosaic_bwd:
        # The Triton backward on this layout: chunks of TRITON_CHUNK steps.
        tbs = bwd_block_sizes or _triton.BlockSizes.get_default(l)
        bdb = tbs.bwd_block_d or tbs.block_d
        bdb = max(min(bdb, _common._next_pow2(cg)), min(bdb, 16))
        tcfg = _triton._Cfg(length=l, n_chunks=lp // TRITON_CHUNK, chunk=TRITON_CHUNK,
                        n_groups=g, blocks_per_group=cgp // bdb, block_d=bdb,
                        bwd_blocks_per_group=cgp // bdb, bwd_block_d=bdb, d_state=np_,
                        softplus=bool(delta_softplus), has_z=z is not None,
                        unroll=min(tbs.unroll, TRITON_CHUNK), prefetch=tbs.prefetch,
                        num_warps=tbs.num_warps, num_stages=tbs.num_stages,
                        bwd_num_warps=tbs.bwd_num_warps, lane=tbs.layout == "lane",
                        fast_math=tbs.fast_math, carry_prefetch=tbs.carry_prefetch,
                        bc_shuffle=False, interpret=bool(interpret))
    cfg = _Cfg(length=l, lp=lp, tile=tile, stages=stages, unroll=bs.unroll,
               save_every=save_every, n_state=n, np_=np_, blocks_per_group=cgp // WIDTH,
               softplus=bool(delta_softplus), has_z=z is not None,
               interpret=bool(interpret), mosaic_bwd=mosaic_bwd, bwd_tile=bwd_tile,
               bwd_stages=bs.bwd_stages, bwd_unroll=bs.bwd_unroll,
               bwd_recompute_unroll=bs.bwd_recompute_unroll,
               bwd_warpgroups=bwd_wgs, bwd_dt_tile=bs.bwd_dt_tile,
               bwd_vec_smem=bs.bwd_vec_smem, bwd_lean_sync=bs.bwd_lean_sync,
               bwd_fused_sums=bs.bwd_fused_sums, bwd_dbc_atomic=bs.bwd_dbc_atomic,
               fwd_zeroes=bs.fwd_zeroes, bwd_sa_log2=bs.bwd_sa_log2,
               bwd_bc_f32=bs.bwd_bc_f32, bwd_dt_ahead=bs.bwd_dt_ahead,
               bwd_warp_rows=bs.bwd_warp_rows, tcfg=tcfg)

    def chan(x, axis=-1):
        # Pad each group's channels along `axis` to cgp (no op when cg == cgp).
        if cgp == cg:
            return x
        x = jnp.moveaxis(x, axis, -1)
        lead = x.shape[:-1]
        x = x.reshape(lead + (g, cg))
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, cgp - cg)])
        return jnp.moveaxis(x.reshape(lead + (g * cgp,)), -1, axis)

    def seq(x):
        return x if lp == l else jnp.pad(x, [(0, 0), (0, lp - l), (0, 0)])

    def bc(x):
        # B / C as (B, Lp, G, Np) in their own dtype (bf16 tiles are converted in-kernel).
        x = _common._as_groups(x)
        if bs.bc_f32 or x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            x = x.astype(f32)
        if lp != l or np_ != n:
            x = jnp.pad(x, [(0, 0), (0, lp - l), (0, 0), (0, np_ - n)])
        return x

    u_p, dt_p = seq(chan(u)), seq(chan(delta))
    z_p = None if z is None else seq(chan(z))
    A_p = chan(A.astype(f32), axis=0)
    if np_ != n:
        A_p = jnp.pad(A_p, [(0, 0), (0, np_ - n)])
    D_p = None if D is None else chan(D.astype(f32))
    bias_p = None if delta_bias is None else chan(delta_bias.astype(f32))
    h0 = (None if initial_state is None else
          jnp.pad(chan(jnp.swapaxes(initial_state.astype(f32), 1, 2)),
                  [(0, 0), (0, np_ - n), (0, 0)]))
    y, hl = _scan_padded(cfg, u_p, dt_p, z_p, bc(B), bc(C), A_p, D_p, bias_p, h0)
    y = y[:, :l]
    if cgp != cg:
        y = y.reshape(b, l, g, cgp)[..., :cg].reshape(b, l, di)
    if not return_final_state:
        return y
    hl = hl[:, :n].reshape(b, n, g, cgp)[..., :cg].reshape(b, n, di)
    return y, jnp.swapaxes(hl, 1, 2)
