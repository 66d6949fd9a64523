// What the emulated kernel library (every divattn/csrc/*.cu compiled as host C++ with
// runtime.cpp and table.cpp) hands the emulated binding (bindings.cpp compiled with
// DIVATTN_EMULATE): the launchers of divattn.h and the emulator's controls. The Python
// side loads a library and passes the address of its table to the binding
// (divattn.ops.cuda_emulator), so a test can swap in a library built from changed sources.
#pragma once

#include <cstddef>

#include "../divattn.h"

namespace divattn {
namespace emu_abi {

constexpr int kVersion = 1;

struct Table {
  int version;
  size_t params_size;  // sizeof(AttnParams) in the library: the binding refuses a mismatch
  cudaError_t (*attn_fwd)(const AttnParams&, cudaStream_t);
  cudaError_t (*cls_fwd)(const AttnParams&, cudaStream_t);
  cudaError_t (*bwd_delta)(const AttnParams&, cudaStream_t);
  cudaError_t (*cls_bwd_prep)(const AttnParams&, cudaStream_t);
  cudaError_t (*bwd_dkdv)(const AttnParams&, cudaStream_t);
  cudaError_t (*bwd_dq)(const AttnParams&, cudaStream_t);
  cudaError_t (*cls_bwd)(const AttnParams&, cudaStream_t);
  size_t (*bwd_workspace_floats)(const AttnParams&);
  void (*clear_ranges)();
  void (*add_range)(const void* begin, size_t bytes, int writable);
  const char* (*error_string)(cudaError_t);
};

}  // namespace emu_abi
}  // namespace divattn
