// Device helpers shared by the kernels: dtype conversion, global memory access, launches,
// warp reductions, sequence addressing, shared-memory tiles and the dtype / head-dim
// dispatch.
//
// The kernels also compile as host C++ (DIVATTN_EMULATE) against emulator/cuda_shim.h,
// which runs them on the CPU for the test suite; the few places that differ are here:
// global memory is read and written only through gld() / gst() (so that the emulator
// checks and counts every access), dynamic shared memory is declared with
// DIVATTN_DYNAMIC_SMEM and kernels are started with launch_kernel().
#pragma once

#ifdef DIVATTN_EMULATE
#include "emulator/cuda_shim.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "divattn.h"

namespace divattn {

constexpr int kWarp = 32;
constexpr int kWarps = 4;        // warps per block of the row kernels
constexpr int kRows = 4;         // rows (queries or keys) owned by one warp
constexpr int kSlots = 32;       // rows per shared-memory tile: one per lane
// Blocks per SM the row kernels are compiled for (__launch_bounds__'s minimum), which caps
// their registers at 65536 / (128 * n): 96 for the forward, 128 for the backward. Without a
// minimum, ptxas aimed at about 72 registers and spilled (up to 40 bytes in the dK/dV
// kernel with cls); with these caps no build for sm_80 or sm_90 spills
// (.ci/compile_csrc.sh fails if one does). At D = 128 shared memory holds an SM to as few
// blocks or fewer anyway (about 44 KB a block for the forward, 54 KB for the dK/dV kernel).
constexpr int kFwdMinBlocks = 5;
constexpr int kBwdMinBlocks = 4;
constexpr unsigned kFull = 0xffffffffu;

// A global-memory read and write. In the emulator each one is checked against the tensors
// of the launch and, when counting traffic, recorded (its 32-byte sectors, per block).
template <typename T>
__device__ __forceinline__ T gld(const T* p) {
#ifdef DIVATTN_EMULATE
  emu::global_read(p, sizeof(T));
#endif
  return *p;
}

template <typename T>
__device__ __forceinline__ void gst(T* p, T v) {
#ifdef DIVATTN_EMULATE
  emu::global_write(p, sizeof(T));
#endif
  *p = v;
}

#ifdef DIVATTN_EMULATE
#define DIVATTN_DYNAMIC_SMEM(type, name) type* name = static_cast<type*>(::emu::dynamic_smem())
#else
#define DIVATTN_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

// kernel<<<grid, block, smem, stream>>>(args...), or the emulator's launch of it; `name`
// is how the emulator's errors and counters call the kernel.
template <typename... P, typename... A>
inline cudaError_t launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                                 cudaStream_t stream, const A&... args) {
#ifdef DIVATTN_EMULATE
  (void)stream;
  auto call = [&]() { kernel(args...); };
  using Call = decltype(call);
  const emu::Body body{[](void* c) { (*static_cast<Call*>(c))(); }, &call};
  return emu::run_grid(name, reinterpret_cast<const void*>(kernel), grid, block, smem, body);
#else
  (void)name;
  kernel<<<grid, block, smem, stream>>>(args...);
  return cudaGetLastError();
#endif
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) x += __shfl_xor_sync(kFull, x, off);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(kFull, x, off));
  return x;
}

// Element offset of sequence s = (i0 * S1 + i1) * S2 + i2 in a view.
struct SeqIndex {
  int64_t i0, i1, i2;
};

// The host refuses more than 2^31 - 1 sequences (bindings.cpp), so s, S1 and S2 fit 32
// bits. The division is done in 32 bits: 64-bit integer division is a called subroutine,
// and the calling convention around it made the row kernels spill registers.
__device__ __forceinline__ SeqIndex seq_index(int64_t s, int64_t S1, int64_t S2) {
  const uint32_t s32 = static_cast<uint32_t>(s), S1u = static_cast<uint32_t>(S1), S2u = static_cast<uint32_t>(S2);
  const uint32_t r = s32 / S2u;
  const uint32_t i0 = r / S1u;
  return {static_cast<int64_t>(i0), static_cast<int64_t>(r - i0 * S1u), static_cast<int64_t>(s32 - r * S2u)};
}

__device__ __forceinline__ int64_t seq_offset(const View& v, const SeqIndex& ix) {
  return ix.i0 * v.s0 + ix.i1 * v.s1 + ix.i2 * v.s2;
}

