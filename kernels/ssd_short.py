"""SSD Pallas kernels (Triton backend) for a sequence that fits in one chunk.

Shape legend: x, z: (B, L, H, P)  dt: (B, L, H)  A: (H,)  B, C: (B, L, G, N)  state: (B, H, P, N)
HiSS's low level runs many sequences of ~10 steps; for them the chunked kernels would move
(P, N) states that are zero. Here two kernels run: a forward that saves nothing and one
backward program per (sequences, head block) with no dL/dh pass. Several sequences share a
program as one tile of rows with a block-diagonal causal mask. Entry point: `_ssd_short`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.ssd_common import (BlockSizes, _dot, _largest_divisor_at_most, _pad_to,
                                _pallas_call)


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
