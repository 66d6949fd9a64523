// Backward of strided batched attention (temporal, spatial with or without cls, joint).
//
// Design: three kernels, no atomics, so the result is bitwise reproducible.
// - bwd_delta: delta = rowsum(o * do) per row, one warp per row (fp32).
// - bwd_dkdv: a warp owns 4 key rows of one sequence (k, v in fp32 shared memory,
//   dk, dv accumulators in registers, lane l owning head-dim elements l, l + 32, ...).
//   Queries and output gradients stream through 32-row shared-memory tiles with their
//   lse and delta; lane i recomputes p_ij = exp2(q_i . k_j * scale * log2e - lse_i) and
//   ds_ij = p_ij (do_i . v_j - delta_i) for the warp's 4 keys, and every lane then adds
//   p_ij do_i and ds_ij q_i over the tile's rows in a fixed order. With a cls token the
//   cls query of the key's frame adds its term first (p from the saved per-frame lse).
// - bwd_dq: the mirror image, a warp owns 4 query rows and streams key/value tiles,
//   accumulating ds_ij k_j; with a cls token the cls key's term is added first.
// - Keys may outnumber queries (Lk > L) and attention may be causal (see attn_fwd.cu): a
//   dk/dv block starts at the first query tile that sees its keys, a dq block stops after
//   the last key tile its queries see, and both mask the diagonal.
// - A padded batch (AttnParams::rows, mask): padded rows are not read, their gradients are
//   written as zeros, and a block streams no tile past its sequences' real rows by the
//   counts (none when its own rows are all padding).
// Recomputing the probabilities in both passes costs a second read of q/k/v/do but
// needs no score matrix in memory and no cross-block reduction. Block shapes, the
// packing of short sequences and the padded row pitch follow attn_fwd.cu.
#include "mma.cuh"

namespace divattn {
namespace {

constexpr int kDeltaWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * kWarp) bwd_delta_kernel(const AttnParams p) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t rows = p.S * p.L;
  const T* o = static_cast<const T*>(p.o.ptr);
  const T* dout = static_cast<const T*>(p.dout.ptr);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kDeltaWarps + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kDeltaWarps) {
    const int64_t s = r / p.L, t = r - s * p.L;
    const SeqIndex ix = seq_index(s, p.S1, p.S2);
    const T* orow = o + seq_offset(p.o, ix) + t * p.o.sL;
    const T* drow = dout + seq_offset(p.dout, ix) + t * p.dout.sL;
    const bool real = t < real_rows(p, ix).queries && mask_real(p, mask_base(p, ix), t + p.Lk - p.L);
    const int D = real ? p.D : 0;  // a padded row's delta is never used: 0
    float acc = 0.f;
    for (int d = lane; d < D; d += kWarp) acc = fmaf(to_float(gld(orow + d)), to_float(gld(drow + d)), acc);
    acc = warp_sum(acc);
    if (lane == 0) gst(p.delta + r, acc);
  }
}

template <int DP>
constexpr size_t dkdv_smem_floats() {
  return 2 * kSlots * (DP + 4) + 2 * kSlots + 2 * kWarps * kRows * DP + 2 * kWarps * kRows * kSlots + kGroupBasesFloats;
}