__device__ __forceinline__ int64_t cls_offset(const ClsView& c, int64_t b, int64_t h) {
  return b * c.sb + h * c.sh;
}

// The real rows of sequence ix (AttnParams::rows / groups): key rows [0, keys) and query
// rows [0, queries); all of them when the batch is not padded. Any count is safe: the
// kernels bound every row by L or Lk as well.
struct RealRows {
  int64_t keys, queries;
};

__device__ __forceinline__ RealRows real_rows(const AttnParams& p, const SeqIndex& ix) {
  if (p.rows == nullptr) return {p.Lk, p.L};
  const int64_t keys = ix.i1 < gld(p.groups + ix.i0) ? gld(p.rows + ix.i0) : 0;
  const int64_t queries = keys - (p.Lk - p.L);
  return {keys, queries > 0 ? queries : 0};
}

// Whether key row `row` of sequence ix is real by the mask (AttnParams::mask; true without
// one). `base` is the sequence's offset in the mask, ix.i0 * s0 + ix.i1 * s1.
__device__ __forceinline__ int64_t mask_base(const AttnParams& p, const SeqIndex& ix) {
  return ix.i0 * p.mask.s0 + ix.i1 * p.mask.s1;
}

__device__ __forceinline__ bool mask_real(const AttnParams& p, int64_t base, int64_t row) {
  return p.mask.ptr == nullptr || gld(p.mask.ptr + base + row * p.mask.sL);
}

// The weight of frame t's cls output in sample b's o_cls = sum_t w_t * (frame t's output):
// with a mask, AttnParams::cls_weights; else (rows = patches, groups = frames) 1 / |F| on
// the frames F that hold a real patch and 0 on the others, 1 / T on every frame when F is
// empty or nothing is padded.
__device__ __forceinline__ float cls_frame_weight(const AttnParams& p, int64_t b, int64_t t) {
  if (p.cls_weights != nullptr) return gld(p.cls_weights + b * p.T + t);
  const float inv_T = 1.f / static_cast<float>(p.T);
  if (p.rows == nullptr) return inv_T;
  const int64_t g = gld(p.groups + b), F = gld(p.rows + b) > 0 ? (g < p.T ? g : p.T) : 0;
  if (F <= 0) return inv_T;
  return t < F ? 1.f / static_cast<float>(F) : 0.f;
}

// Dot product of two zero-padded fp32 rows in shared memory (16-byte aligned), d < 4 * D4.
__device__ __forceinline__ float dot_smem(const float* a, const float* b, int D4) {
  const float4* a4 = reinterpret_cast<const float4*>(a);
  const float4* b4 = reinterpret_cast<const float4*>(b);
  float acc = 0.f;
#pragma unroll 4
  for (int i = 0; i < D4; ++i) {
    const float4 x = a4[i], y = b4[i];
    acc = fmaf(x.x, y.x, acc);
    acc = fmaf(x.y, y.y, acc);
    acc = fmaf(x.z, y.z, acc);
    acc = fmaf(x.w, y.w, acc);
  }
  return acc;
}

// A row of D elements into fp32 shared memory, zero-filled up to DP (or all zero when
// !ok). One warp; lanes read consecutive elements.
template <typename T, int DP>
__device__ __forceinline__ void load_row(float* dst, const T* src, bool ok, int D, int lane) {
#pragma unroll
  for (int d = lane; d < DP; d += kWarp) dst[d] = (ok && d < D) ? to_float(gld(src + d)) : 0.f;
}

// This lane's elements (lane, lane + 32, ...) of a row of D, as fp32 registers; zero
// past D or when !ok.
template <typename T, int DCH>
__device__ __forceinline__ void load_lanes(float (&dst)[DCH], const T* src, bool ok, int D, int lane) {
#pragma unroll
  for (int c = 0; c < DCH; ++c) {
    const int d = lane + c * kWarp;
    dst[c] = (ok && d < D) ? to_float(gld(src + d)) : 0.f;
  }
}

// How a block of kWarps warps splits into G groups, each serving one sequence.
// Short sequences (L <= 8) are packed G = 2 or 4 to a block so that a block's rows and
// its 32-row tile are not mostly padding; a group owns kSlots / G tile rows and
// kWarps / G warps of kRows rows each.
struct Groups {
  int G, slots, warps_per_group, rows_per_block;
};

