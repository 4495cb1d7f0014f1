"""Selective scan (Mamba-1) forward on the Pallas Mosaic GPU backend (experimental, Hopper).

Shape legend (as kernels/selective_scan.py):
    u, delta, z: (B, L, Di)   A: (Di, N)   D, delta_bias: (Di,)
    B, C: (B, L, N) or (B, L, G, N)   state h: (B, Di, N) float32
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t . h_t + D u_t ;  y *= silu(z)
(Gu & Dao 2023, arXiv 2312.00752, Algorithm 2 / eq. 2a-2b.)

Design (benchmarks/NOTES_selective_scan.md, "Mosaic GPU"): one thread block = one warpgroup of
128 threads per (batch, 128 channels), ONE CHANNEL PER THREAD, the N states of its channel in
registers, sequential over time. Tiles of `tile` steps of u, delta, [z] and B|C are brought
into shared memory by the bulk-copy engine (TMA), `stages` tiles ahead of the recurrence, so
the dependent loop reads only registers and shared memory (the Triton kernels load rows from
global memory inside the loop: ~444 cycles per step). B_t[n], C_t[n] are warp-uniform scalar
shared-memory loads (broadcast, no bank conflicts); exp2 with A pre-scaled by log2(e); y_t is
stored straight to global memory (128 consecutive channels per warpgroup and step).
One warpgroup-wide barrier per tile (before a slot is refilled) is the only synchronisation.

Backward: `jax.custom_vjp`; the forward saves the state entering every `chunk` (16) steps in
the layout of kernels/selective_scan.py and the backward is that module's Triton backward
kernel (v5), unchanged. A Mosaic backward (recompute per tile from the saved states, dB/dC as
cross-thread sums) is not written yet.

Contract: everything `kernels.selective_scan` accepts. The wrapper pads time to a multiple of
`tile` (padded steps get delta = 0 after softplus: identity steps), each group's channels to a
multiple of 128 (a block never straddles two groups) and d_state to a power of 2 >= 4 (the
Triton backward's tile; the forward loops over the true N only). Widths far below 128 per
group waste most of each block: correct, not fast.

Needs jax >= 0.11.2 (`plgpu.kernel`, Lane lowering semantics, `InterpretGPUParams`);
`AVAILABLE` is False where the API is missing (the module still imports, e.g. on jax 0.10.2).
On CPU the kernel runs in Mosaic GPU interpret mode.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# The module, not the function `kernels.selective_scan` that kernels/__init__.py exports.
_ss = importlib.import_module("kernels.selective_scan")

try:  # jax 0.10.2 has plgpu, but not every piece used here (Lane semantics, interpret params).
    from jax.experimental.pallas import mosaic_gpu as plgpu
    AVAILABLE = all(hasattr(plgpu, a) for a in (
        "kernel", "copy_gmem_to_smem", "barrier_wait", "wait_smem_to_gmem", "Barrier", "SMEM",
        "CompilerParams", "LoweringSemantics", "InterpretGPUParams"))
    if AVAILABLE:
        _fields = {f.name for f in dataclasses.fields(plgpu.CompilerParams)}
        AVAILABLE = {"lowering_semantics", "unsafe_no_auto_barriers",
                     "approx_math"} <= _fields
except Exception:  # pragma: no cover - depends on the installed jax
    plgpu = None
    AVAILABLE = False

_LOG2E = math.log2(math.e)
WIDTH = 128         # channels per block: one warpgroup, one channel per thread
CHUNK = 16          # steps between saved states (the Triton backward's chunk)


@dataclasses.dataclass(frozen=True)
class MgpuBlockSizes:
    """Tiling of the Mosaic GPU forward."""
    tile: int = 32      # steps per TMA tile (multiple of CHUNK)
    stages: int = 3     # tiles in flight (shared-memory ring)
    unroll: int = 4     # steps per loop iteration inside a chunk (divides CHUNK)

    def __post_init__(self):
        if self.tile < CHUNK or self.tile % CHUNK:
            raise ValueError(f"MgpuBlockSizes.tile={self.tile} must be a multiple of {CHUNK}")
        if self.stages < 1:
            raise ValueError(f"MgpuBlockSizes.stages={self.stages} must be >= 1")
        if CHUNK % self.unroll:
            raise ValueError(f"MgpuBlockSizes.unroll={self.unroll} must divide {CHUNK}")


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static description of one padded problem (hashable: a custom_vjp nondiff argument)."""
    length: int            # true length; steps >= length are identity steps
    n_tiles: int           # padded length = n_tiles * tile
    tile: int
    stages: int
    unroll: int
    n_state: int           # true d_state (the loop's states)
    np_: int               # padded d_state (rows of h0 / hL / hs; B|C row = 2 np_)
    blocks_per_group: int
    softplus: bool
    has_z: bool
    interpret: bool
    tcfg: object           # the Triton backward's _Cfg (kernels/selective_scan.py)


