// Backward of strided batched attention in fp16 / bf16 on tensor cores (see attn_bwd.cu for
// the problem and the fp32 kernels; attn_fwd_mma.cu for the forward).
//
// Design (one kernel for dK, dV and dQ; no atomics, so the result is bitwise reproducible):
// - A warp owns 16 key rows of one sequence and keeps their dK and dV accumulators in
//   registers; a block holds G sequences of warps_per_seq warps each (MmaPlan): at D <= 64
//   all 197 keys of a spatial frame (13 warps), so each frame's keys and values are read
//   once and the frame's dQ is complete in the block. Sequences of up to 16 keys go G = 2
//   or 4 to a block, one sequence per warp.
// - The block's keys and values are copied to shared memory once; the queries, output
//   gradients, log-sum-exps and deltas (rowsum(o * do), bwd_delta) of its sequences stream
//   through a double buffer of tiles (cp.async), kBwdQueries rows of each sequence a tile.
// - Per tile a warp recomputes S^T = K Q^T and dP^T = V dO^T for its keys, then
//   P^T = exp2(S^T scale log2e - lse) and dS^T = P^T (dP^T - delta), masked; it adds
//   dV += P^T dO and dK += dS^T Q with P^T and dS^T taken from the accumulator fragments,
//   and stores dS^T to shared memory. After a barrier the warps of each sequence split
//   dQ = dS K for the tile's queries (ldmatrix .trans of the stored dS^T and of K) and
//   write it, times the scale, once.
// - A sequence with more keys than a block holds (more than 256 at D <= 64, 128 at
//   D = 96 or 128) spans several key blocks: each writes its dQ partial in fp32 to the
//   workspace and dq_sum_kernel adds them in key-block order.
// - With the cls token its query is row 0 of every frame (its output gradient is
//   d o_cls / T, its lse and delta the per-frame ones) and its key row 0; their gradient
//   terms go to the per-frame fp32 buffers that cls.cu sums over frames.
// - A padded batch (AttnParams::rows, mask): padded rows are not read (zeros in the tiles);
//   by the counts they are masked out of P^T and dS^T, so their dK, dV and dQ come out
//   zero; a row the mask pads has a zero q and dO (no P^T, no dS^T) or zero k and v (its
//   dK, dV rows are written as zeros, and its dS^T meets its zero k row in dQ).
#include "mma.cuh"

