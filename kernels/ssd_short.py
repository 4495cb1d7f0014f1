"""SSD Pallas kernels (Triton backend) for a sequence that fits in one chunk.

Shape legend: x, z: (B, L, H, P)  dt: (B, L, H)  A: (H,)  B, C: (B, L, G, N)  state: (B, H, P, N)
HiSS's low level runs many sequences of ~10 steps; for them the chunked kernels would move
(P, N) states that are zero. Here two kernels run: a forward that saves nothing and one
backward program per (sequences, head block) with no dL/dh pass. Entry point: `_ssd_short`.

Layout: (batch, time) is flattened to rows (a free reshape) and a program takes a tile of
`rows` rows (a power of two, for Triton) holding `nseq` whole sequences of `seq` steps, with
a block-diagonal causal mask. Packed (`BlockSizes.short_pack`, default): seq = L and the
sequences lie as in memory, so a tile's last rows (and the last tile's tail) hold no step of
its sequences; they are read as zeros through masked loads (dt = 0 and x = 0: no decay, no
write) and never stored. Padded (run 6): every sequence is padded to seq = Q steps in XLA.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels.ssd_common import (BlockSizes, _dot, _largest_divisor_at_most, _next_pow2,
                                _pad_to, _pallas_call)


def _short_mask(seq, rows, nseq):
    """(T, T) causal mask of a tile of nseq stacked sequences of seq steps: i >= j within one
    sequence (block-diagonal). Rows past nseq * seq hold zeros and need no mask of their own."""
    idx = jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 0)
    jdx = jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 1)
    causal = idx >= jdx
    if nseq > 1:
        causal = causal & (jax.lax.div(idx, seq) == jax.lax.div(jdx, seq))
    return causal


def _short_decay(dt, a, causal, nseq):
    """dt (T,) f32 -> cs (T,) cumsum of dt*A within each sequence, decay (T, T) =
    exp(cs_i - cs_j) under the mask, else 0.

    The per-sequence cumsum is a masked row sum, never a cumsum over the tile minus the
    sequence's start: that difference of large sums would lose f32 digits of the decay.
    """
    dA = dt * a
    if nseq == 1:
        cs = jnp.cumsum(dA)
    else:
        cs = jnp.sum(jnp.where(causal, dA[None, :], 0.0), axis=1)
    decay = jnp.exp(jnp.where(causal, cs[:, None] - cs[None, :], -jnp.inf))
    return cs, decay


def _tile(pi, seq, nseq, rows, n_rows):
    """Program pi's rows -> (t, ok): t the pl.ds of its tile; ok (T,) bool, the rows that hold
    a step of its sequences, or None when all do (no masks: run 6's padded layout)."""
    used = nseq * seq
    start = pl.multiple_of(pi * rows, rows) if used == rows else pi * used
    t = pl.ds(start, rows)
    if used == rows and n_rows % rows == 0:
        return t, None
    r = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0)
    return t, (r < used) & (start + r < n_rows)


def _row_mask(ok, shape):
    return jnp.broadcast_to(ok.reshape(ok.shape + (1,) * (len(shape) - 1)), shape)


def _load(ref, idx, ok):
    """ref[idx] for a block whose first axis is the tile's rows; rows outside ok read 0."""
    if ok is None:
        return ref[idx]
    view = ref.at[idx]
    return pltr.load(view, mask=_row_mask(ok, view.shape), other=0)


def _store(ref, idx, val, ok):
    """ref[idx] = val, skipping the rows outside ok (they belong to the next program)."""
    if ok is None:
        ref[idx] = val
    else:
        pltr.store(ref.at[idx], val, mask=_row_mask(ok, val.shape))


