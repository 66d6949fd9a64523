// Kernels that test the emulator's shim on its own (test_shim.py): the mma.sync m16n8k16
// fragment layouts against a plain matmul, ldmatrix (and .trans) through the loaders of
// mma.cuh, an accumulator reused as an A operand, shuffles, cp.async, the fp16 / bf16
// conversions, and the emulator's findings (a missing barrier, a deadlock, a divergent
// warp, an out-of-bounds read, too much shared memory). Compiled with runtime.cpp into a
// library of its own; every entry point launches one grid and returns its status.
#include "mma.cuh"

namespace {

using namespace divattn;

// The fragment layouts of the PTX ISA written per register (not per element as runtime.cpp
// does): A reg r holds row g + 8 (r & 1), columns 2t + 8 (r >> 1) + {0, 1}; B reg r rows
// 2t + 8r + {0, 1} of column g; C element i is (g + 8 (i >> 1), 2t + (i & 1)).
template <typename T>
__global__ void mma_registers_kernel(const T* A, const T* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  uint32_t a[4];
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
    a[r] = pack2<T>(to_float(gld(A + row * 16 + col)), to_float(gld(A + row * 16 + col + 1)));
  }
  uint32_t b[2];
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * t + 8 * r;
    b[r] = pack2<T>(to_float(gld(B + k * 8 + g)), to_float(gld(B + (k + 1) * 8 + g)));
  }
  float c[4];
  for (int i = 0; i < 4; ++i) c[i] = gld(C + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1));
  mma_16816<T>(c, a, b[0], b[1]);
  for (int i = 0; i < 4; ++i) gst(D + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1), c[i]);
}

// A 16 x 16 result held as two n-tiles, written row-major.
__device__ void store_16x16(float* out, const float (&acc)[2][4], int lane) {
  const int g = lane >> 2, t = lane & 3;
  for (int n = 0; n < 2; ++n) {
    for (int i = 0; i < 4; ++i) gst(out + (g + 8 * (i >> 1)) * 16 + 8 * n + 2 * t + (i & 1), acc[n][i]);
  }
}

constexpr int kPitch = 16 + kPad;

// Through shared memory and the loaders of mma.cuh (16 x 16 matrices, row-major in global
// memory): D0 = A X^T (load_a, load_b_nk), D1 = A X (load_b_kn), D2 = A^T X (load_a_trans),
// D3 = (A X rounded to T) Y (acc_as_a).
template <typename T>
__global__ void mma_shared_kernel(const T* A, const T* X, const T* Y, float* D) {
  DIVATTN_DYNAMIC_SMEM(unsigned char, smem);
  T* As = reinterpret_cast<T*>(smem);  // three [16][kPitch] tiles
  T* Xs = As + 16 * kPitch;
  T* Ys = Xs + 16 * kPitch;
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += kWarp) {
    As[(i / 16) * kPitch + i % 16] = gld(A + i);
    Xs[(i / 16) * kPitch + i % 16] = gld(X + i);
    Ys[(i / 16) * kPitch + i % 16] = gld(Y + i);
  }
  __syncwarp();
  uint32_t a[4], b[4];
  float acc[2][4];

  zero(acc);
  load_a(a, As, kPitch, 0, 0, lane);
  load_b_nk(b, Xs, kPitch, 0, 0, lane);
  mma_16816<T>(acc[0], a, b[0], b[1]);
  mma_16816<T>(acc[1], a, b[2], b[3]);
  store_16x16(D, acc, lane);

  zero(acc);
  load_b_kn(b, Xs, kPitch, 0, 0, lane);
  mma_16816<T>(acc[0], a, b[0], b[1]);
  mma_16816<T>(acc[1], a, b[2], b[3]);
  store_16x16(D + 256, acc, lane);

  float chained[2][4];
  zero(chained);
  acc_as_a<T>(a, acc, 0);
  load_b_kn(b, Ys, kPitch, 0, 0, lane);
  mma_16816<T>(chained[0], a, b[0], b[1]);
  mma_16816<T>(chained[1], a, b[2], b[3]);
  store_16x16(D + 768, chained, lane);

  zero(acc);
  load_a_trans(a, As, kPitch, 0, 0, lane);
  load_b_kn(b, Xs, kPitch, 0, 0, lane);
  mma_16816<T>(acc[0], a, b[0], b[1]);
  mma_16816<T>(acc[1], a, b[2], b[3]);
  store_16x16(D + 512, acc, lane);
}

// Two warps: out[0 .. 64) = v of lane ^ 5, out[64 .. 128) = v of lane (7 lane + 3) % 32,
// with v = 100 warp + lane.
__global__ void shuffle_kernel(int* out) {
  const int lane = threadIdx.x % kWarp, v = 100 * (threadIdx.x / kWarp) + lane;
  gst(out + threadIdx.x, __shfl_xor_sync(kFull, v, 5));
  gst(out + 64 + threadIdx.x, __shfl_sync(kFull, v, (7 * lane + 3) % kWarp));
}

