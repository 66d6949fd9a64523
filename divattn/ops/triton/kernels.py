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
and nothing is transposed. Sequence ``s`` is ``((i0 * n_i1) + i1) * n_i2 + i2``.

**Argument names.** Tensors are upper case, everything else lower case; ``x`` below
stands for any of q, k, v, o, do, dq, dk, dv (``X`` for its tensor):

==========================  ================================================================
argument                    meaning
==========================  ================================================================
``Q K V O DO DQ DK DV``     the op's views (any strides, head dim contiguous)
``LSE``                     fp32 ``(S, L)``: each row's log-sum-exp, base 2, scale included
``Q_CLS K_CLS ...``         the cls vectors ``(B, H, D)`` of q, k, v, do and their gradients
``O_CLS_FR LSE_CLS_FR``     fp32 ``(B, H, T, D)`` / ``(B, H, T)``: the cls query's output and
                            log-sum-exp in each frame (its row of each frame's attention)
``DQ_CLS_FR DK_CLS_FR ..``  fp32 ``(B, H, T, D)``: each frame's part of the cls gradients
``stride_x0, _x1, _x2``     X's strides over i0, i1, i2 (0 over an index the op lacks)
``stride_xL``               X's stride from one row (t, n or l) to the next
``stride_xc0, _xc2``        the cls vector's strides over i0 (b) and i2 (h); none over i1
``n_seq``                   S, the number of sequences; ``n_i1, n_i2`` the extents of i1, i2
``L, L_k``                  query rows and key rows of a sequence, the cls row excluded
                            (``L_k > L``: the queries are the last L of L_k frames)
``D``                       the head dim (``BLOCK_D``: its power of two, at least 16)
``H, T``                    (cls kernels) heads and frames of the ``(B, H, T, ·)`` buffers
``qk_scale``                ``scale * log2(e)``: scores in base 2; ``inv_T`` is 1 / T
``n_q_tiles, n_k_tiles``    query / key tiles of one sequence; ``tiles_per_prog`` per program
``REAL_ROWS REAL_GROUPS``   int32 ``(n_i0,)`` (COUNTS): sequence (i0, i1, i2) has ``REAL_ROWS[i0]``
                            real key rows, its first ones, when ``i1 < REAL_GROUPS[i0]``, else none
``MASK``                    uint8 (MASKED): the token mask, 1 = real; row r of sequence (i0, i1, i2)
                            is its element ``i0 * stride_m0 + i1 * stride_m1 + r * stride_mL``
                            (queries: ``r + L_k - L``); none over i2 (heads share it)
``CLS_W``                   fp32 ``(n_i0, T)`` (MASKED, cls): frame t's weight in o_cls
``GROUP, SEQ``              (constexpr) sequences per tile, rows of each in the tile
``HAS_CLS CAUSAL SINGLE``   (constexpr) cls row present; causal mask; every row in one tile
``COUNTS``                  (constexpr) a padded batch: REAL_ROWS / REAL_GROUPS are read
``MASKED``                  (constexpr) a padded batch given as a token mask: MASK / CLS_W are read
``PREC``                    (constexpr) ``tl.dot``'s input precision ("tf32" or "ieee")
==========================  ================================================================

Inside the kernels: ``q_rows`` / ``k_rows`` are L / L_k plus the cls row, ``real_q`` /
``real_k`` the real ones among the first L / L_k (L / L_k without COUNTS), ``lane`` a
tile position (``GROUP * SEQ`` of them), ``in_tile`` the tile-local sequence of each
lane, ``seq`` the program's sequence (one per lane when ``GROUP > 1``), ``frame`` its
``(i0, i2, i1)`` = ``(b, h, t)`` position in the per-frame cls buffers, ``row`` / ``key``
a lane's query / key row within its sequence; ``row_in`` / ``key_in`` say a lane holds a
row of its sequence (what a store writes), ``row_ok`` / ``key_ok`` that the row is real
(what a load reads and the scores keep).

**Padded batches (COUNTS).** A sequence's real rows are its first ``real_k`` key rows
and first ``real_q = max(real_k - (L_k - L), 0)`` query rows (the queries are the last L
of the L_k frames), plus the cls row, always real. A padded row is never loaded and never
a key; its output, log-sum-exp (-inf) and gradients are written as zeros. With one
sequence per tile, the loops visit only the tiles that hold a real row
(:func:`_tile_range`): a tile of padding costs its stores and nothing else. The cls
query's output averages the frames that hold a real patch: frame weight ``cls_w``
(:func:`_frame_weight`).

**Token masks (MASKED).** A mask is read once per row, where the row is loaded: a row it
calls padding is not loaded, is never a key, and its output and gradients are written as
zeros, as with counts (and both may be given: a row is real where both say so). The cls
row is always real, and its frame weights come from the host (``CLS_W``, the weights of
:meth:`divattn.ops.masks.Padding.frame_weights`). A query tile with no real row visits no
key tile (forward with one sequence per tile, dQ), and a key tile with no real key no
query tile (dK/dV): no loads, no products. Inside a real tile's loop a key (query) tile of
padding is not loaded but is multiplied, as zeros: skipping it there takes a branch in
the inner loop, whose registers spill. Counts skip by loop bounds alone, and are the
cheap form.

**cls folded in.** With a cls token every frame's sequence is extended by one row:
row ``L`` of the queries is the cls query and column ``L`` of the keys the cls key,
both read from their own ``(B, H, D)`` pointers (stride 0 over frames). The cls
query's per-frame output and log-sum-exp go to small fp32 ``(B, H, T, ·)`` buffers,
and its per-frame gradients (and the cls key/value gradients of each frame) to
``(B, H, T, D)`` partials; a tiny epilogue reduces them over frames in a fixed
order. Spatial attention with cls therefore reads each frame's K/V once, like
spatial attention without it, and the backward needs no atomics.

**Tiles.** A program owns ``GROUP`` sequences and a range of ``SEQ``-row tiles of
them (``GROUP * SEQ`` rows per tile). Regimes (chosen by the planner,
:func:`divattn.ops.triton.plan.tile_config`):

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
tile) and is deterministic.
"""

import triton
import triton.language as tl


@triton.jit
def _seq_offset(seq, n_i1, n_i2, stride0, stride1, stride2):
    i2 = seq % n_i2
    i1 = (seq // n_i2) % n_i1
    i0 = seq // (n_i1 * n_i2)
    return i0 * stride0 + i1 * stride1 + i2 * stride2


@triton.jit
def _cls_offset(seq, n_i1, n_i2, stride_c0, stride_c2):
    """Offset of sequence seq's cls vector: its (i0, i2), stride 0 over i1 (frames)."""
    return (seq // (n_i1 * n_i2)) * stride_c0 + (seq % n_i2) * stride_c2


@triton.jit
def _frame_index(seq, n_i1, n_i2):
    """Position of sequence seq = (i0, i1, i2) in a contiguous (n_i0, n_i2, n_i1) buffer: (b, h, t)."""
    i2 = seq % n_i2
    i1 = (seq // n_i2) % n_i1
    i0 = seq // (n_i1 * n_i2)
    return (i0 * n_i2 + i2) * n_i1 + i1


@triton.jit
def _sequence_counts(REAL_ROWS, REAL_GROUPS, seq, seq_ok, n_i1, n_i2, L_k, inv_T,
                     COUNTS: tl.constexpr, GROUP: tl.constexpr):
    """``real_k`` (sequence seq's real key rows, its first ones) and ``cls_w`` (the weight of its
    frame in the cls output, :func:`_frame_weight`); L_k and 1 / T without COUNTS."""
    real_k = L_k
    cls_w = inv_T
    if COUNTS:
        i0 = seq // (n_i1 * n_i2)
        i1 = (seq // n_i2) % n_i1
        if GROUP == 1:
            rows = tl.load(REAL_ROWS + i0)
            groups = tl.load(REAL_GROUPS + i0)
        else:
            rows = tl.load(REAL_ROWS + i0, mask=seq_ok, other=0)
            groups = tl.load(REAL_GROUPS + i0, mask=seq_ok, other=0)
        real_k = tl.where(i1 < groups, rows, 0)
        cls_w = _frame_weight(i1, rows, groups, inv_T)
    return real_k, cls_w


@triton.jit
def _frame_weight(t, rows, groups, inv_T):
    """Frame t's weight in the cls output of spatial attention (rows: patches, groups: frames):
    ``1 / n`` on the n frames that hold a real patch, 0 on the others, ``inv_T`` on every
    frame when none does (each then gives the cls value)."""
    n = tl.where(rows > 0, groups, 0)
    return tl.where(n > 0, tl.where(t < n, 1.0 / tl.maximum(n, 1).to(tl.float32), 0.0), inv_T)


@triton.jit
def _live(ok, row, real, L, HAS_CLS: tl.constexpr, COUNTS: tl.constexpr):
    """``ok`` restricted (COUNTS) to real rows: the first ``real`` and the cls row L."""
    out = ok
    if COUNTS:
        live = row < real
        if HAS_CLS:
            live = live | (row == L)
        out = ok & live
    return out


@triton.jit
def _masked(ok, seq, row, shift, L, MASK, n_i1, n_i2, stride_m0, stride_m1, stride_mL,
            HAS_CLS: tl.constexpr, MASKED: tl.constexpr):
    """``ok`` restricted (MASKED) to the rows the token mask calls real: row ``r < L`` is mask
    token ``r + shift`` of its sequence (``shift = L_k - L`` for the queries, 0 for the keys);
    the cls row L is always real."""
    out = ok
    if MASKED:
        at = _seq_offset(seq, n_i1, n_i2, stride_m0, stride_m1, 0) + (row + shift) * stride_mL
        real = tl.load(MASK + at, mask=ok & (row < L), other=0) != 0
        if HAS_CLS:
            real = real | (row == L)
        out = ok & real
    return out


@triton.jit
def _any(ok):
    """Whether any lane of ``ok`` is set: a tile holds a real row."""
    return tl.max(ok.to(tl.int32), 0) > 0


@triton.jit
def _cls_weight(cls_w, CLS_W, seq, seq_ok, n_i1, n_i2, HAS_CLS: tl.constexpr, MASKED: tl.constexpr,
                GROUP: tl.constexpr):
    """``cls_w``, or (MASKED, cls) the host's weight of sequence seq's frame: ``CLS_W[i0, i1]``."""
    out = cls_w
    if MASKED and HAS_CLS:
        at = (seq // (n_i1 * n_i2)) * n_i1 + (seq // n_i2) % n_i1
        if GROUP == 1:
            out = tl.load(CLS_W + at)
        else:
            out = tl.load(CLS_W + at, mask=seq_ok, other=0.0)
    return out


@triton.jit
def _tile_range(start, stop, real, L, SEQ: tl.constexpr, HAS_CLS: tl.constexpr, COUNTS: tl.constexpr,
                GROUP: tl.constexpr):
    """``(end, last)`` of a loop over tiles ``start .. stop - 1`` of one sequence that visits only
    tiles holding a real row (COUNTS, one sequence per tile): iterations below ``end`` are the
    tiles of the first ``real`` rows, and with cls one more, up to ``last``, is the cls row's tile
    L // SEQ (:func:`_tile_at`). Otherwise every tile: ``(stop, stop)``."""
    end = stop
    last = stop
    if COUNTS and GROUP == 1:
        end = tl.maximum(tl.minimum(stop, tl.cdiv(real, SEQ)), start)
        last = end
        if HAS_CLS:
            last = end + ((L // SEQ >= end) & (L // SEQ < stop)).to(tl.int32)
    return end, last


@triton.jit
def _tile_at(i, end, L, SEQ: tl.constexpr, HAS_CLS: tl.constexpr, COUNTS: tl.constexpr, GROUP: tl.constexpr):
    """The tile iteration ``i`` of a :func:`_tile_range` loop visits."""
    tile = i
    if COUNTS and GROUP == 1 and HAS_CLS:
        tile = tl.where(i < end, i, L // SEQ)
    return tile


@triton.jit
def _unless_padding(last, start, tile, real, L, SEQ: tl.constexpr, HAS_CLS: tl.constexpr, COUNTS: tl.constexpr,
                    GROUP: tl.constexpr):
    """``last``, or ``start`` (no iteration) when ``tile`` holds no real row (COUNTS, one
    sequence per tile): the inner loop of a tile of padding does nothing."""
    out = last
    if COUNTS and GROUP == 1:
        live = tile * SEQ < real
        if HAS_CLS:
            live = live | (tile == L // SEQ)
        out = tl.where(live, last, start)
    return out


@triton.jit
def _program_sequences(n_seq, n_i1, n_i2, D, tiles_per_prog,
                       GROUP: tl.constexpr, SEQ: tl.constexpr, BLOCK_D: tl.constexpr):
    """The prologue of both attention kernels: this program's sequences and its first tile.

    Returns ``lane`` (the tile positions), ``in_tile`` (the tile-local sequence of each
    lane), ``seq`` (the program's one sequence, or each lane's when GROUP > 1), ``seq_ok``
    (``[lanes]``: the sequence exists), ``frame`` (its position in the per-frame cls
    buffers), ``d`` / ``d_ok`` (the head-dim lanes, those below D) and ``first_tile``.
    """
    lane = tl.arange(0, GROUP * SEQ)
    in_tile = lane // SEQ
    if GROUP == 1:
        seq = tl.program_id(0).to(tl.int64)
    else:
        seq = (tl.program_id(0) * GROUP + in_tile).to(tl.int64)
    seq_ok = (seq + tl.zeros_like(lane)) < n_seq
    frame = _frame_index(seq, n_i1, n_i2)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    first_tile = tl.program_id(1) * tiles_per_prog
    return lane, in_tile, seq, seq_ok, frame, d, d_ok, first_tile


@triton.jit
def _load_rows(X, X_CLS, seq, row, ok, d, d_ok, n_i1, n_i2, stride0, stride1, stride2, strideL, stride_c0, stride_c2,
               L, HAS_CLS: tl.constexpr, GROUP: tl.constexpr):
    """Rows ``row`` of sequences ``seq`` as a [rows, BLOCK_D] tile; row L is the cls vector (X_CLS)."""
    x = tl.load(X + (_seq_offset(seq, n_i1, n_i2, stride0, stride1, stride2) + row * strideL)[:, None] + d[None, :],
                mask=(ok & (row < L))[:, None] & d_ok[None, :], other=0.0)
    if HAS_CLS:
        is_cls = ok & (row == L)
        if GROUP == 1:  # one sequence: its cls vector, loaded once and placed in row L
            xc = tl.load(X_CLS + _cls_offset(seq, n_i1, n_i2, stride_c0, stride_c2) + d, mask=d_ok,
                         other=0.0)  # [BLOCK_D]
            x = tl.where(is_cls[:, None], xc[None, :].to(x.dtype), x)
        else:
            xc = tl.load(X_CLS + _cls_offset(seq, n_i1, n_i2, stride_c0, stride_c2)[:, None] + d[None, :],
                         mask=is_cls[:, None] & d_ok[None, :], other=0.0)
            x = tl.where(is_cls[:, None], xc.to(x.dtype), x)
    return x


@triton.jit
def _store_rows(X, X_CLS_FR, val, seq, row, ok, frame, d, d_ok, n_i1, n_i2, stride0, stride1, stride2, strideL, L, D,
                HAS_CLS: tl.constexpr):
    """Store rows ``row < L`` to X (in X's dtype) and the cls row ``row == L`` to the fp32 X_CLS_FR[frame]."""
    mask = (ok & (row < L))[:, None] & d_ok[None, :]
    tl.store(X + (_seq_offset(seq, n_i1, n_i2, stride0, stride1, stride2) + row * strideL)[:, None] + d[None, :],
             val.to(X.dtype.element_ty), mask=mask)
    if HAS_CLS:
        is_cls = ok & (row == L)
        tl.store(X_CLS_FR + ((frame * D) + tl.zeros_like(row))[:, None] + d[None, :], val,
                 mask=is_cls[:, None] & d_ok[None, :])


@triton.jit
def _causal_mask(ok, row, key, L, L_k, CAUSAL: tl.constexpr):
    """``ok``, and with CAUSAL only keys at or before the query's frame (query row is frame L_k - L + row)."""
    if CAUSAL:
        ok = ok & (key.to(tl.int32)[None, :] <= (row.to(tl.int32) + (L_k - L))[:, None])
    return ok


@triton.jit
def _key_tiles_seen(q_tile, n_k_tiles, L, L_k, SEQ: tl.constexpr, CAUSAL: tl.constexpr, GROUP: tl.constexpr):
    """How many key tiles query tile ``q_tile`` looks at: tiles above the causal diagonal are skipped.

    (A packed tile holds whole sequences: there is one key tile and nothing to skip.)
    """
    n = n_k_tiles
    if CAUSAL and GROUP == 1:
        n = tl.minimum(n_k_tiles, ((q_tile + 1) * SEQ - 1 + (L_k - L)) // SEQ + 1)
    return n


@triton.jit
def _first_query_tile(k_tile, L, L_k, SEQ: tl.constexpr, CAUSAL: tl.constexpr, GROUP: tl.constexpr):
    """The first query tile that sees key tile ``k_tile`` (0 unless causal across several tiles)."""
    first = 0
    if CAUSAL and GROUP == 1:
        first = tl.maximum(k_tile * SEQ - (L_k - L), 0) // SEQ
    return first


@triton.jit
def _pair_mask(in_tile, ok, GROUP: tl.constexpr):
    """``ok`` restricted to (row, column) pairs of one sequence (all pairs when a tile holds one).

    ``in_tile`` is the tile-local sequence of each row / column.
    """
    if GROUP == 1:
        out = ok
    else:
        out = (in_tile[:, None] == in_tile[None, :]) & ok
    return out


@triton.jit
def _dot_iso(a, b, in_tile, PREC: tl.constexpr, ISOLATE: tl.constexpr):
    """``a @ b`` over the token dim, where ``a`` is zero outside its block diagonal.

    ``in_tile`` is the tile-local sequence of each row / column (the blocks).

    With ISOLATE (packed tiles), a non-finite entry of ``b`` reaches exactly the
    outputs of its own sequence in its own column, as in a per-sequence product —
    not, through ``0 * NaN``, the other sequences of the tile.
    """
    if ISOLATE:
        bad = (b != b) | (tl.abs(b.to(tl.float32)) == float("inf"))
        n_bad = tl.sum(tl.sum(bad.to(tl.int32), 1), 0)
        out = tl.dot(a, tl.where(bad, tl.zeros_like(b), b), input_precision=PREC)
        if n_bad > 0:
            same = in_tile[:, None] == in_tile[None, :]
            hits = tl.dot(same.to(b.dtype), bad.to(b.dtype), input_precision=PREC)
            out = tl.where(hits > 0, float("nan"), out)
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, Q_CLS, K_CLS, V_CLS, O_CLS_FR, LSE_CLS_FR, REAL_ROWS, REAL_GROUPS, MASK,
    stride_q0, stride_q1, stride_q2, stride_qL,
    stride_k0, stride_k1, stride_k2, stride_kL,
    stride_v0, stride_v1, stride_v2, stride_vL,
    stride_o0, stride_o1, stride_o2, stride_oL,
    stride_qc0, stride_qc2, stride_kc0, stride_kc2, stride_vc0, stride_vc2, stride_m0, stride_m1, stride_mL,
    n_seq, n_i1, n_i2, L, L_k, D, n_q_tiles, n_k_tiles, tiles_per_prog, qk_scale,
    HAS_CLS: tl.constexpr, GROUP: tl.constexpr, SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, CAUSAL: tl.constexpr, COUNTS: tl.constexpr, MASKED: tl.constexpr,
):
    BLOCK: tl.constexpr = GROUP * SEQ
    q_rows = L + HAS_CLS
    k_rows = L_k + HAS_CLS
    lane, in_tile, seq, seq_ok, frame, d, d_ok, first_tile = _program_sequences(
        n_seq, n_i1, n_i2, D, tiles_per_prog, GROUP, SEQ, BLOCK_D)
    real_k, cls_w = _sequence_counts(REAL_ROWS, REAL_GROUPS, seq, seq_ok, n_i1, n_i2, L_k, 1.0, COUNTS, GROUP)
    real_q = tl.maximum(real_k - (L_k - L), 0)
    for q_tile in range(first_tile, tl.minimum(first_tile + tiles_per_prog, n_q_tiles)):
        row = (q_tile * SEQ + lane % SEQ).to(tl.int64)  # [BLOCK] query row within its sequence
        row_in = seq_ok & (row < q_rows)
        row_ok = _masked(_live(row_in, row, real_q, L, HAS_CLS, COUNTS), seq, row, L_k - L, L, MASK, n_i1, n_i2,
                         stride_m0, stride_m1, stride_mL, HAS_CLS, MASKED)
        q = _load_rows(Q, Q_CLS, seq, row, row_ok, d, d_ok, n_i1, n_i2, stride_q0, stride_q1, stride_q2, stride_qL,
                       stride_qc0, stride_qc2, L, HAS_CLS, GROUP)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        k_end, k_last = _tile_range(0, _key_tiles_seen(q_tile, n_k_tiles, L, L_k, SEQ, CAUSAL, GROUP), real_k, L_k,
                                    SEQ, HAS_CLS, COUNTS, GROUP)
        n_iter = _unless_padding(k_last, 0, q_tile, real_q, L, SEQ, HAS_CLS, COUNTS, GROUP)
        if MASKED and GROUP == 1:  # a tile of padded queries visits no key tile
            n_iter = tl.where(_any(row_ok), n_iter, 0)
        for i in range(0, n_iter):
            k_tile = _tile_at(i, k_end, L_k, SEQ, HAS_CLS, COUNTS, GROUP)
            key = (k_tile * SEQ + lane % SEQ).to(tl.int64)  # [BLOCK] key row of each column
            key_ok = _masked(_live(seq_ok & (key < k_rows), key, real_k, L_k, HAS_CLS, COUNTS), seq, key, 0, L_k,
                             MASK, n_i1, n_i2, stride_m0, stride_m1, stride_mL, HAS_CLS, MASKED)
            k = _load_rows(K, K_CLS, seq, key, key_ok, d, d_ok, n_i1, n_i2, stride_k0, stride_k1, stride_k2,
                           stride_kL, stride_kc0, stride_kc2, L_k, HAS_CLS, GROUP)
            v = _load_rows(V, V_CLS, seq, key, key_ok, d, d_ok, n_i1, n_i2, stride_v0, stride_v1, stride_v2,
                           stride_vL, stride_vc0, stride_vc2, L_k, HAS_CLS, GROUP)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK, BLOCK]
            visible = _causal_mask(key_ok[None, :], row, key, L, L_k, CAUSAL)
            qk = tl.where(_pair_mask(in_tile, visible, GROUP), qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot_iso(p.to(v.dtype), v, in_tile, PREC, GROUP > 1)
            m_i = m_new
        if COUNTS or MASKED:  # a padded query (zero q) sees no key: zero output, lse -inf
            acc = tl.where(row_ok[:, None], acc, 0.0)
            l_i = tl.where(row_ok, l_i, 0.0)
            m_i = tl.where(row_ok, m_i, float("-inf"))
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        _store_rows(O, O_CLS_FR, acc / l_safe[:, None], seq, row, row_in, frame, d, d_ok, n_i1, n_i2,
                    stride_o0, stride_o1, stride_o2, stride_oL, L, D, HAS_CLS)
        lse = m_i + tl.log2(l_safe)
        tl.store(LSE + seq * L + row, lse, mask=row_in & (row < L))
        if HAS_CLS:
            tl.store(LSE_CLS_FR + frame + tl.zeros_like(row), lse, mask=row_in & (row == L))


@triton.jit
def _bwd_rows(
    Q, O, DO, LSE, Q_CLS, DO_CLS, O_CLS_FR, LSE_CLS_FR, seq, row, ok, frame, d, d_ok, n_i1, n_i2,
    stride_q0, stride_q1, stride_q2, stride_qL, stride_o0, stride_o1, stride_o2, stride_oL,
    stride_do0, stride_do1, stride_do2, stride_doL, stride_qc0, stride_qc2, stride_doc0, stride_doc2,
    L, D, cls_w, HAS_CLS: tl.constexpr, WITH_DELTA: tl.constexpr, GROUP: tl.constexpr,
):
    """q, dO (in q's dtype), lse and (WITH_DELTA) delta = rowsum(dO * O) of query rows ``row``.

    The cls row's upstream gradient is d o_cls times its frame's weight ``cls_w`` (1 / T:
    o_cls is the mean over the T frames); its output and log-sum-exp come from the
    forward's per-frame fp32 buffers.
    """
    q = _load_rows(Q, Q_CLS, seq, row, ok, d, d_ok, n_i1, n_i2, stride_q0, stride_q1, stride_q2, stride_qL,
                   stride_qc0, stride_qc2, L, HAS_CLS, GROUP)
    do = _load_rows(DO, DO_CLS, seq, row, ok, d, d_ok, n_i1, n_i2, stride_do0, stride_do1, stride_do2, stride_doL,
                    stride_doc0, stride_doc2, L, HAS_CLS, GROUP)
    main = ok & (row < L)
    lse = tl.load(LSE + seq * L + row, mask=main, other=0.0)
    do_f = do.to(tl.float32)
    if HAS_CLS:
        is_cls = ok & (row == L)
        if GROUP == 1:
            lse = tl.where(is_cls, tl.load(LSE_CLS_FR + frame), lse)
        else:
            lse = tl.where(is_cls, tl.load(LSE_CLS_FR + frame, mask=is_cls, other=0.0), lse)
        do_f = tl.where(is_cls[:, None], do_f * (cls_w + tl.zeros_like(lse))[:, None], do_f)  # cls_w: one per lane when GROUP > 1
        do = do_f.to(do.dtype)
    delta = tl.zeros_like(lse)
    if WITH_DELTA:
        o = tl.load(O + (_seq_offset(seq, n_i1, n_i2, stride_o0, stride_o1, stride_o2) + row * stride_oL)[:, None]
                    + d[None, :], mask=main[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_CLS:
            is_cls = ok & (row == L)
            if GROUP == 1:
                oc = tl.load(O_CLS_FR + frame * D + d, mask=d_ok, other=0.0)  # [BLOCK_D]
                o = tl.where(is_cls[:, None], oc[None, :], o)
            else:
                oc = tl.load(O_CLS_FR + (frame * D)[:, None] + d[None, :], mask=is_cls[:, None] & d_ok[None, :],
                             other=0.0)
                o = tl.where(is_cls[:, None], oc, o)
        delta = tl.sum(do_f * o, 1)
    return q, do, lse, delta


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, O, DO, LSE, DQ, DK, DV,
    Q_CLS, K_CLS, V_CLS, DO_CLS, O_CLS_FR, LSE_CLS_FR, DQ_CLS_FR, DK_CLS_FR, DV_CLS_FR, REAL_ROWS, REAL_GROUPS,
    MASK, CLS_W,
    stride_q0, stride_q1, stride_q2, stride_qL,
    stride_k0, stride_k1, stride_k2, stride_kL,
    stride_v0, stride_v1, stride_v2, stride_vL,
    stride_o0, stride_o1, stride_o2, stride_oL,
    stride_do0, stride_do1, stride_do2, stride_doL,
    stride_dq0, stride_dq1, stride_dq2, stride_dqL,
    stride_dk0, stride_dk1, stride_dk2, stride_dkL,
    stride_dv0, stride_dv1, stride_dv2, stride_dvL,
    stride_qc0, stride_qc2, stride_kc0, stride_kc2, stride_vc0, stride_vc2, stride_doc0, stride_doc2,
    stride_m0, stride_m1, stride_mL,
    n_seq, n_i1, n_i2, L, L_k, D, n_q_tiles, n_k_tiles, tiles_per_prog, qk_scale, scale, inv_T,
    HAS_CLS: tl.constexpr, GROUP: tl.constexpr, SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, SINGLE: tl.constexpr, CAUSAL: tl.constexpr, COUNTS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """dK, dV of this program's key tiles, then dQ of its query tiles (in the first pass when SINGLE)."""
    BLOCK: tl.constexpr = GROUP * SEQ
    ISOLATE: tl.constexpr = GROUP > 1
    q_rows = L + HAS_CLS
    k_rows = L_k + HAS_CLS
    lane, in_tile, seq, seq_ok, frame, d, d_ok, first_tile = _program_sequences(
        n_seq, n_i1, n_i2, D, tiles_per_prog, GROUP, SEQ, BLOCK_D)
    real_k, cls_w = _sequence_counts(REAL_ROWS, REAL_GROUPS, seq, seq_ok, n_i1, n_i2, L_k, inv_T, COUNTS, GROUP)
    cls_w = _cls_weight(cls_w, CLS_W, seq, seq_ok, n_i1, n_i2, HAS_CLS, MASKED, GROUP)
    real_q = tl.maximum(real_k - (L_k - L), 0)

    for k_tile in range(first_tile, tl.minimum(first_tile + tiles_per_prog, n_k_tiles)):
        key = (k_tile * SEQ + lane % SEQ).to(tl.int64)
        key_in = seq_ok & (key < k_rows)
        key_ok = _masked(_live(key_in, key, real_k, L_k, HAS_CLS, COUNTS), seq, key, 0, L_k, MASK, n_i1, n_i2,
                         stride_m0, stride_m1, stride_mL, HAS_CLS, MASKED)
        k = _load_rows(K, K_CLS, seq, key, key_ok, d, d_ok, n_i1, n_i2, stride_k0, stride_k1, stride_k2, stride_kL,
                       stride_kc0, stride_kc2, L_k, HAS_CLS, GROUP)
        v = _load_rows(V, V_CLS, seq, key, key_ok, d, d_ok, n_i1, n_i2, stride_v0, stride_v1, stride_v2, stride_vL,
                       stride_vc0, stride_vc2, L_k, HAS_CLS, GROUP)
        dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        first_q = _first_query_tile(k_tile, L, L_k, SEQ, CAUSAL, GROUP)
        q_end, q_last = _tile_range(first_q, n_q_tiles, real_q, L, SEQ, HAS_CLS, COUNTS, GROUP)
        q_last = _unless_padding(q_last, first_q, k_tile, real_k, L_k, SEQ, HAS_CLS, COUNTS, GROUP)
        if MASKED:  # a key tile of padding: no query tile sees it
            q_last = tl.where(_any(key_ok), q_last, first_q)
        for i in range(first_q, q_last):
            q_tile = _tile_at(i, q_end, L, SEQ, HAS_CLS, COUNTS, GROUP)
            row = (q_tile * SEQ + lane % SEQ).to(tl.int64)
            row_in = seq_ok & (row < q_rows)
            row_ok = _masked(_live(row_in, row, real_q, L, HAS_CLS, COUNTS), seq, row, L_k - L, L, MASK, n_i1,
                             n_i2, stride_m0, stride_m1, stride_mL, HAS_CLS, MASKED)
            q, do, lse, delta = _bwd_rows(
                Q, O, DO, LSE, Q_CLS, DO_CLS, O_CLS_FR, LSE_CLS_FR, seq, row, row_ok, frame, d, d_ok, n_i1, n_i2,
                stride_q0, stride_q1, stride_q2, stride_qL, stride_o0, stride_o1, stride_o2, stride_oL,
                stride_do0, stride_do1, stride_do2, stride_doL, stride_qc0, stride_qc2, stride_doc0, stride_doc2,
                L, D, cls_w, HAS_CLS, not SINGLE, GROUP)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [rows, cols]
            valid = _pair_mask(in_tile, _causal_mask(row_ok[:, None] & key_ok[None, :], row, key, L, L_k, CAUSAL),
                               GROUP)
            p = tl.exp2(tl.where(valid, qk - lse[:, None], float("-inf")))
            dv += _dot_iso(tl.trans(p.to(do.dtype)), do, in_tile, PREC, ISOLATE)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            if SINGLE:
                # every key of these rows is in this tile: delta = rowsum(P * dP) = rowsum(dO * O),
                # computed as the softmax backward does (a one-key row gets exactly zero)
                delta = tl.sum(tl.where(valid, p * dp, 0.0), 1)
            ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
            dk += _dot_iso(tl.trans(ds.to(q.dtype)), q, in_tile, PREC, ISOLATE)
            if SINGLE:
                dq = _dot_iso(ds.to(k.dtype), k, in_tile, PREC, ISOLATE) * scale
                _store_rows(DQ, DQ_CLS_FR, dq, seq, row, row_in, frame, d, d_ok, n_i1, n_i2,
                            stride_dq0, stride_dq1, stride_dq2, stride_dqL, L, D, HAS_CLS)
        if SINGLE and ((COUNTS and GROUP == 1) or MASKED):
            if q_last <= first_q:  # keys or queries all padding: the dq rows are zero
                row = (lane % SEQ).to(tl.int64)
                _store_rows(DQ, DQ_CLS_FR, tl.zeros([BLOCK, BLOCK_D], tl.float32), seq, row, seq_ok & (row < q_rows),
                            frame, d, d_ok, n_i1, n_i2, stride_dq0, stride_dq1, stride_dq2, stride_dqL, L, D, HAS_CLS)
        _store_rows(DK, DK_CLS_FR, dk * scale, seq, key, key_in, frame, d, d_ok, n_i1, n_i2,
                    stride_dk0, stride_dk1, stride_dk2, stride_dkL, L_k, D, HAS_CLS)
        _store_rows(DV, DV_CLS_FR, dv, seq, key, key_in, frame, d, d_ok, n_i1, n_i2,
                    stride_dv0, stride_dv1, stride_dv2, stride_dvL, L_k, D, HAS_CLS)

    if not SINGLE:
        for q_tile in range(first_tile, tl.minimum(first_tile + tiles_per_prog, n_q_tiles)):
            row = (q_tile * SEQ + lane % SEQ).to(tl.int64)
            row_in = seq_ok & (row < q_rows)
            row_ok = _masked(_live(row_in, row, real_q, L, HAS_CLS, COUNTS), seq, row, L_k - L, L, MASK, n_i1,
                             n_i2, stride_m0, stride_m1, stride_mL, HAS_CLS, MASKED)
            q, do, lse, delta = _bwd_rows(
                Q, O, DO, LSE, Q_CLS, DO_CLS, O_CLS_FR, LSE_CLS_FR, seq, row, row_ok, frame, d, d_ok, n_i1, n_i2,
                stride_q0, stride_q1, stride_q2, stride_qL, stride_o0, stride_o1, stride_o2, stride_oL,
                stride_do0, stride_do1, stride_do2, stride_doL, stride_qc0, stride_qc2, stride_doc0, stride_doc2,
                L, D, cls_w, HAS_CLS, True, GROUP)
            dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
            k_end, k_last = _tile_range(0, _key_tiles_seen(q_tile, n_k_tiles, L, L_k, SEQ, CAUSAL, GROUP), real_k,
                                        L_k, SEQ, HAS_CLS, COUNTS, GROUP)
            n_iter = _unless_padding(k_last, 0, q_tile, real_q, L, SEQ, HAS_CLS, COUNTS, GROUP)
            if MASKED:  # a tile of padded queries visits no key tile
                n_iter = tl.where(_any(row_ok), n_iter, 0)
            for i in range(0, n_iter):
                k_tile = _tile_at(i, k_end, L_k, SEQ, HAS_CLS, COUNTS, GROUP)
                key = (k_tile * SEQ + lane % SEQ).to(tl.int64)
                key_ok = _masked(_live(seq_ok & (key < k_rows), key, real_k, L_k, HAS_CLS, COUNTS), seq, key, 0,
                                 L_k, MASK, n_i1, n_i2, stride_m0, stride_m1, stride_mL, HAS_CLS, MASKED)
                k = _load_rows(K, K_CLS, seq, key, key_ok, d, d_ok, n_i1, n_i2, stride_k0, stride_k1, stride_k2,
                               stride_kL, stride_kc0, stride_kc2, L_k, HAS_CLS, GROUP)
                v = _load_rows(V, V_CLS, seq, key, key_ok, d, d_ok, n_i1, n_i2, stride_v0, stride_v1, stride_v2,
                               stride_vL, stride_vc0, stride_vc2, L_k, HAS_CLS, GROUP)
                qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
                valid = _pair_mask(in_tile, _causal_mask(row_ok[:, None] & key_ok[None, :], row, key, L, L_k, CAUSAL),
                                   GROUP)
                p = tl.exp2(tl.where(valid, qk - lse[:, None], float("-inf")))
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = tl.where(valid, p * (dp - delta[:, None]), 0.0)
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
            _store_rows(DQ, DQ_CLS_FR, dq * scale, seq, row, row_in, frame, d, d_ok, n_i1, n_i2,
                        stride_dq0, stride_dq1, stride_dq2, stride_dqL, L, D, HAS_CLS)


@triton.jit
def _cls_mean_kernel(O_CLS_FR, O_CLS, REAL_ROWS, REAL_GROUPS, CLS_W, stride_oc0, stride_oc2, H, T, D, inv_T,
                     BLOCK_D: tl.constexpr, COUNTS: tl.constexpr, MASKED: tl.constexpr):
    """o_cls of one (b, h): the mean of its T per-frame outputs, summed in frame order (COUNTS:
    of the frames that hold a real patch, the first ones; of all T when none does; MASKED: the
    sum of the per-frame outputs weighted by CLS_W, which says the same of a mask)."""
    pid = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    n_frames = T
    w = inv_T
    if COUNTS:
        b = pid // H
        rows = tl.load(REAL_ROWS + b)
        real = tl.where(rows > 0, tl.load(REAL_GROUPS + b), 0)
        n_frames = tl.where(real > 0, real, T)
        w = 1.0 / n_frames.to(tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    if MASKED:
        w = 1.0
        for t in range(0, T):
            frame_w = tl.load(CLS_W + (pid // H) * T + t)
            acc += tl.load(O_CLS_FR + (pid * T + t) * D + d, mask=d_ok, other=0.0) * frame_w
    else:
        for t in range(0, n_frames):
            acc += tl.load(O_CLS_FR + (pid * T + t) * D + d, mask=d_ok, other=0.0)
    tl.store(O_CLS + (pid // H) * stride_oc0 + (pid % H) * stride_oc2 + d, (acc * w).to(O_CLS.dtype.element_ty),
             mask=d_ok)


@triton.jit
def _cls_grad_kernel(
    DQ_CLS_FR, DK_CLS_FR, DV_CLS_FR, DQ_CLS, DK_CLS, DV_CLS,
    stride_dqc0, stride_dqc2, stride_dkc0, stride_dkc2, stride_dvc0, stride_dvc2, H, T, D,
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
        dq += tl.load(DQ_CLS_FR + off, mask=d_ok, other=0.0)
        dk += tl.load(DK_CLS_FR + off, mask=d_ok, other=0.0)
        dv += tl.load(DV_CLS_FR + off, mask=d_ok, other=0.0)
    tl.store(DQ_CLS + b * stride_dqc0 + h * stride_dqc2 + d, dq.to(DQ_CLS.dtype.element_ty), mask=d_ok)
    tl.store(DK_CLS + b * stride_dkc0 + h * stride_dkc2 + d, dk.to(DK_CLS.dtype.element_ty), mask=d_ok)
    tl.store(DV_CLS + b * stride_dvc0 + h * stride_dvc2 + d, dv.to(DV_CLS.dtype.element_ty), mask=d_ok)


KERNELS = (_attn_fwd_kernel, _attn_bwd_kernel, _cls_mean_kernel, _cls_grad_kernel)

__all__ = ["KERNELS"]