__host__ __device__ __forceinline__ Groups make_groups(int64_t L) {
  const int G = L <= 4 ? 4 : (L <= 8 ? 2 : 1);
  return {G, kSlots / G, kWarps / G, (kWarps / G) * kRows};
}

// Where a warp of a row kernel works: sequence s of group g, rows [row0, row0 + kRows).
struct RowWarp {
  int warp, lane, g;
  Groups grp;
  int64_t s, row0;
  bool seq_ok;
  SeqIndex ix;
};

// `rows`: how many rows per sequence the kernel's warps own (p.L queries or p.Lk keys).
__device__ __forceinline__ RowWarp row_warp(const AttnParams& p, int64_t rows) {
  RowWarp w;
  w.warp = threadIdx.x / kWarp;
  w.lane = threadIdx.x % kWarp;
  w.grp = make_groups(rows);
  w.g = w.warp / w.grp.warps_per_group;
  w.s = static_cast<int64_t>(blockIdx.x) * w.grp.G + w.g;
  w.seq_ok = w.s < p.S;
  w.ix = seq_index(w.seq_ok ? w.s : 0, p.S1, p.S2);
  w.row0 = static_cast<int64_t>(blockIdx.y) * w.grp.rows_per_block + (w.warp % w.grp.warps_per_group) * kRows;
  return w;
}

__device__ __forceinline__ float lane_of(const float4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// acc[r][c] += sum_{j < n} P[r][j] * X[j][lane + 32 c]: a warp's kRows rows of weights
// (row pitch kSlots, zero past n) times a tile of n rows (row pitch `pitch`), in j order.
template <int DCH>
__device__ __forceinline__ void accumulate_tile(float (&acc)[kRows][DCH], const float* P, const float* X, int pitch,
                                                int n, int lane) {
  const int n4 = (n + 3) & ~3;  // the tile's rows past n are zero too
  for (int j = 0; j < n4; j += 4) {
    float4 pj[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) pj[r] = *reinterpret_cast<const float4*>(P + r * kSlots + j);
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
      for (int c = 0; c < DCH; ++c) {
        const float x = X[(j + jj) * pitch + lane + c * kWarp];
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r][c] = fmaf(lane_of(pj[r], jj), x, acc[r][c]);
      }
    }
  }
}

// Per-group base offsets of up to two views and real rows (RealRows), computed once per
// block into shared memory.
struct GroupBases {
  int64_t a[kWarps];
  int64_t b[kWarps];
  int64_t keys[kWarps];
  int64_t queries[kWarps];
  int64_t mask[kWarps];  // mask_base of the sequence
  bool ok[kWarps];
};

// GroupBases lives after a kernel's float tiles in its dynamic shared memory.
constexpr size_t kGroupBasesFloats = (sizeof(GroupBases) + 15) / 16 * 4;

__device__ __forceinline__ void group_bases(GroupBases& gb, const View& x, const View& y, const AttnParams& p,
                                            int G) {
  const int i = threadIdx.x;
  if (i < G) {
    const int64_t s = static_cast<int64_t>(blockIdx.x) * G + i;
    gb.ok[i] = s < p.S;
    const SeqIndex ix = seq_index(gb.ok[i] ? s : 0, p.S1, p.S2);
    gb.a[i] = seq_offset(x, ix);
    gb.b[i] = seq_offset(y, ix);
    const RealRows real = real_rows(p, ix);
    gb.keys[i] = gb.ok[i] ? real.keys : 0;
    gb.queries[i] = gb.ok[i] ? real.queries : 0;
    gb.mask[i] = mask_base(p, ix);
  }
}

// The most real rows (gb.keys or gb.queries) of the block's G sequences.
__device__ __forceinline__ int64_t most_real(const int64_t (&real)[kWarps], int G) {
  int64_t most = 0;
  for (int i = 0; i < G; ++i) most = real[i] > most ? real[i] : most;
  return most;
}

