// Forward of strided batched attention in fp16 / bf16 on tensor cores (see attn_fwd.cu for
// the problem: S sequences of L query rows and Lk key rows, the cls token as row 0 and key 0
// of every spatial frame, causal and fewer-query temporal attention).
//
// Design (flash attention 2 on mma.sync.m16n8k16, fp32 accumulation):
// - A warp owns 16 query rows of one sequence; a block holds G sequences of warps_per_seq
//   warps each (MmaPlan): a whole spatial frame (197 or 198 rows: 13 warps) is one block at
//   D <= 64, so each frame's keys and values are read from global memory once; sequences
//   of up to 16 rows (temporal attention over T <= 16 frames) go G = 4 to a block of 4
//   warps, one sequence per warp, so no product ever sums over two sequences (a NaN in
//   one sequence's values cannot reach another's outputs through 0 * NaN).
// - The block's query rows are copied to shared memory once (cp.async); keys and values
//   stream through a double buffer of 64-row tiles (G sequences x 64 / G rows), the next
//   tile's cp.async in flight while the current one is used.
// - Per tile a warp computes S = Q K^T (ldmatrix from the padded tiles, see mma.cuh),
//   masks it (other keys, causal), updates the running max and sum of its rows on the
//   accumulator fragments (two shuffles a row), rescales its output accumulators and adds
//   P V with P taken straight from the score fragments (rounded to the input dtype).
// - A padded batch (AttnParams::rows, mask): padded rows of q, k and v are not read (their
//   tile rows are zeros), padded keys are masked (with a mask, by a flag per tile row), no
//   tile past the block's real keys by the counts is streamed (none when its queries are
//   all padding), and padded query rows are written as zeros.
// - The epilogue writes each row once, the log-sum-exp (base 2, scale included) beside
//   it; the cls row of every frame goes to the fp32 per-frame buffers that cls.cu averages.
#include "mma.cuh"

