// The part of the CUDA runtime API that divattn.h and the launchers use, for the host-C++
// build of the kernels (DIVATTN_EMULATE; see cuda_shim.h). Launch errors and the
// emulator's own findings (a race it made visible, an out-of-bounds access, a deadlock)
// come back as cudaErrorLaunchFailure with the emulator's sentence from
// cudaGetErrorString.
#pragma once

#include <cstddef>
#include <cstdint>

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

using cudaStream_t = struct CUstream_st*;

enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint3 {
  unsigned x, y, z;
};

// The emulator's error sentence for cudaErrorLaunchFailure, the CUDA one otherwise.
const char* cudaGetErrorString(cudaError_t err);
// The status of the last launch, reset to cudaSuccess by the call (as in CUDA).
cudaError_t cudaGetLastError();
// Only cudaFuncAttributeMaxDynamicSharedMemorySize: launches asking for more than 48 KB of
// dynamic shared memory fail without it, as on a GPU.
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value);