template <typename T, int DCH, bool CLS>
__global__ void __launch_bounds__(kWarps * kWarp, kBwdMinBlocks) bwd_dkdv_kernel(const AttnParams p) {
  constexpr int DP = DCH * kWarp;
  constexpr int QP = DP + 4;
  DIVATTN_DYNAMIC_SMEM(float, smem);
  float* Qt = smem;                           // [kSlots][QP] query tile
  float* Dt = Qt + kSlots * QP;               // [kSlots][QP] output-gradient tile
  float* Kw = Dt + kSlots * QP;               // [kWarps][kRows][DP] each warp's keys
  float* Vw = Kw + kWarps * kRows * DP;       // [kWarps][kRows][DP] and values
  float* Pw = Vw + kWarps * kRows * DP;       // [kWarps][kRows][kSlots] p of (key, query)
  float* Sw = Pw + kWarps * kRows * kSlots;   // [kWarps][kRows][kSlots] ds of (key, query)
  float* lse_t = Sw + kWarps * kRows * kSlots;  // [kSlots]
  float* del_t = lse_t + kSlots;              // [kSlots]
  GroupBases& gb = *reinterpret_cast<GroupBases*>(del_t + kSlots);

  const RowWarp w = row_warp(p, p.Lk);
  const int warp = w.warp, lane = w.lane, g = w.g;
  const int64_t key0 = w.row0;  // this warp's key rows
  const int D = p.D, D4 = (D + 3) / 4;

  const T* k = static_cast<const T*>(p.k.ptr) + seq_offset(p.k, w.ix);
  const T* v = static_cast<const T*>(p.v.ptr) + seq_offset(p.v, w.ix);
  float* Kr = Kw + warp * kRows * DP;
  float* Vr = Vw + warp * kRows * DP;
  const RealRows real = real_rows(p, w.ix);
  const int64_t mbase = mask_base(p, w.ix);
  bool key_ok[kRows];  // a real key; a padded one (key0 + j < Lk) gets zero gradients
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    key_ok[j] = w.seq_ok && key0 + j < p.Lk && key0 + j < real.keys && mask_real(p, mbase, key0 + j);
    load_row<T, DP>(Kr + j * DP, key_ok[j] ? k + (key0 + j) * p.k.sL : k, key_ok[j], D, lane);
    load_row<T, DP>(Vr + j * DP, key_ok[j] ? v + (key0 + j) * p.v.sL : v, key_ok[j], D, lane);
  }
  group_bases(gb, p.q, p.dout, p, w.grp.G);
  __syncthreads();

  float dk[kRows][DCH], dv[kRows][DCH];
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
#pragma unroll
    for (int c = 0; c < DCH; ++c) dk[j][c] = dv[j][c] = 0.f;
  }

  if constexpr (CLS) {
    // The cls query of this sequence's frame attends to these keys too.
    const int64_t bh = w.ix.i0 * p.S2 + w.ix.i2;
    const int64_t frame = bh * p.S1 + w.ix.i1;
    const float lse_c = gld(p.lse_cls + frame), delta_c = gld(p.delta_cls + frame);
    float qcr[DCH], gcr[DCH];
    load_lanes<T, DCH>(qcr, static_cast<const T*>(p.qc.ptr) + cls_offset(p.qc, w.ix.i0, w.ix.i2), true, D, lane);
    load_lanes<float, DCH>(gcr, p.gc + frame * D, true, D, lane);
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      float a = 0.f, b = 0.f;
#pragma unroll
      for (int c = 0; c < DCH; ++c) {
        a = fmaf(qcr[c], Kr[j * DP + lane + c * kWarp], a);
        b = fmaf(gcr[c], Vr[j * DP + lane + c * kWarp], b);
      }
      a = warp_sum(a);
      b = warp_sum(b);
      const float pc = key_ok[j] ? exp2f(a * p.qk_scale - lse_c) : 0.f;
      const float dsc = pc * (b - delta_c);
#pragma unroll
      for (int c = 0; c < DCH; ++c) {
        dv[j][c] = fmaf(pc, gcr[c], dv[j][c]);
        dk[j][c] = fmaf(dsc, qcr[c], dk[j][c]);
      }
    }
  }

  const T* qptr = static_cast<const T*>(p.q.ptr);
  const T* dptr = static_cast<const T*>(p.dout.ptr);
  const int irow = g * w.grp.slots + (lane & (w.grp.slots - 1));  // this lane's query row in the tile
  const float* Qg = Qt + g * w.grp.slots * QP;
  const float* Dg = Dt + g * w.grp.slots * QP;
  float* Pr = Pw + warp * kRows * kSlots;
  float* Sr = Sw + warp * kRows * kSlots;
  const int64_t shift = p.Lk - p.L;  // query row i is key row i + shift
  const int64_t first_key = static_cast<int64_t>(blockIdx.y) * w.grp.rows_per_block;
  const int64_t qbeg = causal_query_begin(p, first_key);
  // no tile past the block's real queries, and none when all its keys are padding
  const int64_t qreal = first_key < most_real(gb.keys, w.grp.G) ? most_real(gb.queries, w.grp.G) : 0;
  const int64_t qend = qreal < p.L ? qreal : p.L;
  for (int64_t start = qbeg; start < qend; start += w.grp.slots) {
    __syncthreads();
    load_tile_pair<T, DP>(Qt, QP, Dt, QP, qptr, dptr, p.q, p.dout, gb, gb.queries, p, shift, nullptr, start, qend,
                          w.grp.slots, D, warp, lane);
    if (threadIdx.x < kSlots) {
      const int slot = threadIdx.x;
      const int gg = slot / w.grp.slots;
      const int64_t row = start + (slot % w.grp.slots);
      const int64_t s_row = static_cast<int64_t>(blockIdx.x) * w.grp.G + gg;
      const bool ok = gb.ok[gg] && row < qend && row < gb.queries[gg] && mask_real(p, gb.mask[gg], row + shift);
      lse_t[slot] = ok ? gld(p.lse + s_row * p.L + row) : INFINITY;  // a padded query: p = 0
      del_t[slot] = ok ? gld(p.delta + s_row * p.L + row) : 0.f;
    }
    __syncthreads();
    const int64_t qry = start + lane;
    const bool q_ok = w.seq_ok && lane < w.grp.slots && qry < qend && qry < real.queries;
    const float* qrow = Qt + irow * QP;
    const float* drow = Dt + irow * QP;
    const float lse_i = lse_t[irow], del_i = del_t[irow];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      float pr = 0.f, ds = 0.f;
      if (q_ok && (!p.causal || key0 + j <= qry + shift)) {
        pr = exp2f(dot_smem(qrow, Kr + j * DP, D4) * p.qk_scale - lse_i);
        ds = pr * (dot_smem(drow, Vr + j * DP, D4) - del_i);
      }
      Pr[j * kSlots + lane] = pr;
      Sr[j * kSlots + lane] = ds;
    }
    __syncwarp();
    const int n = static_cast<int>(qend - start < w.grp.slots ? qend - start : w.grp.slots);
    accumulate_tile<DCH>(dv, Pr, Dg, QP, n, lane);
    accumulate_tile<DCH>(dk, Sr, Qg, QP, n, lane);
  }

  T* dkp = static_cast<T*>(p.dk.ptr) + seq_offset(p.dk, w.ix);
  T* dvp = static_cast<T*>(p.dv.ptr) + seq_offset(p.dv, w.ix);
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    if (!w.seq_ok || key0 + j >= p.Lk) continue;
    T* dkr = dkp + (key0 + j) * p.dk.sL;
    T* dvr = dvp + (key0 + j) * p.dv.sL;