namespace divattn {
namespace {

template <int DP>
__host__ __device__ constexpr int bwd_tile_pitch() {
  return MmaTraits<DP>::kBwdQueries + kPad;
}

template <typename T, int DP>
size_t bwd_smem_bytes(int warps, int tile) {
  const size_t halves = static_cast<size_t>(2 * warps * 16 + 4 * tile) * (DP + kPad) +
                        static_cast<size_t>(warps * 16) * bwd_tile_pitch<DP>();
  return halves * sizeof(T) + 4 * static_cast<size_t>(tile) * sizeof(float);
}

template <typename T, int DP>
__global__ void __launch_bounds__(MmaTraits<DP>::kBwdWarps* kWarp)
    attn_bwd_mma_kernel(const AttnParams p, const MmaPlan pl, const bool aligned) {
  constexpr int kP = DP + kPad, kBQ = MmaTraits<DP>::kBwdQueries, kNQ = kBQ / 8, kDT = DP / 8;
  constexpr int kSP = bwd_tile_pitch<DP>();
  const bool cls = p.has_cls;
  const int kCls = cls ? 1 : 0;
  DIVATTN_DYNAMIC_SMEM(unsigned char, smem_raw);
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wps = pl.warps_per_seq, bq = pl.seq_tile, qt = pl.G * bq;
  T* Ks = reinterpret_cast<T*>(smem_raw);  // [warps * 16][kP] the block's keys
  T* Vs = Ks + warps * 16 * kP;             // [warps * 16][kP] and values
  T* Qs = Vs + warps * 16 * kP;             // [2][qt][kP] query tiles
  T* Ds = Qs + 2 * qt * kP;                 // [2][qt][kP] output-gradient tiles
  T* dSt = Ds + 2 * qt * kP;                // [warps * 16][kSP] dS^T of the current tile
  float* lse_s = reinterpret_cast<float*>(dSt + warps * 16 * kSP);  // [2][qt]
  float* del_s = lse_s + 2 * qt;                                       // [2][qt]

  const int E = pl.other, EK = pl.rows, D = p.D;
  const int gw = warp / wps;                                            // this warp's sequence in the block
  const int kt = static_cast<int>(blockIdx.y) * wps + warp % wps;       // its 16-key tile in the sequence
  const int64_t s = static_cast<int64_t>(blockIdx.x) * pl.G + gw;
  const bool seq_ok = s < p.S;
  const bool active = seq_ok && kt * 16 < EK;
  const int shift = static_cast<int>(p.Lk - p.L);  // 32-bit, as E and EK
  // This warp's sequence's real keys and queries as block rows (the cls row is real), and
  // whether its 16 keys hold a real one: a warp of padding multiplies nothing (and writes
  // its zero dK and dV), and products over query rows that are all padding are skipped.
  const RealRows real = real_rows(p, seq_index(seq_ok ? s : 0, p.S1, p.S2));
  const int klim = static_cast<int>(real.keys) + kCls, qlim = static_cast<int>(real.queries) + kCls;
  const bool computes = active && kt * 16 < klim;

  const T* q = static_cast<const T*>(p.q.ptr);
  const T* k = static_cast<const T*>(p.k.ptr);
  const T* v = static_cast<const T*>(p.v.ptr);
  const T* dout = static_cast<const T*>(p.dout.ptr);

  // Block row r: key row j of sequence s_r.
  auto key_ptr = [&](int r, const T* x, const View& view, const ClsView& cv) -> const T* {
    const int w = r / 16, g = w / wps;
    const int64_t j = static_cast<int64_t>(blockIdx.y * wps + w % wps) * 16 + r % 16;
    const int64_t sr = static_cast<int64_t>(blockIdx.x) * pl.G + g;
    if (sr >= p.S || j >= EK) return nullptr;
    const SeqIndex ix = seq_index(sr, p.S1, p.S2);
    if (cls && j == 0) return static_cast<const T*>(cv.ptr) + cls_offset(cv, ix.i0, ix.i2);
    // a padded key: zeros (its dK, dV rows are written as zeros; its dS meets a zero k row in dQ)
    if (j - kCls >= real_rows(p, ix).keys || !mask_real(p, mask_base(p, ix), j - kCls)) return nullptr;
    return x + seq_offset(view, ix) + (j - kCls) * view.sL;
  };
  load_tile<T, DP>(Ks, warps * 16, k, aligned, D, [&](int r) { return RowSrc<T>{key_ptr(r, k, p.k, p.kc), 1.f}; });
  load_tile<T, DP>(Vs, warps * 16, v, aligned, D, [&](int r) { return RowSrc<T>{key_ptr(r, v, p.v, p.vc), 1.f}; });

  // The queries [qbeg, E) of each sequence see some key of this block.
  int64_t qbeg = 0;
  if (p.causal && pl.G == 1) {
    const int64_t first_key = static_cast<int64_t>(blockIdx.y) * wps * 16;
    qbeg = first_key - shift > 0 ? first_key - shift : 0;
  }
  const int t0 = static_cast<int>(qbeg / bq), ntiles = static_cast<int>((E + bq - 1) / bq);
  // Tile t, slot c: query row t * bq + c % bq of the block's sequence c / bq (not ok past
  // the rows and for a padded row, whose tile row is zeros).
  struct QRow {
    int64_t s, i;
    bool ok;
  };
  auto q_row = [&](int c, int t) -> QRow {
    const int64_t sr = static_cast<int64_t>(blockIdx.x) * pl.G + c / bq, i = static_cast<int64_t>(t) * bq + c % bq;
    bool ok = sr < p.S && i < E;
    if (ok && !(cls && i == 0)) {
      const SeqIndex ix = seq_index(sr, p.S1, p.S2);
      ok = i - kCls < real_rows(p, ix).queries && mask_real(p, mask_base(p, ix), i - kCls + shift);
    }
    return {sr, i, ok};
  };
  auto load_queries = [&](int t) {
    const int b = (t - t0) & 1;
    load_tile<T, DP>(Qs + b * qt * kP, qt, q, aligned, D, [&](int c) {
      const QRow r = q_row(c, t);
      if (!r.ok) return RowSrc<T>{nullptr, 1.f};
      const SeqIndex ix = seq_index(r.s, p.S1, p.S2);
      if (cls && r.i == 0) return RowSrc<T>{static_cast<const T*>(p.qc.ptr) + cls_offset(p.qc, ix.i0, ix.i2), 1.f};
      return RowSrc<T>{q + seq_offset(p.q, ix) + (r.i - kCls) * p.q.sL, 1.f};
    });
    load_tile<T, DP>(Ds + b * qt * kP, qt, dout, aligned, D, [&](int c) {
      const QRow r = q_row(c, t);
      if (!r.ok) return RowSrc<T>{nullptr, 1.f};
      const SeqIndex ix = seq_index(r.s, p.S1, p.S2);
      if (cls && r.i == 0) {  // d o_cls times the frame's weight in o_cls
        return RowSrc<T>{static_cast<const T*>(p.doc.ptr) + cls_offset(p.doc, ix.i0, ix.i2),
                         cls_frame_weight(p, ix.i0, ix.i1)};
      }
      return RowSrc<T>{dout + seq_offset(p.dout, ix) + (r.i - kCls) * p.dout.sL, 1.f};
    });
    for (int c = threadIdx.x; c < qt; c += blockDim.x) {
      const QRow r = q_row(c, t);
      float lse = 0.f, delta = 0.f;
      if (r.ok && cls && r.i == 0) {
        const SeqIndex ix = seq_index(r.s, p.S1, p.S2);
        const int64_t frame = (ix.i0 * p.S2 + ix.i2) * p.S1 + ix.i1;
        lse = gld(p.lse_cls + frame);
        delta = gld(p.delta_cls + frame);
      } else if (r.ok) {
        lse = gld(p.lse + r.s * p.L + r.i - kCls);
        delta = gld(p.delta + r.s * p.L + r.i - kCls);
      }
      lse_s[b * qt + c] = lse;
      del_s[b * qt + c] = delta;
    }
  };

  if (t0 < ntiles) load_queries(t0);
  cp_async_commit();

  const int g = lane >> 2, t4 = lane & 3;
  const bool single = pl.row_blocks == 1;  // this block holds every key of its sequences: dQ is complete here
  float dk[kDT][4], dv[kDT][4];
  zero(dk);
  zero(dv);
  for (int t = t0; t < ntiles; ++t) {
    if (t + 1 < ntiles) {
      load_queries(t + 1);  // into the buffer of tile t - 1: every warp left it at the last barrier
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int b = (t - t0) & 1;
    const T* Qt = Qs + (b * qt + gw * bq) * kP;  // this warp's sequence's rows of the tile
    const T* Dt = Ds + (b * qt + gw * bq) * kP;
    const int64_t i0 = static_cast<int64_t>(t) * bq;
    if (computes) {
      const float* lse_t = lse_s + b * qt + gw * bq;
      const float* del_t = del_s + b * qt + gw * bq;
      float st[kNQ][4], dpt[kNQ][4];  // [16 keys, kBQ queries]
      zero(st);
      zero(dpt);
      uint32_t a[4];
#pragma unroll 1
      for (int ks = 0; ks < DP / 16; ++ks) {  // not unrolled: it indexes no register array, and unrolling spilled
        load_a(a, Ks, kP, warp * 16, 16 * ks, lane);
#pragma unroll
        for (int c = 0; c < kNQ / 2; ++c) {
          if (16 * c < bq && i0 + 16 * c < qlim) mma_rows_t<T>(st[2 * c], st[2 * c + 1], a, Qt, kP, 16 * c, 16 * ks, lane);
        }
        load_a(a, Vs, kP, warp * 16, 16 * ks, lane);
#pragma unroll
        for (int c = 0; c < kNQ / 2; ++c) {
          if (16 * c < bq && i0 + 16 * c < qlim) mma_rows_t<T>(dpt[2 * c], dpt[2 * c + 1], a, Dt, kP, 16 * c, 16 * ks, lane);
        }
      }
#pragma unroll
      for (int n = 0; n < kNQ; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = 8 * n + 2 * t4 + (e & 1);
          const int64_t j = kt * 16 + g + 8 * (e >> 1), i = i0 + col;
          const bool seen = col < bq && i < qlim && j < klim && (!p.causal || j <= i + shift);
          const float pr = seen ? exp2f(st[n][e] * p.qk_scale - lse_t[col]) : 0.f;
          dpt[n][e] = seen ? pr * (dpt[n][e] - del_t[col]) : 0.f;
          st[n][e] = pr;
        }
      }
#pragma unroll
      for (int c = 0; c < kNQ / 2; ++c) {
        if (16 * c < bq && i0 + 16 * c < qlim) {
          acc_as_a<T>(a, st, c);
          mma_rows<T, DP>(dv, a, Dt, kP, 16 * c, lane);
          acc_as_a<T>(a, dpt, c);
          mma_rows<T, DP>(dk, a, Qt, kP, 16 * c, lane);
        }
      }
      // dS^T (16 keys x bq queries) for the block's dQ
#pragma unroll
      for (int n = 0; n < kNQ; ++n) {
        if (8 * n < bq) {
          uint32_t* row0 = reinterpret_cast<uint32_t*>(dSt + (warp * 16 + g) * kSP + 8 * n + 2 * t4);
          uint32_t* row8 = reinterpret_cast<uint32_t*>(dSt + (warp * 16 + g + 8) * kSP + 8 * n + 2 * t4);
          *row0 = pack2<T>(dpt[n][0], dpt[n][1]);
          *row8 = pack2<T>(dpt[n][2], dpt[n][3]);
        }
      }
    }
    __syncthreads();
    if (seq_ok) {
      // dQ (bq queries x DP) = dS (bq x the block's keys) K, in 16 x 16 pieces over the sequence's warps
      const int pieces = (bq / 16) * (DP / 16);
      for (int piece = warp % wps; piece < pieces; piece += wps) {
        const int qm = piece / (DP / 16), dp = piece % (DP / 16);
        if (i0 + 16 * qm >= E) continue;
        float acc[2][4];
        zero(acc);
        uint32_t a[4], bf[4];
        for (int kc = 0; kc < wps; ++kc) {
          // the warps that wrote their dS^T; none for rows of padding (their dQ is 0)
          if ((static_cast<int>(blockIdx.y) * wps + kc) * 16 < klim && i0 + 16 * qm < qlim) {
            const int krow = (gw * wps + kc) * 16;
            load_a_trans(a, dSt, kSP, krow, 16 * qm, lane);
            load_b_kn(bf, Ks, kP, krow, 16 * dp, lane);
            mma_16816<T>(acc[0], a, bf[0], bf[1]);
            mma_16816<T>(acc[1], a, bf[2], bf[3]);
          }
        }
        const SeqIndex ix = seq_index(s, p.S1, p.S2);
        const int64_t frame = (ix.i0 * p.S2 + ix.i2) * p.S1 + ix.i1;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int64_t i = i0 + 16 * qm + g + 8 * ((e >> 1) & 1);
          const int col = 16 * dp + 8 * (e >> 2) + 2 * t4 + (e & 1);
          if (i >= E || col >= D) continue;
          const float val = acc[e >> 2][e & 3];
          if (!single) {
            gst(p.workspace + ((blockIdx.y * p.S + s) * E + i) * D + col, val);
          } else if (cls && i == 0) {
            gst(p.cls_grad_frames + frame * D + col, val);  // unscaled: cls_sum_frames applies the scale
          } else {
            gst(static_cast<T*>(p.dq.ptr) + seq_offset(p.dq, ix) + (i - kCls) * p.dq.sL + col,
                from_float<T>(val * p.scale));
          }
        }
      }
    }
    __syncthreads();  // dS^T and the tile's buffer are reused by the next tile
  }

