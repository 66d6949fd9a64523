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
and nothing is transposed. A program owns a tile of ``GROUP * SEQ`` rows: when the
sequence is short (temporal attention, T <= SEQ) it packs ``GROUP`` whole sequences
into one tile and masks the score tile block-diagonally, because ``tl.dot`` needs at
least 16 rows; when it is long, ``GROUP == 1`` and the kernel is flash attention
(online softmax in base 2, fp32 accumulators, log-sum-exp saved, no score matrix in
memory). In spatial attention every frame's keys are ``[cls] + its N patches``: the
cls key/value are read once per row from their own pointers (stride 0 over frames)
and seed the online softmax; the cls query's per-frame attention, its mean over
frames, and the cls gradients run in small kernels of their own, one program per
(b, h), so the backward needs no atomics and is deterministic.

The log-sum-exp saved for the backward is in base 2 and includes the scale.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _seq_offset(s, S1, S2, st0, st1, st2):
    i2 = s % S2
    i1 = (s // S2) % S1
    i0 = s // (S1 * S2)
    return i0 * st0 + i1 * st1 + i2 * st2


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KC, VC,
    sq0, sq1, sq2, sqL,
    sk0, sk1, sk2, skL,
    sv0, sv1, sv2, svL,
    so0, so1, so2, soL,
    skc0, skc2, svc0, svc2,
    S, S1, S2, L, D, qk_scale,
    HAS_CLS: tl.constexpr, GROUP: tl.constexpr, SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    BLOCK: tl.constexpr = GROUP * SEQ
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    r = tl.arange(0, BLOCK)
    g = r // SEQ
    s = (pid_s * GROUP + g).to(tl.int64)  # [BLOCK] sequence of each row
    t = (pid_m * SEQ + r % SEQ).to(tl.int64)  # [BLOCK] row within its sequence
    row_ok = (s < S) & (t < L)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    row_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + (_seq_offset(s, S1, S2, sq0, sq1, sq2) + t * sqL)[:, None] + d[None, :],
                mask=row_mask, other=0.0)  # [BLOCK, BLOCK_D]

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    if HAS_CLS:
        i0 = s // (S1 * S2)
        i2 = s % S2
        kc = tl.load(KC + (i0 * skc0 + i2 * skc2)[:, None] + d[None, :], mask=row_mask, other=0.0)
        vc = tl.load(VC + (i0 * svc0 + i2 * svc2)[:, None] + d[None, :], mask=row_mask, other=0.0)
        m_i = tl.sum(q.to(tl.float32) * kc.to(tl.float32), 1) * qk_scale
        l_i += 1.0
        acc += vc.to(tl.float32)

    k_base = _seq_offset(s, S1, S2, sk0, sk1, sk2)
    v_base = _seq_offset(s, S1, S2, sv0, sv1, sv2)
    for start in range(0, L, SEQ):
        tk = (start + r % SEQ).to(tl.int64)  # [BLOCK] key row of each column
        col_ok = (s < S) & (tk < L)
        col_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + (k_base + tk * skL)[:, None] + d[None, :], mask=col_mask, other=0.0)
        v = tl.load(V + (v_base + tk * svL)[:, None] + d[None, :], mask=col_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK, BLOCK]
        valid = (g[:, None] == g[None, :]) & col_ok[None, :]
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(O + (_seq_offset(s, S1, S2, so0, so1, so2) + t * soL)[:, None] + d[None, :],
             o.to(O.dtype.element_ty), mask=row_mask)
    tl.store(LSE + s * L + t, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _cls_fwd_kernel(
    QC, KC, VC, K, V, OC, OCF, LSEC,
    sqc0, sqc2, skc0, skc2, svc0, svc2, soc0, soc2,
    sk0, sk1, sk2, skL, sv0, sv1, sv2, svL,
    T, H, N, D, qk_scale, inv_T,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # (b, h)
    b = pid // H
    h = pid % H
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    qc = tl.load(QC + b * sqc0 + h * sqc2 + d, mask=d_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
    kc = tl.load(KC + b * skc0 + h * skc2 + d, mask=d_ok, other=0.0).to(tl.float32)
    vc = tl.load(VC + b * svc0 + h * svc2 + d, mask=d_ok, other=0.0).to(tl.float32)
    s_cls = tl.sum(qc * kc, 0) * qk_scale
    mean = tl.zeros([BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for t in range(0, T):
        m = s_cls
        l = s_cls * 0.0 + 1.0
        acc = vc
        k_base = b * sk0 + t * sk1 + h * sk2
        v_base = b * sv0 + t * sv1 + h * sv2
        for start in range(0, N, BLOCK_N):
            nk = (start + n).to(tl.int64)
            ok = nk < N
            mask = ok[:, None] & d_ok[None, :]
            k = tl.load(K + (k_base + nk * skL)[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
            v = tl.load(V + (v_base + nk * svL)[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
            sc = tl.where(ok, tl.sum(k * qc[None, :], 1) * qk_scale, float("-inf"))  # [BLOCK_N]
            m_new = tl.maximum(m, tl.max(sc, 0))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(sc - m_new)
            l = l * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m = m_new
        o_t = acc / l
        tl.store(OCF + (pid * T + t) * D + d, o_t, mask=d_ok)
        tl.store(LSEC + pid * T + t, m + tl.log2(l))
        mean += o_t
    tl.store(OC + b * soc0 + h * soc2 + d, (mean * inv_T).to(OC.dtype.element_ty), mask=d_ok)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA,
    so0, so1, so2, soL, sdo0, sdo1, sdo2, sdoL,
    S, S1, S2, L, D,
    GROUP: tl.constexpr, SEQ: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK: tl.constexpr = GROUP * SEQ
    r = tl.arange(0, BLOCK)
    s = (tl.program_id(0) * GROUP + r // SEQ).to(tl.int64)
    t = (tl.program_id(1) * SEQ + r % SEQ).to(tl.int64)
    row_ok = (s < S) & (t < L)
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d < D)[None, :]
    o = tl.load(O + (_seq_offset(s, S1, S2, so0, so1, so2) + t * soL)[:, None] + d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + (_seq_offset(s, S1, S2, sdo0, sdo1, sdo2) + t * sdoL)[:, None] + d[None, :],
                 mask=mask, other=0.0)
    tl.store(DELTA + s * L + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, KC, VC, QC, GC, LSEC, DELTAC,
    sq0, sq1, sq2, sqL,
    sk0, sk1, sk2, skL,
    sv0, sv1, sv2, svL,
    sdo0, sdo1, sdo2, sdoL,
    sdq0, sdq1, sdq2, sdqL,
    sdk0, sdk1, sdk2, sdkL,
    sdv0, sdv1, sdv2, sdvL,
    skc0, skc2, svc0, svc2, sqc0, sqc2,
    S, S1, S2, L, D, qk_scale, scale,
    HAS_CLS: tl.constexpr, GROUP: tl.constexpr, SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, PREC: tl.constexpr,
):
    """dK, dV of one key tile (and dQ too when the whole sequence is one tile)."""
    BLOCK: tl.constexpr = GROUP * SEQ
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = tl.arange(0, BLOCK)
    g = r // SEQ
    s = (pid_s * GROUP + g).to(tl.int64)
    tk = (pid_n * SEQ + r % SEQ).to(tl.int64)
    col_ok = (s < S) & (tk < L)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    col_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + (_seq_offset(s, S1, S2, sk0, sk1, sk2) + tk * skL)[:, None] + d[None, :],
                mask=col_mask, other=0.0)  # [BLOCK, BLOCK_D]
    v = tl.load(V + (_seq_offset(s, S1, S2, sv0, sv1, sv2) + tk * svL)[:, None] + d[None, :],
                mask=col_mask, other=0.0)
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    i0 = s // (S1 * S2)
    i2 = s % S2
    if HAS_CLS:
        # The cls query of frame i1 attends to these keys with weight p_c.
        fr = (i0 * S2 + i2) * S1 + (s // S2) % S1  # (b, h, t) index of the key's frame
        qc = tl.load(QC + (i0 * sqc0 + i2 * sqc2)[:, None] + d[None, :], mask=col_mask, other=0.0).to(tl.float32)
        gc = tl.load(GC + (i0 * S2 + i2)[:, None] * D + d[None, :], mask=col_mask, other=0.0)
        lse_c = tl.load(LSEC + fr, mask=col_ok, other=0.0)
        delta_c = tl.load(DELTAC + fr, mask=col_ok, other=0.0)
        kf = k.to(tl.float32)
        p_c = tl.exp2(tl.where(col_ok, tl.sum(qc * kf, 1) * qk_scale - lse_c, float("-inf")))  # [BLOCK]
        dv += p_c[:, None] * gc
        ds_c = p_c * (tl.sum(gc * v.to(tl.float32), 1) - delta_c)
        dk += ds_c[:, None] * qc

    q_base = _seq_offset(s, S1, S2, sq0, sq1, sq2)
    do_base = _seq_offset(s, S1, S2, sdo0, sdo1, sdo2)
    for start in range(0, L, SEQ):
        t = (start + r % SEQ).to(tl.int64)
        row_ok = (s < S) & (t < L)
        row_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + (q_base + t * sqL)[:, None] + d[None, :], mask=row_mask, other=0.0)
        do = tl.load(DO + (do_base + t * sdoL)[:, None] + d[None, :], mask=row_mask, other=0.0)
        lse = tl.load(LSE + s * L + t, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + s * L + t, mask=row_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [rows, cols]
        valid = (g[:, None] == g[None, :]) & row_ok[:, None] & col_ok[None, :]
        p = tl.exp2(tl.where(valid, qk - lse[:, None], float("-inf")))
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        if SINGLE:
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC)  # [rows, BLOCK_D]
            if HAS_CLS:
                kc = tl.load(KC + (i0 * skc0 + i2 * skc2)[:, None] + d[None, :], mask=row_mask, other=0.0)
                vc = tl.load(VC + (i0 * svc0 + i2 * svc2)[:, None] + d[None, :], mask=row_mask, other=0.0)
                kc = kc.to(tl.float32)
                p_k = tl.exp2(tl.where(row_ok, tl.sum(q.to(tl.float32) * kc, 1) * qk_scale - lse, float("-inf")))
                ds_k = p_k * (tl.sum(do.to(tl.float32) * vc.to(tl.float32), 1) - delta)
                dq += ds_k[:, None] * kc
            tl.store(DQ + (_seq_offset(s, S1, S2, sdq0, sdq1, sdq2) + t * sdqL)[:, None] + d[None, :],
                     (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)

    tl.store(DK + (_seq_offset(s, S1, S2, sdk0, sdk1, sdk2) + tk * sdkL)[:, None] + d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=col_mask)
    tl.store(DV + (_seq_offset(s, S1, S2, sdv0, sdv1, sdv2) + tk * sdvL)[:, None] + d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KC, VC,
    sq0, sq1, sq2, sqL,
    sk0, sk1, sk2, skL,
    sv0, sv1, sv2, svL,
    sdo0, sdo1, sdo2, sdoL,
    sdq0, sdq1, sdq2, sdqL,
    skc0, skc2, svc0, svc2,
    S, S1, S2, L, D, qk_scale, scale,
    HAS_CLS: tl.constexpr, GROUP: tl.constexpr, SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    """dQ of one query tile, looping over key tiles (used when a sequence spans tiles)."""
    BLOCK: tl.constexpr = GROUP * SEQ
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    r = tl.arange(0, BLOCK)
    g = r // SEQ
    s = (pid_s * GROUP + g).to(tl.int64)
    t = (pid_m * SEQ + r % SEQ).to(tl.int64)
    row_ok = (s < S) & (t < L)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    row_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + (_seq_offset(s, S1, S2, sq0, sq1, sq2) + t * sqL)[:, None] + d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + (_seq_offset(s, S1, S2, sdo0, sdo1, sdo2) + t * sdoL)[:, None] + d[None, :],
                 mask=row_mask, other=0.0)
    lse = tl.load(LSE + s * L + t, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + s * L + t, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    if HAS_CLS:
        i0 = s // (S1 * S2)
        i2 = s % S2
        kc = tl.load(KC + (i0 * skc0 + i2 * skc2)[:, None] + d[None, :], mask=row_mask, other=0.0).to(tl.float32)
        vc = tl.load(VC + (i0 * svc0 + i2 * svc2)[:, None] + d[None, :], mask=row_mask, other=0.0).to(tl.float32)
        p_k = tl.exp2(tl.where(row_ok, tl.sum(q.to(tl.float32) * kc, 1) * qk_scale - lse, float("-inf")))
        ds_k = p_k * (tl.sum(do.to(tl.float32) * vc, 1) - delta)
        dq += ds_k[:, None] * kc

    k_base = _seq_offset(s, S1, S2, sk0, sk1, sk2)
    v_base = _seq_offset(s, S1, S2, sv0, sv1, sv2)
    for start in range(0, L, SEQ):
        tk = (start + r % SEQ).to(tl.int64)
        col_ok = (s < S) & (tk < L)
        col_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + (k_base + tk * skL)[:, None] + d[None, :], mask=col_mask, other=0.0)
        v = tl.load(V + (v_base + tk * svL)[:, None] + d[None, :], mask=col_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        valid = (g[:, None] == g[None, :]) & row_ok[:, None] & col_ok[None, :]
        p = tl.exp2(tl.where(valid, qk - lse[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + (_seq_offset(s, S1, S2, sdq0, sdq1, sdq2) + t * sdqL)[:, None] + d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _cls_bwd_kernel(
    QC, KC, VC, Q, K, V, DO, LSE, DELTA, OCF, LSEC, GC, DQC, DKC, DVC,
    sqc0, sqc2, skc0, skc2, svc0, svc2,
    sdqc0, sdqc2, sdkc0, sdkc2, sdvc0, sdvc2,
    sq0, sq1, sq2, sqL, sk0, sk1, sk2, skL, sv0, sv1, sv2, svL, sdo0, sdo1, sdo2, sdoL,
    T, H, N, D, qk_scale, scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradients of the cls q/k/v of one (b, h), summed over frames in a fixed order."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    qc = tl.load(QC + b * sqc0 + h * sqc2 + d, mask=d_ok, other=0.0).to(tl.float32)
    kc = tl.load(KC + b * skc0 + h * skc2 + d, mask=d_ok, other=0.0).to(tl.float32)
    vc = tl.load(VC + b * svc0 + h * svc2 + d, mask=d_ok, other=0.0).to(tl.float32)
    gc = tl.load(GC + pid * D + d, mask=d_ok, other=0.0)  # d o_cls / T, fp32
    dqc = tl.zeros([BLOCK_D], tl.float32)
    dkc = tl.zeros([BLOCK_D], tl.float32)
    dvc = tl.zeros([BLOCK_D], tl.float32)
    s_cls = tl.sum(qc * kc, 0) * qk_scale
    dp_cls = tl.sum(gc * vc, 0)
    n = tl.arange(0, BLOCK_N)
    for t in range(0, T):
        lse_t = tl.load(LSEC + pid * T + t)
        o_t = tl.load(OCF + (pid * T + t) * D + d, mask=d_ok, other=0.0)
        delta_t = tl.sum(gc * o_t, 0)
        p0 = tl.exp2(s_cls - lse_t)
        ds0 = p0 * (dp_cls - delta_t)
        dqc += ds0 * kc
        dkc += ds0 * qc
        dvc += p0 * gc
        seq = (b * T + t) * H + h  # spatial sequence (b, t, h)
        q_base = b * sq0 + t * sq1 + h * sq2
        k_base = b * sk0 + t * sk1 + h * sk2
        v_base = b * sv0 + t * sv1 + h * sv2
        do_base = b * sdo0 + t * sdo1 + h * sdo2
        for start in range(0, N, BLOCK_N):
            nk = (start + n).to(tl.int64)
            ok = nk < N
            mask = ok[:, None] & d_ok[None, :]
            # the cls query against this frame's patch keys
            k = tl.load(K + (k_base + nk * skL)[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
            v = tl.load(V + (v_base + nk * svL)[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
            p = tl.exp2(tl.where(ok, tl.sum(k * qc[None, :], 1) * qk_scale - lse_t, float("-inf")))
            ds = p * (tl.sum(v * gc[None, :], 1) - delta_t)
            dqc += tl.sum(ds[:, None] * k, 0)
            # this frame's patch queries against the cls key
            q = tl.load(Q + (q_base + nk * sqL)[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
            do = tl.load(DO + (do_base + nk * sdoL)[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
            lse = tl.load(LSE + seq * N + nk, mask=ok, other=0.0)
            delta = tl.load(DELTA + seq * N + nk, mask=ok, other=0.0)
            pr = tl.exp2(tl.where(ok, tl.sum(q * kc[None, :], 1) * qk_scale - lse, float("-inf")))
            dsr = pr * (tl.sum(do * vc[None, :], 1) - delta)
            dkc += tl.sum(dsr[:, None] * q, 0)
            dvc += tl.sum(pr[:, None] * do, 0)
    tl.store(DQC + b * sdqc0 + h * sdqc2 + d, (dqc * scale).to(DQC.dtype.element_ty), mask=d_ok)
    tl.store(DKC + b * sdkc0 + h * sdkc2 + d, (dkc * scale).to(DKC.dtype.element_ty), mask=d_ok)
    tl.store(DVC + b * sdvc0 + h * sdvc2 + d, dvc.to(DVC.dtype.element_ty), mask=d_ok)


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


def _config(L: int, D: int, target):
    """(GROUP, SEQ, BLOCK_D, num_warps, num_stages, regime): a tile of GROUP*SEQ rows holds GROUP sequences."""
    block = 32 if target == "interpreter" else (64 if D <= 128 else 32)
    Lp = triton.next_power_of_2(max(L, 1))
    if Lp <= block:
        group, seq, regime = block // Lp, Lp, "packed"
    else:
        group, seq, regime = 1, block, "long"
    block_d = max(16, triton.next_power_of_2(D))
    return group, seq, block_d, 4, (1 if target == "interpreter" else 2), regime


def _prec(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _cls_strides(c: torch.Tensor):
    return c.stride(0), c.stride(1)


def _named(kernel, values) -> dict:
    """Map positional kernel arguments to the kernel's (non-constexpr) parameter names."""
    fn = getattr(kernel, "fn", kernel)
    names = list(inspect.signature(fn).parameters)
    return dict(zip(names, values))


def plan_forward(op, q, k, v, o, lse, scale, *, cls=None, o_cls=None, cls_frames=None, lse_cls=None,
                 target=None) -> list:
    """The launches :func:`forward` makes for these arguments, on ``target`` (default: q's device)."""
    target = _target(q.device, target)
    (S0, S1, S2, L), sq = _geometry(q, op)
    _, sk = _geometry(k, op)
    _, sv = _geometry(v, op)
    _, so = _geometry(o, op)
    D = q.shape[-1]
    S = S0 * S1 * S2
    group, seq, block_d, warps, stages, regime = _config(L, D, target)
    qk_scale = scale * LOG2E
    has_cls = cls is not None
    kc, vc = (cls[1], cls[2]) if has_cls else (k, v)
    ckc = _cls_strides(kc) if has_cls else (0, 0)
    cvc = _cls_strides(vc) if has_cls else (0, 0)
    plan = []
    if S > 0 and L > 0:
        plan.append(Launch(
            _attn_fwd_kernel, (triton.cdiv(S, group), triton.cdiv(L, seq)),
            _named(_attn_fwd_kernel, (q, k, v, o, lse, kc, vc, *sq, *sk, *sv, *so, *ckc, *cvc,
                                      S, S1, S2, L, D, qk_scale)),
            dict(HAS_CLS=has_cls, GROUP=group, SEQ=seq, BLOCK_D=block_d, PREC=_prec(q.dtype)),
            warps, stages, regime))
    if has_cls:
        B, T, N, H, _ = q.shape
        if B * H > 0:
            qc = cls[0]
            plan.append(Launch(
                _cls_fwd_kernel, (B * H,),
                _named(_cls_fwd_kernel, (
                    qc, kc, vc, k, v, o_cls, cls_frames, lse_cls,
                    *_cls_strides(qc), *ckc, *cvc, *_cls_strides(o_cls),
                    k.stride(0), k.stride(1), k.stride(3), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(3), v.stride(2),
                    T, H, N, D, qk_scale, 1.0 / T)),
                dict(BLOCK_N=32, BLOCK_D=block_d), warps, stages, "cls"))
    return plan


def forward(op, q, k, v, o, lse, scale, *, cls=None, o_cls=None, cls_frames=None, lse_cls=None):
    """Write attention outputs into ``o`` (and ``o_cls``) and row log-sum-exps into ``lse``.

    ``q, k, v, o`` are views in the op's layout (any strides, head dim contiguous);
    ``lse`` is a contiguous fp32 ``(S*L,)``; with ``cls``, ``o_cls`` is ``(B, H, D)``,
    ``cls_frames`` a contiguous fp32 ``(B, H, T, D)`` of per-frame cls outputs and
    ``lse_cls`` a contiguous fp32 ``(B, H, T)``.
    """
    for launch in plan_forward(op, q, k, v, o, lse, scale, cls=cls, o_cls=o_cls,
                               cls_frames=cls_frames, lse_cls=lse_cls):
        launch.run()


def plan_backward(op, q, k, v, o, do, lse, dq, dk, dv, scale, *,
                  cls=None, d_cls=None, do_cls=None, cls_frames=None, lse_cls=None, target=None) -> list:
    """The launches :func:`backward` makes (scratch buffers allocated on q's device)."""
    target = _target(q.device, target)
    (S0, S1, S2, L), sq = _geometry(q, op)
    strides = {name: _geometry(x, op)[1] for name, x in
               (("k", k), ("v", v), ("o", o), ("do", do), ("dq", dq), ("dk", dk), ("dv", dv))}
    D = q.shape[-1]
    S = S0 * S1 * S2
    group, seq, block_d, warps, stages, regime = _config(L, D, target)
    qk_scale = scale * LOG2E
    prec = _prec(q.dtype)
    has_cls = cls is not None
    delta = torch.empty_like(lse)
    if has_cls:
        B, T, N, H, _ = q.shape
        qc, kc, vc = cls
        gc = (do_cls.float() / T).contiguous()  # (B, H, D)
        delta_cls = (cls_frames * gc[:, :, None, :]).sum(-1).contiguous()  # (B, H, T)
        cls_args = (kc, vc, qc, gc, lse_cls, delta_cls)
        cls_strides = (*_cls_strides(kc), *_cls_strides(vc), *_cls_strides(qc))
    else:
        cls_args = (k, v, q, lse, lse, lse)
        cls_strides = (0,) * 6
    plan = []
    if S > 0 and L > 0:
        grid = (triton.cdiv(S, group), triton.cdiv(L, seq))
        plan.append(Launch(
            _bwd_delta_kernel, grid,
            _named(_bwd_delta_kernel, (o, do, delta, *strides["o"], *strides["do"], S, S1, S2, L, D)),
            dict(GROUP=group, SEQ=seq, BLOCK_D=block_d), warps, stages, regime))
        single = L <= seq
        plan.append(Launch(
            _attn_bwd_kernel, grid,
            _named(_attn_bwd_kernel, (
                q, k, v, do, lse, delta, dq, dk, dv, *cls_args,
                *sq, *strides["k"], *strides["v"], *strides["do"], *strides["dq"], *strides["dk"], *strides["dv"],
                *cls_strides, S, S1, S2, L, D, qk_scale, scale)),
            dict(HAS_CLS=has_cls, GROUP=group, SEQ=seq, BLOCK_D=block_d, SINGLE=single, PREC=prec),
            warps, stages, regime))
        if not single:
            plan.append(Launch(
                _attn_bwd_dq_kernel, grid,
                _named(_attn_bwd_dq_kernel, (
                    q, k, v, do, lse, delta, dq, *cls_args[:2],
                    *sq, *strides["k"], *strides["v"], *strides["do"], *strides["dq"], *cls_strides[:4],
                    S, S1, S2, L, D, qk_scale, scale)),
                dict(HAS_CLS=has_cls, GROUP=group, SEQ=seq, BLOCK_D=block_d, PREC=prec),
                warps, stages, regime))
    if has_cls and B * H > 0:
        dqc, dkc, dvc = d_cls
        plan.append(Launch(
            _cls_bwd_kernel, (B * H,),
            _named(_cls_bwd_kernel, (
                qc, kc, vc, q, k, v, do, lse, delta, cls_frames, lse_cls, gc, dqc, dkc, dvc,
                *_cls_strides(qc), *_cls_strides(kc), *_cls_strides(vc),
                *_cls_strides(dqc), *_cls_strides(dkc), *_cls_strides(dvc),
                q.stride(0), q.stride(1), q.stride(3), q.stride(2),
                k.stride(0), k.stride(1), k.stride(3), k.stride(2),
                v.stride(0), v.stride(1), v.stride(3), v.stride(2),
                do.stride(0), do.stride(1), do.stride(3), do.stride(2),
                T, H, N, D, qk_scale, scale)),
            dict(BLOCK_N=32, BLOCK_D=block_d), warps, stages, "cls"))
    return plan


def backward(op, q, k, v, o, do, lse, dq, dk, dv, scale, *,
             cls=None, d_cls=None, do_cls=None, cls_frames=None, lse_cls=None):
    """Write dq, dk, dv (and the cls grads ``d_cls``) for the forward above.

    Every element of dq/dk/dv/d_cls is written; nothing is accumulated, so the
    result does not depend on launch order.
    """
    for launch in plan_backward(op, q, k, v, o, do, lse, dq, dk, dv, scale, cls=cls, d_cls=d_cls,
                                do_cls=do_cls, cls_frames=cls_frames, lse_cls=lse_cls):
        launch.run()


__all__ = ["forward", "backward", "plan_forward", "plan_backward", "Launch", "LOG2E"]
