// Interface between the binding (bindings.cpp, host compiler, all input checks) and the
// kernels (*.cu, nvcc). Plain structs of pointers, sizes and element strides only, so
// the .cu files need no torch headers.
#pragma once

#ifdef DIVATTN_EMULATE
#include "emulator/runtime_api.h"
#else
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

namespace divattn {

enum class DType : int { f16 = 0, bf16 = 1, f32 = 2 };

constexpr int kMaxHeadDim = 128;

// One q/k/v/o-like tensor as S sequences of L rows: sequence s = (i0 * S1 + i1) * S2 + i2
// starts at i0 * s0 + i1 * s1 + i2 * s2 and row t is t * sL further (element strides).
struct View {
  void* ptr = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, sL = 0;
};

// A padded batch's token mask over the key rows (true = a real token): row t of sequence
// (i0, i1, i2) at i0 * s0 + i1 * s1 + t * sL (bool elements; the heads share it).
struct MaskView {
  const bool* ptr = nullptr;
  int64_t s0 = 0, s1 = 0, sL = 0;
};

// A (B, H, D) cls tensor: element (b, h, :) at b * sb + h * sh.
struct ClsView {
  void* ptr = nullptr;
  int64_t sb = 0, sh = 0;
};

struct AttnParams {
  DType dtype = DType::f32;
  int D = 0;
  float scale = 1.f;     // softmax scale
  float qk_scale = 1.f;  // scale * log2(e): scores in base 2
  // S sequences; each has L query rows (q, o, lse) and Lk >= L key rows (k, v).
  int64_t S = 0, S1 = 1, S2 = 1, L = 0, Lk = 0;
  // Causal, bottom-right aligned: query row i sees key rows 0 .. i + (Lk - L).
  bool causal = false;

  // A padded batch given as counts (null: every row is real). Sequence (i0, i1, i2)
  // has real key rows 0 .. rows[i0] - 1 when i1 < groups[i0], none otherwise; its real
  // query rows are those whose key row (i + Lk - L) is real, again a prefix. A padded
  // row is never a key; its output, lse and gradients are written as zeros. With cls
  // (rows = patches, groups = frames) the cls token is always real and o_cls weighs the
  // frames that hold a real patch (all T equally when none does).
  const int32_t* rows = nullptr;    // (B,)
  const int32_t* groups = nullptr;  // (B,)
  // A padded batch given as a mask (ptr null: none), with the counts or alone: a row is real
  // where both say so. With cls, o_cls = sum_t cls_weights[b, t] * (frame t's cls output).
  MaskView mask;
  const float* cls_weights = nullptr;  // (B, T), with a mask and cls only

  View q, k, v, o, dout, dq, dk, dv;
  float* lse = nullptr;    // (S * L,), base 2, scale included
  float* delta = nullptr;  // (S * L,) rowsum(o * do), backward only

  // Spatial attention with a cls token: S = B * T * H sequences (b, t, h) of L = N rows.
  bool has_cls = false;
  int64_t B = 0, T = 0, H = 0;
  ClsView qc, kc, vc, oc, doc, dqc, dkc, dvc;
  float* cls_frames = nullptr;  // (B, H, T, D) per-frame cls outputs
  float* lse_cls = nullptr;     // (B, H, T)
  float* gc = nullptr;          // (B, H, T, D) d o_cls times frame t's weight in o_cls, backward only
  float* delta_cls = nullptr;   // (B, H, T) rowsum(cls_frames * gc), backward only
  float* cls_grad_frames = nullptr;  // (3, B, H, T, D) per-frame dq/dk/dv_cls partials, backward only
  float* workspace = nullptr;        // bwd_workspace_floats(p) floats, backward only
};

// Each launcher enqueues its kernels on `stream` and returns the launch status.
cudaError_t launch_attn_fwd(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_bwd_delta(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_bwd_dkdv(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_bwd_dq(const AttnParams& p, cudaStream_t stream);
// cls (cls.cu): the mean over frames of the per-frame cls outputs launch_attn_fwd wrote
// into o_cls; per-frame backward kernels, then their sum over frames into dq, dk, dv_cls.
cudaError_t launch_cls_fwd(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_cls_bwd_prep(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_cls_bwd(const AttnParams& p, cudaStream_t stream);
// fp32 scratch the backward needs (AttnParams::workspace), in floats; 0 for none.
size_t bwd_workspace_floats(const AttnParams& p);

}  // namespace divattn
