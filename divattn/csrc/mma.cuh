// Tensor-core building blocks of the fp16 / bf16 kernels (attn_fwd_mma.cu, attn_bwd_mma.cu):
// mma.sync.aligned.m16n8k16 with fp32 accumulation, ldmatrix, cp.async, as inline PTX (in
// the emulator: the shim's implementations of the same instructions), and the fragment
// loads the kernels use, with the PTX ISA's fragment layouts spelled out once here.
//
// Shared-memory tiles are row-major with a row pitch of D_pad + 8 elements (16 bytes more
// than the row): the 8 rows an ldmatrix phase reads then start in 8 different 16-byte
// bank groups for every padded head dim used (32, 64, 96, 128: pitches of 5, 9, 13 and
// 17 groups, all odd), so no ldmatrix has a bank conflict; the emulator counts the
// wavefronts of every ldmatrix and the suite requires one per matrix.
//
// Fragments (groupID g = lane / 4, t = lane % 4), m16n8k16:
//   A (16 x 16, 4 regs): reg0 = (g, 2t..2t+1), reg1 = (g + 8, 2t..), reg2 = (g, 2t + 8..),
//                        reg3 = (g + 8, 2t + 8..)
//   B (16 x 8, 2 regs):  reg0 = rows (k) 2t..2t+1 of column (n) g, reg1 = rows 2t + 8..
//   C (16 x 8, 4 fp32):  c0, c1 = (g, 2t..2t+1), c2, c3 = (g + 8, 2t..)
// so the accumulators of two neighbouring n-tiles, packed to 16 bits, are the A fragment
// of the next product (flash attention's P, the backward's P^T and dS^T).
#pragma once

#include "common.cuh"

namespace divattn {

constexpr int kPad = 8;  // elements of row padding in every fp16 / bf16 shared-memory tile

template <typename T>
struct IsHalf {
  static constexpr bool value = false;
};
template <>
struct IsHalf<__half> {
  static constexpr bool value = true;
};

__device__ __forceinline__ unsigned short bits_of(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ unsigned short bits_of(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// Two floats as one register of two T (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(bits_of(from_float<T>(lo))) | (static_cast<uint32_t>(bits_of(from_float<T>(hi))) << 16);
}

// d += a * b (16 x 8 x 16, fp32 accumulation).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef DIVATTN_EMULATE
  const uint32_t b[2] = {b0, b1};
  emu::mma_m16n8k16(d, a, b, d, IsHalf<T>::value ? emu::Mma::f16 : emu::Mma::bf16);
#else
  if constexpr (IsHalf<T>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

#ifndef DIVATTN_EMULATE
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ldmatrix .x4: four 8 x 8 b16 matrices; lane 8i + j gives the address of row j of matrix i,
// register i gets matrix i's elements (row lane / 4, columns 2 (lane % 4) ..) or, with
// .trans, (rows 2 (lane % 4) .., column lane / 4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef DIVATTN_EMULATE
  emu::ldmatrix(r, row, 4, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#ifdef DIVATTN_EMULATE
  emu::ldmatrix(r, row, 4, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
#endif
}

// 16 bytes global -> shared, bypassing L1 (cp.async.cg); zeros when !valid (src-size 0,
// src must still be a valid 16-byte aligned global address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#ifdef DIVATTN_EMULATE
  emu::cp_async(dst, src, 16, valid ? 16 : 0);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef DIVATTN_EMULATE
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N committed groups of this thread are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef DIVATTN_EMULATE
  emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// A fragment of the 16 x 16 block at (row0, col0) of a row-major [m][k] tile.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int pitch, int row0, int col0, int lane) {
  const int m = lane >> 3, j = lane & 7;
  ldmatrix_x4(a, tile + (row0 + j + 8 * (m & 1)) * pitch + col0 + 8 * (m >> 1));
}

// A fragment of the 16 x 16 block whose rows are k0.. and columns m0.. of a [k][m] tile
// (the block transposed: A = tile^T).
template <typename T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* tile, int pitch, int k0, int m0, int lane) {
  const int m = lane >> 3, j = lane & 7;
  ldmatrix_x4_trans(a, tile + (k0 + j + 8 * (m >> 1)) * pitch + m0 + 8 * (m & 1));
}

// B fragments of two n-tiles (n0.., n0 + 8..) over k0..k0 + 15 from an [n][k] tile (B = tile^T,
// e.g. the keys of q k^T): b[0], b[1] for n-tile n0, b[2], b[3] for n0 + 8.
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int pitch, int n0, int k0, int lane) {
  const int m = lane >> 3, j = lane & 7;
  ldmatrix_x4(b, tile + (n0 + j + 8 * (m >> 1)) * pitch + k0 + 8 * (m & 1));
}

// The same from a [k][n] tile (B = tile, e.g. the values of p v).
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int pitch, int k0, int n0, int lane) {
  const int m = lane >> 3, j = lane & 7;
  ldmatrix_x4_trans(b, tile + (k0 + j + 8 * (m & 1)) * pitch + n0 + 8 * (m >> 1));
}