def _ssd_short_fwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, h0_ref,
                          y_ref, hT_ref, *, seq, nseq, rows, hf, rep, unroll):
    """One-chunk forward: one program per (nseq sequences, block of hf heads of a group); no
    state pass.

    x, z, y: (B*S, H, P)  dt: (B*S, H) f32  B, C: (B*S, G, N)  D: (H, P) f32  (S = seq)
    h0, hT: (B, H, P, N) f32 or None (only with one sequence per program).
    y = (C B^T o decay) (dt x) [+ exp(cs) C h0^T] + D x, gated by silu(z) (Mamba-2 sec. 6
    with a single chunk); nothing is saved for the backward. The block's heads share the
    loads of B, C and C B^T.
    """
    pi, blk = pl.program_id(0), pl.program_id(1)
    gi = (blk * hf) // rep
    f32 = jnp.float32
    dot_dtype = x_ref.dtype
    t, ok = _tile(pi, seq, nseq, rows, x_ref.shape[0])
    Bc = _load(b_ref, (t, gi, slice(None)), ok)
    Cc = _load(c_ref, (t, gi, slice(None)), ok)
    cb = _dot(Cc, Bc, ((1,), (1,)))
    causal = _short_mask(seq, rows, nseq)

    def head(j, carry):
        hi = blk * hf + j
        a = a_ref[hi]
        d = d_ref[hi, :]
        x = _load(x_ref, (t, hi, slice(None)), ok)
        dt = _load(dt_ref, (t, hi), ok)
        cs, decay = _short_decay(dt, a, causal, nseq)
        xf = x.astype(f32)
        xdt = xf * dt[:, None]
        y = _dot((cb * decay).astype(dot_dtype), xdt.astype(dot_dtype))
        if h0_ref is not None:
            h0 = h0_ref[pi, hi, :, :]
            y = y + jnp.exp(cs)[:, None] * _dot(Cc, h0.astype(dot_dtype), ((1,), (1,)))
        y = y + d[None, :] * xf
        if z_ref is not None:
            zf = _load(z_ref, (t, hi, slice(None)), ok).astype(f32)
            y = y * (zf * jax.nn.sigmoid(zf))
        _store(y_ref, (t, hi, slice(None)), y.astype(y_ref.dtype), ok)
        if hT_ref is not None:
            total = jnp.sum(dt * a)
            w = jnp.exp(total - cs)
            hT = _dot((xdt * w[:, None]).astype(dot_dtype), Bc, ((0,), (0,)))
            if h0_ref is not None:
                hT = hT + jnp.exp(total) * h0
            hT_ref[pi, hi, :, :] = hT
        return carry

    _head_loop(head, hf, unroll, ())


def _head_loop(head, count, unroll, carry):
    """head(j, carry) over j < count: straight code when unroll, else a loop."""
    if count == 1:
        return head(0, carry)
    if unroll:
        for j in range(count):
            carry = head(j, carry)
        return carry
    return jax.lax.fori_loop(0, count, head, carry)