// One warp: lane l copies 8 fp16 from src + 8 l (lanes >= 16: src-size 0, zeros); the row is
// read back before the wait (out[0 .. 256)) and after it (out[256 .. 512)).
__global__ void cp_async_kernel(const __half* src, float* out) {
  DIVATTN_DYNAMIC_SMEM(unsigned char, smem);
  __half* rows = reinterpret_cast<__half*>(smem);  // [32][8]
  const int lane = threadIdx.x;
  cp_async_16(rows + 8 * lane, src + 8 * lane, lane < 16);
  cp_async_commit();
  for (int e = 0; e < 8; ++e) gst(out + 8 * lane + e, __half2float(rows[8 * lane + e]));
  cp_async_wait<0>();
  for (int e = 0; e < 8; ++e) gst(out + 256 + 8 * lane + e, __half2float(rows[8 * lane + e]));
}

// Thread i writes i to shared memory and reads thread (i + 1)'s value, with or without a
// barrier in between.
__global__ void neighbour_kernel(float* out, bool barrier) {
  DIVATTN_DYNAMIC_SMEM(float, vals);
  vals[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (barrier) __syncthreads();
  gst(out + threadIdx.x, vals[(threadIdx.x + 1) % blockDim.x]);
}

// Half of the second warp waits at a shuffle its other half never reaches: they wait at the
// barrier with the first warp, which can never complete.
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x >= kWarp + 16) {
    gst(out + threadIdx.x, __shfl_xor_sync(kFull, static_cast<int>(threadIdx.x), 1));
  }
  __syncthreads();
}

// Half a warp shuffles while the other half waits at __syncwarp.
__global__ void divergent_kernel(int* out) {
  if (threadIdx.x < 16) {
    gst(out + threadIdx.x, __shfl_xor_sync(kFull, static_cast<int>(threadIdx.x), 1));
  } else {
    __syncwarp();
  }
}

// Each thread reads x[threadIdx.x]: past the end of x when the block is larger than x.
__global__ void read_kernel(const float* x, float* out) { gst(out + threadIdx.x, gld(x + threadIdx.x)); }

template <typename... Args>
int launch(const char* name, void (*kernel)(Args...), unsigned threads, size_t smem, Args... args) {
  return static_cast<int>(launch_kernel(name, kernel, dim3(1), dim3(threads), smem, nullptr, args...));
}

}  // namespace

#define EXPORT extern "C" __attribute__((visibility("default")))

EXPORT int test_mma_registers(int bf16, const void* A, const void* B, const float* C, float* D) {
  if (bf16) {
    return launch("mma_registers_kernel", mma_registers_kernel<__nv_bfloat16>, kWarp, 0,
                  static_cast<const __nv_bfloat16*>(A), static_cast<const __nv_bfloat16*>(B), C, D);
  }
  return launch("mma_registers_kernel", mma_registers_kernel<__half>, kWarp, 0, static_cast<const __half*>(A),
                static_cast<const __half*>(B), C, D);
}

EXPORT int test_mma_shared(int bf16, const void* A, const void* X, const void* Y, float* D) {
  if (bf16) {
    using T = __nv_bfloat16;
    return launch("mma_shared_kernel", mma_shared_kernel<T>, kWarp, 48 * kPitch * sizeof(T), static_cast<const T*>(A),
                  static_cast<const T*>(X), static_cast<const T*>(Y), D);
  }
  return launch("mma_shared_kernel", mma_shared_kernel<__half>, kWarp, 48 * kPitch * sizeof(__half),
                static_cast<const __half*>(A),
                static_cast<const __half*>(X), static_cast<const __half*>(Y), D);
}

EXPORT int test_shuffles(int* out) { return launch("shuffle_kernel", shuffle_kernel, 2 * kWarp, 0, out); }

EXPORT int test_cp_async(const void* src, float* out) {
  return launch("cp_async_kernel", cp_async_kernel, kWarp, 32 * 8 * sizeof(__half), static_cast<const __half*>(src),
                out);
}

EXPORT int test_neighbours(float* out, int threads, int barrier) {
  return launch("neighbour_kernel", neighbour_kernel, static_cast<unsigned>(threads), threads * sizeof(float), out,
                barrier != 0);
}

EXPORT int test_deadlock(int* out) { return launch("deadlock_kernel", deadlock_kernel, 2 * kWarp, 0, out); }

EXPORT int test_divergent(int* out) { return launch("divergent_kernel", divergent_kernel, kWarp, 0, out); }

EXPORT int test_read(const float* x, float* out, int threads) {
  return launch("read_kernel", read_kernel, static_cast<unsigned>(threads), 0, x, out);
}

EXPORT int test_big_smem(float* out, int bytes) {
  return static_cast<int>(launch_kernel("neighbour_kernel", neighbour_kernel, dim3(1), dim3(kWarp),
                                        static_cast<size_t>(bytes), nullptr, out, true));
}

EXPORT const char* test_error(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

EXPORT void test_to_half(const float* x, uint16_t* h, uint16_t* b, int n) {
  for (int i = 0; i < n; ++i) {
    h[i] = emu::float_to_half_bits(x[i]);
    b[i] = emu::float_to_bf16_bits(x[i]);
  }
}

EXPORT void test_from_half(const uint16_t* bits, float* h, float* b, int n) {
  for (int i = 0; i < n; ++i) {
    h[i] = emu::half_bits_to_float(bits[i]);
    b[i] = emu::bf16_bits_to_float(bits[i]);
  }
}
