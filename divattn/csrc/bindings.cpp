// Python binding of the CUDA kernels (divattn._C). Every input check lives here: the
// kernels trust what they are given. Semantics and calling convention are those of
// divattn/ops/triton forward() / backward(); divattn/ops/cuda_ext.py calls in.
//
// Compiled with DIVATTN_EMULATE (divattn/ops/cuda_emulator.py) it is the binding of the
// emulated kernels instead: the same checks, on CPU tensors, launching through the kernel
// library emulator/binding.h is given, with every tensor's extent registered so that the
// emulator checks each global access.
#ifndef DIVATTN_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "divattn.h"
#ifdef DIVATTN_EMULATE
#include "emulator/binding.h"
#endif

namespace {

using at::Tensor;
using divattn::AttnParams;
using divattn::ClsView;
using divattn::View;

constexpr double kLog2e = 1.4426950408889634;

enum class Op { temporal, spatial, joint };

Op parse_op(const std::string& op) {
  if (op == "temporal") return Op::temporal;
  if (op == "spatial") return Op::spatial;
  if (op == "joint") return Op::joint;
  TORCH_CHECK(false, "divattn._C: op must be 'temporal', 'spatial' or 'joint', got '", op, "'");
}

std::string describe(const Tensor& t) {
  return c10::str("shape ", t.sizes(), ", dtype ", t.scalar_type(), ", strides ", t.strides(), ", device ",
                  t.device());
}

// Checks one call's arguments; every message names the function, the tensor, what was
// expected and what came.
struct Checker {
  std::string fn;
  at::ScalarType dtype;
  at::Device device;

  void defined(const char* name, const Tensor& t) const {
    TORCH_CHECK(t.defined(), fn, ": ", name, " is an undefined tensor");
  }

  void same_place(const char* name, const Tensor& t) const {
    TORCH_CHECK(t.device() == device, fn, ": ", name, " must be on ", device, " like q, got ", describe(t));
  }

  // A q/k/v/o-like view: the dtype and device of q, the given shape, last dim contiguous.
  void like(const char* name, const Tensor& t, at::IntArrayRef shape, bool output,
            const char* what = " like q") const {
    defined(name, t);
    same_place(name, t);
    TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must have dtype ", dtype, " like q, got ", describe(t));
    TORCH_CHECK(t.sizes() == shape, fn, ": ", name, " must have shape ", shape, what, ", got ", describe(t));
    TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, fn, ": ", name,
                " must have a contiguous last dim (stride(-1) == 1), got ", describe(t));
    if (output) {
      TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, fn, ": ", name,
                  " is written and must not have overlapping elements (e.g. a zero stride), got ", describe(t));
    }
  }

  // A contiguous fp32 buffer of the given shape (lse, per-frame cls outputs).
  void f32(const char* name, const Tensor& t, at::IntArrayRef shape) const {
    defined(name, t);
    same_place(name, t);
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape, fn, ": ", name,
                " must be a contiguous float32 tensor of shape ", shape, ", got ", describe(t));
  }
};

struct Geometry {
  int64_t S0 = 0, S1 = 1, S2 = 0, L = 0, Lk = 0;  // L query rows, Lk key rows per sequence
  int64_t B = 0, T = 0, N = 0, H = 0, D = 0;
};