#pragma unroll
    for (int c = 0; c < DCH; ++c) {
      const int d = lane + c * kWarp;
      if (d < D) {
        gst(dkr + d, from_float<T>(key_ok[j] ? dk[j][c] * p.scale : 0.f));
        gst(dvr + d, from_float<T>(key_ok[j] ? dv[j][c] : 0.f));
      }
    }
  }
}

template <int DP>
constexpr size_t dq_smem_floats() {
  return 2 * kSlots * (DP + 4) + 2 * kWarps * kRows * DP + kWarps * kRows * kSlots + kGroupBasesFloats;
}

template <typename T, int DCH, bool CLS>
__global__ void __launch_bounds__(kWarps * kWarp, kBwdMinBlocks) bwd_dq_kernel(const AttnParams p) {
  constexpr int DP = DCH * kWarp;
  constexpr int KP = DP + 4;
  DIVATTN_DYNAMIC_SMEM(float, smem);
  float* Kt = smem;                          // [kSlots][KP] key tile
  float* Vt = Kt + kSlots * KP;              // [kSlots][KP] value tile
  float* Qw = Vt + kSlots * KP;              // [kWarps][kRows][DP] each warp's queries
  float* Dw = Qw + kWarps * kRows * DP;      // [kWarps][kRows][DP] and output gradients
  float* Sw = Dw + kWarps * kRows * DP;      // [kWarps][kRows][kSlots] ds of (query, key)
  GroupBases& gb = *reinterpret_cast<GroupBases*>(Sw + kWarps * kRows * kSlots);

  const RowWarp w = row_warp(p, p.L);
  const int warp = w.warp, lane = w.lane, g = w.g;
  const int64_t row0 = w.row0;
  const int D = p.D, D4 = (D + 3) / 4;

  const T* q = static_cast<const T*>(p.q.ptr) + seq_offset(p.q, w.ix);
  const T* dout = static_cast<const T*>(p.dout.ptr) + seq_offset(p.dout, w.ix);
  float* Qr = Qw + warp * kRows * DP;
  float* Dr = Dw + warp * kRows * DP;
  const RealRows real = real_rows(p, w.ix);
  const int64_t mbase = mask_base(p, w.ix);
  bool row_ok[kRows];  // a real query; a padded one (row < L) gets a zero gradient
  float lse[kRows], del[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int64_t row = row0 + i;
    row_ok[i] = w.seq_ok && row < p.L && row < real.queries && mask_real(p, mbase, row + p.Lk - p.L);
    load_row<T, DP>(Qr + i * DP, row_ok[i] ? q + row * p.q.sL : q, row_ok[i], D, lane);
    load_row<T, DP>(Dr + i * DP, row_ok[i] ? dout + row * p.dout.sL : dout, row_ok[i], D, lane);
    lse[i] = row_ok[i] ? gld(p.lse + w.s * p.L + row) : 0.f;
    del[i] = row_ok[i] ? gld(p.delta + w.s * p.L + row) : 0.f;
  }
  group_bases(gb, p.k, p.v, p, w.grp.G);
  __syncthreads();

  float dq[kRows][DCH];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
#pragma unroll
    for (int c = 0; c < DCH; ++c) dq[i][c] = 0.f;
  }

  if constexpr (CLS) {
    float kcr[DCH], vcr[DCH];
    load_lanes<T, DCH>(kcr, static_cast<const T*>(p.kc.ptr) + cls_offset(p.kc, w.ix.i0, w.ix.i2), true, D, lane);
    load_lanes<T, DCH>(vcr, static_cast<const T*>(p.vc.ptr) + cls_offset(p.vc, w.ix.i0, w.ix.i2), true, D, lane);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      float a = 0.f, b = 0.f;
#pragma unroll
      for (int c = 0; c < DCH; ++c) {
        a = fmaf(Qr[i * DP + lane + c * kWarp], kcr[c], a);
        b = fmaf(Dr[i * DP + lane + c * kWarp], vcr[c], b);
      }
      a = warp_sum(a);
      b = warp_sum(b);
      const float pk = row_ok[i] ? exp2f(a * p.qk_scale - lse[i]) : 0.f;
      const float dsk = pk * (b - del[i]);
#pragma unroll
      for (int c = 0; c < DCH; ++c) dq[i][c] = fmaf(dsk, kcr[c], dq[i][c]);
    }
  }

  const T* kptr = static_cast<const T*>(p.k.ptr);
  const T* vptr = static_cast<const T*>(p.v.ptr);
  const int jrow = g * w.grp.slots + (lane & (w.grp.slots - 1));
  const float* Kg = Kt + g * w.grp.slots * KP;
  float* Sr = Sw + warp * kRows * kSlots;
  const int64_t shift = p.Lk - p.L;  // query row i is key row i + shift
  const int64_t first_query = static_cast<int64_t>(blockIdx.y) * w.grp.rows_per_block;
  const int64_t kcausal = causal_key_end(p, first_query, w.grp.rows_per_block);
  // no tile past the block's real keys, and none when all its queries are padding
  const int64_t kreal = first_query < most_real(gb.queries, w.grp.G) ? most_real(gb.keys, w.grp.G) : 0;
  const int64_t kend = kcausal < kreal ? kcausal : kreal;
  for (int64_t start = 0; start < kend; start += w.grp.slots) {
    __syncthreads();
    // a key the mask pads is read as zeros: its ds multiplies a zero k row
    load_tile_pair<T, DP>(Kt, KP, Vt, KP, kptr, vptr, p.k, p.v, gb, gb.keys, p, 0, nullptr, start, kend,
                          w.grp.slots, D, warp, lane);
    __syncthreads();
    const int64_t key = start + lane;
    const bool key_ok = w.seq_ok && lane < w.grp.slots && key < kend && key < real.keys;
    const float* krow = Kt + jrow * KP;
    const float* vrow = Vt + jrow * KP;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      float ds = 0.f;
      if (key_ok && row_ok[i] && (!p.causal || key <= row0 + i + shift)) {
        const float pr = exp2f(dot_smem(Qr + i * DP, krow, D4) * p.qk_scale - lse[i]);
        ds = pr * (dot_smem(Dr + i * DP, vrow, D4) - del[i]);
      }
      Sr[i * kSlots + lane] = ds;
    }
    __syncwarp();
    const int n = static_cast<int>(kend - start < w.grp.slots ? kend - start : w.grp.slots);
    accumulate_tile<DCH>(dq, Sr, Kg, KP, n, lane);
  }

  T* dqp = static_cast<T*>(p.dq.ptr) + seq_offset(p.dq, w.ix);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    if (!w.seq_ok || row0 + i >= p.L) continue;
    T* dqr = dqp + (row0 + i) * p.dq.sL;