// Whether tile row `slot` (row start + slot % slots of group slot / slots) is read: not
// past L, past the group's real rows (gb.keys or gb.queries) or where the mask pads it
// (mask row: the row + mask_shift).
__device__ __forceinline__ bool tile_row_read(int slot, const GroupBases& gb, const int64_t (&real)[kWarps],
                                              const AttnParams& p, int64_t mask_shift, int64_t start, int64_t L,
                                              int slots) {
  const int g = slot / slots;
  const int64_t row = start + (slot % slots);
  return gb.ok[g] && row < L && row < real[g] && mask_real(p, gb.mask[g], row + mask_shift);
}

// Tile rows [start, start + slots) of every group's sequence from two views (k and v,
// or q and do) into fp32 shared memory with the given row pitches; zeros for a row not
// read (tile_row_read, or flags[slot] == 0 where the caller computed them) and past D.
template <typename T, int DP>
__device__ __forceinline__ void load_tile_pair(float* ta, int pitch_a, float* tb, int pitch_b, const T* xa,
                                               const T* xb, const View& va, const View& vb,
                                               const GroupBases& gb, const int64_t (&real)[kWarps],
                                               const AttnParams& p, int64_t mask_shift, const float* flags,
                                               int64_t start, int64_t L, int slots, int D, int warp, int lane) {
  for (int slot = warp; slot < kSlots; slot += kWarps) {
    const int g = slot / slots;
    const int64_t row = start + (slot % slots);
    const bool ok = flags != nullptr ? flags[slot] != 0.f
                                     : tile_row_read(slot, gb, real, p, mask_shift, start, L, slots);
    const T* pa = ok ? xa + gb.a[g] + row * va.sL : xa;
    const T* pb = ok ? xb + gb.b[g] + row * vb.sL : xb;
    load_row<T, DP>(ta + slot * pitch_a, pa, ok, D, lane);
    load_row<T, DP>(tb + slot * pitch_b, pb, ok, D, lane);
  }
}

// Causal bounds of a block whose warps own rows [first, first + rows_per_block):
// the end (exclusive) of the key rows its query rows see, and the first query row that
// sees any of its key rows. Without causal: all keys, all queries.
__device__ __forceinline__ int64_t causal_key_end(const AttnParams& p, int64_t first, int rows_per_block) {
  if (!p.causal) return p.Lk;
  const int64_t last = first + rows_per_block < p.L ? first + rows_per_block : p.L;
  return last + (p.Lk - p.L);
}

__device__ __forceinline__ int64_t causal_query_begin(const AttnParams& p, int64_t first) {
  if (!p.causal) return 0;
  const int64_t q0 = first - (p.Lk - p.L);
  return q0 > 0 ? q0 : 0;
}

template <typename Kernel>
inline cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// Launch a row kernel (attn_fwd.cu, attn_bwd.cu): one block per G sequences x rows_per_block
// of the `rows` rows (p.L queries or p.Lk keys) its warps own.
template <typename Kernel>
cudaError_t launch_rows(const char* name, Kernel kernel, size_t smem, const AttnParams& p, int64_t rows,
                        cudaStream_t stream) {
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const Groups grp = make_groups(rows);
  const dim3 grid(static_cast<unsigned>((p.S + grp.G - 1) / grp.G),
                  static_cast<unsigned>((rows + grp.rows_per_block - 1) / grp.rows_per_block));
  return launch_kernel(name, kernel, grid, dim3(kWarps * kWarp), smem, stream, p);
}

inline int head_chunks(int D) { return (D + kWarp - 1) / kWarp; }

// Launch<float, ceil(D / 32), CLS>::run(p, stream) for the params' head dim: the scalar
// kernels serve fp32 (fp16 / bf16 run on tensor cores, mma.cuh).
template <template <typename, int, bool> class Launch, bool CLS>
cudaError_t dispatch_head(const AttnParams& p, cudaStream_t stream) {
  switch (head_chunks(p.D)) {
    case 1:
      return Launch<float, 1, CLS>::run(p, stream);
    case 2:
      return Launch<float, 2, CLS>::run(p, stream);
    case 3:
      return Launch<float, 3, CLS>::run(p, stream);
    default:
      return Launch<float, 4, CLS>::run(p, stream);
  }
}

// With CLS = p.has_cls.
template <template <typename, int, bool> class Launch>
cudaError_t dispatch_f32(const AttnParams& p, cudaStream_t stream) {
  return p.has_cls ? dispatch_head<Launch, true>(p, stream) : dispatch_head<Launch, false>(p, stream);
}

}  // namespace divattn