// q is (B, T, N, H, D) (joint: (B, L, H, D)); see divattn/ops/triton/plan.py _geometry.
Geometry geometry(Op op, const Tensor& q, const Checker& ck) {
  TORCH_CHECK(q.defined(), ck.fn, ": q is an undefined tensor");
#ifdef DIVATTN_EMULATE
  TORCH_CHECK(q.is_cpu(), ck.fn, ": q must be a CPU tensor (the CUDA kernels run emulated on the host), got ",
              describe(q));
#else
  TORCH_CHECK(q.is_cuda(), ck.fn, ": q must be a CUDA tensor, got ", describe(q));
#endif
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, ck.fn,
              ": q must have dtype float16, bfloat16 or float32, got ", describe(q));
  const int64_t want_dim = op == Op::joint ? 4 : 5;
  TORCH_CHECK(q.dim() == want_dim, ck.fn, ": q must be ", want_dim, "-D ",
              op == Op::joint ? "(B, L, H, D)" : "(B, T, N, H, D)", ", got ", describe(q));
  TORCH_CHECK(q.size(-1) <= 1 || q.stride(-1) == 1, ck.fn,
              ": q must have a contiguous last dim (stride(-1) == 1), got ", describe(q));
  Geometry g;
  g.D = q.size(-1);
  TORCH_CHECK(g.D >= 1 && g.D <= divattn::kMaxHeadDim, ck.fn, ": head dim (q.size(-1)) must be in [1, ",
              divattn::kMaxHeadDim, "], got ", describe(q));
  if (op == Op::joint) {
    g.B = q.size(0);
    g.H = q.size(2);
    g.S0 = g.B, g.S1 = 1, g.S2 = g.H, g.L = q.size(1);
  } else {
    g.B = q.size(0), g.T = q.size(1), g.N = q.size(2), g.H = q.size(3);
    if (op == Op::temporal) {
      g.S0 = g.B, g.S1 = g.N, g.S2 = g.H, g.L = g.T;
    } else {
      g.S0 = g.B, g.S1 = g.T, g.S2 = g.H, g.L = g.N;
    }
  }
  g.Lk = g.L;
  const int64_t S = g.S0 * g.S1 * g.S2;
  // Grid limits of the row kernels: ceil(S / G) blocks in x, ceil(L / 16) in y.
  TORCH_CHECK(S <= std::numeric_limits<int32_t>::max(), ck.fn, ": ", S,
              " sequences is more than the kernels' grid allows (2^31 - 1), q: ", describe(q));
  TORCH_CHECK((g.L + 15) / 16 <= 65535, ck.fn, ": sequence length ", g.L,
              " is more than the kernels' grid allows (65535 * 16), q: ", describe(q));
  return g;
}

View view_of(Op op, const Tensor& t) {
  View v;
  v.ptr = t.data_ptr();
  if (op == Op::temporal) {  // sequences (b, n, h), rows t
    v.s0 = t.stride(0), v.s1 = t.stride(2), v.s2 = t.stride(3), v.sL = t.stride(1);
  } else if (op == Op::spatial) {  // sequences (b, t, h), rows n
    v.s0 = t.stride(0), v.s1 = t.stride(1), v.s2 = t.stride(3), v.sL = t.stride(2);
  } else {  // sequences (b, h), rows l
    v.s0 = t.stride(0), v.s1 = 0, v.s2 = t.stride(2), v.sL = t.stride(1);
  }
  return v;
}

ClsView cls_view_of(const Tensor& t) {
  ClsView c;
  c.ptr = t.data_ptr();
  c.sb = t.stride(0);
  c.sh = t.stride(1);
  return c;
}

divattn::DType dtype_of(at::ScalarType t) {
  if (t == at::kHalf) return divattn::DType::f16;
  if (t == at::kBFloat16) return divattn::DType::bf16;
  return divattn::DType::f32;
}

const Tensor& need(const std::optional<Tensor>& t, const Checker& ck, const char* name) {
  TORCH_CHECK(t.has_value() && t->defined(), ck.fn, ": ", name, " is required when cls is given");
  return *t;
}

// The stream kernels go to: the current CUDA stream of q's device (none in the emulator).
cudaStream_t stream_of(const Tensor& q) {
#ifdef DIVATTN_EMULATE
  (void)q;
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
#endif
}

// A buffer the kernels fill: uninitialised, or NaN in the emulator, where an element a
// kernel reads before any wrote it then shows.
Tensor scratch(at::IntArrayRef shape, const at::TensorOptions& options) {
#ifdef DIVATTN_EMULATE
  return at::full(shape, std::numeric_limits<float>::quiet_NaN(), options);
#else
  return at::empty(shape, options);
#endif
}

// In the emulator: the tensors the next launches may read, and those they may write.
void allow_memory(std::initializer_list<std::optional<Tensor>> reads,
                  std::initializer_list<std::optional<Tensor>> writes) {
#ifdef DIVATTN_EMULATE
  divattn::emu_abi::clear_memory();
  for (const auto& t : reads) {
    if (t.has_value()) divattn::emu_abi::allow(*t, false);
  }
  for (const auto& t : writes) {
    if (t.has_value()) divattn::emu_abi::allow(*t, true);
  }
#else
  (void)reads;
  (void)writes;
#endif
}

