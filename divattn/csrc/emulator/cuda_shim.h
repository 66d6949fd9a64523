// The CUDA built-ins the kernels use, for compiling divattn/csrc/*.cu as host C++
// (DIVATTN_EMULATE). The kernels are not changed for the emulator: common.cuh and mma.cuh
// include this header instead of the CUDA headers, and runtime.cpp runs every thread of
// a block as a fiber of its own:
// - __syncthreads() and the warp collectives (__syncwarp, __shfl_*_sync, ldmatrix, mma)
//   are the only points where a thread hands over; a thread runs until it reaches one.
//   One warp at a time runs to the next __syncthreads, in the opposite order of warps
//   each time (lanes too, between warp collectives), so a thread reads what another
//   writes before or after the other got to it, and a missing barrier shows as a wrong
//   or NaN result.
// - Shared memory (dynamic only: see __shared__ below) is filled with NaN (all bits set)
//   before every block; a cp.async destination is filled with NaN when the copy is issued and gets
//   its data only when cp.async.wait_group retires the copy's group.
// - Every global access goes through ld() / st() (common.cuh): each is checked against
//   the tensors the binding registered and, when counting, its 32-byte sectors are
//   recorded per block.
// - mma.sync.aligned.m16n8k16 and ldmatrix gather the operands of the 32 lanes by the
//   fragment layouts of the PTX ISA and compute in double (rounded to fp32 once).
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Kernels take all their shared memory from the dynamic buffer (DIVATTN_DYNAMIC_SMEM, which
// the emulator fills with NaN before every block); a static __shared__ does not compile.
#define __shared__ static_shared_memory_is_not_emulated_use_DIVATTN_DYNAMIC_SMEM

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

namespace emu {

enum class Mma : int { f16 = 0, bf16 = 1 };

// The scheduler's entry points (runtime.cpp). All 32 lanes of a warp must meet at a warp
// collective of the same kind (full masks only); a block barrier counts arrivals, as bar.sync does.
void syncthreads();
void syncwarp(unsigned mask);
uint64_t shfl(unsigned mask, uint64_t bits, int lane_arg, int width, bool xor_mode);
// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (count = 4): this lane's row address
// (lane 8i + j: row j of matrix i), the lane's 4 registers back in out.
void ldmatrix(uint32_t* out, const void* row, int count, bool trans);
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: d = a * b + c.
void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, const float* c, Mma type);
// cp.async.{ca,cg}.shared.global [dst], [src], cp_size, src_size (src_size < cp_size: the
// rest is zero-filled), cp.async.commit_group, cp.async.wait_group n.
void cp_async(void* dst, const void* src, int cp_size, int src_size);
void cp_async_commit();
void cp_async_wait(int n);
void* dynamic_smem();
void global_read(const void* p, size_t bytes);
void global_write(const void* p, size_t bytes);

// A callable the launcher passes to run_grid: every thread calls it once.
struct Body {
  void (*call)(void*);
  void* ctx;
};
cudaError_t run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem, Body body);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled values are up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// Round-to-nearest-even conversions of IEEE binary16 and bfloat16 (bit patterns).
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN stays NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half (or zero), value m * 2^-24
    float af;
    std::memcpy(&af, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(nearbyintf(af * 16777216.0f)));
  }
  uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13);  // exponent rebiased 127 -> 15
  const uint32_t rest = ax & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return static_cast<uint16_t>(sign | h);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0) {
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (e == 31) {
    bits = sign | 0x7f800000u | (m << 13);
  } else {
    bits = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace emu

struct alignas(16) float4 {
  float x, y, z, w;
};

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

inline float __half2float(__half h) { return emu::half_bits_to_float(h.x); }
inline __half __float2half_rn(float f) { return {emu::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::bf16_bits_to_float(b.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {emu::float_to_bf16_bits(f)}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::syncwarp(mask); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return emu::from_bits<T>(emu::shfl(mask, emu::to_bits(var), lane_mask, width, true));
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return emu::from_bits<T>(emu::shfl(mask, emu::to_bits(var), src_lane, width, false));
}