def _ssd_short_bwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, h0_ref, dy_ref,
                          dhT_ref, dx_ref, ddt_ref, db_ref, dc_ref, dz_ref, da_ref, dd_ref,
                          dh0_ref, *, seq, nseq, rows, hb, rep, unroll):
    """One-chunk backward: one program per (nseq sequences, block of hb heads of a group).

    Shapes as in `_ssd_short_fwd_kernel`; dy like x; dhT, dh0: (B, H, P, N) f32 or None.
    Outputs dx, dz like x; ddt: (B*S, H); dB, dC: (B*S, H // hb, N) partials per head block;
    dA: (programs, H, 16) and dD: (programs, H, P) per-program partials.
    The chunk's entry state is h0 (or zero) and its end cotangent dhT (or zero): no dL/dh
    pass, no state loads. d(C B^T) sums over the block's heads in registers. d(dA) as in
    `kernels.ssd_long._ssd_bwd_kernel` (masked exclusive cumsum, no cancellation); the
    block-diagonal mask keeps every sum inside its sequence.
    """
    pi, blk = pl.program_id(0), pl.program_id(1)
    gi = (blk * hb) // rep
    f32 = jnp.float32
    dot_dtype = x_ref.dtype
    t, ok = _tile(pi, seq, nseq, rows, x_ref.shape[0])
    Bc = _load(b_ref, (t, gi, slice(None)), ok)
    Cc = _load(c_ref, (t, gi, slice(None)), ok)
    cb = _dot(Cc, Bc, ((1,), (1,)))                  # shared by the block's heads
    causal = _short_mask(seq, rows, nseq)
    has_h0, has_dhT = h0_ref is not None, dhT_ref is not None

    def head(j, carry):
        dcb_acc, db_acc, dc_acc = carry
        hi = blk * hb + j
        a = a_ref[hi]
        d = d_ref[hi, :]
        dt = _load(dt_ref, (t, hi), ok)
        xf = _load(x_ref, (t, hi, slice(None)), ok).astype(f32)
        dout = _load(dy_ref, (t, hi, slice(None)), ok).astype(f32)
        cs, decay = _short_decay(dt, a, causal, nseq)
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
            zf = _load(z_ref, (t, hi, slice(None)), ok).astype(f32)
            y = _dot(m.astype(dot_dtype), xdt_c) + d[None, :] * xf
            if has_h0:
                y = y + ecs[:, None] * ch
            sz = jax.nn.sigmoid(zf)
            _store(dz_ref, (t, hi, slice(None)),
                   (dout * y * sz * (1.0 + zf * (1.0 - sz))).astype(dz_ref.dtype), ok)
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
        _store(ddt_ref, (t, hi), a * dda + jnp.sum(xf * dxdt, axis=1), ok)
        _store(dx_ref, (t, hi, slice(None)),
               (dxdt * dt[:, None] + d[None, :] * dout).astype(dx_ref.dtype), ok)
        da_ref[pi, hi, :] = jnp.full((16,), jnp.sum(dda * dt), f32)
        return dcb_acc, db_acc, dc_acc

    n = b_ref.shape[-1]
    zeros_tn = jnp.zeros((rows, n), f32)
    carry = (jnp.zeros((rows, rows), f32), zeros_tn if has_dhT else None,
             zeros_tn if has_h0 else None)
    dcb, db, dc = _head_loop(head, hb, unroll, carry)
    dcb_c = dcb.astype(dot_dtype)
    db_out = _dot(dcb_c, Cc, ((0,), (0,)))
    dc_out = _dot(dcb_c, Bc)
    if has_dhT:
        db_out = db_out + db
    if has_h0:
        dc_out = dc_out + dc
    _store(db_ref, (t, blk, slice(None)), db_out.astype(db_ref.dtype), ok)
    _store(dc_ref, (t, blk, slice(None)), dc_out.astype(dc_ref.dtype), ok)