  if (!active) return;
  const SeqIndex ix = seq_index(s, p.S1, p.S2);
  const int64_t frame = (ix.i0 * p.S2 + ix.i2) * p.S1 + ix.i1, frames = p.B * p.H * p.T, mbase = mask_base(p, ix);
#pragma unroll
  for (int n = 0; n < kDT; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = kt * 16 + g + 8 * (e >> 1);
      const int col = 8 * n + 2 * t4 + (e & 1);
      if (j >= EK || col >= D) continue;
      if (cls && j == 0) {  // the frame's terms of the cls key's gradients, unscaled
        gst(p.cls_grad_frames + (frames + frame) * D + col, dk[n][e]);
        gst(p.cls_grad_frames + (2 * frames + frame) * D + col, dv[n][e]);
      } else {
        const bool real = mask_real(p, mbase, j - kCls);  // the counts' padding has zero dk, dv already
        gst(static_cast<T*>(p.dk.ptr) + seq_offset(p.dk, ix) + (j - kCls) * p.dk.sL + col,
            from_float<T>(real ? dk[n][e] * p.scale : 0.f));
        gst(static_cast<T*>(p.dv.ptr) + seq_offset(p.dv, ix) + (j - kCls) * p.dv.sL + col,
            from_float<T>(real ? dv[n][e] : 0.f));
      }
    }
  }
}