#pragma unroll
    for (int c = 0; c < DCH; ++c) {
      const int d = lane + c * kWarp;
      if (d < D) gst(dqr + d, from_float<T>(row_ok[i] ? dq[i][c] * p.scale : 0.f));
    }
  }
}

template <typename T, int DCH, bool CLS>
struct DkdvLaunch {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    return launch_rows("bwd_dkdv_kernel", bwd_dkdv_kernel<T, DCH, CLS>,
                       dkdv_smem_floats<DCH * kWarp>() * sizeof(float), p, p.Lk, stream);
  }
};

template <typename T, int DCH, bool CLS>
struct DqLaunch {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    return launch_rows("bwd_dq_kernel", bwd_dq_kernel<T, DCH, CLS>, dq_smem_floats<DCH * kWarp>() * sizeof(float),
                       p, p.L, stream);
  }
};

template <typename T>
cudaError_t delta_impl(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = p.S * p.L;
  int64_t blocks = (rows + kDeltaWarps - 1) / kDeltaWarps;
  if (blocks > (int64_t{1} << 20)) blocks = int64_t{1} << 20;  // grid-stride beyond this
  return launch_kernel("bwd_delta_kernel", bwd_delta_kernel<T>, dim3(static_cast<unsigned>(blocks)),
                       dim3(kDeltaWarps * kWarp), 0, stream, p);
}

}  // namespace

