// The emulated kernel library's table (table.h).
#include "table.h"

extern "C" {
void divattn_emu_clear_ranges();
void divattn_emu_add_range(const void* begin, size_t bytes, int writable);
}

namespace {

const char* error_string(cudaError_t err) { return cudaGetErrorString(err); }

const divattn::emu_abi::Table kTable = {
    divattn::emu_abi::kVersion,
    sizeof(divattn::AttnParams),
    divattn::launch_attn_fwd,
    divattn::launch_cls_fwd,
    divattn::launch_bwd_delta,
    divattn::launch_cls_bwd_prep,
    divattn::launch_bwd_dkdv,
    divattn::launch_bwd_dq,
    divattn::launch_cls_bwd,
    divattn::bwd_workspace_floats,
    divattn_emu_clear_ranges,
    divattn_emu_add_range,
    error_string,
};

}  // namespace

extern "C" __attribute__((visibility("default"))) const divattn::emu_abi::Table* divattn_emu_kernels() {
  return &kTable;
}