def _softplus(x):
    """log1p(exp(x)) from ex2 / lg2 (MUFU with approx_math): a 4-term series below e = 1/32
    (relative error < 2e-7), x itself above 20 (as kernels/selective_scan.py's fast path)."""
    e = jnp.exp2(jnp.minimum(x, 20.0) * _LOG2E)
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0 - e * 0.25)))
    big = jnp.log2(1.0 + e) * (1.0 / _LOG2E)
    return jnp.where(x > 20.0, x, jnp.where(e < 0.03125, series, big))


def _fwd_kernel(*refs, cfg: _Cfg, save_states: bool):
    """Forward of one (batch, 128-channel block): eq. 2a-2b, one channel per thread.

    GMEM refs: u, dt, [z]: (B, Lp, Dp)  bc: (B, G, Lp, 2 Np) float32 (B | C)
    par: (Np + 2, Dp) float32 (rows: A^T log2(e), D, delta_bias)  h0: (B, Np, Dp)
    -> y: (B, Lp, Dp)  hL: (B, Np, Dp)  [hs: (B, Lp / CHUNK, Np, Dp)]
    SMEM scratch: u, dt, [z]: (stages, tile, 128)  bc: (stages, tile, 2 Np)
    par: (Np + 2, 128)  h0: (Np, 128); barriers: one per stage, one for par / h0.
    """
    n_in = 4 if cfg.has_z else 3
    it = iter(refs)
    seq_refs = [next(it) for _ in range(n_in)]       # u, dt, [z], bc
    par_ref, h0_ref = next(it), next(it)
    y_ref, hl_ref = next(it), next(it)
    hs_ref = next(it) if save_states else None
    seq_smem = [next(it) for _ in range(n_in)]
    par_s, h0_s, bar, pbar = next(it), next(it), next(it), next(it)

    bi = jax.lax.axis_index("b")
    j = jax.lax.axis_index("d")
    grp = j // cfg.blocks_per_group
    cols = pl.ds(j * WIDTH, WIDTH)
    T, S, N = cfg.tile, cfg.stages, cfg.n_state

    def issue(k, slot):
        rows = pl.ds(k * T, T)
        for r, s in zip(seq_refs[:-1], seq_smem[:-1]):
            plgpu.copy_gmem_to_smem(r.at[bi, rows, cols], s.at[slot], bar.at[slot])
        plgpu.copy_gmem_to_smem(seq_refs[-1].at[bi, grp, rows, :], seq_smem[-1].at[slot],
                                bar.at[slot])

    plgpu.copy_gmem_to_smem(par_ref.at[:, cols], par_s, pbar)
    plgpu.copy_gmem_to_smem(h0_ref.at[bi, :, cols], h0_s, pbar)
    for k in range(min(S - 1, cfg.n_tiles)):
        issue(k, k)
    plgpu.barrier_wait(pbar)
    a2 = [par_s[n, :] for n in range(N)]
    dskip = par_s[cfg.np_, :]
    bias = par_s[cfg.np_ + 1, :]
    h = tuple(h0_s[n, :] for n in range(N))
    zero = h0_s[N, :] if N < cfg.np_ else None      # padded state rows are zero in h0
    u_s, dt_s = seq_smem[0], seq_smem[1]
    z_s = seq_smem[2] if cfg.has_z else None
    bc_s = seq_smem[-1]
    masked = cfg.n_tiles * T != cfg.length

    def step(t0, slot, t, h):
        x = dt_s[slot, t, :].astype(jnp.float32) + bias
        dt = _softplus(x) if cfg.softplus else x
        if masked:
            dt = jnp.where(t0 + t < cfg.length, dt, 0.0)
        u = u_s[slot, t, :].astype(jnp.float32)
        dtu = dt * u
        y = dskip * u
        out = []
        for n in range(N):
            hn = jnp.exp2(dt * a2[n]) * h[n] + dtu * bc_s[slot, t, n]
            y = y + hn * bc_s[slot, t, cfg.np_ + n]
            out.append(hn)
        if cfg.has_z:
            zt = z_s[slot, t, :].astype(jnp.float32)
            y = y * zt / (1.0 + jnp.exp2(zt * -_LOG2E))
        y_ref[bi, t0 + t, cols] = y.astype(y_ref.dtype)
        return tuple(out)

    def save(c, h):
        for n in range(cfg.np_):
            hs_ref[bi, c, n, cols] = h[n] if n < N else zero

    def tile_body(k, h):
        slot = jax.lax.rem(k, S)
        if S > 1:
            # Every thread is done with tile k - 1, whose slot the copy below refills (the
            # wait on no pending stores is a warpgroup barrier; auto barriers are off).
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            @pl.when(k + S - 1 < cfg.n_tiles)
            def _():
                issue(k + S - 1, jax.lax.rem(k + S - 1, S))
        else:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            issue(k, 0)
        plgpu.barrier_wait(bar.at[slot])
        t0 = k * T
        for q in range(T // CHUNK):
            if save_states:
                save(k * (T // CHUNK) + q, h)
            h = jax.lax.fori_loop(
                q * CHUNK, (q + 1) * CHUNK,
                lambda t, h: step(t0, slot, t, h), h, unroll=cfg.unroll)
        return h

    h = jax.lax.fori_loop(0, cfg.n_tiles, tile_body, h)
    for n in range(cfg.np_):
        hl_ref[bi, n, cols] = h[n] if n < N else zero


def _fwd_call(cfg, save_states, u, dt, z, Bm, Cm, par, h0):
    b, lp, dp = u.shape
    g = Bm.shape[2]
    np_, T, S = cfg.np_, cfg.tile, cfg.stages
    f32 = jnp.float32
    # B | C as one (tile, 2 Np) row block per TMA copy, groups outermost.
    bc = jnp.swapaxes(jnp.concatenate([Bm, Cm], axis=-1).astype(f32), 1, 2)
    seq = [u, dt] + ([z] if cfg.has_z else []) + [bc]
    out_type = [jax.ShapeDtypeStruct((b, lp, dp), u.dtype),
                jax.ShapeDtypeStruct((b, np_, dp), f32)]
    if save_states:
        out_type.append(jax.ShapeDtypeStruct((b, lp // CHUNK, np_, dp), f32))
    scratch = ([plgpu.SMEM((S, T, WIDTH), x.dtype) for x in seq[:-1]]
               + [plgpu.SMEM((S, T, 2 * np_), f32),
                  plgpu.SMEM((np_ + 2, WIDTH), f32), plgpu.SMEM((np_, WIDTH), f32),
                  plgpu.Barrier(num_arrivals=len(seq), num_barriers=S),
                  plgpu.Barrier(num_arrivals=2)])
    params = plgpu.CompilerParams(
        lowering_semantics=plgpu.LoweringSemantics.Lane, approx_math=True,
        unsafe_no_auto_barriers=True)
    kern = plgpu.kernel(
        functools.partial(_fwd_kernel, cfg=cfg, save_states=save_states),
        out_type=tuple(out_type), scratch_types=scratch, compiler_params=params,
        grid=(b, dp // WIDTH), grid_names=("b", "d"),
        interpret=plgpu.InterpretGPUParams() if cfg.interpret else None,
        )
    del g
    return kern(*seq, par, h0)


def _par(AT, D, bias):
    return jnp.concatenate([AT * _LOG2E, D[None], bias[None]], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan_padded(cfg, u, dt, z, Bm, Cm, AT, D, bias, h0):
    y, hl = _fwd_call(cfg, False, u, dt, z, Bm, Cm, _par(AT, D, bias), h0)
    return y, hl


def _scan_padded_fwd(cfg, u, dt, z, Bm, Cm, AT, D, bias, h0):
    y, hl, hs = _fwd_call(cfg, True, u, dt, z, Bm, Cm, _par(AT, D, bias), h0)
    return (y, hl), (u, dt, z, Bm, Cm, AT, D, bias, hs)


def _scan_padded_bwd(cfg, res, cts):
    # The Triton backward of kernels/selective_scan.py on the same padded layout.
    return _ss._scan_padded_bwd(cfg.tcfg, res, cts)


_scan_padded.defvjp(_scan_padded_fwd, _scan_padded_bwd)


def _round_up(x, m):
    return -(-x // m) * m


def selective_scan_mgpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                        delta_softplus=False, initial_state=None, return_final_state=False,
                        block_sizes: MgpuBlockSizes | None = None,
                        bwd_block_sizes: "_ss.BlockSizes | None" = None,
                        interpret: bool | None = None):
    """Selective scan: Mosaic GPU forward, Triton backward (`jax.custom_vjp`).

    u, delta, z: (B, L, Di)  A: (Di, N)  B, C: (B, L, N) or (B, L, G, N)  D, delta_bias: (Di,)
    initial_state: (B, Di, N).  Returns y (B, L, Di) [, h_L (B, Di, N) float32]; eq. 2a-2b.
    `interpret=None` runs Mosaic GPU (and Triton) interpret mode when no GPU is present.
    """
    if not AVAILABLE:
        raise NotImplementedError(
            f"selective_scan_mgpu needs the Pallas Mosaic GPU API of jax >= 0.11.2 "
            f"(jax {jax.__version__} lacks part of it); use kernels.selective_scan")
    b, l, di, g, n = _ss._check_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    bs = block_sizes or MgpuBlockSizes()
    tbs = bwd_block_sizes or _ss.BlockSizes.get_default(l)
    if interpret is None:
        interpret = not _ss._on_gpu()
    f32 = jnp.float32
    cg = di // g
    cgp = _round_up(cg, WIDTH)
    np_ = max(_ss._next_pow2(n), 4)
    lp = _round_up(l, bs.tile)
    bdb = tbs.bwd_block_d or tbs.block_d
    bdb = max(min(bdb, _ss._next_pow2(cg)), min(bdb, 16))
    # The Triton backward on this layout: chunk = CHUNK steps, lp // CHUNK chunks.
    tcfg = _ss._Cfg(length=l, n_chunks=lp // CHUNK, chunk=CHUNK, n_groups=g,
                    blocks_per_group=cgp // bdb, block_d=bdb,
                    bwd_blocks_per_group=cgp // bdb, bwd_block_d=bdb, d_state=np_,
                    softplus=bool(delta_softplus), has_z=z is not None,
                    unroll=min(tbs.unroll, CHUNK), prefetch=tbs.prefetch,
                    num_warps=tbs.num_warps, num_stages=tbs.num_stages,
                    bwd_num_warps=tbs.bwd_num_warps, lane=tbs.layout == "lane",
                    fast_math=tbs.fast_math, carry_prefetch=tbs.carry_prefetch,
                    bc_shuffle=False, interpret=bool(interpret))
    cfg = _Cfg(length=l, n_tiles=lp // bs.tile, tile=bs.tile, stages=bs.stages,
               unroll=bs.unroll, n_state=n, np_=np_, blocks_per_group=cgp // WIDTH,
               softplus=bool(delta_softplus), has_z=z is not None,
               interpret=bool(interpret), tcfg=tcfg)

    def chan(x):
        # (..., Di) -> (..., G * cgp): pad each group's channels (no copy when cg == cgp).
        if cgp == cg:
            return x
        lead = x.shape[:-1]
        x = x.reshape(lead + (g, cg))
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, cgp - cg)])
        return x.reshape(lead + (g * cgp,))

    def seq(x):
        return x if lp == l else jnp.pad(x, [(0, 0), (0, lp - l), (0, 0)])

    u_p, dt_p = seq(chan(u)), seq(chan(delta))
    z_p = None if z is None else seq(chan(z))
    pad_bc = [(0, 0), (0, lp - l), (0, 0), (0, np_ - n)]
    B_p = jnp.pad(_ss._as_groups(B).astype(f32), pad_bc)
    C_p = jnp.pad(_ss._as_groups(C).astype(f32), pad_bc)
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
