"""SSD Pallas kernels (Triton backend) for sequences of several chunks.

Shape legend: x, z: (B, L, H, P)  dt: (B, L, H)  A: (H,)  B, C: (B, L, G, N)  state: (B, H, P, N)
Operands arrive padded by `kernels.ssd.ssd_pallas`: Lp a multiple of the kernel chunk Q, P
and N powers of two >= 16, dt after bias and softplus (padding steps have dt = 0).
Forward (`_ssd_fwd_kernel`): one program per (batch, head), a sequential loop over chunks
with the (P, N) state in registers; under `jax.grad` it also writes the chunk-entry states.
Backward (`BlockSizes.bwd`): "split3" (default; a dL/dh pass, a dx pass, a dB/dC pass),
"split" or "fused"; see `BlockSizes` and benchmarks/NOTES_ssd.md. The split3 dx and dB/dC
passes run on the Mosaic GPU backend, as one launch, where `kernels.ssd_mgpu.supports` and
`dbc_supports` hold (`BlockSizes.dx_backend`, `dbc_backend`, `mgpu_fused`).
Entry point: `_ssd_core` (a `jax.custom_vjp`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.ssd_common import _dot, _largest_divisor_at_most, _pallas_call


LOG2E = 1.4426950408889634


def _decay(cs, causal, exp2=False):
    """(Q, Q) exp(cs_i - cs_j) where causal, else 0. The exponent is masked, never the product:
    exp(cs_i) * exp(-cs_j) overflows within a chunk. exp2: as exp2((cs_i - cs_j) log2 e) with
    cs scaled first (`BlockSizes.fast_exp`): one MUFU.EX2 per element instead of expf's
    range reduction (~8 instructions), on the largest elementwise op of the chunk kernels."""
    if exp2:
        cs2 = cs * LOG2E
        return jnp.exp2(jnp.where(causal, cs2[:, None] - cs2[None, :], -jnp.inf))
    return jnp.exp(jnp.where(causal, cs[:, None] - cs[None, :], -jnp.inf))


def _chunk_common(dt, a, C, B, q, exp2=False):
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
    decay = _decay(cs, causal, exp2)
    cb = _dot(C, B, ((1,), (1,)))
    return cs, total, causal, decay, cb


def _pair_dda(e, t_inter, causal, dot_dtype, by_dot):
    """sum_{i >= k} (sum_{j < k} e_ij + t_inter_i) for every k: the pair and inter-chunk parts
    of d(dA_k) (cs_i - cs_j depends on dA_k for j < k <= i, cs_i for k <= i). e: (Q, Q) f32,
    zero above the diagonal; t_inter: (Q,) f32.
    Default: an exclusive row cumsum under the causal mask and a column sum (a layout
    conversion of the tile each way and a cross-warp reduction). by_dot (16-bit dot_dtype
    only, `BlockSizes.dda_dot`): g = L^T e on the tensor cores with the 0/1 matrix
    L_ik = [i >= k] and e split into two 16-bit parts (hi + lo = e to ~2^-16 relative), then
    one row sum over c of g_kc (c < k) or t_inter_c (c >= k), within each warp. Both sum the
    same terms (never the cancelling out * dout - ddt * dt identity)."""
    if not by_dot:
        excl = jnp.cumsum(e, axis=1) - e                                     # sum_{j<k} e_ik
        return jnp.sum(jnp.where(causal, excl + t_inter[:, None], 0.0), axis=0)
    q = e.shape[0]
    kdx = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    cdx = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    lt = (cdx >= kdx).astype(dot_dtype)                                      # [k, i] = [i >= k]
    e_hi = e.astype(dot_dtype)
    e_lo = (e - e_hi.astype(jnp.float32)).astype(dot_dtype)
    g = _dot(lt, e_hi) + _dot(lt, e_lo)                                      # [k, j]
    return jnp.sum(jnp.where(cdx < kdx, g, t_inter[None, :]), axis=1)


def _ssd_fwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, h0_ref,
                    y_ref, hT_ref, st_ref, *, q, nc, rep, store_at_exit=False, exp2=False):
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
        cs, total, _, decay, cb = _chunk_common(dt, a, Cc, Bc, q, exp2)
        xf = x.astype(jnp.float32)
        xdt = xf * dt[:, None]
        y = _dot((cb * decay).astype(dot_dtype), xdt.astype(dot_dtype))
        y = y + jnp.exp(cs)[:, None] * _dot(Cc, h.astype(dot_dtype), ((1,), (1,)))
        y = y + d[None, :] * xf
        if z_ref is not None:
            zf = z_ref[bi, t, hi, :].astype(jnp.float32)
            y = y * (zf * jax.nn.sigmoid(zf))
        y_ref[bi, t, hi, :] = y.astype(y_ref.dtype)
        if st_ref is not None and not store_at_exit:
            st_ref[bi, c, hi, :, :] = h.astype(st_ref.dtype)
        w = jnp.exp(total - cs)
        h_next = jnp.exp(total) * h + _dot((xdt * w[:, None]).astype(dot_dtype), Bc,
                                           ((0,), (0,)))
        if st_ref is not None and store_at_exit:
            # The entry state of chunk c + 1, stored after this chunk's dots.
            @pl.when(c + 1 < nc)
            def _():
                st_ref[bi, c + 1, hi, :, :] = h_next.astype(st_ref.dtype)
        return h_next

    # h0_ref None: a zero entry state; hT_ref None: the final state is not wanted.
    h0 = (jnp.zeros(y_ref.shape[3:] + c_ref.shape[3:], jnp.float32) if h0_ref is None
          else h0_ref[bi, hi, :, :])
    if st_ref is not None and store_at_exit:
        st_ref[bi, 0, hi, :, :] = h0.astype(st_ref.dtype)
    hT = jax.lax.fori_loop(0, nc, body, h0)
    if hT_ref is not None:
        hT_ref[bi, hi, :, :] = hT


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

    # dhT_ref None: a zero final-state cotangent; dh0_ref None: no initial state to return to.
    dh_T = (jnp.zeros(dst_ref.shape[3:], f32) if dhT_ref is None
            else dhT_ref[bi, hi, :, :])
    dh0 = jax.lax.fori_loop(0, nc, body, dh_T)
    if dh0_ref is not None:
        dh0_ref[bi, hi, :, :] = dh0


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
                       dy_ref, sp_ref, dx_ref, ddt_ref, dz_ref, da_ref, dd_ref, *, q, rep,
                       heads_fastest, exp2=False, dda_dot=False, s_prev="dx"):
    """Three-kernel backward, pass 2: one program per (batch, chunk, head), no accumulators.

    Shapes as in `_ssd_bwd_chunk_kernel`; writes dx, ddt, dz, dA (B, nc, H, 16), dD
    (B, nc, H, P). The (Q, N) products of the head-block kernel are replaced by (Q, P) ones
    (t_inter from C h_prev^T), which keeps the live set small enough not to spill at P=64,
    N=128; dB and dC come from `_ssd_bwd_dbc_kernel`. Grid (H, nc, B) with heads_fastest
    (axis 0 is the hardware's fastest: one chunk's heads run together and share B, C in
    L2), else (B, nc, H).
    s_prev = exp(cs_Q) <dL/dh_c, h_prev> (the state-decay part of d(dA)): "dx" as an
    elementwise (P, N) product here (both tiles stay live in registers), "dot" as the trace
    of dh h_prev^T on the tensor cores (operands already in shared memory; 16-bit states
    only, `_trace_dot`), "dbc" read from
    sp (B, nc, H, 16), written by `_ssd_bwd_dbc_kernel` (which then runs first).
    exp2, dda_dot: `_decay`, `_pair_dda` (`BlockSizes.fast_exp`, `BlockSizes.dda_dot`).
    """
    bi, c, hi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if heads_fastest:
        bi, hi = hi, bi
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
    cs, total, causal, decay, cb = _chunk_common(dt, a, Cc, Bc, q, exp2)
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
    if s_prev == "dbc":
        sp = sp_ref[bi, c, hi, pl.ds(0, 16)]
        sp = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, (16,), 0) == 0, sp, 0.0))
    elif s_prev == "dot":
        sp = jnp.exp(total) * _trace_dot(dh, h_prev)
    else:
        sp = jnp.exp(total) * jnp.sum(dh.astype(f32) * h_prev.astype(f32))
    dda = _pair_dda(dm * m, t_inter, causal, dot_dtype, dda_dot)
    dda = dda + (jnp.cumsum(f_write) - f_write) + sp
    ddt_ref[bi, t, hi] = a * dda + jnp.sum(xf * dxdt, axis=1)
    dx_ref[bi, t, hi, :] = (dxdt * dt[:, None] + d[None, :] * dout).astype(dx_ref.dtype)
    da_ref[bi, c, hi, :] = jnp.full((16,), jnp.sum(dda * dt), f32)


def _trace_dot(u, v):
    """sum(u * v) of two (P, N) tiles as the trace of u v^T (one tensor-core dot, f32
    accumulation of the exact products of 16-bit operands) and a diagonal mask. f32 tiles
    take the elementwise sum (an f32 dot would run as TF32 on the GPU)."""
    if u.dtype == jnp.float32:
        return jnp.sum(u * v.astype(jnp.float32))
    uv = _dot(u, v, ((1,), (1,)))
    pdx = jax.lax.broadcasted_iota(jnp.int32, uv.shape, 0)
    qdx = jax.lax.broadcasted_iota(jnp.int32, uv.shape, 1)
    return jnp.sum(jnp.where(pdx == qdx, uv, 0.0))


def _ssd_bwd_dbc_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, z_ref, st_ref, dst_ref, dy_ref,
                        db_ref, dc_ref, sp_ref, *, q, hb, rep, exp2=False):
    """Three-kernel backward, pass 3: dB, dC per (batch, chunk, block of hb heads of a group).

    dB = sum_h [ (d(C B^T)_h)^T C + (exp(cs_Q - cs) o dt x)_h dh_h ]
    dC = sum_h [ d(C B^T)_h B + (exp(cs) o dy_core)_h h_prev_h ]
    A matmul K-loop over the block's heads: only the three accumulators are carried.
    Outputs dB, dC: (B, Lp, H // hb, N) f32 partials; sp (optional, B, nc, H, 16): 16 copies
    of s_prev = exp(cs_Q) <dh_h, h_prev_h> per head for the dx pass (`BlockSizes.s_prev`), as
    the trace of dh h_prev^T: both tiles are in shared memory here already.
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
        decay = _decay(cs, causal, exp2)
        dm = _dot(dout.astype(dot_dtype), xdt.astype(dot_dtype), ((1,), (1,)))
        u = (xdt * jnp.exp(total - cs)[:, None]).astype(dot_dtype)
        v = (dout * jnp.exp(cs)[:, None]).astype(dot_dtype)
        dh = dst_ref[bi, c, hi, :, :]
        h_prev = st_ref[bi, c, hi, :, :]
        if sp_ref is not None:
            sp_ref[bi, c, hi, :] = jnp.full((16,), jnp.exp(total) * _trace_dot(dh, h_prev), f32)
        return (dcb_acc + dm * decay,
                db_acc + _dot(u, dh),
                dc_acc + _dot(v, h_prev))

    n = b_ref.shape[-1]
    init = (jnp.zeros((q, q), f32), jnp.zeros((q, n), f32), jnp.zeros((q, n), f32))
    dcb, db, dc = jax.lax.fori_loop(0, hb, head, init)
    dcb_c = dcb.astype(dot_dtype)
    db_ref[bi, t, blk, :] = db + _dot(dcb_c, c_ref[bi, t, gi, :], ((0,), (0,)))
    dc_ref[bi, t, blk, :] = dc + _dot(dcb_c, b_ref[bi, t, gi, :])


def _fast_exp(bs, x):
    """`BlockSizes.fast_exp` applies to 16-bit inputs: with float32 ones it made the L
    backward slower on the H100 (run 14: fwd+bwd 10.59 vs 9.12 ms at b8 L4096 h32 p64 n128)."""
    return bs.fast_exp and x.dtype != jnp.float32


def _fwd_call(x, dt, A, B, C, D, z, h0, *, q, bs, interpret, save_states, want_hT=True):
    """Launches `_ssd_fwd_kernel` on padded operands; returns y, hT [, chunk-entry states].
    h0 None: a zero initial state (no zeros array in memory); want_hT False: hT is None."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    # Chunk-entry states stored in the input dtype: bf16 states halve the largest residual and
    # stay within the bf16 tolerance (they only feed C h^T and d(dA) terms of one chunk).
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((b, h, p, n), jnp.float32) if want_hT else None,
                 jax.ShapeDtypeStruct((b, nc, h, p, n), x.dtype) if save_states else None]
    kernel = functools.partial(_ssd_fwd_kernel, q=q, nc=nc, rep=h // g,
                               store_at_exit=bs.state_store_at_exit, exp2=_fast_exp(bs, x))
    res = _pallas_call(kernel, [x, dt, A, B, C, D, z, h0], out_shape, (b, h), bs.num_warps_fwd,
                       bs.num_stages, interpret, "ssd_fwd")
    return tuple(res if save_states else res[:2])


def _bwd_call(x, dt, A, B, C, D, z, states, dy, dhT, *, q, bs, interpret):
    """Launches `_ssd_bwd_kernel`; returns padded-shape gradients (per-head dB/dC partials)."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    part = x.dtype      # per-head dB/dC partials: f32 for f32 inputs, bf16 halves the traffic
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),                 # dx
                 jax.ShapeDtypeStruct((b, lp, h), jnp.float32),          # ddt
                 jax.ShapeDtypeStruct((b, lp, h, n), part),              # dB partials
                 jax.ShapeDtypeStruct((b, lp, h, n), part),              # dC partials
                 None if z is None else jax.ShapeDtypeStruct(z.shape, z.dtype),   # dz
                 jax.ShapeDtypeStruct((b, h, 16), jnp.float32),          # dA (16 copies)
                 jax.ShapeDtypeStruct((b, h, p), jnp.float32),           # dD
                 jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)]        # dh0
    return tuple(_pallas_call(
        functools.partial(_ssd_bwd_kernel, q=q, nc=nc, rep=h // g),
        [x, dt, A, B, C, D, z, states, dy, dhT], out_shape, (b, h), bs.num_warps_bwd,
        bs.num_stages, interpret, "ssd_bwd"))


def _dstate_call(dt, A, C, z, dy, dhT, *, states_dtype, q, bs, interpret, want_dh0=True):
    """Launches `_ssd_bwd_dstate_kernel`; returns dL/dh at every chunk end (B, nc, H, P, N)
    in states_dtype, and dh0 (B, H, P, N) f32 (None unless want_dh0). dhT None: zero."""
    b, lp, h, p = dy.shape
    g, n = C.shape[2:]
    nc = lp // q
    return _pallas_call(
        functools.partial(_ssd_bwd_dstate_kernel, q=q, nc=nc, rep=h // g),
        [dt, A, C, z, dy, dhT],
        [jax.ShapeDtypeStruct((b, nc, h, p, n), states_dtype),
         jax.ShapeDtypeStruct((b, h, p, n), jnp.float32) if want_dh0 else None],
        (b, h), bs.num_warps_dstate or bs.num_warps_fwd, bs.num_stages, interpret,
        "ssd_bwd_dstate")


def _bwd_split_call(x, dt, A, B, C, D, z, states, dy, dhT, *, q, bs, interpret,
                    want_dh0=True):
    """Launches the two split-backward kernels; returns the same tuple as `_bwd_call`."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    rep = h // g
    hb = _largest_divisor_at_most(rep, bs.bwd_heads)
    f32 = jnp.float32

    dstates, dh0 = _dstate_call(dt, A, C, z, dy, dhT, states_dtype=states.dtype, q=q, bs=bs,
                                interpret=interpret, want_dh0=want_dh0)
    if bs.bwd == "split3":
        return _bwd_split3_rest(x, dt, A, B, C, D, z, states, dstates, dy, dh0, q=q, hb=hb,
                                bs=bs, interpret=interpret)

    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),                 # dx
                 jax.ShapeDtypeStruct((b, lp, h), f32),                  # ddt
                 jax.ShapeDtypeStruct((b, lp, h // hb, n), f32),         # dB partials
                 jax.ShapeDtypeStruct((b, lp, h // hb, n), f32),         # dC partials
                 None if z is None else jax.ShapeDtypeStruct(z.shape, z.dtype),   # dz
                 jax.ShapeDtypeStruct((b, nc, h, 16), f32),              # dA (16 copies)
                 jax.ShapeDtypeStruct((b, nc, h, p), f32)]               # dD
    dx, ddt, dbp, dcp, dz, da, dd = _pallas_call(
        functools.partial(_ssd_bwd_chunk_kernel, q=q, hb=hb, rep=rep),
        [x, dt, A, B, C, D, z, states, dstates, dy], out_shape, (b, nc, h // hb),
        bs.num_warps_bwd, bs.num_stages, interpret, "ssd_bwd_chunk")
    return dx, ddt, dbp, dcp, dz, da.sum(1), dd.sum(1), dh0


def _bwd_split3_rest(x, dt, A, B, C, D, z, states, dstates, dy, dh0, *, q, hb, bs,
                     interpret):
    """Passes 2 and 3 of the three-kernel backward (after the dL/dh pass)."""
    # With s_prev "dbc" the dB/dC pass writes s_prev per (batch, chunk, head) for the dx pass.
    from kernels import ssd_mgpu
    mosaic_dbc = (bs.dbc_backend == "mosaic" and z is None and bs.s_prev != "dbc"
                  and ssd_mgpu.dbc_supports(x, B, q))
    if (mosaic_dbc and bs.mgpu_fused and bs.dx_backend == "mosaic"
            and ssd_mgpu.supports(x, B, q)):
        dx, ddt, dz, da, dd, dbp, dcp = ssd_mgpu.dx_dbc_call(
            x, dt, A, B, C, D, states, dstates, dy, q=q, interpret=interpret,
            split_loads=bs.mgpu_dx_split_loads, slots=bs.mgpu_dbc_slots,
            lead=bs.mgpu_dbc_lead)
        return dx, ddt, dbp, dcp, dz, da.sum(1), dd.sum(1), dh0
    if mosaic_dbc:
        # dB, dC complete (B, Lp, G, N) in B's dtype: `_ssd_core_bwd` passes them through.
        dbp, dcp = ssd_mgpu.dbc_call(x, dt, A, B, C, states, dstates, dy, q=q,
                                     interpret=interpret, slots=bs.mgpu_dbc_slots)
        sp = None
    else:
        dbp, dcp, sp = _dbc_call(x, dt, A, B, C, z, states, dstates, dy, q=q, hb=hb, bs=bs,
                                 interpret=interpret)
    if bs.dx_backend == "mosaic" and z is None and sp is None:
        if ssd_mgpu.supports(x, B, q):
            dx, ddt, dz, da, dd = ssd_mgpu.dx_call(x, dt, A, B, C, D, states, dstates, dy, q=q,
                                                   interpret=interpret,
                                                   split_loads=bs.mgpu_dx_split_loads)
            return dx, ddt, dbp, dcp, dz, da.sum(1), dd.sum(1), dh0
    dx, ddt, dz, da, dd = _dx_call(x, dt, A, B, C, D, z, states, dstates, dy, sp, q=q, bs=bs,
                                   interpret=interpret)
    return dx, ddt, dbp, dcp, dz, da.sum(1), dd.sum(1), dh0


def _dx_call(x, dt, A, B, C, D, z, states, dstates, dy, sp=None, *, q, bs, interpret):
    """Launches `_ssd_bwd_dx_kernel`: dx, ddt, dz, per-chunk dA (B, nc, H, 16), dD (B, nc, H, P)."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),                 # dx
                 jax.ShapeDtypeStruct((b, lp, h), f32),                  # ddt
                 None if z is None else jax.ShapeDtypeStruct(z.shape, z.dtype),   # dz
                 jax.ShapeDtypeStruct((b, nc, h, 16), f32),              # dA (16 copies)
                 jax.ShapeDtypeStruct((b, nc, h, p), f32)]               # dD
    return tuple(_pallas_call(
        functools.partial(_ssd_bwd_dx_kernel, q=q, rep=h // g,
                          heads_fastest=bs.dx_heads_fastest, exp2=_fast_exp(bs, x),
                          dda_dot=bs.dda_dot and x.dtype != jnp.float32,
                          s_prev="dbc" if sp is not None else bs.s_prev),
        [x, dt, A, B, C, D, z, states, dstates, dy, sp], out_shape,
        (h, nc, b) if bs.dx_heads_fastest else (b, nc, h),
        bs.num_warps_dx or bs.num_warps_fwd, bs.num_stages, interpret, "ssd_bwd_dx"))


def _dbc_call(x, dt, A, B, C, z, states, dstates, dy, *, q, hb, bs, interpret):
    """Launches `_ssd_bwd_dbc_kernel`: dB, dC partials (B, Lp, H // hb, N) f32, and with
    `BlockSizes.s_prev` "dbc" s_prev (B, nc, H, 16) for the dx pass (else None)."""
    b, lp, h, p = x.shape
    g, n = B.shape[2:]
    nc = lp // q
    sp = (jax.ShapeDtypeStruct((b, nc, h, 16), jnp.float32) if bs.s_prev == "dbc"
          else None)
    return _pallas_call(
        functools.partial(_ssd_bwd_dbc_kernel, q=q, hb=hb, rep=h // g,
                          exp2=_fast_exp(bs, x)),
        [x, dt, A, B, C, z, states, dstates, dy],
        [jax.ShapeDtypeStruct((b, lp, h // hb, n), jnp.float32)] * 2 + [sp],
        (b, nc, h // hb), bs.num_warps_bwd, bs.num_stages, interpret, "ssd_bwd_dbc")


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _ssd_core(x, dt, A, B, C, D, z, h0, q, bs, interpret, want_hT=True):
    """Padded operands (Lp % q == 0, P and N powers of two >= 16) -> (y, hT).
    h0 None: a zero initial state; want_hT False: hT is None (`BlockSizes.zero_states_inline`:
    no zeros arrays for h0 and the final-state cotangent, no hT or dh0 written)."""
    return tuple(_fwd_call(x, dt, A, B, C, D, z, h0, q=q, bs=bs, interpret=interpret,
                           save_states=False, want_hT=want_hT))


def _ssd_core_fwd(x, dt, A, B, C, D, z, h0, q, bs, interpret, want_hT=True):
    y, hT, states = _fwd_call(x, dt, A, B, C, D, z, h0, q=q, bs=bs, interpret=interpret,
                              save_states=True, want_hT=want_hT)
    # h0's slot in the residuals: None (no initial state) or a 0-d marker array.
    return (y, hT), (x, dt, A, B, C, D, z, states,
                     None if h0 is None else jnp.zeros((), jnp.float32))


def _ssd_core_bwd(q, bs, interpret, want_hT, res, cts):
    x, dt, A, B, C, D, z, states, h0_mark = res
    dy, dhT = cts
    has_h0 = h0_mark is not None
    if bs.bwd == "fused":
        if dhT is None:
            dhT = jnp.zeros((x.shape[0], x.shape[2], x.shape[3], B.shape[3]), jnp.float32)
        dx, ddt, dbp, dcp, dz, da, dd, dh0 = _bwd_call(
            x, dt, A, B, C, D, z, states, dy.astype(x.dtype), dhT.astype(jnp.float32), q=q,
            bs=bs, interpret=interpret)
    else:
        dx, ddt, dbp, dcp, dz, da, dd, dh0 = _bwd_split_call(
            x, dt, A, B, C, D, z, states, dy.astype(x.dtype),
            None if dhT is None else dhT.astype(jnp.float32), q=q, bs=bs,
            interpret=interpret, want_dh0=has_h0)
    if not has_h0:
        dh0 = None
    b, lp, _, _ = x.shape
    g, n = B.shape[2:]
    # Sum the partials (per head or per head block) over each group's share: the partial axis
    # is ordered like the heads, and head h reads group h // (H // G).
    k = dbp.shape[2]
    if k == g and dbp.dtype == B.dtype:      # already summed (the Mosaic dB/dC pass)
        dB, dC = dbp, dcp.astype(C.dtype)
    else:
        dB = dbp.astype(jnp.float32).reshape(b, lp, g, k // g, n).sum(3).astype(B.dtype)
        dC = dcp.astype(jnp.float32).reshape(b, lp, g, k // g, n).sum(3).astype(C.dtype)
    return (dx, ddt, da[:, :, 0].sum(0).astype(A.dtype), dB, dC, dd.sum(0).astype(D.dtype),
            dz, dh0)


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)
