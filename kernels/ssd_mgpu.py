"""SSD backward dx and dB/dC passes on the Pallas Mosaic GPU backend (Hopper, 16-bit inputs).

`dx_call` (below), `dbc_call` (the dB/dC pass: a head loop per (batch, chunk, group, 64
d_state columns) with a TMA ring, see `_dbc_kernel`) and `dx_dbc_call` (both in one launch,
the default since H100 run 19: L fwd+bwd 1.338 ms vs 1.430 as two launches, 1.560 with the
Triton dB/dC pass; since run 22 with the dB/dC CTAs 16 (batch, chunk) groups ahead of the dx
CTAs, `BlockSizes.mgpu_dbc_lead`: 1.299 ms with `zero_states_inline`, vs 1.337-1.340;
benchmarks/NOTES_ssd.md runs 18-22).

Shape legend (as kernels/ssd_long.py): x, dy, dx: (B, Lp, H, P)  dt: (B, Lp, H) f32
B, C: (B, Lp, G, N)  states, dstates: (B, nc, H, P, N) (chunk-entry states, dL/dh at chunk
ends)  A: (H,)  D: (H, P) f32.

Replaces `ssd_long._ssd_bwd_dx_kernel` (the split3 backward's pass 2) when
`BlockSizes.dx_backend == "mosaic"` and `supports(...)` holds: one CTA of one warpgroup per
(batch, chunk, head), heads fastest in the grid (one chunk's B, C shared through L2). Every
tile comes into shared memory by TMA on one barrier; every dot is a warpgroup wgmma
(bf16 operands from shared memory or registers, f32 accumulators), so the (Q, Q) and (Q, P)
tiles stay in the WGMMA register layout from the dot to the elementwise math: no layout
conversions through shared memory as in the Triton lowering. The terms are those of the
Triton kernel, rewritten so that nothing needs a cumsum or a transposed register tile:
  cs (chunk-local inclusive cumsum of dt A, log2 units) comes from XLA;
  M^T = (B C^T) o decay^T is formed directly (A operand of dxdt = M^T dy, from registers);
  dm = (dy x^T) o dt_j (no dt x tile);
  the pair, inter-chunk and write terms of d(dA) sum as one masked (Q, Q) tile reduced over
  its rows: T_ik = [i >= k] (e U_ik + t_inter_i) + [i < k] f_write_i, with e U the exclusive
  row cumsum of e = dm o M as a dot with the 0/1 matrix U_jk = [j < k] (e split into two bf16
  parts, hi + lo = e to ~2^-16, as `BlockSizes.dda_dot`);
  s_prev = exp(cs_Q) <dh, h_prev> is the trace of dh h_prev^T (one wgmma, a diagonal mask).
Outputs per (batch, chunk, head): dx (bf16, TMA store), d(dA) and rowsum(x o dxdt) as
(B, H, Lp) f32 vectors (XLA forms ddt = A d(dA) + rowsum and dA = sum d(dA) dt), and the dD
partial (B, nc, H, P).

Needs jax >= 0.11.2 (`plgpu.kernel`, `InterpretGPUParams`); `AVAILABLE` is False where the API
is missing (the module still imports, e.g. on jax 0.10.2), and the caller then keeps the
Triton kernel. On CPU the kernel runs in Mosaic GPU interpret mode.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # jax 0.10.2 has plgpu, but not every piece used here.
    from jax.experimental.pallas import mosaic_gpu as plgpu
    AVAILABLE = all(hasattr(plgpu, a) for a in (
        "kernel", "copy_gmem_to_smem", "copy_smem_to_gmem", "barrier_wait", "wait_smem_to_gmem",
        "Barrier", "SMEM", "CompilerParams", "InterpretGPUParams", "wgmma", "Layout",
        "TilingTransform", "SwizzleTransform", "find_swizzle", "broadcasted_iota", "load",
        "commit_smem", "ACC", "layout_cast", "wgmma_wait"))
except Exception:  # pragma: no cover - depends on the installed jax
    plgpu = None
    AVAILABLE = False

LOG2E = 1.4426950408889634
F32 = jnp.float32


def supports(x, B, q):
    """The shapes and dtypes this kernel covers (else the Triton dx kernel runs)."""
    if not AVAILABLE:
        return False
    p, n = x.shape[-1], B.shape[-1]
    return (x.dtype in (jnp.bfloat16, jnp.float16) and B.dtype == x.dtype and q == 64
            and p == 64 and n % 64 == 0 and n <= 256)


def _smem(shape, dtype):
    """A shared-memory tile tiled and swizzled for TMA and wgmma (minor dim = last dim)."""
    dtype = jnp.dtype(dtype)
    swizzle = plgpu.find_swizzle(shape[-1] * dtype.itemsize * 8)
    return plgpu.SMEM(shape, dtype, transforms=(
        plgpu.TilingTransform((8, swizzle // dtype.itemsize)), plgpu.SwizzleTransform(swizzle)))


def _lhs(a_s, v, k):
    """A 16-bit WGMMA register tile as a dot's A operand: from registers on the GPU; through
    the shared-memory slot a_s[k] in interpret mode (whose wgmma reads refs only)."""
    if not a_s:
        return v
    a_s[k][...] = v
    plgpu.commit_smem()
    return a_s[k]


def _mm(*specs, between=None):
    """Dots on the tensor cores: each spec is (a, b, shape) or (((a1, b1), (a2, b2)), shape)
    (a sum of dots in one accumulator); a: shared-memory ref or 16-bit WGMMA registers, b: a
    shared-memory ref (`.T` for its transpose); f32 results. Every wgmma is issued before
    the first result is read (one wait for the group), and `between()` (optional) runs
    while they fly; returns the results (and between's value last). The optimization barrier
    keeps the compiler from reading the accumulator registers before the wgmma wait (the
    wait has no data dependency on them)."""
    def scoped(*accs):
        for acc, spec in zip(accs, specs):
            pairs = spec[0] if len(spec) == 2 else ((spec[0], spec[1]),)
            for a, b in pairs:
                plgpu.wgmma(acc, a, b)
        extra = between() if between is not None else None
        return tuple(acc[...] for acc in accs), extra
    outs, extra = pl.run_scoped(scoped, *[plgpu.ACC(spec[-1], F32) for spec in specs])
    outs = lax.optimization_barrier(outs)
    return (*outs, extra) if between is not None else (outs if len(outs) > 1 else outs[0])


def _dx_kernel(x_ref, dy_ref, b_ref, c_ref, hp_ref, dh_ref, cs_ref, dt_ref, d_ref,
               dx_ref, dda_ref, xdx_ref, dd_ref,
               x_s, dy_s, b_s, c_s, hp_s, dh_s, cs_s, dt_s, d_s, u_s, dx_s, dda_s, xdx_s,
               dd_s, bar_a, bar_b, bar_c, *a_s, q, rep, idx=None):
    """One (batch, chunk, head). Three TMA groups on three barriers (bar_b and bar_c may be
    bar_a: one wait for everything): C, B, cs, dt, D first (C B^T, B C^T and the decays start
    while the rest flies), then dy and x, then h_prev and dh."""
    wg = plgpu.Layout.WGMMA
    rows_l, cols_l = wg.reduce(1), wg.reduce(0)
    bi, c, hi = idx or (lax.axis_index("b"), lax.axis_index("c"), lax.axis_index("h"))
    gi = lax.div(hi, rep)
    t = pl.ds(c * q, q)
    dtype = x_s.dtype
    p = x_s.shape[-1]
    plgpu.copy_gmem_to_smem(c_ref.at[bi, t, gi], c_s, bar_a)
    plgpu.copy_gmem_to_smem(b_ref.at[bi, t, gi], b_s, bar_a)
    plgpu.copy_gmem_to_smem(cs_ref.at[bi, hi, t], cs_s, bar_a)
    plgpu.copy_gmem_to_smem(dt_ref.at[bi, hi, t], dt_s, bar_a)
    plgpu.copy_gmem_to_smem(d_ref.at[hi], d_s, bar_a)
    plgpu.copy_gmem_to_smem(dy_ref.at[bi, t, hi], dy_s, bar_b)
    plgpu.copy_gmem_to_smem(x_ref.at[bi, t, hi], x_s, bar_b)
    plgpu.copy_gmem_to_smem(hp_ref.at[bi, c, hi], hp_s, bar_c)
    plgpu.copy_gmem_to_smem(dh_ref.at[bi, c, hi], dh_s, bar_c)
    split = bar_b is not bar_a

    sq = (q, q)
    sp_ = (q, p)
    ii = plgpu.broadcasted_iota(jnp.int32, sq, 0, layout=wg)
    jj = plgpu.broadcasted_iota(jnp.int32, sq, 1, layout=wg)
    # U_jk = [j < k]: e U is the exclusive row cumsum of e (filled while the copies fly).
    u_s[...] = jnp.where(ii < jj, 1.0, 0.0).astype(dtype)
    plgpu.commit_smem()

    lhs = functools.partial(_lhs, a_s)

    def bc_rows(v, shape):
        return lax.broadcast_in_dim(v, shape, [0])

    def bc_cols(v, shape):
        return lax.broadcast_in_dim(v, shape, [1])

    plgpu.barrier_wait(bar_a)
    cs_r = plgpu.load(cs_s, layout=rows_l)
    cs_c = plgpu.load(cs_s, layout=cols_l)
    causal = ii >= jj

    def decays():
        # decay[i, j] = exp(cs_i - cs_j) for i >= j; decay^T[r, s] = exp(cs_s - cs_r), s >= r.
        return (jnp.exp2(jnp.where(causal, bc_rows(cs_r, sq) - bc_cols(cs_c, sq), -jnp.inf)),
                jnp.exp2(jnp.where(jj >= ii, bc_cols(cs_c, sq) - bc_rows(cs_r, sq), -jnp.inf)))

    cb, cb_t, (decay, decay_t) = _mm((c_s, b_s.T, sq), (b_s, c_s.T, sq), between=decays)
    m = cb * decay                                                     # C B^T o decay
    m_t = cb_t * decay_t                                               # its transpose
    if split:
        plgpu.barrier_wait(bar_b)
    dxdt, dyx = _mm((lhs(m_t.astype(dtype), 0), dy_s, sp_), (dy_s, x_s.T, sq))
    dt_c = plgpu.load(dt_s, layout=cols_l)
    e = dyx * bc_cols(dt_c, sq) * m                                    # dm o M, dm = dy (dt x)^T
    e_hi = e.astype(dtype)
    e_lo = (e - e_hi.astype(F32)).astype(dtype)
    eu = _mm((((lhs(e_hi, 1), u_s), (lhs(e_lo, 2), u_s)), sq))        # sum_{j<k} e_ik
    if split:
        plgpu.barrier_wait(bar_c)
    ch, bdh = _mm((c_s, hp_s.T, sp_), (b_s, dh_s.T, sp_))            # C h_prev^T, B dh^T
    tr = _mm((dh_s, hp_s.T, (p, p)))                                   # dh h_prev^T
    dout = plgpu.load(dy_s, layout=wg).astype(F32)
    xf = plgpu.load(x_s, layout=wg).astype(F32)
    dt_r = plgpu.load(dt_s, layout=rows_l)
    total = cs_s[q - 1]
    ecs = jnp.exp2(cs_r)
    w = jnp.exp2(total - cs_r)
    t_inter = ecs * jnp.sum(dout * ch, axis=1)
    dxdt = dxdt + bc_rows(w, sp_) * bdh
    f_write = w * dt_r * jnp.sum(xf * bdh, axis=1)
    pp = (p, p)
    diag = jnp.where(plgpu.broadcasted_iota(jnp.int32, pp, 0, layout=wg)
                     == plgpu.broadcasted_iota(jnp.int32, pp, 1, layout=wg), tr, 0.0)
    s_prev = jnp.exp2(total) * jnp.sum(jnp.sum(diag, axis=1))
    tt = jnp.where(causal, eu + bc_rows(t_inter, sq), bc_rows(f_write, sq))
    dda_s[...] = jnp.sum(tt, axis=0) + s_prev
    xdx_s[...] = jnp.sum(xf * dxdt, axis=1)
    dd_s[...] = jnp.sum(dout * xf, axis=0)
    d_c = plgpu.load(d_s, layout=cols_l)
    dx_s[...] = (dxdt * bc_rows(dt_r, sp_) + bc_cols(d_c, sp_) * dout).astype(dx_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dx_s, dx_ref.at[bi, t, hi], commit_group=False)
    plgpu.copy_smem_to_gmem(dda_s, dda_ref.at[bi, hi, t], commit_group=False)
    plgpu.copy_smem_to_gmem(xdx_s, xdx_ref.at[bi, hi, t], commit_group=False)
    plgpu.copy_smem_to_gmem(dd_s, dd_ref.at[bi, c, hi], commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0)


def _one_barrier(*refs, **kw):
    """`_dx_kernel` with one barrier for every copy (after the scratch: bar, then a_s)."""
    refs = list(refs)
    i = 13 + 14          # inputs (9) + outputs (4), then 14 scratch refs before the barrier
    bar = refs[i]
    return _dx_kernel(*refs[:i], bar, bar, bar, *refs[i + 1:], **kw)


def dx_call(x, dt, A, B, C, D, states, dstates, dy, *, q, interpret, split_loads=True):
    """The split3 dx pass: returns dx, ddt (B, Lp, H) f32, dz (None), dA (B, 1, H, 16) and
    dD (B, nc, H, P) partials, the tuple `ssd_long._dx_call` returns (z must be None)."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    dtype = x.dtype
    dt_t, cs = _dx_cs(dt, A, q)
    scratch = _dx_scratch(q, p, n, dtype, split_loads, interpret)
    out_type = _dx_out_type(x, q)
    kern = plgpu.kernel(
        functools.partial(_dx_kernel if split_loads else _one_barrier, q=q, rep=h // g),
        out_type=out_type, scratch_types=scratch, grid=(b, nc, h), grid_names=("b", "c", "h"),
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="ssd_bwd_dx_mgpu")
    outs = kern(x, dy.astype(dtype), B, C, states.astype(dtype), dstates.astype(dtype), cs,
                dt_t, D.astype(F32))
    return _dx_finish(outs, A, dt_t)


def _dx_cs(dt, A, q):
    """dt (B, Lp, H) -> dt (B, H, Lp) and cs, the chunk-local inclusive cumsum of dt A in
    log2 units (B, H, Lp)."""
    b, lp, h = dt.shape
    dt_t = jnp.swapaxes(dt, 1, 2)                                       # (B, H, Lp)
    da = (dt_t * A.astype(F32)[None, :, None]).reshape(b, h, lp // q, q)
    return dt_t, (jnp.cumsum(da, axis=-1) * LOG2E).reshape(b, h, lp)


def _dx_out_type(x, q=64):
    b, lp, h, p = x.shape
    return (jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((b, h, lp), F32),
            jax.ShapeDtypeStruct((b, h, lp), F32),
            jax.ShapeDtypeStruct((b, lp // q, h, p), F32))


def _dx_finish(outs, A, dt_t):
    dx, dda, xdx, dd = outs
    b, h, _ = dda.shape
    ddt = jnp.swapaxes(A.astype(F32)[None, :, None] * dda + xdx, 1, 2)
    da_sum = jnp.sum(dda * dt_t, axis=2)                                # (B, H)
    da_out = jnp.broadcast_to(da_sum[:, None, :, None], (b, 1, h, 16))
    return dx, ddt, None, da_out, dd


def _dx_scratch(q, p, n, dtype, split_loads, interpret):
    vec = plgpu.SMEM((q,), F32)
    scratch = [_smem((q, p), dtype), _smem((q, p), dtype), _smem((q, n), dtype),
               _smem((q, n), dtype), _smem((p, n), dtype), _smem((p, n), dtype),
               vec, vec, plgpu.SMEM((p,), F32), _smem((q, q), dtype), _smem((q, p), dtype),
               vec, vec, plgpu.SMEM((p,), F32)]
    # split_loads (`BlockSizes.mgpu_dx_split_loads`): three TMA groups on three barriers;
    # else one barrier for all nine copies (the kernel passes it three times).
    scratch += ([plgpu.Barrier(num_arrivals=5), plgpu.Barrier(num_arrivals=2),
                 plgpu.Barrier(num_arrivals=2)] if split_loads
                else [plgpu.Barrier(num_arrivals=9)])
    if interpret:
        scratch += [_smem((q, q), dtype)] * 3
    return scratch


# --------------------------------------------------------------------------------------------
# dB/dC pass (split3 pass 3) on Mosaic GPU.
# --------------------------------------------------------------------------------------------
DBC_NB = 64      # d_state columns per CTA


def dbc_supports(x, B, q):
    """The shapes and dtypes the Mosaic dB/dC kernel covers (else the Triton kernel runs)."""
    if not AVAILABLE:
        return False
    p, n = x.shape[-1], B.shape[-1]
    return (x.dtype in (jnp.bfloat16, jnp.float16) and B.dtype == x.dtype and q == 64
            and p == 64 and n % DBC_NB == 0)


def _dbc_kernel(x_ref, dy_ref, b_ref, c_ref, hp_ref, dh_ref, cs_ref, dt_ref,
                db_ref, dc_ref,
                x_s, dy_s, hp_s, dh_s, cs_s, dt_s, b_s, c_s, dcb_s, ob_s, oc_s, bars, bar_bc,
                *a_s, q, rep, nnb, slots, idx=None):
    """One (batch, chunk, group, block of DBC_NB d_state columns): a loop over the group's
    heads with the per-head tiles (x, dy, h_prev and dL/dh column blocks, cs, dt) in a ring of
    `slots` TMA buffers, the next heads' copies flying during this head's math. Three f32
    accumulators in registers: d(C B^T) = sum_h (dy x^T o dt_j) o decay (elementwise), and the
    wgmma accumulators dB += (exp2(cs_Q - cs) dt x)_h dh_h, dC += (exp2(cs) dy)_h h_prev_h.
    After the loop dB += d(C B^T)^T C and dC += d(C B^T) B; both are written in B's dtype
    (no per-head-block partials)."""
    wg = plgpu.Layout.WGMMA
    rows_l, cols_l = wg.reduce(1), wg.reduce(0)
    bi, c, k = idx or (lax.axis_index("b"), lax.axis_index("c"), lax.axis_index("k"))
    gi = lax.div(k, nnb)
    cols = pl.ds(lax.rem(k, nnb) * DBC_NB, DBC_NB)
    t = pl.ds(c * q, q)
    dtype = x_s.dtype
    nb = DBC_NB

    def fetch(j, slot):
        hi = gi * rep + j
        bar = bars.at[slot]
        plgpu.copy_gmem_to_smem(x_ref.at[bi, t, hi], x_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(dy_ref.at[bi, t, hi], dy_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(hp_ref.at[bi, c, hi, :, cols], hp_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(dh_ref.at[bi, c, hi, :, cols], dh_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(cs_ref.at[bi, hi, t], cs_s.at[slot], bar)
        plgpu.copy_gmem_to_smem(dt_ref.at[bi, hi, t], dt_s.at[slot], bar)

    for j in range(min(max(slots - 1, 1), rep)):
        fetch(j, j)
    plgpu.copy_gmem_to_smem(b_ref.at[bi, t, gi, cols], b_s, bar_bc)
    plgpu.copy_gmem_to_smem(c_ref.at[bi, t, gi, cols], c_s, bar_bc)

    sq = (q, q)
    ii = plgpu.broadcasted_iota(jnp.int32, sq, 0, layout=wg)
    jj = plgpu.broadcasted_iota(jnp.int32, sq, 1, layout=wg)
    causal = ii >= jj

    lhs = functools.partial(_lhs, a_s)

    def scoped(acc_b, acc_c):
        def head(j, dcb):
            slot = lax.rem(j, slots)
            plgpu.barrier_wait(bars.at[slot])
            dyx = _mm((dy_s.at[slot], x_s.at[slot].T, sq))          # also waits head j-1's dots

            if slots > 1:
                @pl.when(j + slots - 1 < rep)
                def _():
                    # The slot of head j - 1, whose wgmmas the wait above retired.
                    fetch(j + slots - 1, lax.rem(j + slots - 1, slots))

            cs_r = plgpu.load(cs_s.at[slot], layout=rows_l)
            cs_c = plgpu.load(cs_s.at[slot], layout=cols_l)
            dt_c = plgpu.load(dt_s.at[slot], layout=cols_l)
            dt_r = plgpu.load(dt_s.at[slot], layout=rows_l)
            total = cs_s[slot, q - 1]
            decay = jnp.exp2(jnp.where(causal, lax.broadcast_in_dim(cs_r, sq, [0])
                                       - lax.broadcast_in_dim(cs_c, sq, [1]), -jnp.inf))
            dcb = dcb + dyx * lax.broadcast_in_dim(dt_c, sq, [1]) * decay
            sp = (q, x_s.shape[-1])
            xf = plgpu.load(x_s.at[slot], layout=wg).astype(F32)
            dout = plgpu.load(dy_s.at[slot], layout=wg).astype(F32)
            u = xf * lax.broadcast_in_dim(dt_r * jnp.exp2(total - cs_r), sp, [0])
            v = dout * lax.broadcast_in_dim(jnp.exp2(cs_r), sp, [0])
            plgpu.wgmma(acc_b, lhs(u.astype(dtype), 0), dh_s.at[slot])
            plgpu.wgmma(acc_c, lhs(v.astype(dtype), 1), hp_s.at[slot])
            if slots == 1:
                plgpu.wgmma_wait(0)

                @pl.when(j + 1 < rep)
                def _():
                    fetch(j + 1, 0)
            return dcb

        dcb = lax.fori_loop(0, rep, head, plgpu.layout_cast(jnp.zeros(sq, F32), wg))
        dcb_c = dcb.astype(dtype)
        dcb_s[...] = dcb_c
        plgpu.commit_smem()
        plgpu.barrier_wait(bar_bc)
        plgpu.wgmma(acc_b, dcb_s.T, c_s)                               # d(C B^T)^T C
        plgpu.wgmma(acc_c, lhs(dcb_c, 2), b_s)                         # d(C B^T) B
        return acc_b[...], acc_c[...]

    db, dcv = pl.run_scoped(scoped, plgpu.ACC((q, nb), F32), plgpu.ACC((q, nb), F32))
    ob_s[...] = db.astype(ob_s.dtype)
    oc_s[...] = dcv.astype(oc_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(ob_s, db_ref.at[bi, t, gi, cols], commit_group=False)
    plgpu.copy_smem_to_gmem(oc_s, dc_ref.at[bi, t, gi, cols], commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0)


def dbc_call(x, dt, A, B, C, states, dstates, dy, *, q, interpret, slots=2):
    """The split3 dB/dC pass: dB, dC (B, Lp, G, N) in B's dtype, summed over each group's
    heads in the kernel (z must be None)."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    nnb = n // DBC_NB
    dtype = x.dtype
    dt_t, cs = _dx_cs(dt, A, q)
    slots = max(1, min(slots, h // g))
    scratch = _dbc_scratch(q, p, dtype, slots, interpret)
    out = jax.ShapeDtypeStruct(B.shape, B.dtype)
    kern = plgpu.kernel(
        functools.partial(_dbc_kernel, q=q, rep=h // g, nnb=nnb, slots=slots),
        out_type=(out, out), scratch_types=scratch, grid=(b, nc, g * nnb),
        grid_names=("b", "c", "k"),
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="ssd_bwd_dbc_mgpu")
    return kern(x, dy.astype(dtype), B, C, states.astype(dtype), dstates.astype(dtype), cs, dt_t)


def _dbc_scratch(q, p, dtype, slots, interpret):
    ring = lambda shape: _smem((slots, *shape), dtype)
    scratch = [ring((q, p)), ring((q, p)), ring((p, DBC_NB)), ring((p, DBC_NB)),
               plgpu.SMEM((slots, q), F32), plgpu.SMEM((slots, q), F32),
               _smem((q, DBC_NB), dtype), _smem((q, DBC_NB), dtype), _smem((q, q), dtype),
               _smem((q, DBC_NB), dtype), _smem((q, DBC_NB), dtype),
               plgpu.Barrier(num_arrivals=6, num_barriers=slots),
               plgpu.Barrier(num_arrivals=2)]
    if interpret:
        scratch += [_smem((q, p), dtype), _smem((q, p), dtype), _smem((q, q), dtype)]
    return scratch


def _fused_kernel(x_ref, dy_ref, b_ref, c_ref, hp_ref, dh_ref, cs_ref, dt_ref, d_ref,
                  dx_ref, dda_ref, xdx_ref, dd_ref, db_ref, dc_ref,
                  *, q, rep, nk, nnb, slots, dx_scratch, dbc_scratch, split_loads,
                  lead=None, nc=None, nb=None, nh=None):
    """`_dbc_kernel` where the grid's last index k < nk (= groups x column blocks), else
    `_dx_kernel` for head k - nk: one launch, each CTA with its own kernel's shared memory
    (run_scoped in the two branches of a cond: the larger of the two is reserved).
    With `lead` (not None) the grid is one axis "i" over nb * nc (batch, chunk) groups, in
    order: the dB/dC CTAs of the first `lead` groups, then per group t the dB/dC CTAs of
    group t + lead (while there is one) and the dx CTAs of group t (`_lead_index`)."""
    if lead is None:
        bi, c, k = lax.axis_index("b"), lax.axis_index("c"), lax.axis_index("k")
        is_dbc = k < nk
        dbc_idx = (bi, c, k)
        dx_idx = (bi, c, k - nk)
    else:
        is_dbc, (gd, kd), (gx, hx) = _lead_index(lax.axis_index("i"), nk=nk, h=nh,
                                                 t_all=nb * nc, lead=lead)
        dbc_idx = (lax.div(gd, nc), lax.rem(gd, nc), kd)
        dx_idx = (lax.div(gx, nc), lax.rem(gx, nc), hx)

    @pl.when(is_dbc)
    def _():
        def dbc(*scr):
            _dbc_kernel(x_ref, dy_ref, b_ref, c_ref, hp_ref, dh_ref, cs_ref, dt_ref, db_ref,
                        dc_ref, *scr, q=q, rep=rep, nnb=nnb, slots=slots, idx=dbc_idx)
        pl.run_scoped(dbc, *dbc_scratch)

    @pl.when(jnp.logical_not(is_dbc))
    def _():
        def dx(*scr):
            scr = list(scr)
            if not split_loads:          # one barrier for every copy, passed three times
                scr = scr[:14] + [scr[14]] * 3 + scr[15:]
            _dx_kernel(x_ref, dy_ref, b_ref, c_ref, hp_ref, dh_ref, cs_ref, dt_ref, d_ref,
                       dx_ref, dda_ref, xdx_ref, dd_ref, *scr, q=q, rep=rep, idx=dx_idx)
        pl.run_scoped(dx, *dx_scratch)


def _lead_index(i, *, nk, h, t_all, lead):
    """Linear CTA index i -> (is_dbc, (dB/dC group, column block k), (dx group, head)) for
    the `lead` order of `_fused_kernel` (groups = batch * n_chunks + chunk). Works on Python
    ints (tests) and int32 scalars (the kernel); every quotient has a non-negative dividend."""
    is_int = isinstance(i, int)
    sel = (lambda c, a, b: a if c else b) if is_int else lax.select
    div = (lambda a, b: a // b) if is_int else lax.div
    rem = (lambda a, b: a % b) if is_int else lax.rem
    mx = max if is_int else jnp.maximum
    d = min(lead, t_all)
    w = nk + h
    p0 = d * nk                      # the lead groups' dB/dC CTAs
    e = (t_all - d) * w              # groups 0 .. t_all - d - 1: dB/dC of t + d, dx of t
    head = i < p0
    j = mx(i - p0, 0)
    in_mid = (i >= p0) & (j < e) if not is_int else (i >= p0 and j < e)
    t, r = div(j, w), rem(j, w)
    j2 = mx(j - e, 0)
    is_dbc = (head | (in_mid & (r < nk))) if not is_int else (head or (in_mid and r < nk))
    g_dbc = sel(head, div(i, nk), t + d)
    k_dbc = sel(head, rem(i, nk), r)
    g_dx = sel(in_mid, t, t_all - d + div(j2, h))
    h_dx = sel(in_mid, r - nk, rem(j2, h))
    return is_dbc, (g_dbc, k_dbc), (g_dx, h_dx)


def dx_dbc_call(x, dt, A, B, C, D, states, dstates, dy, *, q, interpret, split_loads=True,
                slots=2, lead=0):
    """The dx and dB/dC passes in one launch (`BlockSizes.mgpu_fused`): per (batch, chunk),
    the G x N / DBC_NB dB/dC CTAs first, then the H dx CTAs, so both kinds share the SMs
    (and the chunk's tiles in L2). Returns `dx_call`'s tuple, then dB, dC.
    lead (`BlockSizes.mgpu_dbc_lead`) > 0: the long dB/dC CTAs (a 32-head loop, ~10x a dx
    CTA) run `lead` (batch, chunk) groups ahead of the dx CTAs (one grid axis, see
    `_lead_index`), so that the last CTAs to start are short dx ones, not dB/dC ones that
    would run on alone at the end (the tail). A short lead pays (H100 runs 21-22 at L: 16
    best), a long one loses the L2 sharing of each chunk's tiles (64: +0.03 ms, all dB/dC
    CTAs first: +0.09 ms over lead 0)."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    nnb = n // DBC_NB
    dtype = x.dtype
    dt_t, cs = _dx_cs(dt, A, q)
    slots = max(1, min(slots, h // g))
    out = jax.ShapeDtypeStruct(B.shape, B.dtype)
    if lead:
        grid, names = (b * nc * (g * nnb + h),), ("i",)
        lead_kw = dict(lead=lead, nc=nc, nb=b, nh=h)
    else:
        grid, names, lead_kw = (b, nc, g * nnb + h), ("b", "c", "k"), {}
    kern = plgpu.kernel(
        functools.partial(_fused_kernel, q=q, rep=h // g, nk=g * nnb, nnb=nnb, slots=slots,
                          dx_scratch=_dx_scratch(q, p, n, dtype, split_loads, interpret),
                          dbc_scratch=_dbc_scratch(q, p, dtype, slots, interpret),
                          split_loads=split_loads, **lead_kw),
        out_type=(*_dx_out_type(x, q), out, out), grid=grid, grid_names=names,
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="ssd_bwd_dx_dbc_mgpu")
    *outs, db, dc = kern(x, dy.astype(dtype), B, C, states.astype(dtype), dstates.astype(dtype),
                         cs, dt_t, D.astype(F32))
    return (*_dx_finish(outs, A, dt_t), db, dc)