void check_launch(cudaError_t err, const Checker& ck, const char* what) {
  TORCH_CHECK(err == cudaSuccess, ck.fn, ": launching the ", what, " kernel failed: ", cudaGetErrorString(err));
}

AttnParams base_params(Op op, const Geometry& g, const Tensor& q, double scale) {
  AttnParams p;
  p.dtype = dtype_of(q.scalar_type());
  p.D = static_cast<int>(g.D);
  p.scale = static_cast<float>(scale);
  p.qk_scale = static_cast<float>(scale * kLog2e);
  p.S = g.S0 * g.S1 * g.S2;
  p.S1 = g.S1;
  p.S2 = g.S2;
  p.L = g.L;
  p.Lk = g.Lk;
  p.B = g.B;
  p.T = g.T;
  p.H = g.H;
  p.q = view_of(op, q);
  return p;
}

// The cls inputs forward and backward share (q/k/v_cls, the saved per-frame outputs and
// their lse), checked and stored in p; returns whether cls is given.
bool set_cls_inputs(AttnParams& p, Op op, const Geometry& g, const Checker& ck, const std::optional<Tensor>& q_cls,
                    const std::optional<Tensor>& k_cls, const std::optional<Tensor>& v_cls,
                    const std::optional<Tensor>& cls_frames, const std::optional<Tensor>& lse_cls) {
  const int n = int(q_cls.has_value()) + int(k_cls.has_value()) + int(v_cls.has_value());
  TORCH_CHECK(n == 0 || n == 3, ck.fn, ": q_cls, k_cls and v_cls must be given together, got ", n, " of them");
  TORCH_CHECK(n == 0 || op == Op::spatial, ck.fn, ": cls is only supported by spatial attention");
  p.has_cls = n == 3;
  if (!p.has_cls) return false;
  TORCH_CHECK(g.T >= 1, ck.fn, ": cls needs T >= 1 frames (o_cls is a mean over frames), got T = ", g.T);
  const std::vector<int64_t> bhd{g.B, g.H, g.D};
  ck.like("q_cls", *q_cls, bhd, false, " = (B, H, D)");
  ck.like("k_cls", *k_cls, bhd, false, " = (B, H, D)");
  ck.like("v_cls", *v_cls, bhd, false, " = (B, H, D)");
  ck.f32("cls_frames", need(cls_frames, ck, "cls_frames"), {g.B, g.H, g.T, g.D});
  ck.f32("lse_cls", need(lse_cls, ck, "lse_cls"), {g.B, g.H, g.T});
  p.qc = cls_view_of(*q_cls);
  p.kc = cls_view_of(*k_cls);
  p.vc = cls_view_of(*v_cls);
  p.cls_frames = cls_frames->data_ptr<float>();
  p.lse_cls = lse_cls->data_ptr<float>();
  return true;
}

// The counts of a padded batch (AttnParams::rows / groups), both or neither: (B,) int32,
// contiguous, on q's device. Their values need no check here: the kernels bound every row
// by L and Lk as well, so any count reads and writes only the tensors' own rows.
void set_counts(AttnParams& p, const Geometry& g, const Checker& ck, const std::optional<Tensor>& rows,
                const std::optional<Tensor>& groups) {
  const bool has_rows = rows.has_value() && rows->defined(), has_groups = groups.has_value() && groups->defined();
  TORCH_CHECK(has_rows == has_groups, ck.fn, ": rows and groups (the counts of a padded batch) must be given together");
  if (!has_rows) return;
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"rows", *rows}, {"groups", *groups}}) {
    ck.same_place(name, t);
    TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.dim() == 1 && t.size(0) == g.B, ck.fn, ": ",
                name, " must be a contiguous int32 tensor of shape (B,) = (", g.B, ",), got ", describe(t));
  }
  p.rows = rows->data_ptr<int32_t>();
  p.groups = groups->data_ptr<int32_t>();
}