namespace divattn {
namespace {

template <typename T, int DP>
__global__ void __launch_bounds__(MmaTraits<DP>::kFwdWarps* kWarp)
    attn_fwd_mma_kernel(const AttnParams p, const MmaPlan pl, const bool aligned) {
  constexpr int kP = DP + kPad, kBN = MmaTraits<DP>::kFwdKeys, kNT = kBN / 8, kDT = DP / 8;
  const bool cls = p.has_cls;
  const int kCls = cls ? 1 : 0;
  DIVATTN_DYNAMIC_SMEM(unsigned char, smem_raw);
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  T* Qs = reinterpret_cast<T*>(smem_raw);  // [warps * 16][kP]
  T* Ks = Qs + warps * 16 * kP;             // [2][kBN][kP]
  T* Vs = Ks + 2 * kBN * kP;                // [2][kBN][kP]
  float* Kf = reinterpret_cast<float*>(Vs + 2 * kBN * kP);  // [2][kBN] with a mask: 1 for a key row read

  const int E = pl.rows, EK = pl.other, bn = pl.seq_tile, D = p.D;
  const int gw = warp / pl.warps_per_seq;                                       // this warp's sequence in the block
  const int mt = static_cast<int>(blockIdx.y) * pl.warps_per_seq + warp % pl.warps_per_seq;  // its 16-row tile
  const int64_t s = static_cast<int64_t>(blockIdx.x) * pl.G + gw;
  const bool active = s < p.S && mt * 16 < E;
  const int64_t shift = p.Lk - p.L;  // query row i is key row i + shift (no cls with causal)

  const T* q = static_cast<const T*>(p.q.ptr);
  const T* k = static_cast<const T*>(p.k.ptr);
  const T* v = static_cast<const T*>(p.v.ptr);
  // Block row r: query row i of sequence s_r (nullptr past the rows and for padded ones).
  auto q_ptr = [&](int r) -> const T* {
    const int w = r / 16, g = w / pl.warps_per_seq;
    const int64_t i = static_cast<int64_t>(blockIdx.y * pl.warps_per_seq + w % pl.warps_per_seq) * 16 + r % 16;
    const int64_t sr = static_cast<int64_t>(blockIdx.x) * pl.G + g;
    if (sr >= p.S || i >= E) return nullptr;
    const SeqIndex ix = seq_index(sr, p.S1, p.S2);
    if (cls && i == 0) return static_cast<const T*>(p.qc.ptr) + cls_offset(p.qc, ix.i0, ix.i2);
    if (i - kCls >= real_rows(p, ix).queries || !mask_real(p, mask_base(p, ix), i - kCls + shift)) return nullptr;
    return q + seq_offset(p.q, ix) + (i - kCls) * p.q.sL;
  };
  auto q_row = [&](int r) { return RowSrc<T>{q_ptr(r), 1.f}; };

  // Keys [0, kend) of each sequence are seen by some row of this block: none past the real
  // keys of its sequences, none at all when its query rows are all padding.
  int64_t kend = EK;
  if (p.causal && pl.G == 1) {
    const int64_t rows_end = static_cast<int64_t>(blockIdx.y + 1) * pl.warps_per_seq * 16;
    const int64_t last = (rows_end < E ? rows_end : E) - 1;
    kend = last + shift + 1 < EK ? last + shift + 1 : EK;
  }
  if (p.rows != nullptr) {
    const int64_t first_query = static_cast<int64_t>(blockIdx.y) * pl.warps_per_seq * 16 - kCls;
    int64_t keys = 0;
    for (int gg = 0; gg < pl.G; ++gg) {
      const int64_t sr = static_cast<int64_t>(blockIdx.x) * pl.G + gg;
      if (sr >= p.S) break;
      const RealRows rr = real_rows(p, seq_index(sr, p.S1, p.S2));
      if (first_query < rr.queries && rr.keys + kCls > keys) keys = rr.keys + kCls;
    }
    kend = keys < kend ? keys : kend;
  }
  // the keys this warp's sequence sees: kend, or fewer when it has fewer real keys (the
  // bound is 32-bit: a second 64-bit one live through the loop made ptxas spill at D = 64)
  int klim = static_cast<int>(kend);
  if (p.rows != nullptr && s < p.S) {
    const int64_t own = real_rows(p, seq_index(s, p.S1, p.S2)).keys + kCls;
    klim = own < klim ? static_cast<int>(own) : klim;
  }
  const int ntiles = static_cast<int>((kend + bn - 1) / bn);
  // Tile t, slot c: key row t * bn + c % bn of the block's sequence c / bn.
  auto kv_row = [&](int c, int t, const T* x, const View& view, const ClsView& cv) -> const T* {
    const int g = c / bn;
    const int64_t j = static_cast<int64_t>(t) * bn + c % bn;
    const int64_t sr = static_cast<int64_t>(blockIdx.x) * pl.G + g;
    if (sr >= p.S || j >= kend) return nullptr;
    const SeqIndex ix = seq_index(sr, p.S1, p.S2);
    if (cls && j == 0) return static_cast<const T*>(cv.ptr) + cls_offset(cv, ix.i0, ix.i2);
    if (j - kCls >= real_rows(p, ix).keys || !mask_real(p, mask_base(p, ix), j - kCls)) return nullptr;  // padding
    return x + seq_offset(view, ix) + (j - kCls) * view.sL;
  };
  auto load_kv = [&](int t) {
    const int b = t & 1;
    load_tile<T, DP>(Ks + b * kBN * kP, pl.G * bn, k, aligned, D,
                     [&](int c) { return RowSrc<T>{kv_row(c, t, k, p.k, p.kc), 1.f}; });
    load_tile<T, DP>(Vs + b * kBN * kP, pl.G * bn, v, aligned, D,
                     [&](int c) { return RowSrc<T>{kv_row(c, t, v, p.v, p.vc), 1.f}; });
    if (p.mask.ptr != nullptr) {  // which rows are keys: a row the mask pads is not (a zero row scores 0)
      for (int c = threadIdx.x; c < pl.G * bn; c += blockDim.x) {
        Kf[b * kBN + c] = kv_row(c, t, k, p.k, p.kc) != nullptr ? 1.f : 0.f;
      }
    }
  };

  load_tile<T, DP>(Qs, warps * 16, q, aligned, D, q_row);
  load_kv(0);
  cp_async_commit();

  const int g = lane >> 2, t4 = lane & 3;
  float o[kDT][4];
  zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  for (int t = 0; t < ntiles; ++t) {
    if (t + 1 < ntiles) {
      load_kv(t + 1);  // into the buffer the previous tile used: every warp left it at the last barrier
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (active) {
      const T* Kt = Ks + ((t & 1) * kBN + gw * bn) * kP;  // this warp's sequence's rows of the tile
      const T* Vt = Vs + ((t & 1) * kBN + gw * bn) * kP;
      const int64_t key0 = static_cast<int64_t>(t) * bn;
      float sc[kNT][4];  // [16 rows, kBN keys]
      zero(sc);
      uint32_t a[4];
#pragma unroll
      for (int ks = 0; ks < DP / 16; ++ks) {
        load_a(a, Qs, kP, warp * 16, ks * 16, lane);
#pragma unroll
        for (int c = 0; c < kNT / 2; ++c) {
          if (16 * c < bn && key0 + 16 * c < kend) mma_rows_t<T>(sc[2 * c], sc[2 * c + 1], a, Kt, kP, 16 * c, 16 * ks, lane);
        }
      }
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1;
          const int64_t i = mt * 16 + g + 8 * h, j = key0 + 8 * n + 2 * t4 + (e & 1);
          const bool seen = 8 * n < bn && j < klim && (!p.causal || j <= i + shift) &&
                            (p.mask.ptr == nullptr || Kf[(t & 1) * kBN + gw * bn + (j - key0)] != 0.f);
          sc[n][e] = seen ? sc[n][e] * p.qk_scale : -INFINITY;
          mx[h] = fmaxf(mx[h], sc[n][e]);
        }
      }
      float mu[2], alpha[2], sum[2] = {0.f, 0.f};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(kFull, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(kFull, mx[h], 2));
        const float m_new = fmaxf(m[h], mx[h]);
        mu[h] = m_new == -INFINITY ? 0.f : m_new;
        alpha[h] = exp2f(m[h] - mu[h]);
        m[h] = m_new;
      }
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[n][e] = exp2f(sc[n][e] - mu[e >> 1]);
          sum[e >> 1] += sc[n][e];
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) l[h] = fmaf(l[h], alpha[h], sum[h]);
#pragma unroll
      for (int n = 0; n < kDT; ++n) {
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }
#pragma unroll
      for (int c = 0; c < kNT / 2; ++c) {
        if (16 * c < bn && key0 + 16 * c < kend) {
          acc_as_a<T>(a, sc, c);
          mma_rows<T, DP>(o, a, Vt, kP, 16 * c, lane);
        }
      }
    }
    __syncthreads();  // the tile is consumed: the next iteration refills this buffer
  }

  if (!active) return;
  const SeqIndex ix = seq_index(s, p.S1, p.S2);
  const int64_t real_queries = real_rows(p, ix).queries, mbase = mask_base(p, ix);  // the rest is padding: zeros
  T* orows = static_cast<T*>(p.o.ptr) + seq_offset(p.o, ix);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(kFull, l[h], 1);
    l[h] += __shfl_xor_sync(kFull, l[h], 2);
    const int64_t i = mt * 16 + g + 8 * h;
    if (i >= E) continue;
    const float l_safe = l[h] == 0.f ? 1.f : l[h];
    const float inv = 1.f / l_safe;
    if (cls && i == 0) {
      const int64_t frame = (ix.i0 * p.S2 + ix.i2) * p.S1 + ix.i1;  // (b, h, t) of this (b, t, h) sequence
      float* out = p.cls_frames + frame * D;
#pragma unroll
      for (int n = 0; n < kDT; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * n + 2 * t4 + e;
          if (col < D) gst(out + col, o[n][2 * h + e] * inv);
        }
      }
      if (t4 == 0) gst(p.lse_cls + frame, m[h] + log2f(l_safe));
    } else {
      const bool pad = i - kCls >= real_queries || !mask_real(p, mbase, i - kCls + shift);  // a padded query
      T* orow = orows + (i - kCls) * p.o.sL;
#pragma unroll
      for (int n = 0; n < kDT; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * n + 2 * t4 + e;
          if (col < D) gst(orow + col, from_float<T>(pad ? 0.f : o[n][2 * h + e] * inv));
        }
      }
      if (t4 == 0) gst(p.lse + s * p.L + i - kCls, pad ? 0.f : m[h] + log2f(l_safe));
    }
  }
}

template <typename T, int DP>
struct FwdMmaLaunch {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    using Tr = MmaTraits<DP>;
    const int kCls = p.has_cls ? 1 : 0;
    const MmaPlan pl = plan_rows(p.L + kCls, p.Lk + kCls, Tr::kFwdWarps, Tr::kFwdKeys, Tr::kFwdKeys);
    const int warps = pl.G * pl.warps_per_seq;
    const size_t smem = static_cast<size_t>(warps * 16 + 4 * Tr::kFwdKeys) * (DP + kPad) * sizeof(T) +
                        2 * Tr::kFwdKeys * sizeof(float);
    const auto kernel = attn_fwd_mma_kernel<T, DP>;
    const cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>((p.S + pl.G - 1) / pl.G), static_cast<unsigned>(pl.row_blocks));
    return launch_kernel("attn_fwd_mma_kernel", kernel, grid, dim3(warps * kWarp), smem, stream, p, pl,
                         rows_aligned(p, false));
  }
};

}  // namespace

cudaError_t launch_attn_fwd_mma(const AttnParams& p, cudaStream_t stream) {
  return dispatch_mma<FwdMmaLaunch>(p, stream);
}

}  // namespace divattn
