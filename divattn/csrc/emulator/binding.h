// The emulated binding's side of table.h: bindings.cpp compiled with DIVATTN_EMULATE calls
// the launchers of divattn.h, defined here to go through the table of the kernel library
// the Python side loaded (set_kernels), and tells the emulator which memory each launch
// may touch: the extent of every tensor it passes, writable for the outputs.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#include "table.h"

namespace divattn {
namespace emu_abi {

inline const Table*& current_table() {
  static const Table* table = nullptr;
  return table;
}

inline const Table& table() {
  const Table* t = current_table();
  TORCH_CHECK(t != nullptr, "divattn emulator: no kernel library is loaded (set_kernels was not called)");
  return *t;
}

inline void set_kernels(uintptr_t address) {
  const auto* t = reinterpret_cast<const Table*>(address);
  TORCH_CHECK(t != nullptr && t->version == kVersion && t->params_size == sizeof(AttnParams),
              "divattn emulator: the kernel library was built from another divattn.h (table version ",
              t ? t->version : -1, ", AttnParams of ", t ? t->params_size : 0, " bytes, this binding: version ",
              kVersion, ", ", sizeof(AttnParams), " bytes)");
  current_table() = t;
}

// Every launch after this may read the tensors passed to allow() and write those passed
// with write = true (their extent: from the first to the last element of the view).
inline void clear_memory() { table().clear_ranges(); }

inline void allow(const at::Tensor& t, bool write) {
  if (!t.defined() || t.numel() == 0) return;
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  table().add_range(t.data_ptr(), static_cast<size_t>(last + 1) * t.element_size(), write ? 1 : 0);
}

}  // namespace emu_abi

cudaError_t launch_attn_fwd(const AttnParams& p, cudaStream_t s) { return emu_abi::table().attn_fwd(p, s); }
cudaError_t launch_cls_fwd(const AttnParams& p, cudaStream_t s) { return emu_abi::table().cls_fwd(p, s); }
cudaError_t launch_bwd_delta(const AttnParams& p, cudaStream_t s) { return emu_abi::table().bwd_delta(p, s); }
cudaError_t launch_cls_bwd_prep(const AttnParams& p, cudaStream_t s) {
  return emu_abi::table().cls_bwd_prep(p, s);
}
cudaError_t launch_bwd_dkdv(const AttnParams& p, cudaStream_t s) { return emu_abi::table().bwd_dkdv(p, s); }
cudaError_t launch_bwd_dq(const AttnParams& p, cudaStream_t s) { return emu_abi::table().bwd_dq(p, s); }
cudaError_t launch_cls_bwd(const AttnParams& p, cudaStream_t s) { return emu_abi::table().cls_bwd(p, s); }
size_t bwd_workspace_floats(const AttnParams& p) { return emu_abi::table().bwd_workspace_floats(p); }

}  // namespace divattn

const char* cudaGetErrorString(cudaError_t err) { return divattn::emu_abi::table().error_string(err); }