// The mask of a padded batch (AttnParams::mask): bool on q's device, (B, Tk, N) for temporal
// attention (the key frames), (B, T, N) for spatial, (B, L) for joint, any strides; with
// cls, the (B, T) contiguous fp32 weights of the frames in o_cls come with it.
void set_mask(AttnParams& p, Op op, const Geometry& g, const Checker& ck, const std::optional<Tensor>& mask,
              const std::optional<Tensor>& cls_weights) {
  const bool has_mask = mask.has_value() && mask->defined();
  const bool has_weights = cls_weights.has_value() && cls_weights->defined();
  if (!has_mask) {
    TORCH_CHECK(!has_weights, ck.fn, ": cls_weights come with a mask only");
    return;
  }
  const Tensor& m = *mask;
  ck.same_place("mask", m);
  std::vector<int64_t> shape{g.B, op == Op::temporal ? g.Lk : g.T, g.N};
  if (op == Op::joint) shape = {g.B, g.L};
  TORCH_CHECK(m.scalar_type() == at::kBool && m.sizes() == at::IntArrayRef(shape), ck.fn, ": mask must be a bool ",
              "tensor of shape ", at::IntArrayRef(shape), ", got ", describe(m));
  p.mask.ptr = m.data_ptr<bool>();
  p.mask.s0 = m.stride(0);
  if (op == Op::temporal) {  // sequences (b, n, h), rows t
    p.mask.s1 = m.stride(2), p.mask.sL = m.stride(1);
  } else if (op == Op::spatial) {  // sequences (b, t, h), rows n
    p.mask.s1 = m.stride(1), p.mask.sL = m.stride(2);
  } else {  // sequences (b, h), rows l
    p.mask.s1 = 0, p.mask.sL = m.stride(1);
  }
  TORCH_CHECK(has_weights == p.has_cls, ck.fn, ": cls_weights must be given with a mask exactly when cls is");
  if (has_weights) {
    ck.f32("cls_weights", *cls_weights, {g.B, g.T});
    p.cls_weights = cls_weights->data_ptr<float>();
  }
}

// What forward and backward share: the op, the checker, the geometry, q/k/v/o and lse.
struct Call {
  Op op;
  Checker ck;
  Geometry g;
  AttnParams p;
};

// Temporal k and v may have more frames (Tk) than q (Tq): q's frames are the last Tq.
// Every other dim, and every dim for spatial and joint attention, must match q.
Call begin(const char* fn, const std::string& op_name, const Tensor& q, const Tensor& k, const Tensor& v,
           const Tensor& o, const Tensor& lse, double scale, bool causal, bool o_written) {
  const Op op = parse_op(op_name);
  Checker ck{std::string(fn) + "(" + op_name + ")", q.defined() ? q.scalar_type() : at::kFloat,
             q.defined() ? q.device() : at::Device(at::kCPU)};
  Geometry g = geometry(op, q, ck);
  TORCH_CHECK(!causal || op == Op::temporal, ck.fn, ": causal is only supported by temporal attention");
  std::vector<int64_t> kshape(q.sizes().begin(), q.sizes().end());
  const char* kwhat = " like q";
  if (op == Op::temporal) {
    ck.defined("k", k);
    TORCH_CHECK(k.dim() == 5, ck.fn, ": k must be 5-D (B, Tk, N, H, D), got ", describe(k));
    TORCH_CHECK(k.size(1) >= g.L, ck.fn, ": k must have shape (B, Tk, N, H, D) with Tk >= the Tq = ", g.L,
                " frames of q (q's frames are the last Tq of k's), got ", describe(k));
    kshape[1] = g.Lk = k.size(1);
    TORCH_CHECK((g.Lk + 15) / 16 <= 65535, ck.fn, ": sequence length ", g.Lk,
                " is more than the kernels' grid allows (65535 * 16), k: ", describe(k));
    kwhat = " = q's shape with k's Tk frames";
  }
  ck.like("k", k, kshape, false, kwhat);
  ck.like("v", v, kshape, false, kwhat);
  ck.like("o", o, q.sizes(), o_written);
  ck.f32("lse", lse, {g.S0 * g.S1 * g.S2 * g.L});
  TORCH_CHECK(std::isfinite(scale), ck.fn, ": scale must be finite, got ", scale);
  AttnParams p = base_params(op, g, q, scale);
  p.causal = causal;
  p.k = view_of(op, k);
  p.v = view_of(op, v);
  p.o = view_of(op, o);
  p.lse = lse.data_ptr<float>();
  return {op, ck, g, p};
}

