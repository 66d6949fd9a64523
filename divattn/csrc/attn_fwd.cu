// Forward of strided batched attention: temporal, spatial (with the cls key/value) and
// joint attention as one problem of S sequences of L rows (see divattn.h: View).
//
// Design:
// - A block is 4 warps; a warp owns 4 query rows of one sequence, keeps them in fp32
//   shared memory, and holds their running max, partial sums and output accumulators
//   (lane l owns head-dim elements l, l + 32, ...) in registers, all in fp32.
// - Keys and values stream through a shared-memory tile of 32 rows, converted to fp32
//   and zero-padded to the padded head dim: lane j scores key j against the warp's 4
//   queries (float4 reads; the key tile's row pitch is padded by 4 floats so the 32 lanes
//   hit distinct banks), then the tile's probabilities go through shared memory and every
//   lane accumulates p * v for its own head-dim elements. The score matrix never leaves
//   the chip; the softmax is online, in base 2 with the scale folded into log2(e).
// - Sequences of L <= 8 rows (temporal attention over few frames) are packed 2 or 4 to a
//   block, each group of warps using its own slice of the tile (Groups in common.cuh),
//   so short sequences do not leave most of a block idle.
// - With a cls token every spatial row's softmax starts from the cls key (m = q . k_cls,
//   l = 1, acc = v_cls), read once per row from its own pointer: the same vectors serve
//   every frame without being repeated in memory. The cls query is one more row of every
//   frame (row 0, the patches are rows 1 .. N): it streams through the frame's key tiles
//   with the patch rows, so each frame's keys and values are read once, and its output and
//   lse go to the per-frame fp32 buffers (cls_frames, lse_cls) that cls.cu averages.
// - Keys may outnumber queries (temporal attention from the last L of Lk frames). Causal
//   attention is bottom-right aligned (query row i sees keys 0 .. i + Lk - L): a block
//   stops streaming key tiles after the last key its rows see, and masks the diagonal.
// - A padded batch (AttnParams::rows, and a mask read per row): by the counts a sequence's
//   real keys and queries are prefixes;
//   a block streams no tile past its sequences' real keys (none at all when its query
//   rows are all padding); a padded query row is not read and its output and lse are
//   written as zeros.
// - Every load is guarded on sequence, row and head dim; addresses are 64-bit; every
//   output row is written exactly once, with its log-sum-exp (base 2, scale included).
#include "mma.cuh"