cudaError_t launch_bwd_delta(const AttnParams& p, cudaStream_t stream) {
  if (p.S == 0 || p.L == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::f16:
      return delta_impl<__half>(p, stream);
    case DType::bf16:
      return delta_impl<__nv_bfloat16>(p, stream);
    default:
      return delta_impl<float>(p, stream);
  }
}

cudaError_t launch_bwd_dkdv(const AttnParams& p, cudaStream_t stream) {
  if (p.S == 0 || p.Lk == 0) return cudaSuccess;  // with no queries (L = 0) dk, dv are written as zeros
  if (p.dtype != DType::f32) return launch_attn_bwd_mma(p, stream);  // dk, dv and dq
  return dispatch_f32<DkdvLaunch>(p, stream);
}

size_t bwd_workspace_floats(const AttnParams& p) {
  return p.dtype == DType::f32 || p.S == 0 || p.Lk == 0 ? 0 : bwd_mma_workspace_floats(p);
}

cudaError_t launch_bwd_dq(const AttnParams& p, cudaStream_t stream) {
  if (p.S == 0 || p.L == 0) return cudaSuccess;
  if (p.dtype != DType::f32) return p.Lk == 0 ? cudaSuccess : launch_dq_sum(p, stream);  // partials, if any
  return dispatch_f32<DqLaunch>(p, stream);
}

}  // namespace divattn