// The A fragment of k-chunk c (columns 16c..16c + 15) of a 16-row accumulator held as n-tiles.
template <typename T, int NT>
__device__ __forceinline__ void acc_as_a(uint32_t (&a)[4], const float (&acc)[NT][4], int c) {
  a[0] = pack2<T>(acc[2 * c][0], acc[2 * c][1]);
  a[1] = pack2<T>(acc[2 * c][2], acc[2 * c][3]);
  a[2] = pack2<T>(acc[2 * c + 1][0], acc[2 * c + 1][1]);
  a[3] = pack2<T>(acc[2 * c + 1][2], acc[2 * c + 1][3]);
}

// acc0 (n-tile n0..) and acc1 (n0 + 8..) += a times the 16 rows n0.. of an [n][k] tile,
// columns k0..k0 + 15, transposed (e.g. the scores of 16 keys).
template <typename T>
__device__ __forceinline__ void mma_rows_t(float (&acc0)[4], float (&acc1)[4], const uint32_t (&a)[4], const T* tile,
                                           int pitch, int n0, int k0, int lane) {
  uint32_t b[4];
  load_b_nk(b, tile, pitch, n0, k0, lane);
  mma_16816<T>(acc0, a, b[0], b[1]);
  mma_16816<T>(acc1, a, b[2], b[3]);
}