void forward(const std::string& op_name, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
             const Tensor& lse, double scale, bool causal, const std::optional<Tensor>& q_cls,
             const std::optional<Tensor>& k_cls, const std::optional<Tensor>& v_cls,
             const std::optional<Tensor>& o_cls, const std::optional<Tensor>& cls_frames,
             const std::optional<Tensor>& lse_cls, const std::optional<Tensor>& rows,
             const std::optional<Tensor>& groups, const std::optional<Tensor>& mask,
             const std::optional<Tensor>& cls_weights) {
  Call call = begin("divattn._C.forward", op_name, q, k, v, o, lse, scale, causal, true);
  const Checker& ck = call.ck;
  const Geometry& g = call.g;
  AttnParams& p = call.p;
#ifndef DIVATTN_EMULATE
  const c10::cuda::CUDAGuard guard(q.device());
#endif
  if (set_cls_inputs(p, call.op, g, ck, q_cls, k_cls, v_cls, cls_frames, lse_cls)) {
    ck.like("o_cls", need(o_cls, ck, "o_cls"), {g.B, g.H, g.D}, true, " = (B, H, D)");
    p.oc = cls_view_of(*o_cls);
  }

  set_counts(p, g, ck, rows, groups);
  set_mask(p, call.op, g, ck, mask, cls_weights);
  allow_memory({q, k, v, q_cls, k_cls, v_cls, rows, groups, mask, cls_weights}, {o, lse, o_cls, cls_frames, lse_cls});
  const cudaStream_t stream = stream_of(q);
  check_launch(divattn::launch_attn_fwd(p, stream), ck, "attention forward");
  if (p.has_cls) check_launch(divattn::launch_cls_fwd(p, stream), ck, "cls forward");
}

void backward(const std::string& op_name, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
              const Tensor& dout, const Tensor& lse, const Tensor& dq, const Tensor& dk, const Tensor& dv,
              double scale, bool causal, const std::optional<Tensor>& q_cls, const std::optional<Tensor>& k_cls,
              const std::optional<Tensor>& v_cls, const std::optional<Tensor>& dq_cls,
              const std::optional<Tensor>& dk_cls, const std::optional<Tensor>& dv_cls,
              const std::optional<Tensor>& do_cls, const std::optional<Tensor>& cls_frames,
              const std::optional<Tensor>& lse_cls, const std::optional<Tensor>& rows,
              const std::optional<Tensor>& groups, const std::optional<Tensor>& mask,
              const std::optional<Tensor>& cls_weights) {
  Call call = begin("divattn._C.backward", op_name, q, k, v, o, lse, scale, causal, false);
  const Checker& ck = call.ck;
  const Geometry& g = call.g;
  AttnParams& p = call.p;
  ck.like("do", dout, q.sizes(), false);
  ck.like("dq", dq, q.sizes(), true);
  ck.like("dk", dk, k.sizes(), true, " like k");
  ck.like("dv", dv, k.sizes(), true, " like k");
  p.dout = view_of(call.op, dout);
  p.dq = view_of(call.op, dq);
  p.dk = view_of(call.op, dk);
  p.dv = view_of(call.op, dv);
#ifndef DIVATTN_EMULATE
  const c10::cuda::CUDAGuard guard(q.device());
#endif

  const auto f32 = q.options().dtype(at::kFloat);
  const Tensor delta = scratch({lse.numel()}, f32);
  p.delta = delta.data_ptr<float>();

  Tensor gc, delta_cls, cls_grad_frames;
  if (set_cls_inputs(p, call.op, g, ck, q_cls, k_cls, v_cls, cls_frames, lse_cls)) {
    const std::vector<int64_t> bhd{g.B, g.H, g.D};
    ck.like("dq_cls", need(dq_cls, ck, "dq_cls"), bhd, true, " = (B, H, D)");
    ck.like("dk_cls", need(dk_cls, ck, "dk_cls"), bhd, true, " = (B, H, D)");
    ck.like("dv_cls", need(dv_cls, ck, "dv_cls"), bhd, true, " = (B, H, D)");
    ck.like("do_cls", need(do_cls, ck, "do_cls"), bhd, false, " = (B, H, D)");
    p.dqc = cls_view_of(*dq_cls);
    p.dkc = cls_view_of(*dk_cls);
    p.dvc = cls_view_of(*dv_cls);
    p.doc = cls_view_of(*do_cls);
    gc = scratch({g.B, g.H, g.T, g.D}, f32);
    delta_cls = scratch({g.B, g.H, g.T}, f32);
    cls_grad_frames = scratch({3, g.B, g.H, g.T, g.D}, f32);  // per-frame partials, summed over T
    p.gc = gc.data_ptr<float>();
    p.delta_cls = delta_cls.data_ptr<float>();
    p.cls_grad_frames = cls_grad_frames.data_ptr<float>();
  }

  const size_t floats = divattn::bwd_workspace_floats(p);
  Tensor workspace;
  if (floats > 0) {
    workspace = scratch({static_cast<int64_t>(floats)}, f32);
    p.workspace = workspace.data_ptr<float>();
  }

  set_counts(p, g, ck, rows, groups);
  set_mask(p, call.op, g, ck, mask, cls_weights);
  allow_memory({q, k, v, o, dout, lse, q_cls, k_cls, v_cls, do_cls, cls_frames, lse_cls, rows, groups, mask,
                cls_weights},
               {dq, dk, dv, delta, dq_cls, dk_cls, dv_cls, gc, delta_cls, cls_grad_frames, workspace});
  const cudaStream_t stream = stream_of(q);
  check_launch(divattn::launch_bwd_delta(p, stream), ck, "delta");
  if (p.has_cls) check_launch(divattn::launch_cls_bwd_prep(p, stream), ck, "cls gradient preparation");
  check_launch(divattn::launch_bwd_dkdv(p, stream), ck, "dk/dv");
  check_launch(divattn::launch_bwd_dq(p, stream), ck, "dq");
  if (p.has_cls) check_launch(divattn::launch_cls_bwd(p, stream), ck, "cls backward");
}