namespace divattn {
namespace {

template <int DP>
constexpr size_t fwd_smem_floats() {
  return kSlots * (DP + 4) + kSlots * DP + kWarps * kRows * DP + kWarps * kRows * kSlots + kSlots +
         kGroupBasesFloats;
}

template <typename T, int DCH, bool CLS>
__global__ void __launch_bounds__(kWarps * kWarp, kFwdMinBlocks) attn_fwd_kernel(const AttnParams p) {
  constexpr int DP = DCH * kWarp;
  constexpr int KP = DP + 4;
  DIVATTN_DYNAMIC_SMEM(float, smem);
  float* Ks = smem;                      // [kSlots][KP]
  float* Vs = Ks + kSlots * KP;          // [kSlots][DP]
  float* Qs = Vs + kSlots * DP;          // [kWarps][kRows][DP]
  float* Ps = Qs + kWarps * kRows * DP;  // [kWarps][kRows][kSlots]
  float* Kf = Ps + kWarps * kRows * kSlots;  // [kSlots] 1 for a key row of the tile that is read (a real key)
  GroupBases& gb = *reinterpret_cast<GroupBases*>(Kf + kSlots);

  constexpr int kCls = CLS ? 1 : 0;  // query row r is patch row r - kCls; with cls, row 0 is the cls query
  const int64_t rows = p.L + kCls;
  const RowWarp w = row_warp(p, rows);
  const int warp = w.warp, lane = w.lane, g = w.g;
  const int64_t row0 = w.row0;
  const int D = p.D, D4 = (D + 3) / 4;

  const T* q = static_cast<const T*>(p.q.ptr) + seq_offset(p.q, w.ix);
  float* Qw = Qs + warp * kRows * DP;
  unsigned padded = 0;  // bit i: row i is a padded query (read as zeros, written as zeros)
  if (p.rows != nullptr || p.mask.ptr != nullptr) {
    const int64_t queries = real_rows(p, w.ix).queries, mbase = mask_base(p, w.ix);
#pragma unroll 1
    for (int i = 0; i < kRows; ++i) {
      const int64_t r = row0 + i - kCls;  // the patch row (-1: the cls row)
      if (r >= 0 && (r >= queries || !mask_real(p, mbase, r + p.Lk - p.L))) padded |= 1u << i;
    }
  }
  bool row_ok[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int64_t r = row0 + i;
    row_ok[i] = w.seq_ok && r < rows;
    const bool is_cls = CLS && i == 0 && row0 == 0;
    const bool load = row_ok[i] && !((padded >> i) & 1u);
    const T* src = q;
    if (load) {
      src = is_cls ? static_cast<const T*>(p.qc.ptr) + cls_offset(p.qc, w.ix.i0, w.ix.i2) : q + (r - kCls) * p.q.sL;
    }
    load_row<T, DP>(Qw + i * DP, src, load, D, lane);
  }
  group_bases(gb, p.k, p.v, p, w.grp.G);
  __syncthreads();

  float m[kRows], l[kRows], acc[kRows][DCH];
  if constexpr (CLS) {
    float kcr[DCH], vcr[DCH];
    load_lanes<T, DCH>(kcr, static_cast<const T*>(p.kc.ptr) + cls_offset(p.kc, w.ix.i0, w.ix.i2), true, D, lane);
    load_lanes<T, DCH>(vcr, static_cast<const T*>(p.vc.ptr) + cls_offset(p.vc, w.ix.i0, w.ix.i2), true, D, lane);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      float part = 0.f;
#pragma unroll
      for (int c = 0; c < DCH; ++c) part = fmaf(Qw[i * DP + lane + c * kWarp], kcr[c], part);
      m[i] = warp_sum(part) * p.qk_scale;
      l[i] = lane == 0 ? 1.f : 0.f;  // partial sums per lane, reduced at the end
#pragma unroll
      for (int c = 0; c < DCH; ++c) acc[i][c] = vcr[c];
    }
  } else {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      m[i] = -INFINITY;
      l[i] = 0.f;
#pragma unroll
      for (int c = 0; c < DCH; ++c) acc[i][c] = 0.f;
    }
  }