// acc (16 x DP) += a times the 16 rows k0.. of a [k][DP] tile (e.g. P V).
template <typename T, int DP>
__device__ __forceinline__ void mma_rows(float (&acc)[DP / 8][4], const uint32_t (&a)[4], const T* tile, int pitch,
                                         int k0, int lane) {
  uint32_t b[4];
#pragma unroll
  for (int dp = 0; dp < DP / 16; ++dp) {
    load_b_kn(b, tile, pitch, k0, 16 * dp, lane);
    mma_16816<T>(acc[2 * dp], a, b[0], b[1]);
    mma_16816<T>(acc[2 * dp + 1], a, b[2], b[3]);
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

// Where a tile row comes from: ptr (nullptr: a padding row, zeros), times scale (!= 1 only
// for the cls row of the backward's output gradient, d o_cls / T).
template <typename T>
struct RowSrc {
  const T* ptr;
  float scale;
};

// Rows of a [rows][DP] tile of T into shared memory (row pitch DP + kPad): row r from
// row_src(r), zeros past D. 16-byte cp.async when every row is 16-byte aligned and
// D % 8 == 0 (the caller's `aligned`) and the row is not scaled; element loads otherwise.
// Each thread of the block takes every blockDim.x-th 16-byte chunk.
template <typename T, int DP, typename Rows>
__device__ __forceinline__ void load_tile(T* dst, int rows, const T* any_row, bool aligned, int D, Rows row_src) {
  constexpr int kChunks = DP / 8, kPitch = DP + kPad;
  for (int idx = threadIdx.x; idx < rows * kChunks; idx += blockDim.x) {
    const int r = idx / kChunks, c = idx - r * kChunks;
    const RowSrc<T> src = row_src(r);
    T* d = dst + r * kPitch + 8 * c;
    if (aligned && src.scale == 1.f) {
      const bool valid = src.ptr != nullptr && 8 * c < D;
      cp_async_16(d, valid ? src.ptr + 8 * c : any_row, valid);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int col = 8 * c + e;
        d[e] = from_float<T>(src.ptr != nullptr && col < D ? to_float(gld(src.ptr + col)) * src.scale : 0.f);
      }
    }
  }
}

// Launch bounds and tiles of the tensor-core kernels per padded head dim: up to 16 warps
// (256 query or key rows) a block at DP <= 64, 8 at DP = 96 or 128, whose accumulators
// take twice the registers. 16 warps leave 128 registers a thread: the backward's warp
// (dK and dV of its 16 keys, and S^T and dP^T of 16 keys x kBwdQueries queries) fits them
// with 16 queries a tile; 32 spilled.
template <int DP>
struct MmaTraits {
  static constexpr int kFwdWarps = DP <= 64 ? 16 : 8;
  static constexpr int kBwdWarps = DP <= 64 ? 16 : 8;
  static constexpr int kFwdKeys = 64;     // key rows of a forward tile (all sequences of the block)
  static constexpr int kBwdQueries = 16;  // query rows of one sequence in a backward tile
  static constexpr int kBwdTile = 64;     // query rows of a backward tile (all sequences)
};

// How the rows of S sequences (rows each, cls included) spread over blocks of 16-row
// warps: G sequences of warps_per_seq warps each a block, or one sequence over
// row_blocks blocks of max_warps warps; seq_tile rows of each sequence per streamed tile.
struct MmaPlan {
  int rows = 0, other = 0;  // rows each warp covers (queries / keys), rows streamed (keys / queries)
  int G = 1, warps_per_seq = 1, row_blocks = 1, seq_tile = 16;
};

__host__ __device__ __forceinline__ int round16(int64_t x) { return static_cast<int>((x + 15) / 16 * 16); }

// `tile`: rows of a streamed tile over all G sequences; `seq_max`: most rows of one
// sequence in it.
inline MmaPlan plan_rows(int64_t rows, int64_t other, int max_warps, int tile, int seq_max) {
  MmaPlan pl;
  pl.rows = static_cast<int>(rows);
  pl.other = static_cast<int>(other);
  const int64_t warps = (rows + 15) / 16 > 0 ? (rows + 15) / 16 : 1;
  pl.seq_tile = round16(other < seq_max ? other : seq_max);
  if (pl.seq_tile == 0) pl.seq_tile = 16;
  if (warps <= max_warps) {
    pl.warps_per_seq = static_cast<int>(warps);
    while (pl.G * 2 * pl.warps_per_seq <= 4 && pl.G * 2 * pl.seq_tile <= tile) pl.G *= 2;
  } else {
    pl.warps_per_seq = max_warps;
    pl.row_blocks = static_cast<int>((warps + max_warps - 1) / max_warps);
  }
  return pl;
}

// Whether every row the tensor-core kernels copy with cp.async is 16-byte aligned: D a
// multiple of 8 and every pointer and stride of q, k, v (and do for the backward, and the
// cls vectors) too. Otherwise the tiles are loaded element by element.
inline bool view_aligned(const View& v) {
  return reinterpret_cast<uintptr_t>(v.ptr) % 16 == 0 && v.s0 % 8 == 0 && v.s1 % 8 == 0 && v.s2 % 8 == 0 &&
         v.sL % 8 == 0;
}

inline bool cls_aligned(const ClsView& c) {
  return reinterpret_cast<uintptr_t>(c.ptr) % 16 == 0 && c.sb % 8 == 0 && c.sh % 8 == 0;
}

inline bool rows_aligned(const AttnParams& p, bool backward) {
  bool ok = p.D % 8 == 0 && view_aligned(p.q) && view_aligned(p.k) && view_aligned(p.v);
  if (backward) ok = ok && view_aligned(p.dout);
  if (p.has_cls) ok = ok && cls_aligned(p.qc) && cls_aligned(p.kc) && cls_aligned(p.vc);
  return ok;
}

// Dispatch Launch<T, DP>::run(p, stream) over the half dtypes and DP = 32 * ceil(D / 32). The
// cls token is a runtime flag of these kernels (p.has_cls): it only chooses row pointers.
template <template <typename, int> class Launch, typename T>
cudaError_t dispatch_mma_dp(const AttnParams& p, cudaStream_t stream) {
  switch (head_chunks(p.D)) {
    case 1:
      return Launch<T, 32>::run(p, stream);
    case 2:
      return Launch<T, 64>::run(p, stream);
    case 3:
      return Launch<T, 96>::run(p, stream);
    default:
      return Launch<T, 128>::run(p, stream);
  }
}

template <template <typename, int> class Launch>
cudaError_t dispatch_mma(const AttnParams& p, cudaStream_t stream) {
  return p.dtype == DType::f16 ? dispatch_mma_dp<Launch, __half>(p, stream)
                               : dispatch_mma_dp<Launch, __nv_bfloat16>(p, stream);
}

// The tensor-core forward and backward (fp16 / bf16), called by the launchers of divattn.h.
cudaError_t launch_attn_fwd_mma(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_attn_bwd_mma(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_dq_sum(const AttnParams& p, cudaStream_t stream);
size_t bwd_mma_workspace_floats(const AttnParams& p);

}  // namespace divattn
