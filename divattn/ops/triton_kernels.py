"""Triton kernels for strided batched attention: temporal, spatial (+cls) and joint.

All three ops are one problem: S independent sequences of length L, each sequence
``s`` addressed by three batch indices ``(i0, i1, i2)`` with their own strides, rows
``t`` by a row stride, and the head dim contiguous:

=========  ===============  ======  =====================================
op         (i0, i1, i2)     L       tensors
=========  ===============  ======  =====================================
temporal   (b, n, h)        T       q, k, v ``(B, T, N, H, D)``
spatial    (b, t, h)        N       q, k, v ``(B, T, N, H, D)``, cls ``(B, H, D)``
joint      (b, -, h)        L       q, k, v ``(B, L, H, D)``
=========  ===============  ======  =====================================

so q/k/v are read straight out of the qkv projection output in either token order
and nothing is transposed.

**cls folded in.** With a cls token every frame's sequence is extended by one row:
row ``L`` of the queries is the cls query and column ``L`` of the keys the cls key,
both read from their own ``(B, H, D)`` pointers (stride 0 over frames). The cls
query's per-frame output and log-sum-exp go to small fp32 ``(B, H, T, ·)`` buffers,
and its per-frame gradients (and the cls key/value gradients of each frame) to
``(B, H, T, D)`` partials; a tiny epilogue reduces them over frames in a fixed
order. Spatial attention with cls therefore reads each frame's K/V once, like
spatial attention without it, and the backward needs no atomics.

**Tiles.** A program owns ``GROUP`` sequences and a range of ``SEQ``-row tiles of
them (``GROUP * SEQ`` rows per tile). Regimes (chosen by :func:`tile_config`):

- *packed* — short sequences (temporal attention, T <= SEQ): ``GROUP`` whole
  sequences share one tile and the score tile is masked block-diagonally, because
  ``tl.dot`` needs at least 16 rows. A product over the token dimension would let
  ``0 * NaN`` carry a non-finite value from one sequence to its tile neighbours; the
  packed products zero non-finite rows of their right operand and re-inject them,
  per column, into their own sequence only (:func:`_dot_iso`), so every sequence
  sees exactly the non-finite values a per-sequence product would give it.
- *frame* — a sequence of up to ``FRAME_MAX`` rows (a frame's 196 patches and the
  cls token) belongs to one program, which loops over its query tiles (forward) or
  runs its key tiles and then its query tiles (backward); each of the frame's
  q/k/v/o/dO rows comes from memory once per program, and the re-reads within the
  program are cache hits.
- *long* — longer sequences spread their tiles over programs, flash-attention
  style: online softmax in base 2, fp32 accumulators, log-sum-exp saved, no score
  matrix in memory.

The backward recomputes the softmax from the saved log-sum-exp and ``rowsum(dO * O)``
on the fly; it writes every gradient element once (dK/dV per key tile, dQ per query
tile) and is deterministic. The log-sum-exp saved for the backward is in base 2 and
includes the scale.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
FRAME_MAX = 256  # longest sequence (with cls) that one program keeps to itself


@triton.jit
def _seq_offset(s, S1, S2, st0, st1, st2):
    i2 = s % S2
    i1 = (s // S2) % S1
    i0 = s // (S1 * S2)
    return i0 * st0 + i1 * st1 + i2 * st2


@triton.jit
def _cls_offset(s, S1, S2, sc0, sc2):
    """Offset of sequence s's cls vector: its (i0, i2), stride 0 over i1 (frames)."""
    return (s // (S1 * S2)) * sc0 + (s % S2) * sc2


@triton.jit
def _frame_index(s, S1, S2):
    """Position of sequence s = (i0, i1, i2) in a contiguous (S0, S2, S1) buffer: (b, h, t)."""
    i2 = s % S2
    i1 = (s // S2) % S1
    i0 = s // (S1 * S2)
    return (i0 * S2 + i2) * S1 + i1


@triton.jit
def _load_rows(X, XC, s, pos, ok, d, d_ok, S1, S2, x0, x1, x2, xL, xc0, xc2, L,
               HAS_CLS: tl.constexpr, GROUP: tl.constexpr):
    """Rows ``pos`` of sequences ``s`` as a [rows, BLOCK_D] tile; row L is the cls vector (XC)."""
    x = tl.load(X + (_seq_offset(s, S1, S2, x0, x1, x2) + pos * xL)[:, None] + d[None, :],
                mask=(ok & (pos < L))[:, None] & d_ok[None, :], other=0.0)
    if HAS_CLS:
        is_cls = ok & (pos == L)
        if GROUP == 1:  # one sequence: its cls vector, loaded once and placed in row L
            xc = tl.load(XC + _cls_offset(s, S1, S2, xc0, xc2) + d, mask=d_ok, other=0.0)  # [BLOCK_D]
            x = tl.where(is_cls[:, None], xc[None, :].to(x.dtype), x)
        else:
            xc = tl.load(XC + _cls_offset(s, S1, S2, xc0, xc2)[:, None] + d[None, :],
                         mask=is_cls[:, None] & d_ok[None, :], other=0.0)
            x = tl.where(is_cls[:, None], xc.to(x.dtype), x)
    return x


@triton.jit
def _store_rows(X, XF, val, s, pos, ok, fr, d, d_ok, S1, S2, x0, x1, x2, xL, L, D, HAS_CLS: tl.constexpr):
    """Store rows ``pos < L`` to X (in X's dtype) and the cls row ``pos == L`` to the fp32 XF[fr]."""
    mask = (ok & (pos < L))[:, None] & d_ok[None, :]
    tl.store(X + (_seq_offset(s, S1, S2, x0, x1, x2) + pos * xL)[:, None] + d[None, :],
             val.to(X.dtype.element_ty), mask=mask)
    if HAS_CLS:
        is_cls = ok & (pos == L)
        tl.store(XF + ((fr * D) + tl.zeros_like(pos))[:, None] + d[None, :], val, mask=is_cls[:, None] & d_ok[None, :])


@triton.jit
def _causal_mask(ok, t, tk, L, LK, CAUSAL: tl.constexpr):
    """``ok``, and with CAUSAL only keys at or before the query's frame (query t is frame LK - L + t)."""
    if CAUSAL:
        ok = ok & (tk.to(tl.int32)[None, :] <= (t.to(tl.int32) + (LK - L))[:, None])
    return ok


@triton.jit
def _key_tiles_seen(mt, n_k_tiles, L, LK, SEQ: tl.constexpr, CAUSAL: tl.constexpr, GROUP: tl.constexpr):
    """How many key tiles query tile ``mt`` looks at: tiles above the causal diagonal are skipped.

    (A packed tile holds whole sequences: there is one key tile and nothing to skip.)
    """
    n = n_k_tiles
    if CAUSAL and GROUP == 1:
        n = tl.minimum(n_k_tiles, ((mt + 1) * SEQ - 1 + (LK - L)) // SEQ + 1)
    return n


@triton.jit
def _first_query_tile(kt, L, LK, SEQ: tl.constexpr, CAUSAL: tl.constexpr, GROUP: tl.constexpr):
    """The first query tile that sees key tile ``kt`` (0 unless causal across several tiles)."""
    first = 0
    if CAUSAL and GROUP == 1:
        first = tl.maximum(kt * SEQ - (LK - L), 0) // SEQ
    return first


@triton.jit
def _pair_mask(g, ok, GROUP: tl.constexpr):
    """``ok`` restricted to (row, column) pairs of one sequence (all pairs when a tile holds one).

    ``g`` is the tile-local sequence of each row / column.
    """
    if GROUP == 1:
        out = ok
    else:
        out = (g[:, None] == g[None, :]) & ok
    return out


@triton.jit
def _dot_iso(a, b, g, PREC: tl.constexpr, ISOLATE: tl.constexpr):
    """``a @ b`` over the token dim, where ``a`` is zero outside its block diagonal.

    ``g`` is the tile-local sequence of each row / column (the blocks).

    With ISOLATE (packed tiles), a non-finite entry of ``b`` reaches exactly the
    outputs of its own sequence in its own column, as in a per-sequence product —
    not, through ``0 * NaN``, the other sequences of the tile.
    """
    if ISOLATE:
        bad = (b != b) | (tl.abs(b.to(tl.float32)) == float("inf"))
        n_bad = tl.sum(tl.sum(bad.to(tl.int32), 1), 0)
        out = tl.dot(a, tl.where(bad, tl.zeros_like(b), b), input_precision=PREC)
        if n_bad > 0:
            same = g[:, None] == g[None, :]
            hits = tl.dot(same.to(b.dtype), bad.to(b.dtype), input_precision=PREC)
            out = tl.where(hits > 0, float("nan"), out)
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, QC, KC, VC, OCF, LSEC,
    sq0, sq1, sq2, sqL,
    sk0, sk1, sk2, skL,
    sv0, sv1, sv2, svL,
    so0, so1, so2, soL,
    sqc0, sqc2, skc0, skc2, svc0, svc2,
    S, S1, S2, L, LK, D, n_q_tiles, n_k_tiles, tiles_per_prog, qk_scale,
    HAS_CLS: tl.constexpr, GROUP: tl.constexpr, SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, CAUSAL: tl.constexpr,
):
    BLOCK: tl.constexpr = GROUP * SEQ
    E = L + HAS_CLS  # query rows of a sequence, the cls row included
    EK = LK + HAS_CLS  # key rows
    r = tl.arange(0, BLOCK)
    g = r // SEQ  # [BLOCK] sequence of each row (and column) within the tile
    if GROUP == 1:
        s = tl.program_id(0).to(tl.int64)  # the program's one sequence
    else:
        s = (tl.program_id(0) * GROUP + g).to(tl.int64)  # [BLOCK] sequence of each row
    s_ok = (s + tl.zeros_like(r)) < S  # [BLOCK]
    fr = _frame_index(s, S1, S2)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    first = tl.program_id(1) * tiles_per_prog
    last = tl.minimum(first + tiles_per_prog, n_q_tiles)
    for mt in range(first, last):
        t = (mt * SEQ + r % SEQ).to(tl.int64)  # [BLOCK] query row within its sequence
        row_ok = s_ok & (t < E)
        q = _load_rows(Q, QC, s, t, row_ok, d, d_ok, S1, S2, sq0, sq1, sq2, sqL, sqc0, sqc2, L, HAS_CLS, GROUP)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for kt in range(0, _key_tiles_seen(mt, n_k_tiles, L, LK, SEQ, CAUSAL, GROUP)):
            tk = (kt * SEQ + r % SEQ).to(tl.int64)  # [BLOCK] key row of each column
            col_ok = s_ok & (tk < EK)
            k = _load_rows(K, KC, s, tk, col_ok, d, d_ok, S1, S2, sk0, sk1, sk2, skL, skc0, skc2, LK, HAS_CLS, GROUP)
            v = _load_rows(V, VC, s, tk, col_ok, d, d_ok, S1, S2, sv0, sv1, sv2, svL, svc0, svc2, LK, HAS_CLS, GROUP)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK, BLOCK]
            visible = _causal_mask(col_ok[None, :], t, tk, L, LK, CAUSAL)
            qk = tl.where(_pair_mask(g, visible, GROUP), qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot_iso(p.to(v.dtype), v, g, PREC, GROUP > 1)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        _store_rows(O, OCF, acc / l_safe[:, None], s, t, row_ok, fr, d, d_ok, S1, S2,
                    so0, so1, so2, soL, L, D, HAS_CLS)
        lse = m_i + tl.log2(l_safe)
        tl.store(LSE + s * L + t, lse, mask=row_ok & (t < L))
        if HAS_CLS:
            tl.store(LSEC + fr + tl.zeros_like(t), lse, mask=row_ok & (t == L))


@triton.jit
def _bwd_rows(
    Q, O, DO, LSE, QC, DOC, OCF, LSEC, s, t, ok, fr, d, d_ok, S1, S2,
    sq0, sq1, sq2, sqL, so0, so1, so2, soL, sdo0, sdo1, sdo2, sdoL, sqc0, sqc2, sdoc0, sdoc2,
    L, D, inv_T, HAS_CLS: tl.constexpr, WITH_DELTA: tl.constexpr, GROUP: tl.constexpr,
):
    """q, dO (in q's dtype), lse and (WITH_DELTA) delta = rowsum(dO * O) of query rows ``t``.

    The cls row's upstream gradient is d o_cls / T (o_cls is the mean over T frames);
    its output and log-sum-exp come from the forward's per-frame fp32 buffers.
    """
    q = _load_rows(Q, QC, s, t, ok, d, d_ok, S1, S2, sq0, sq1, sq2, sqL, sqc0, sqc2, L, HAS_CLS, GROUP)
    do = _load_rows(DO, DOC, s, t, ok, d, d_ok, S1, S2, sdo0, sdo1, sdo2, sdoL, sdoc0, sdoc2, L, HAS_CLS, GROUP)
    main = ok & (t < L)
    lse = tl.load(LSE + s * L + t, mask=main, other=0.0)
    do_f = do.to(tl.float32)
    if HAS_CLS:
        is_cls = ok & (t == L)
        if GROUP == 1:
            lse = tl.where(is_cls, tl.load(LSEC + fr), lse)
        else:
            lse = tl.where(is_cls, tl.load(LSEC + fr, mask=is_cls, other=0.0), lse)
        do_f = tl.where(is_cls[:, None], do_f * inv_T, do_f)
        do = do_f.to(do.dtype)
    delta = tl.zeros_like(lse)
    if WITH_DELTA:
        o = tl.load(O + (_seq_offset(s, S1, S2, so0, so1, so2) + t * soL)[:, None] + d[None, :],
                    mask=main[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_CLS:
            is_cls = ok & (t == L)
            if GROUP == 1:
                oc = tl.load(OCF + fr * D + d, mask=d_ok, other=0.0)  # [BLOCK_D]
                o = tl.where(is_cls[:, None], oc[None, :], o)
            else:
                oc = tl.load(OCF + (fr * D)[:, None] + d[None, :], mask=is_cls[:, None] & d_ok[None, :], other=0.0)
                o = tl.where(is_cls[:, None], oc, o)
        delta = tl.sum(do_f * o, 1)
    return q, do, lse, delta


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, O, DO, LSE, DQ, DK, DV,
    QC, KC, VC, DOC, OCF, LSEC, DQCF, DKCF, DVCF,
    sq0, sq1, sq2, sqL,
    sk0, sk1, sk2, skL,
    sv0, sv1, sv2, svL,
    so0, so1, so2, soL,
    sdo0, sdo1, sdo2, sdoL,
    sdq0, sdq1, sdq2, sdqL,
    sdk0, sdk1, sdk2, sdkL,
    sdv0, sdv1, sdv2, sdvL,
    sqc0, sqc2, skc0, skc2, svc0, svc2, sdoc0, sdoc2,
    S, S1, S2, L, LK, D, n_q_tiles, n_k_tiles, tiles_per_prog, qk_scale, scale, inv_T,
    HAS_CLS: tl.constexpr, GROUP: tl.constexpr, SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, SINGLE: tl.constexpr, CAUSAL: tl.constexpr,
):
    """dK, dV of this program's key tiles, then dQ of its query tiles (in the first pass when SINGLE)."""
    BLOCK: tl.constexpr = GROUP * SEQ
    ISOLATE: tl.constexpr = GROUP > 1
    E = L + HAS_CLS
    EK = LK + HAS_CLS
    r = tl.arange(0, BLOCK)
    g = r // SEQ  # [BLOCK] sequence of each row (and column) within the tile
    if GROUP == 1:
        s = tl.program_id(0).to(tl.int64)  # the program's one sequence
    else:
        s = (tl.program_id(0) * GROUP + g).to(tl.int64)  # [BLOCK] sequence of each row
    s_ok = (s + tl.zeros_like(r)) < S  # [BLOCK]
    fr = _frame_index(s, S1, S2)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    first = tl.program_id(1) * tiles_per_prog

    for kt in range(first, tl.minimum(first + tiles_per_prog, n_k_tiles)):
        tk = (kt * SEQ + r % SEQ).to(tl.int64)
        col_ok = s_ok & (tk < EK)
        k = _load_rows(K, KC, s, tk, col_ok, d, d_ok, S1, S2, sk0, sk1, sk2, skL, skc0, skc2, LK, HAS_CLS, GROUP)
        v = _load_rows(V, VC, s, tk, col_ok, d, d_ok, S1, S2, sv0, sv1, sv2, svL, svc0, svc2, LK, HAS_CLS, GROUP)
        dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for mt in range(_first_query_tile(kt, L, LK, SEQ, CAUSAL, GROUP), n_q_tiles):
            t = (mt * SEQ + r % SEQ).to(tl.int64)
            row_ok = s_ok & (t < E)
            q, do, lse, delta = _bwd_rows(
                Q, O, DO, LSE, QC, DOC, OCF, LSEC, s, t, row_ok, fr, d, d_ok, S1, S2,
                sq0, sq1, sq2, sqL, so0, so1, so2, soL, sdo0, sdo1, sdo2, sdoL, sqc0, sqc2, sdoc0, sdoc2,
                L, D, inv_T, HAS_CLS, not SINGLE, GROUP)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [rows, cols]
            valid = _pair_mask(g, _causal_mask(row_ok[:, None] & col_ok[None, :], t, tk, L, LK, CAUSAL), GROUP)
            p = tl.exp2(tl.where(valid, qk - lse[:, None], float("-inf")))
            dv += _dot_iso(tl.trans(p.to(do.dtype)), do, g, PREC, ISOLATE)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            if SINGLE:
                # every key of these rows is in this tile: delta = rowsum(P * dP) = rowsum(dO * O),
                # computed as the softmax backward does (a one-key row gets exactly zero)
                delta = tl.sum(tl.where(valid, p * dp, 0.0), 1)
            ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
            dk += _dot_iso(tl.trans(ds.to(q.dtype)), q, g, PREC, ISOLATE)
            if SINGLE:
                dq = _dot_iso(ds.to(k.dtype), k, g, PREC, ISOLATE) * scale
                _store_rows(DQ, DQCF, dq, s, t, row_ok, fr, d, d_ok, S1, S2,
                            sdq0, sdq1, sdq2, sdqL, L, D, HAS_CLS)
        _store_rows(DK, DKCF, dk * scale, s, tk, col_ok, fr, d, d_ok, S1, S2, sdk0, sdk1, sdk2, sdkL, LK, D, HAS_CLS)
        _store_rows(DV, DVCF, dv, s, tk, col_ok, fr, d, d_ok, S1, S2, sdv0, sdv1, sdv2, sdvL, LK, D, HAS_CLS)

    if not SINGLE:
        for mt in range(first, tl.minimum(first + tiles_per_prog, n_q_tiles)):
            t = (mt * SEQ + r % SEQ).to(tl.int64)
            row_ok = s_ok & (t < E)
            q, do, lse, delta = _bwd_rows(
                Q, O, DO, LSE, QC, DOC, OCF, LSEC, s, t, row_ok, fr, d, d_ok, S1, S2,
                sq0, sq1, sq2, sqL, so0, so1, so2, soL, sdo0, sdo1, sdo2, sdoL, sqc0, sqc2, sdoc0, sdoc2,
                L, D, inv_T, HAS_CLS, True, GROUP)
            dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
            for kt in range(0, _key_tiles_seen(mt, n_k_tiles, L, LK, SEQ, CAUSAL, GROUP)):
                tk = (kt * SEQ + r % SEQ).to(tl.int64)
                col_ok = s_ok & (tk < EK)
                k = _load_rows(K, KC, s, tk, col_ok, d, d_ok, S1, S2, sk0, sk1, sk2, skL, skc0, skc2, LK, HAS_CLS, GROUP)
                v = _load_rows(V, VC, s, tk, col_ok, d, d_ok, S1, S2, sv0, sv1, sv2, svL, svc0, svc2, LK, HAS_CLS, GROUP)
                qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
                valid = _pair_mask(g, _causal_mask(row_ok[:, None] & col_ok[None, :], t, tk, L, LK, CAUSAL), GROUP)
                p = tl.exp2(tl.where(valid, qk - lse[:, None], float("-inf")))
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
            _store_rows(DQ, DQCF, dq * scale, s, t, row_ok, fr, d, d_ok, S1, S2,
                        sdq0, sdq1, sdq2, sdqL, L, D, HAS_CLS)


@triton.jit
def _cls_mean_kernel(OCF, OC, soc0, soc2, H, T, D, inv_T, BLOCK_D: tl.constexpr):
    """o_cls of one (b, h): the mean of its T per-frame outputs, summed in frame order."""
    pid = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for t in range(0, T):
        acc += tl.load(OCF + (pid * T + t) * D + d, mask=d_ok, other=0.0)
    tl.store(OC + (pid // H) * soc0 + (pid % H) * soc2 + d, (acc * inv_T).to(OC.dtype.element_ty), mask=d_ok)


@triton.jit
def _cls_grad_kernel(
    DQCF, DKCF, DVCF, DQC, DKC, DVC, sdqc0, sdqc2, sdkc0, sdkc2, sdvc0, sdvc2, H, T, D,
    BLOCK_D: tl.constexpr,
):
    """The cls q/k/v gradients of one (b, h): its per-frame partials summed in frame order."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    dq = tl.zeros([BLOCK_D], tl.float32)
    dk = tl.zeros([BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_D], tl.float32)
    for t in range(0, T):
        off = (pid * T + t) * D + d
        dq += tl.load(DQCF + off, mask=d_ok, other=0.0)
        dk += tl.load(DKCF + off, mask=d_ok, other=0.0)
        dv += tl.load(DVCF + off, mask=d_ok, other=0.0)
    tl.store(DQC + b * sdqc0 + h * sdqc2 + d, dq.to(DQC.dtype.element_ty), mask=d_ok)
    tl.store(DKC + b * sdkc0 + h * sdkc2 + d, dk.to(DKC.dtype.element_ty), mask=d_ok)
    tl.store(DVC + b * sdvc0 + h * sdvc2 + d, dv.to(DVC.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class Launch:
    """One kernel launch, as data: what the static report compiles and the traffic model counts.

    ``args`` are the kernel's runtime arguments by parameter name (tensors, ints,
    floats), ``constexprs`` its compile-time ones; :meth:`run` launches it.
    """

    kernel: object
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    regime: str

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))

    def run(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def _target(device: torch.device, target):
    """The compile target a plan is made for: "interpreter" on CPU, else the SM number."""
    if target is not None:
        return target
    if device.type != "cuda":
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


# Tile configurations, as data: (regime, pass, head-dim bucket, precision, arch, cls) -> candidate
# (rows, num_warps, num_stages), best first. "rows" is the tile height GROUP * SEQ; "arch"
# is 80 (Ampere, mma.sync) or 90 (Hopper and newer). The first candidate is what runs; on a
# GPU the candidates are the pruned tuning space (see :func:`_run`). Chosen with
# `python -m divattn kernels`: no register spill in any fp16/bf16 build at D <= 128 on
# sm_80 / sm_90, then the most resident blocks. The interpreter (CPU) runs small tiles of
# its own.
_HOPPER = {
    ("packed", "fwd", 64): [(64, 4, 2)],
    ("packed", "fwd", 128): [(32, 4, 2), (64, 8, 2)],
    ("packed", "fwd", 256): [(16, 8, 1)],
    ("packed", "bwd", 64): [(32, 8, 1)],
    ("packed", "bwd", 128): [(16, 4, 1)],
    ("packed", "bwd", 256): [(16, 8, 1)],
    ("frame", "fwd", 64): [(64, 8, 2), (32, 8, 2)],
    ("frame", "fwd", 128): [(32, 8, 2)],
    ("frame", "fwd", 256): [(16, 8, 1)],
    ("frame", "bwd", 64): [(64, 8, 1), (32, 8, 1)],
    ("frame", "bwd", 128): [(32, 8, 1), (16, 4, 1)],
    ("frame", "bwd", 256): [(16, 8, 1)],
    ("long", "fwd", 64): [(64, 8, 2), (32, 8, 2)],
    ("long", "fwd", 128): [(32, 8, 2)],
    ("long", "fwd", 256): [(16, 8, 1)],
    ("long", "bwd", 64): [(32, 8, 1), (64, 8, 1)],
    ("long", "bwd", 128): [(32, 8, 1), (16, 4, 1)],
    ("long", "bwd", 256): [(16, 8, 1)],
}
_AMPERE = {
    **_HOPPER,
    ("packed", "fwd", 128): [(32, 4, 2)],
    ("frame", "fwd", 64): [(32, 8, 2)],
    ("frame", "bwd", 64): [(32, 8, 1)],
    ("long", "fwd", 64): [(32, 8, 2)],
    ("long", "bwd", 64): [(32, 8, 1)],
}
# With a cls token the backward holds more per row (the cls row's merged loads): fewer rows.
_CLS = {
    ("frame", "bwd", 64): [(32, 8, 1)],
    ("frame", "bwd", 128): [(16, 8, 1)],
    ("long", "bwd", 64): [(32, 8, 1)],
    ("long", "bwd", 128): [(16, 8, 1)],
}
TILES = {
    (regime, pass_, bucket, "half", arch, cls): (_CLS.get((regime, pass_, bucket)) if cls else None) or cands
    for arch, table in ((80, _AMPERE), (90, _HOPPER))
    for (regime, pass_, bucket), cands in table.items()
    for cls in (False, True)
}
INTERPRETER_ROWS = 32


def _bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def _regime(E: int, rows: int) -> str:
    if triton.next_power_of_2(max(E, 1)) <= rows:
        return "packed"
    return "frame" if E <= FRAME_MAX else "long"


def tile_candidates(E: int, D: int, dtype: torch.dtype, target, pass_: str, has_cls: bool = False) -> list:
    """Candidate ``(regime, rows, num_warps, num_stages)`` for sequences of E rows (cls included).

    The regime follows from the first packed entry: sequences that fit its tile are
    packed, longer ones up to FRAME_MAX rows take the frame regime, the rest the long
    one. fp32 inputs take half the rows of the half-precision entries (twice the bytes
    per element).
    """
    if target == "interpreter":
        return [(_regime(E, INTERPRETER_ROWS), INTERPRETER_ROWS, 4, 1)]
    bucket = _bucket(max(16, triton.next_power_of_2(D)))
    arch = 90 if int(target) >= 90 else 80
    shrink = 2 if dtype == torch.float32 else 1
    first_packed = TILES[("packed", pass_, bucket, "half", arch, has_cls)][0][0] // shrink
    regime = _regime(E, max(16, first_packed))
    out = []
    for rows, warps, stages in TILES[(regime, pass_, bucket, "half", arch, has_cls)]:
        rows = max(16, rows // shrink)
        if regime == "packed" and triton.next_power_of_2(max(E, 1)) > rows:
            continue
        if (regime, rows, warps, stages) not in out:
            out.append((regime, rows, warps, stages))
    return out


@dataclass(frozen=True)
class Tiling:
    """How one problem is tiled: its sequences (S of them, indexed by (i0, i1, i2) with
    S1, S2), query rows L and key rows LK (the cls row excluded), and the tile
    configuration: GROUP sequences of SEQ rows per tile, n_q / n_k query / key tiles per
    sequence, tiles_per_prog of them per program."""

    S: int
    S1: int
    S2: int
    L: int
    LK: int
    has_cls: bool
    regime: str
    group: int
    seq: int
    block_d: int
    n_q: int
    n_k: int
    tiles_per_prog: int
    num_warps: int
    num_stages: int


def tile_config(op: str, q: torch.Tensor, k: torch.Tensor, has_cls: bool, target, pass_: str,
                candidate=None) -> Tiling:
    """The tiling of ``op`` on q, k (sequences of E = L + cls rows) for ``target``.

    ``candidate`` is one of :func:`tile_candidates`; by default the first.
    """
    (S0, S1, S2, L), _ = _geometry(q, op)
    LK = _geometry(k, op)[0][3]
    E, EK = L + int(has_cls), LK + int(has_cls)
    regime, rows, warps, stages = candidate or tile_candidates(max(E, EK), q.shape[-1], q.dtype, target, pass_,
                                                               has_cls)[0]
    if regime == "packed":
        seq = triton.next_power_of_2(max(E, EK, 1))
        group = rows // seq
    else:
        seq, group = rows, 1
    n_q, n_k = triton.cdiv(max(E, 1), seq), triton.cdiv(max(EK, 1), seq)
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    return Tiling(S0 * S1 * S2, S1, S2, L, LK, has_cls, regime, group, seq, block_d,
                  n_q, n_k, max(n_q, n_k) if regime != "long" else 1, warps, stages)


def _geometry(x: torch.Tensor, op: str):
    """(S0, S1, S2, L) and the matching strides (s0, s1, s2, sL) of a q/k/v/o-like tensor."""
    if op == "temporal":  # (B, T, N, H, D): sequences (b, n, h), rows t
        B, T, N, H, _ = x.shape
        return (B, N, H, T), (x.stride(0), x.stride(2), x.stride(3), x.stride(1))
    if op == "spatial":  # sequences (b, t, h), rows n
        B, T, N, H, _ = x.shape
        return (B, T, H, N), (x.stride(0), x.stride(1), x.stride(3), x.stride(2))
    if op == "joint":  # (B, L, H, D): sequences (b, h), rows l
        B, L, H, _ = x.shape
        return (B, 1, H, L), (x.stride(0), 0, x.stride(2), x.stride(1))
    raise ValueError(f"unknown op {op!r}")


def _prec(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _cls_strides(c: torch.Tensor):
    return c.stride(0), c.stride(1)


def _named(kernel, values) -> dict:
    """Map positional kernel arguments to the kernel's (non-constexpr) parameter names."""
    fn = getattr(kernel, "fn", kernel)
    return dict(zip(inspect.signature(fn).parameters, values))


_TUNED: dict = {}


def _run(make_plan, op: str, pass_: str, q: torch.Tensor, k: torch.Tensor, has_cls: bool) -> None:
    """Launch the plan with the first tile candidate or, on a GPU with several, the fastest.

    On a GPU the table's candidates for a problem are timed once (``triton.testing.do_bench``)
    and the winner is kept for that problem size; ``DIVATTN_AUTOTUNE=0`` always runs
    the first. Every launch writes its outputs whole, so timing runs are harmless.
    """
    target = _target(q.device, None)
    (S0, S1, S2, L), _ = _geometry(q, op)
    E = max(L, _geometry(k, op)[0][3]) + int(has_cls)
    candidates = tile_candidates(E, q.shape[-1], q.dtype, target, pass_, has_cls)
    choice = candidates[0]
    if len(candidates) > 1 and q.device.type == "cuda" and os.environ.get("DIVATTN_AUTOTUNE", "1") != "0":
        key = (op, pass_, E, q.shape[-1], q.dtype, S0 * S1 * S2, target)
        choice = _TUNED.get(key)
        if choice is None:
            from triton.testing import do_bench

            times = [do_bench(lambda c=c: [launch.run() for launch in make_plan(c)], warmup=5, rep=20)
                     for c in candidates]
            choice = _TUNED[key] = candidates[times.index(min(times))]
    for launch in make_plan(choice):
        launch.run()


def plan_forward(op, q, k, v, o, lse, scale, *, causal=False, cls=None, o_cls=None, cls_frames=None,
                 lse_cls=None, target=None, candidate=None) -> list:
    """The launches :func:`forward` makes for these arguments, on ``target`` (default: q's device).

    ``candidate``: a tile configuration from :func:`tile_candidates` (default: the first).
    """
    has_cls = cls is not None
    t = tile_config(op, q, k, has_cls, _target(q.device, target), "fwd", candidate)
    D = q.shape[-1]
    if has_cls:
        qc, kc, vc = cls
        cls_bufs = (qc, kc, vc, cls_frames, lse_cls)
        cls_strides = (*_cls_strides(qc), *_cls_strides(kc), *_cls_strides(vc))
    else:
        cls_bufs = (q, k, v, lse, lse)
        cls_strides = (0,) * 6
    plan = []
    if t.S > 0 and t.L + has_cls > 0:
        plan.append(Launch(
            _attn_fwd_kernel, (triton.cdiv(t.S, t.group), triton.cdiv(t.n_q, t.tiles_per_prog)),
            _named(_attn_fwd_kernel, (
                q, k, v, o, lse, *cls_bufs, *[st for x in (q, k, v, o) for st in _geometry(x, op)[1]], *cls_strides,
                t.S, t.S1, t.S2, t.L, t.LK, D, t.n_q, t.n_k, t.tiles_per_prog, scale * LOG2E)),
            dict(HAS_CLS=has_cls, GROUP=t.group, SEQ=t.seq, BLOCK_D=t.block_d, PREC=_prec(q.dtype),
                 CAUSAL=bool(causal)),
            t.num_warps, t.num_stages, t.regime))
    if has_cls:
        B, T, N, H, _ = q.shape
        if B * H > 0:
            plan.append(Launch(
                _cls_mean_kernel, (B * H,),
                _named(_cls_mean_kernel, (cls_frames, o_cls, *_cls_strides(o_cls), H, T, D, 1.0 / T)),
                dict(BLOCK_D=t.block_d), 1, 1, "epilogue"))
    return plan


def forward(op, q, k, v, o, lse, scale, *, causal=False, cls=None, o_cls=None, cls_frames=None, lse_cls=None):
    """Write attention outputs into ``o`` (and ``o_cls``) and row log-sum-exps into ``lse``.

    ``q, k, v, o`` are views in the op's layout (any strides, head dim contiguous);
    ``lse`` is a contiguous fp32 ``(S*L,)``; with ``cls``, ``o_cls`` is ``(B, H, D)``,
    ``cls_frames`` a contiguous fp32 ``(B, H, T, D)`` of per-frame cls outputs and
    ``lse_cls`` a contiguous fp32 ``(B, H, T)``.
    """
    _run(lambda c: plan_forward(op, q, k, v, o, lse, scale, causal=causal, cls=cls, o_cls=o_cls,
                                cls_frames=cls_frames, lse_cls=lse_cls, candidate=c), op, "fwd", q, k, cls is not None)


def plan_backward(op, q, k, v, o, do, lse, dq, dk, dv, scale, *,
                  causal=False, cls=None, d_cls=None, do_cls=None, cls_frames=None, lse_cls=None, target=None,
                  candidate=None) -> list:
    """The launches :func:`backward` makes (cls scratch buffers allocated on q's device)."""
    has_cls = cls is not None
    t = tile_config(op, q, k, has_cls, _target(q.device, target), "bwd", candidate)
    D = q.shape[-1]
    if has_cls:
        B, T, N, H, _ = q.shape
        qc, kc, vc = cls
        # per-frame partial gradients of the cls q/k/v, summed over frames by the epilogue
        partials = torch.empty((3, B, H, T, D), dtype=torch.float32, device=q.device)
        cls_bufs = (qc, kc, vc, do_cls, cls_frames, lse_cls, *partials)
        cls_strides = (*_cls_strides(qc), *_cls_strides(kc), *_cls_strides(vc), *_cls_strides(do_cls))
        inv_T = 1.0 / T
    else:
        cls_bufs = (q, k, v, do, lse, lse, lse, lse, lse)
        cls_strides = (0,) * 8
        inv_T = 1.0
    plan = []
    if t.S > 0 and t.L + has_cls > 0:
        plan.append(Launch(
            _attn_bwd_kernel, (triton.cdiv(t.S, t.group), triton.cdiv(max(t.n_q, t.n_k), t.tiles_per_prog)),
            _named(_attn_bwd_kernel, (
                q, k, v, o, do, lse, dq, dk, dv, *cls_bufs,
                *[st for x in (q, k, v, o, do, dq, dk, dv) for st in _geometry(x, op)[1]], *cls_strides,
                t.S, t.S1, t.S2, t.L, t.LK, D, t.n_q, t.n_k, t.tiles_per_prog, scale * LOG2E, scale, inv_T)),
            dict(HAS_CLS=has_cls, GROUP=t.group, SEQ=t.seq, BLOCK_D=t.block_d, PREC=_prec(q.dtype),
                 SINGLE=t.n_q == 1 and t.n_k == 1, CAUSAL=bool(causal)),
            t.num_warps, t.num_stages, t.regime))
    if has_cls and B * H > 0:
        dqc, dkc, dvc = d_cls
        plan.append(Launch(
            _cls_grad_kernel, (B * H,),
            _named(_cls_grad_kernel, (*partials, dqc, dkc, dvc, *_cls_strides(dqc), *_cls_strides(dkc),
                                      *_cls_strides(dvc), H, T, D)),
            dict(BLOCK_D=t.block_d), 1, 1, "epilogue"))
    return plan


def backward(op, q, k, v, o, do, lse, dq, dk, dv, scale, *,
             causal=False, cls=None, d_cls=None, do_cls=None, cls_frames=None, lse_cls=None):
    """Write dq, dk, dv (and the cls grads ``d_cls``) for the forward above.

    Every element of dq/dk/dv/d_cls is written once; nothing is accumulated across
    programs, so the result does not depend on launch order.
    """
    _run(lambda c: plan_backward(op, q, k, v, o, do, lse, dq, dk, dv, scale, causal=causal, cls=cls, d_cls=d_cls,
                                 do_cls=do_cls, cls_frames=cls_frames, lse_cls=lse_cls, candidate=c),
         op, "bwd", q, k, cls is not None)


__all__ = ["forward", "backward", "plan_forward", "plan_backward", "Launch", "Tiling", "LOG2E", "TILES",
           "tile_candidates", "tile_config"]