template <int DP>
MmaPlan bwd_plan(const AttnParams& p) {
  using Tr = MmaTraits<DP>;
  const int kCls = p.has_cls ? 1 : 0;
  return plan_rows(p.Lk + kCls, p.L + kCls, Tr::kBwdWarps, Tr::kBwdTile, Tr::kBwdQueries);
}

template <typename T, int DP>
struct BwdMmaLaunch {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    const MmaPlan pl = bwd_plan<DP>(p);
    const int warps = pl.G * pl.warps_per_seq;
    const size_t smem = bwd_smem_bytes<T, DP>(warps, pl.G * pl.seq_tile);
    const auto kernel = attn_bwd_mma_kernel<T, DP>;
    const cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>((p.S + pl.G - 1) / pl.G), static_cast<unsigned>(pl.row_blocks));
    return launch_kernel("attn_bwd_mma_kernel", kernel, grid, dim3(warps * kWarp), smem, stream, p, pl,
                         rows_aligned(p, true));
  }
};

// dq (and the cls rows' per-frame dq_cls terms) = the sum of the key blocks' fp32 partials,
// in key-block order; one thread per (sequence, row, d). With causal attention a key block
// wrote only the queries that see one of its keys (row i + Lk - L >= its first key): the
// others are not in the sum.
constexpr int kSumThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kSumThreads)
    dq_sum_kernel(const AttnParams p, const int E, const int blocks, const int block_keys) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
  const int64_t rows = p.S * E;
  if (idx >= rows * p.D) return;
  const int64_t r = idx / p.D, col = idx - r * p.D, s = r / E, i = r - s * E;
  float sum = 0.f;
  const int64_t seen = p.causal ? i + p.Lk - p.L : INT64_MAX;  // the last key row i sees
  for (int kb = 0; kb < blocks && static_cast<int64_t>(kb) * block_keys <= seen; ++kb) {
    sum += gld(p.workspace + (kb * rows + r) * p.D + col);
  }
  const SeqIndex ix = seq_index(s, p.S1, p.S2);
  if (p.has_cls && i == 0) {
    gst(p.cls_grad_frames + ((ix.i0 * p.S2 + ix.i2) * p.S1 + ix.i1) * p.D + col, sum);
  } else {
    const int64_t kCls = p.has_cls ? 1 : 0;
    gst(static_cast<T*>(p.dq.ptr) + seq_offset(p.dq, ix) + (i - kCls) * p.dq.sL + col, from_float<T>(sum * p.scale));
  }
}

