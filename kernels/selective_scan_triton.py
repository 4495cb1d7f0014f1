"""Selective scan (Mamba-1) as Pallas GPU kernels on the Triton backend, forward and backward.

Shape legend and contract: kernels/selective_scan.py (`selective_scan`, impl="pallas", takes
these kernels wherever the Mosaic GPU ones of kernels/selective_scan_mgpu.py do not apply:
CPU interpret mode, CI's cross-lowering, jax < 0.11.2, short sequences, narrow groups).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels.selective_scan_common import (_as_groups, _check_args, _next_pow2, _on_gpu,
                                           _round_up)

_LOG2E = math.log2(math.e)
# The Pallas Triton backend is deprecated from jax 0.11 in favour of Mosaic GPU; it is still the
# pallas_call GPU backend there and the only one whose kernels we can cross-lower on CPU.
warnings.filterwarnings("ignore", message=".*jax-pallas-triton.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecated.*", category=DeprecationWarning)


# --------------------------------------------------------------------------------------------
# Pallas GPU kernels (Triton backend).
#
# One program per (batch, block of `block_d` channels); the state tile h (N, block_d) lives in
# float32 registers and the program walks time sequentially. The only dependent operation per
# step is one FMA on h; everything else (loads, softplus, exp2, the C contraction) is free to
# overlap across steps, but a warp issues in order and does not overlap loop iterations, so
# each loop iteration runs `unroll` consecutive steps as straight-line code and the input rows
# of the next `prefetch` iterations are loaded ahead through the loop carry (carried across
# chunk boundaries too). With one warp per scheduler (512 programs at both benchmark shapes)
# the kernels are latency-bound, not issue-bound: v3 ran 218 instructions per step in ~730
# cycles. v4 (the defaults) cuts both: the forward keeps one channel per lane ("lane" layout:
# no layout conversions or shuffles per step, 95 instructions per 16-channel step), blocks of
# 16 channels put two warps on each scheduler, softplus/sigmoid use MUFU ex2/lg2, and the
# backward prefetches its scratch one step ahead. H100, b8 L4096 d2048: 0.92 ms forward,
# 4.6 ms forward+backward (v3: 1.50 / 6.46); benchmarks/NOTES_selective_scan.md has the
# measurements and what limits it.
# The forward saves the state entering every `chunk` of steps; the backward walks the chunks
# in reverse, recomputes the chunk's states from the saved entry state into a per-program
# scratch tile (small enough to stay in L2), then runs the adjoint recurrence backwards.
# --------------------------------------------------------------------------------------------
SHORT_LEN = 64  # BlockSizes.get_default: at most this many steps counts as a short sequence


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters of the selective-scan kernels."""
    # Channels per program (power of 2). 16 beat 32 and 8 on the H100 (two warps per scheduler
    # hide latency; 8 costs more instructions per channel than it hides).
    block_d: int = 16
    bwd_block_d: int | None = None   # channels per backward program (None: block_d)
    chunk: int = 16            # steps between saved states (power of 2); bwd scratch depth
    unroll: int = 4            # time steps per loop iteration (power of 2, <= chunk)
    prefetch: int = 1          # iterations whose rows are loaded ahead, via the loop carry
    num_warps: int = 1         # 1 warp keeps the bwd's per-step channel sums in shuffles
    num_stages: int = 1
    bwd_num_warps: int = 1
    # Forward state-tile layout. "tile" (v3): the compiler lays the (N, block_d) tile out from
    # the 2-D loads and stores (it picks 4 states x 4 channels per lane, so every step pays
    # layout conversions through shared memory, barriers and shuffles). "lane" (v4): the
    # compiler's default, one channel per lane with its N states in registers (2 lanes of N/2
    # states at 16 channels), kept by never reading or writing a 2-D tile from memory (rows
    # only). The backward keeps the compiler's tile: a lane backward (tried) pays 5 shuffle
    # levels per dB/dC sum and compiles for minutes (benchmarks/NOTES_selective_scan.md).
    layout: str = "lane"
    fast_math: bool = True       # softplus / sigmoid with MUFU ex2, lg2 (not libdevice)
    carry_prefetch: bool = True  # prefetched rows stay in flight across chunk boundaries
    bc_f32: bool = True          # B, C converted to float32 once, outside the kernels
    # Forward, lane layout: B_t | C_t read as one row (one value per lane) and broadcast with
    # warp shuffles, instead of Triton's conversion through shared memory (2 barriers a step).
    # 4% faster at 32 channels, but 16-channel blocks without it are faster still.
    bc_shuffle: bool = False

    @classmethod
    def get_default(cls, length: int | None = None) -> "BlockSizes":
        """The H100-tuned default; for sequences of at most SHORT_LEN steps (the HiSS low level:
        many sequences of one chunk) 32-channel blocks, since there the programs' fixed cost,
        not the per-step chain, decides: HiSS Mamba -> Mamba's low level (12 800 x 10 steps x
        256 channels) ran its backward in 16.8 ms at 32 channels and 25.9 ms at 16
        (benchmarks/NOTES_selective_scan.md, "Short sequences")."""
        if length is not None and length <= SHORT_LEN:
            return cls(block_d=32, bwd_block_d=32)
        return cls()

    def __post_init__(self):
        for name in ("block_d", "bwd_block_d", "chunk", "unroll"):
            v = getattr(self, name)
            if v is None:
                continue
            if v < 1 or v & (v - 1):
                raise ValueError(f"BlockSizes.{name}={v} must be a power of 2 (Triton tiles)")
        if self.prefetch < 0:
            raise ValueError(f"BlockSizes.prefetch={self.prefetch} must be >= 0")
        if self.unroll > self.chunk:
            raise ValueError(f"BlockSizes.unroll={self.unroll} must be <= chunk={self.chunk}")
        if self.layout not in ("tile", "lane"):
            raise ValueError(f"BlockSizes.layout={self.layout!r} must be 'tile' or 'lane'")
        if self.bc_shuffle and (self.layout != "lane" or self.block_d > 32
                                or self.num_warps != 1):
            raise ValueError(f"BlockSizes.bc_shuffle shuffles within one warp: needs "
                             f"layout='lane', block_d <= 32 and num_warps == 1; got "
                             f"{self.layout=}, {self.block_d=}, {self.num_warps=}")


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static description of one padded problem (hashable: a custom_vjp nondiff argument)."""
    length: int            # true length; steps >= length are identity steps
    n_chunks: int          # padded length = n_chunks * chunk
    chunk: int
    n_groups: int
    blocks_per_group: int  # forward channel blocks per group
    block_d: int
    bwd_blocks_per_group: int
    bwd_block_d: int
    d_state: int           # padded to a power of 2
    softplus: bool
    has_z: bool
    unroll: int
    prefetch: int
    num_warps: int
    num_stages: int
    bwd_num_warps: int
    lane: bool             # BlockSizes.layout == "lane" (forward kernel)
    fast_math: bool
    carry_prefetch: bool
    bc_shuffle: bool
    interpret: bool


def _compiler_params(num_warps, num_stages):
    # jax 0.10.2 and 0.11.2 both expose `CompilerParams`; older releases named it
    # `TritonCompilerParams`.
    cls = getattr(pltr, "CompilerParams", None) or getattr(pltr, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def _mufu(cfg, x, op, reference):
    """One MUFU instruction (`op`.approx.ftz.f32) on the GPU; `reference` in interpret mode.
    The libdevice exp2f / log2f the lowering would call add denormal handling that decays
    (<= 1, flushed to 0 below 2^-126) and softplus arguments do not need."""
    if cfg.interpret:
        return reference(x)
    return pltr.elementwise_inline_asm(
        f"{op}.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def _exp2(cfg, x):
    return _mufu(cfg, x, "ex2", jnp.exp2)


def _lg2(cfg, x):
    return _mufu(cfg, x, "lg2", jnp.log2)


def _softplus_fast(cfg, x):
    """softplus with two MUFU ops instead of libdevice log1pf(expf) (~30 instructions).

    log1p(e) for e = exp(x): a 4-term series below e = 1/32 (error < e^5/5, i.e. relative
    < 2e-7), else lg2(1 + e) (1 + e rounds with relative error < 2e-6 of log1p(e) there).
    """
    if cfg.interpret:
        return _softplus_f32(x)
    e = _exp2(cfg, jnp.minimum(x, 20.0) * _LOG2E)
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0 - e * 0.25)))
    big = _lg2(cfg, 1.0 + e) * (1.0 / _LOG2E)
    return jnp.where(x > 20.0, x, jnp.where(e < 0.03125, series, big))


def _sigmoid(cfg, x):
    if cfg.interpret or not cfg.fast_math:
        return jax.nn.sigmoid(x)
    # ex2 of a large argument is +inf and 1 / inf = 0: no clamp needed.
    return 1.0 / (1.0 + _exp2(cfg, -x * _LOG2E))


def _shfl_idx(cfg, v, k):
    """Every lane gets element k of v (bd,): one `shfl.sync.idx` (one element per lane)."""
    if cfg.interpret:
        return jnp.broadcast_to(v[k], v.shape)
    return pltr.elementwise_inline_asm(
        f"shfl.sync.idx.b32 $0, $1, {k}, 0x1f, 0xffffffff;", args=[v], constraints="=r,r",
        pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, v.dtype)])[0]


def _rows_to_tile(rows):
    """N rows (bd,) -> (N, bd) tile, with selects on a row iota (no 2-D memory access).

    With one channel per lane the row index of every register is a compile-time constant,
    so the selects fold away.
    """
    n, bd = len(rows), rows[0].shape[0]
    iota = jax.lax.broadcasted_iota(jnp.int32, (n, bd), 0)
    tile = jnp.broadcast_to(rows[0][None, :], (n, bd))
    for k in range(1, n):
        tile = jnp.where(iota == k, rows[k][None, :], tile)
    return tile


def _tile_row(tile, k):
    """Row k (bd,) of an (N, bd) tile: a masked sum over N (in-thread in the lane layout)."""
    iota = jax.lax.broadcasted_iota(jnp.int32, tile.shape, 0)
    return jnp.sum(jnp.where(iota == k, tile, 0.0), axis=0)


def _load_tile(lane, ref, lead, cols):
    """ref[*lead, :, cols] -> (N, bd) float32; row by row in the lane layout."""
    if not lane:
        return ref[lead + (slice(None), cols)].astype(jnp.float32)
    return _rows_to_tile([ref[lead + (k, cols)].astype(jnp.float32)
                          for k in range(ref.shape[len(lead)])])


def _store_tile(lane, ref, lead, cols, tile):
    """ref[*lead, :, cols] = tile; row by row in the lane layout."""
    if not lane:
        ref[lead + (slice(None), cols)] = tile.astype(ref.dtype)
        return
    for k in range(tile.shape[0]):
        ref[lead + (k, cols)] = _tile_row(tile, k).astype(ref.dtype)


def _softplus_f32(x):
    # log1p(exp(x)) overflows for large x, where softplus(x) == x to float32 precision.
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _step_size(cfg, dt_raw, bias, t):
    """delta (+ bias, softplus), zeroed on padded steps AFTER softplus so they are identity."""
    x = dt_raw.astype(jnp.float32) + bias
    if cfg.softplus:
        dt = _softplus_fast(cfg, x) if cfg.fast_math else _softplus_f32(x)
    else:
        dt = x
    return jnp.where(t < cfg.length, dt, 0.0), x


def _prefetched_loop(lo, hi, load, body, carry, prefetch, unroll, reverse=False):
    """Steps lo..hi-1 (or reversed), `unroll` steps per fori_loop iteration, rows prefetched.

    `load(t)` returns a tuple of row values for step t (it must clamp t itself); `body(t, row,
    carry)` returns the new carry. hi - lo must be a multiple of `unroll`. The rows of the next
    `prefetch` iterations ride in the loop carry, so a load issued in iteration i is first
    waited on in iteration i + prefetch.
    """
    n_iter = (hi - lo) // unroll
    step_of = (lambda s: hi - 1 - s) if reverse else (lambda s: lo + s)

    def steps(i):
        return [step_of(i * unroll + k) for k in range(unroll)]

    def load_group(i):
        return tuple(load(t) for t in steps(i))

    queue = tuple(load_group(i) for i in range(prefetch))

    def it(i, state):
        c, q = state
        if prefetch:
            rows, q = q[0], q[1:] + (load_group(i + prefetch),)
        else:
            rows = load_group(i)
        for t, row in zip(steps(i), rows):
            c = body(t, row, c)
        return c, q

    c, _ = jax.lax.fori_loop(0, n_iter, it, (carry, queue))
    return c


def _stream_queue(steps, load, prefetch):
    """The rows of the first `prefetch` iterations of a step stream (see `_stream_loop`)."""
    return tuple(tuple(load(t) for t in steps(i)) for i in range(prefetch))


def _stream_loop(i0, n, steps, load, body, carry, queue):
    """Iterations i0..i0+n-1 of a step stream, the prefetched rows carried across calls.

    `steps(i)` lists the (traced) steps of global iteration i; `queue` holds the rows of
    iterations i0..i0+prefetch-1 on entry and of i0+n.. on exit, so a loop over chunks keeps
    its loads in flight across chunk boundaries (`_prefetched_loop` restarts them per chunk).
    `load(t)` must clamp t: the stream is read past its end.
    """
    prefetch = len(queue)

    def it(k, state):
        c, q = state
        i = i0 + k
        if prefetch:
            rows = q[0]
            q = q[1:] + (tuple(load(t) for t in steps(i + prefetch)),)
        else:
            rows = tuple(load(t) for t in steps(i))
        for t, row in zip(steps(i), rows):
            c = body(t, row, c)
        return c, q

    return jax.lax.fori_loop(0, n, it, (carry, queue))


def _fwd_kernel(*refs, cfg: _Cfg, save_states: bool):
    """Forward scan of one (batch, channel block): eq. 2a-2b, states saved per chunk.

    Refs: u, dt, [z]: (B, Lp, Dp)  B, C: (B, Lp, G, Np)  AT: (Np, Dp)  D, bias: (Dp,)
    h0: (B, Np, Dp) -> y: (B, Lp, Dp)  hL: (B, Np, Dp)  [hs: (B, n_chunks, Np, Dp)]
    """
    if cfg.has_z:
        u_ref, dt_ref, z_ref, b_ref, c_ref, at_ref, d_ref, bias_ref, h0_ref, *outs = refs
    else:
        u_ref, dt_ref, b_ref, c_ref, at_ref, d_ref, bias_ref, h0_ref, *outs = refs
        z_ref = None
    # bc_shuffle: b_ref is B|C (B, Lp, G, W) float32, W = 2 Np padded to a multiple of bd.
    y_ref, hl_ref = outs[0], outs[1]
    hs_ref = outs[2] if save_states else None
    bi, j = pl.program_id(0), pl.program_id(1)
    grp = j // cfg.blocks_per_group
    cols = pl.ds(j * cfg.block_d, cfg.block_d)
    last = cfg.n_chunks * cfg.chunk - 1
    # exp2 with A pre-scaled by log2(e): one MUFU op per state update.
    a2 = _load_tile(cfg.lane, at_ref, (), cols) * _LOG2E
    dskip = d_ref[cols].astype(jnp.float32)
    bias = bias_ref[cols].astype(jnp.float32)

    bd, ns = cfg.block_d, cfg.d_state
    n_bc = -(-2 * ns // bd)     # B|C rows of bd values per step (bc_shuffle)

    def load(t):
        t = jnp.clip(t, 0, last)
        if cfg.bc_shuffle:
            bc = tuple(b_ref[bi, t, grp, pl.ds(r * bd, bd)] for r in range(n_bc))
        else:
            bc = (b_ref[bi, t, grp, :], c_ref[bi, t, grp, :])
        row = (dt_ref[bi, t, cols], u_ref[bi, t, cols]) + bc
        return row + ((z_ref[bi, t, cols],) if cfg.has_z else ())

    def body(t, row, h):
        dt_raw, u = row[:2]
        u = u.astype(jnp.float32)
        dt, _ = _step_size(cfg, dt_raw, bias, t)
        if cfg.bc_shuffle:
            vals = [_shfl_idx(cfg, row[2 + e // bd], e % bd) for e in range(2 * ns)]
            b_tile, c_tile = _rows_to_tile(vals[:ns]), _rows_to_tile(vals[ns:])
            nxt = 2 + n_bc
        else:
            b_tile = row[2].astype(jnp.float32)[:, None]
            c_tile = row[3].astype(jnp.float32)[:, None]
            nxt = 4
        h = _exp2(cfg, dt[None, :] * a2) * h + (dt * u)[None, :] * b_tile
        y = jnp.sum(h * c_tile, axis=0) + dskip * u
        if cfg.has_z:
            zt = row[nxt].astype(jnp.float32)
            y = y * (zt * _sigmoid(cfg, zt))
        y_ref[bi, t, cols] = y.astype(y_ref.dtype)
        return h

    h = _load_tile(cfg.lane, h0_ref, (bi,), cols)
    if cfg.carry_prefetch:
        ipc = cfg.chunk // cfg.unroll

        def steps(i):
            return [i * cfg.unroll + k for k in range(cfg.unroll)]

        def chunk_body(c, state):
            h, q = state
            if save_states:
                _store_tile(cfg.lane, hs_ref, (bi, c), cols, h)
            return _stream_loop(c * ipc, ipc, steps, load, body, h, q)

        h, _ = jax.lax.fori_loop(0, cfg.n_chunks, chunk_body,
                                 (h, _stream_queue(steps, load, cfg.prefetch)))
    else:
        def chunk_body(c, h):
            if save_states:
                hs_ref[bi, c, :, cols] = h
            return _prefetched_loop(c * cfg.chunk, (c + 1) * cfg.chunk, load, body, h,
                                    cfg.prefetch, cfg.unroll)

        h = jax.lax.fori_loop(0, cfg.n_chunks, chunk_body, h)
    _store_tile(cfg.lane, hl_ref, (bi,), cols, h)


def _bwd_kernel(*refs, cfg: _Cfg):
    """Backward of one (batch, channel block): chunks in reverse, recomputed from saved states.

    Per step (adjoint g = dLoss/dh_t, accumulated backwards; x_t = dt_t u_t B_t):
        g += C_t dy_t ;  dC_t = sum_d dy_t h_t ;  dB_t = sum_d g dt_t u_t
        du_t = D dy_t + sum_n g dt_t B_t ;  ddt_t = sum_n g (B_t u_t + A a_t h_{t-1})
        dA += g a_t h_{t-1} dt_t ;  g *= a_t          (a_t = exp(dt_t A))
    Refs (inputs): u, dt, [z], dout: (B, Lp, Dp)  B, C: (B, Lp, G, Np)  AT: (Np, Dp)
    D, bias: (Dp,)  hs: (B, n_chunks, Np, Dp)  dhL: (B, Np, Dp)
    Refs (outputs): du, ddt, [dz]: (B, Lp, Dp)  dB, dC: (B, Lp, n_blocks, Np) per-block partials
    dAT: (B, Np, Dp)  dD, dbias: (B, Dp)  dh0: (B, Np, Dp)  scratch: (B, n_blocks, chunk, Np, bd)
    """
    it = iter(refs)
    u_ref, dt_ref = next(it), next(it)
    z_ref = next(it) if cfg.has_z else None
    do_ref, b_ref, c_ref, at_ref, d_ref, bias_ref, hs_ref, dhl_ref = (next(it) for _ in range(8))
    du_ref, ddt_ref = next(it), next(it)
    dz_ref = next(it) if cfg.has_z else None
    db_ref, dc_ref, dat_ref, dd_ref, dbias_ref, dh0_ref, scr_ref = (next(it) for _ in range(7))

    bi, j = pl.program_id(0), pl.program_id(1)
    grp = j // cfg.bwd_blocks_per_group
    cols = pl.ds(j * cfg.bwd_block_d, cfg.bwd_block_d)
    last = cfg.n_chunks * cfg.chunk - 1
    at = at_ref[:, cols].astype(jnp.float32)
    a2 = at * _LOG2E
    dskip = d_ref[cols].astype(jnp.float32)
    bias = bias_ref[cols].astype(jnp.float32)
    f32 = jnp.float32

    def load_fwd(t):
        t = jnp.clip(t, 0, last)
        return dt_ref[bi, t, cols], u_ref[bi, t, cols], b_ref[bi, t, grp, :]

    def recompute(t, row, h):
        # Store h_{t-1} (what step t's gradient needs), then advance to h_t.
        dt_raw, u, bt = row
        dt, _ = _step_size(cfg, dt_raw, bias, t)
        scr_ref[bi, j, jax.lax.rem(t, cfg.chunk), :, :] = h
        return (_exp2(cfg, dt[None, :] * a2) * h
                + (dt * u.astype(f32))[None, :] * bt.astype(f32)[:, None])

    def load_bwd(t):
        t = jnp.clip(t, 0, last)
        row = (dt_ref[bi, t, cols], u_ref[bi, t, cols], b_ref[bi, t, grp, :],
               c_ref[bi, t, grp, :], do_ref[bi, t, cols])
        return row + ((z_ref[bi, t, cols],) if cfg.has_z else ())

    def scratch(t):
        return scr_ref[bi, j, jax.lax.rem(t, cfg.chunk), :, :]

    def adjoint(t, row, carry):
        if cfg.carry_prefetch:
            # h_{t-1} was loaded one step ahead: an L2 round trip per step otherwise. At a
            # chunk's first step (t = lo) this reads a stale row that is never used.
            g, dat, dd, dbias, h_prev = carry
            h_next = scratch(t - 1 + cfg.chunk)
        else:
            g, dat, dd, dbias = carry
            h_prev = scratch(t)
        dt_raw, u, bt, ct, dout = row[:5]
        u, bt, ct, dout = u.astype(f32), bt.astype(f32), ct.astype(f32), dout.astype(f32)
        dt, x = _step_size(cfg, dt_raw, bias, t)
        a = _exp2(cfg, dt[None, :] * a2)
        dtu = dt * u
        h = a * h_prev + dtu[None, :] * bt[:, None]
        if cfg.has_z:
            zt = row[5].astype(f32)
            sig = _sigmoid(cfg, zt)
            y = jnp.sum(h * ct[:, None], axis=0) + dskip * u
            dz = dout * y * sig * (1.0 + zt * (1.0 - sig))
            dz_ref[bi, t, cols] = dz.astype(dz_ref.dtype)
            dy = dout * zt * sig
        else:
            dy = dout
        g = g + ct[:, None] * dy[None, :]
        dc_ref[bi, t, j, :] = jnp.sum(h * dy[None, :], axis=1)
        db_ref[bi, t, j, :] = jnp.sum(g * dtu[None, :], axis=1)
        ga = g * a * h_prev
        gb = jnp.sum(g * bt[:, None], axis=0)
        du = dskip * dy + dt * gb
        ddt = gb * u + jnp.sum(ga * at, axis=0)
        if cfg.softplus:
            ddt = ddt * _sigmoid(cfg, x)
        ddt = jnp.where(t < cfg.length, ddt, 0.0)
        du_ref[bi, t, cols] = du.astype(du_ref.dtype)
        ddt_ref[bi, t, cols] = ddt.astype(ddt_ref.dtype)
        out = (g * a, dat + ga * dt[None, :], dd + dy * u, dbias + ddt)
        return out + (h_next,) if cfg.carry_prefetch else out

    def barrier():
        if not cfg.interpret:
            # Scratch written by the recompute is read back by other threads of the program.
            pltr.debug_barrier()

    nb = cfg.bwd_block_d
    init = (dhl_ref[bi, :, cols].astype(f32), jnp.zeros((cfg.d_state, nb), f32),
            jnp.zeros((nb,), f32), jnp.zeros((nb,), f32))
    if cfg.carry_prefetch:
        ipc, un = cfg.chunk // cfg.unroll, cfg.unroll

        def steps_fwd(i):
            # Recompute stream: chunks last to first, steps ascending inside a chunk.
            c = cfg.n_chunks - 1 - i // ipc
            base = c * cfg.chunk + jax.lax.rem(i, ipc) * un
            return [base + k for k in range(un)]

        def steps_bwd(i):
            return [last - (i * un + k) for k in range(un)]

        def chunk_body(i, state):
            carry, qf, qb = state
            c = cfg.n_chunks - 1 - i
            _, qf = _stream_loop(i * ipc, ipc, steps_fwd, load_fwd, recompute,
                                 hs_ref[bi, c, :, cols], qf)
            barrier()
            carry, qb = _stream_loop(i * ipc, ipc, steps_bwd, load_bwd, adjoint,
                                     carry + (scratch(c * cfg.chunk + cfg.chunk - 1),), qb)
            barrier()
            return carry[:4], qf, qb

        g, dat, dd, dbias = jax.lax.fori_loop(
            0, cfg.n_chunks, chunk_body,
            (init, _stream_queue(steps_fwd, load_fwd, cfg.prefetch),
             _stream_queue(steps_bwd, load_bwd, cfg.prefetch)))[0]
    else:
        def chunk_body(i, carry):
            c = cfg.n_chunks - 1 - i
            lo, hi = c * cfg.chunk, (c + 1) * cfg.chunk
            _prefetched_loop(lo, hi, load_fwd, recompute, hs_ref[bi, c, :, cols],
                             cfg.prefetch, cfg.unroll)
            barrier()
            carry = _prefetched_loop(lo, hi, load_bwd, adjoint, carry, cfg.prefetch,
                                     cfg.unroll, reverse=True)
            barrier()
            return carry

        g, dat, dd, dbias = jax.lax.fori_loop(0, cfg.n_chunks, chunk_body, init)
    dh0_ref[bi, :, cols] = g
    dat_ref[bi, :, cols] = dat
    dd_ref[bi, cols] = dd
    dbias_ref[bi, cols] = dbias


def _fwd_call(cfg, save_states, u, dt, z, Bm, Cm, AT, D, bias, h0):
    b, lp, dp = u.shape
    np_ = cfg.d_state
    n_blocks = cfg.n_groups * cfg.blocks_per_group
    out_shape = [jax.ShapeDtypeStruct((b, lp, dp), u.dtype),
                 jax.ShapeDtypeStruct((b, np_, dp), jnp.float32)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((b, cfg.n_chunks, np_, dp), jnp.float32))
    if cfg.bc_shuffle:
        w = _round_up(2 * np_, cfg.block_d)
        bc = jnp.concatenate([Bm, Cm], axis=-1).astype(jnp.float32)
        Bm = jnp.pad(bc, [(0, 0)] * 3 + [(0, w - 2 * np_)])
        Cm = Cm[:, :1, :1, :1]      # unused
    ins = (u, dt) + ((z,) if cfg.has_z else ()) + (Bm, Cm, AT, D, bias, h0)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, save_states=save_states),
        out_shape=tuple(out_shape),
        grid=(b, n_blocks),
        compiler_params=_compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="selective_scan_fwd",
    )(*ins)


def _bwd_call(cfg, res, dy, dhl):
    u, dt, z, Bm, Cm, AT, D, bias, hs = res
    b, lp, dp = u.shape
    np_ = cfg.d_state
    n_blocks = cfg.n_groups * cfg.bwd_blocks_per_group
    f32 = jnp.float32
    out_shape = ([jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(dt.shape, dt.dtype)]
                 + ([jax.ShapeDtypeStruct(z.shape, z.dtype)] if cfg.has_z else [])
                 + [jax.ShapeDtypeStruct((b, lp, n_blocks, np_), f32),
                    jax.ShapeDtypeStruct((b, lp, n_blocks, np_), f32),
                    jax.ShapeDtypeStruct((b, np_, dp), f32),
                    jax.ShapeDtypeStruct((b, dp), f32),
                    jax.ShapeDtypeStruct((b, dp), f32),
                    jax.ShapeDtypeStruct((b, np_, dp), f32),
                    jax.ShapeDtypeStruct((b, n_blocks, cfg.chunk, np_, cfg.bwd_block_d), f32)])
    ins = (u, dt) + ((z,) if cfg.has_z else ()) + (dy, Bm, Cm, AT, D, bias, hs, dhl)
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, cfg=cfg),
        out_shape=tuple(out_shape),
        grid=(b, n_blocks),
        compiler_params=_compiler_params(cfg.bwd_num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="selective_scan_bwd",
    )(*ins)
    return outs[:-1]    # drop the scratch


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan_padded(cfg, u, dt, z, Bm, Cm, AT, D, bias, h0):
    y, hl = _fwd_call(cfg, False, u, dt, z, Bm, Cm, AT, D, bias, h0)
    return y, hl


def _scan_padded_fwd(cfg, u, dt, z, Bm, Cm, AT, D, bias, h0):
    y, hl, hs = _fwd_call(cfg, True, u, dt, z, Bm, Cm, AT, D, bias, h0)
    return (y, hl), (u, dt, z, Bm, Cm, AT, D, bias, hs)


def _scan_padded_bwd(cfg, res, cts):
    dy, dhl = cts
    u, dt, z, Bm, Cm = res[:5]
    outs = _bwd_call(cfg, res, dy.astype(u.dtype), dhl.astype(jnp.float32))
    du, ddt = outs[0], outs[1]
    dz = outs[2] if cfg.has_z else None
    db, dc, dat, dd, dbias, dh0 = outs[3:] if cfg.has_z else outs[2:]
    b, lp, _, np_ = db.shape
    # Per-block partial sums of dB/dC reduced here (deterministic, no atomics).
    nbg = cfg.bwd_blocks_per_group
    db = db.reshape(b, lp, cfg.n_groups, nbg, np_).sum(3).astype(Bm.dtype)
    dc = dc.reshape(b, lp, cfg.n_groups, nbg, np_).sum(3).astype(Cm.dtype)
    return (du, ddt, dz, db, dc, dat.sum(0), dd.sum(0), dbias.sum(0), dh0)


_scan_padded.defvjp(_scan_padded_fwd, _scan_padded_bwd)


def selective_scan_pallas(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                          delta_softplus=False, initial_state=None, return_final_state=False,
                          block_sizes: BlockSizes | None = None, interpret: bool | None = None):
    """Pallas (Triton) selective scan with its own backward kernels (`jax.custom_vjp`).

    u, delta, z: (B, L, Di)  A: (Di, N)  B, C: (B, L, N) or (B, L, G, N)  D, delta_bias: (Di,)
    initial_state: (B, Di, N).  Returns y (B, L, Di) [, h_L (B, Di, N) float32]; eq. 2a-2b.
    Any length, width and d_state: the wrapper pads time to a multiple of the chunk (padded
    steps get delta = 0 after softplus, i.e. identity steps), each group's channels to a
    multiple of the block, and d_state to a power of 2 (A = B = C = 0 there).
    `interpret=None` runs interpret mode when no GPU is present.
    """
    b, l, di, g, n = _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    bs = block_sizes or BlockSizes.get_default(l)
    if interpret is None:
        interpret = not _on_gpu()
    f32 = jnp.float32
    cg = di // g
    # A block never straddles two groups; tiny widths use a smaller block rather than pad.
    # (Blocks below 16 channels only when asked for: small blocks mean more warps in flight.)
    bd, bdb = (max(min(x, _next_pow2(cg)), min(x, 16))
               for x in (bs.block_d, bs.bwd_block_d or bs.block_d))
    cgp = _round_up(cg, max(bd, bdb))
    np_ = max(_next_pow2(n), 2)
    chunk = min(bs.chunk, _next_pow2(l))
    unroll = min(bs.unroll, chunk)
    lp = _round_up(l, chunk)
    cfg = _Cfg(length=l, n_chunks=lp // chunk, chunk=chunk, n_groups=g,
               blocks_per_group=cgp // bd, block_d=bd, bwd_blocks_per_group=cgp // bdb,
               bwd_block_d=bdb, d_state=np_,
               softplus=bool(delta_softplus), has_z=z is not None, unroll=unroll,
               prefetch=bs.prefetch,
               num_warps=bs.num_warps, num_stages=bs.num_stages,
               bwd_num_warps=bs.bwd_num_warps, lane=bs.layout == "lane",
               fast_math=bs.fast_math, carry_prefetch=bs.carry_prefetch,
               bc_shuffle=bs.bc_shuffle,
               interpret=bool(interpret))

    def chan(x, fill=0.0):
        # (..., Di) -> (..., G * cgp): pad each group's channels (no copy when cg == cgp).
        if cgp == cg:
            return x
        lead = x.shape[:-1]
        x = x.reshape(lead + (g, cg))
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, cgp - cg)], constant_values=fill)
        return x.reshape(lead + (g * cgp,))

    def seq(x):
        return x if lp == l else jnp.pad(x, [(0, 0), (0, lp - l), (0, 0)])

    u_p = seq(chan(u))
    dt_p = seq(chan(delta))
    z_p = None if z is None else seq(chan(z))
    Bg, Cg = _as_groups(B), _as_groups(C)
    pad_bc = [(0, 0), (0, lp - l), (0, 0), (0, np_ - n)]
    B_p = Bg if pad_bc == [(0, 0)] * 4 else jnp.pad(Bg, pad_bc)
    C_p = Cg if pad_bc == [(0, 0)] * 4 else jnp.pad(Cg, pad_bc)
    if bs.bc_f32:
        # B/C are small next to u and delta (N per step, not d_inner): converting them once
        # here saves the kernels two conversions per state and step.
        B_p, C_p = B_p.astype(f32), C_p.astype(f32)
    AT = jnp.pad(chan(A.astype(f32).T), [(0, np_ - n), (0, 0)])
    D_p = chan(jnp.zeros((di,), f32) if D is None else D.astype(f32))
    bias_p = chan(jnp.zeros((di,), f32) if delta_bias is None else delta_bias.astype(f32))
    h0 = (jnp.zeros((b, np_, g * cgp), f32) if initial_state is None else
          jnp.pad(chan(jnp.swapaxes(initial_state.astype(f32), 1, 2)),
                  [(0, 0), (0, np_ - n), (0, 0)]))
    y, hl = _scan_padded(cfg, u_p, dt_p, z_p, B_p, C_p, AT, D_p, bias_p, h0)
    y = y[:, :l]
    if cgp != cg:
        y = y.reshape(b, l, g, cgp)[..., :cg].reshape(b, l, di)
    if not return_final_state:
        return y
    hl = hl[:, :n].reshape(b, n, g, cgp)[..., :cg].reshape(b, n, di)
    return y, jnp.swapaxes(hl, 1, 2)