  const T* kptr = static_cast<const T*>(p.k.ptr);
  const T* vptr = static_cast<const T*>(p.v.ptr);
  const int jrow = g * w.grp.slots + (lane & (w.grp.slots - 1));  // this lane's key row in the tile
  const float* Vg = Vs + g * w.grp.slots * DP;
  float* Pw = Ps + warp * kRows * kSlots;
  // query row i is key row i + shift; the loop's rows in 32 bits (the host bounds them by
  // 65535 * 16), which the registers of this kernel need (64-bit ones spilled at D = 96)
  const int diag = static_cast<int>(row0 + p.Lk - p.L);  // key row of the warp's first query
  const int64_t kcausal = causal_key_end(p, static_cast<int64_t>(blockIdx.y) * w.grp.rows_per_block,
                                         w.grp.rows_per_block);
  // no tile past the block's real keys, and none when all its queries are padding
  const int64_t first_query = static_cast<int64_t>(blockIdx.y) * w.grp.rows_per_block - kCls;
  const int64_t kreal = first_query < most_real(gb.queries, w.grp.G) ? most_real(gb.keys, w.grp.G) : 0;
  const int kend = static_cast<int>(kcausal < kreal ? kcausal : kreal);
  for (int start = 0; start < kend; start += w.grp.slots) {
    __syncthreads();  // the previous tile is consumed
    if (threadIdx.x < kSlots) Kf[threadIdx.x] = tile_row_read(threadIdx.x, gb, gb.keys, p, 0, start, kend, w.grp.slots);
    __syncthreads();
    load_tile_pair<T, DP>(Ks, KP, Vs, DP, kptr, vptr, p.k, p.v, gb, gb.keys, p, 0, Kf, start, kend, w.grp.slots, D,
                          warp, lane);
    __syncthreads();
    const int key = start + lane;
    const bool key_ok = lane < w.grp.slots && Kf[jrow] != 0.f;  // read: a real key of this sequence, before kend
    const float* krow = Ks + jrow * KP;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const bool seen = key_ok && (!p.causal || key <= diag + i);
      const float sc = seen ? dot_smem(Qw + i * DP, krow, D4) * p.qk_scale : -INFINITY;
      const float m_new = fmaxf(m[i], warp_max(sc));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[i] - m_use);
      const float pr = exp2f(sc - m_use);
      l[i] = fmaf(l[i], alpha, pr);
      Pw[i * kSlots + lane] = pr;
#pragma unroll
      for (int c = 0; c < DCH; ++c) acc[i][c] *= alpha;
      m[i] = m_new;
    }
    __syncwarp();
    const int n = static_cast<int>(kend - start < w.grp.slots ? kend - start : w.grp.slots);
    accumulate_tile<DCH>(acc, Pw, Vg, DP, n, lane);
  }

  const SeqIndex ix = seq_index(w.seq_ok ? w.s : 0, p.S1, p.S2);  // again: not held through the loop
  T* o = static_cast<T*>(p.o.ptr) + seq_offset(p.o, ix);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const float lt = warp_sum(l[i]);
    const float l_safe = lt == 0.f ? 1.f : lt;
    const float inv = 1.f / l_safe;
    const int64_t r = row0 + i;
    if (CLS && i == 0 && row0 == 0 && row_ok[i]) {
      // frame (b, h, t) of the (B, H, T) cls buffers; this sequence is (b, t, h)
      const int64_t frame = (ix.i0 * p.S2 + ix.i2) * p.S1 + ix.i1;
      float* out = p.cls_frames + frame * D;
#pragma unroll
      for (int c = 0; c < DCH; ++c) {
        const int d = lane + c * kWarp;
        if (d < D) gst(out + d, acc[i][c] * inv);
      }
      if (lane == 0) gst(p.lse_cls + frame, m[i] + log2f(l_safe));
    } else if (row_ok[i]) {
      const bool pad = (padded >> i) & 1u;
      T* orow = o + (r - kCls) * p.o.sL;
#pragma unroll
      for (int c = 0; c < DCH; ++c) {
        const int d = lane + c * kWarp;
        if (d < D) gst(orow + d, from_float<T>(pad ? 0.f : acc[i][c] * inv));
      }
      if (lane == 0) gst(p.lse + w.s * p.L + r - kCls, pad ? 0.f : m[i] + log2f(l_safe));
    }
  }
}

template <typename T, int DCH, bool CLS>
struct FwdLaunch {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    return launch_rows("attn_fwd_kernel", attn_fwd_kernel<T, DCH, CLS>, fwd_smem_floats<DCH * kWarp>() * sizeof(float),
                       p, p.L + (CLS ? 1 : 0), stream);
  }
};

}  // namespace

cudaError_t launch_attn_fwd(const AttnParams& p, cudaStream_t stream) {
  if (p.S == 0 || p.L + (p.has_cls ? 1 : 0) == 0) return cudaSuccess;
  if (p.dtype != DType::f32) return launch_attn_fwd_mma(p, stream);
  return dispatch_f32<FwdLaunch>(p, stream);
}

}  // namespace divattn