template <typename T, int DP>
struct DqSumLaunch {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    const MmaPlan pl = bwd_plan<DP>(p);
    if (pl.row_blocks == 1) return cudaSuccess;  // the backward kernel wrote dq itself
    const int64_t n = p.S * pl.other * p.D;
    const dim3 grid(static_cast<unsigned>((n + kSumThreads - 1) / kSumThreads));
    return launch_kernel("dq_sum_kernel", dq_sum_kernel<T>, grid, dim3(kSumThreads), 0, stream, p, pl.other,
                         pl.row_blocks, 16 * pl.warps_per_seq);
  }
};

template <int DP>
size_t workspace_floats(const AttnParams& p) {
  const MmaPlan pl = bwd_plan<DP>(p);
  return pl.row_blocks == 1 ? 0 : static_cast<size_t>(pl.row_blocks) * p.S * pl.other * p.D;
}

}  // namespace

cudaError_t launch_attn_bwd_mma(const AttnParams& p, cudaStream_t stream) {
  return dispatch_mma<BwdMmaLaunch>(p, stream);
}

cudaError_t launch_dq_sum(const AttnParams& p, cudaStream_t stream) { return dispatch_mma<DqSumLaunch>(p, stream); }

size_t bwd_mma_workspace_floats(const AttnParams& p) {
  switch (head_chunks(p.D)) {
    case 1:
      return workspace_floats<32>(p);
    case 2:
      return workspace_floats<64>(p);
    case 3:
      return workspace_floats<96>(p);
    default:
      return workspace_floats<128>(p);
  }
}

}  // namespace divattn