def _short_layout(l: int, q: int, bs: BlockSizes, per_sequence: bool):
    """-> (seq, nseq, rows): steps per sequence as the kernels see them, sequences per
    program, rows per program tile (a power of two)."""
    if bs.short_pack:
        nseq = 1 if per_sequence else max(1, (bs.short_rows or 32) // l)
        return l, nseq, max(16, _next_pow2(nseq * l))
    nseq = 1 if per_sequence else (
        bs.short_batch if bs.short_batch is not None else max(1, 32 // q))
    return q, nseq, nseq * q


def _short_fwd_call(x, dt, A, B, C, D, z, h0, *, seq, nseq, rows, want_hT, bs, interpret):
    """Launches `_ssd_short_fwd_kernel` on flattened operands (rows of steps); returns
    y [, hT]."""
    n_rows, h, p = x.shape
    g, n = B.shape[1:]
    nb = n_rows // seq
    hf = _largest_divisor_at_most(h // g, bs.short_fwd_heads)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((nb, h, p, n), jnp.float32) if want_hT else None]
    kernel = functools.partial(_ssd_short_fwd_kernel, seq=seq, nseq=nseq, rows=rows, hf=hf,
                               rep=h // g, unroll=bs.short_unroll)
    res = _pallas_call(kernel, [x, dt, A, B, C, D, z, h0], out_shape, (-(-nb // nseq), h // hf),
                       bs.num_warps_short_fwd, bs.num_stages_short, interpret, "ssd_short_fwd")
    return tuple(res) if want_hT else res[0]


def _short_bwd_call(x, dt, A, B, C, D, z, h0, dy, dhT, *, seq, nseq, rows, bs, interpret):
    """Launches `_ssd_short_bwd_kernel`; returns dx, ddt, dB/dC partials, dz, dA, dD, dh0."""
    n_rows, h, p = x.shape
    g, n = B.shape[1:]
    rep = h // g
    hb = _largest_divisor_at_most(rep, bs.bwd_heads)
    nprog = -(-(n_rows // seq) // nseq)
    f32 = jnp.float32
    # Partials that are summed over head blocks in XLA stay f32; a single one per group is
    # the final dB / dC and takes the input dtype.
    part = x.dtype if h // hb == g else f32
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype),                 # dx
                 jax.ShapeDtypeStruct((n_rows, h), f32),                 # ddt
                 jax.ShapeDtypeStruct((n_rows, h // hb, n), part),       # dB partials
                 jax.ShapeDtypeStruct((n_rows, h // hb, n), part),       # dC partials
                 None if z is None else jax.ShapeDtypeStruct(z.shape, z.dtype),   # dz
                 jax.ShapeDtypeStruct((nprog, h, 16), f32),              # dA (16 copies)
                 jax.ShapeDtypeStruct((nprog, h, p), f32),               # dD
                 None if h0 is None else jax.ShapeDtypeStruct(h0.shape, f32)]     # dh0
    kernel = functools.partial(_ssd_short_bwd_kernel, seq=seq, nseq=nseq, rows=rows, hb=hb,
                               rep=rep, unroll=bs.short_unroll)
    return tuple(_pallas_call(kernel, [x, dt, A, B, C, D, z, h0, dy, dhT], out_shape,
                              (nprog, h // hb), bs.num_warps_short_bwd, bs.num_stages_short,
                              interpret, "ssd_short_bwd"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12, 13))
def _ssd_short_core(x, dt, A, B, C, D, z, h0, seq, nseq, rows, want_hT, bs, interpret):
    """Flattened one-chunk operands (rows of steps, sequences of seq rows) -> y [, hT]."""
    return _short_fwd_call(x, dt, A, B, C, D, z, h0, seq=seq, nseq=nseq, rows=rows,
                           want_hT=want_hT, bs=bs, interpret=interpret)


def _ssd_short_core_fwd(x, dt, A, B, C, D, z, h0, seq, nseq, rows, want_hT, bs, interpret):
    out = _short_fwd_call(x, dt, A, B, C, D, z, h0, seq=seq, nseq=nseq, rows=rows,
                          want_hT=want_hT, bs=bs, interpret=interpret)
    return out, (x, dt, A, B, C, D, z, h0)


def _ssd_short_core_bwd(seq, nseq, rows, want_hT, bs, interpret, res, cts):
    x, dt, A, B, C, D, z, h0 = res
    dy, dhT = (cts if want_hT else (cts, None))
    dx, ddt, dbp, dcp, dz, da, dd, dh0 = _short_bwd_call(
        x, dt, A, B, C, D, z, h0, dy.astype(x.dtype),
        None if dhT is None else dhT.astype(jnp.float32), seq=seq, nseq=nseq, rows=rows,
        bs=bs, interpret=interpret)
    n_rows = x.shape[0]
    g, n = B.shape[1:]
    k = dbp.shape[1]
    dB = dbp.astype(jnp.float32).reshape(n_rows, g, k // g, n).sum(2).astype(B.dtype)
    dC = dcp.astype(jnp.float32).reshape(n_rows, g, k // g, n).sum(2).astype(C.dtype)
    return (dx, ddt, da[:, :, 0].sum(0).astype(A.dtype), dB, dC, dd.sum(0).astype(D.dtype),
            dz, dh0)


_ssd_short_core.defvjp(_ssd_short_core_fwd, _ssd_short_core_bwd)


def _ssd_short(x, dt_eff, A, B, C, D, z, h0, *, q, bs, interpret, want_hT):
    """(B, L, ...) operands with L <= q (P, N already padded; dt after bias and softplus)
    -> y (B, L, H, P) [, hT].

    Packed: (batch, time) flattened to rows as they are, a free reshape. Padded (run 6):
    time padded to q and the batch to whole programs, then flattened; y sliced back."""
    b, l, h, p = x.shape
    seq, nseq, rows = _short_layout(l, q, bs, per_sequence=h0 is not None or want_hT)
    bp = b if bs.short_pack else -(-b // nseq) * nseq

    def flat(t):
        if t is None:
            return None
        if seq != l:
            t = _pad_to(t, 1, seq)
        return _pad_to(t, 0, bp).reshape(bp * seq, *t.shape[2:])

    out = _ssd_short_core(flat(x), flat(dt_eff), A, flat(B), flat(C), D, flat(z), h0, seq,
                          nseq, rows, want_hT, bs, interpret)
    y, hT = out if want_hT else (out, None)
    y = y.reshape(bp, seq, h, p)
    if (bp, seq) != (b, l):
        y = y[:b, :l]
    return y, hT