#define DIVATTN_STR_(...) #__VA_ARGS__
#define DIVATTN_STR(...) DIVATTN_STR_(__VA_ARGS__)

// The architectures the build was asked for, '+'-separated ("sm_80+sm_90"), or "".
std::string archs() {
#ifdef DIVATTN_ARCHS
  return DIVATTN_STR(DIVATTN_ARCHS);
#else
  return "";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "divattn CUDA kernels: strided temporal, spatial (+cls) and joint attention";
  m.def("forward", &forward, "Attention forward; see divattn.ops.triton.forward", py::arg("op"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("scale"),
        py::arg("causal") = false, py::arg("q_cls") = py::none(), py::arg("k_cls") = py::none(),
        py::arg("v_cls") = py::none(), py::arg("o_cls") = py::none(), py::arg("cls_frames") = py::none(),
        py::arg("lse_cls") = py::none(), py::arg("rows") = py::none(), py::arg("groups") = py::none(),
        py::arg("mask") = py::none(), py::arg("cls_weights") = py::none());
  m.def("backward", &backward, "Attention backward; see divattn.ops.triton.backward", py::arg("op"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("do"), py::arg("lse"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("scale"), py::arg("causal") = false, py::arg("q_cls") = py::none(),
        py::arg("k_cls") = py::none(), py::arg("v_cls") = py::none(), py::arg("dq_cls") = py::none(),
        py::arg("dk_cls") = py::none(), py::arg("dv_cls") = py::none(), py::arg("do_cls") = py::none(),
        py::arg("cls_frames") = py::none(), py::arg("lse_cls") = py::none(), py::arg("rows") = py::none(),
        py::arg("groups") = py::none(), py::arg("mask") = py::none(), py::arg("cls_weights") = py::none());
  m.def("archs", &archs, "Architectures this build targets, '+'-separated, or '' if unknown");
  m.attr("max_head_dim") = py::int_(divattn::kMaxHeadDim);
#ifdef DIVATTN_EMULATE
  m.attr("cuda_version") = py::int_(0);
  m.def("set_kernels", &divattn::emu_abi::set_kernels,
        "Launch through the kernel library whose divattn_emu_kernels() table is at this address", py::arg("table"));
#else
  m.attr("cuda_version") = py::int_(CUDART_VERSION);
#endif
}
