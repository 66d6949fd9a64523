// The cls token of spatial attention (official TimeSformer divided block): the cls query
// attends, in every frame t, to [cls] + that frame's N patch keys with a softmax of its
// own, and o_cls is the mean of the T per-frame outputs.
//
// Design: the forward's per-frame outputs come from attn_fwd.cu, where the cls query is
// row 0 of every frame's spatial attention (each frame's keys and values are read once),
// into small fp32 (B, H, T, ·) buffers; here a tiny epilogue sums them over t in a fixed
// order: no atomics, deterministic. The backward's per-frame work runs in one block of 4
// warps per frame (b, h, t), as many blocks as the spatial attention kernels have
// sequences, so it spreads over the GPU like spatial attention does; no kernel walks the
// frames of a (b, h) one after another.
// - cls_bwd_prep: one warp per frame: delta_cls[t] = cls_frames[t] . gc with
//   gc[t] = d o_cls / T (with padding: times frame t's weight, cls_frame_weight), which the
//   patch key gradients (attn_bwd.cu) need too.
// - cls_bwd_frame: per frame, the cls query's gradient terms (against the cls key and
//   every patch key) and the cls key/value's gradient terms (from the frame's cls query
//   and every patch query, through the rows' saved lse and delta); warp partials are
//   combined in warp order into the frame's partial sums (3, B, H, T, D).
// - cls_sum_frames: o_cls = sum_t cls_frames[t] / T, and dq/dk/dv_cls = the sums of the
//   per-frame partials (times the scale for dq and dk), t in increasing order.
// A padded batch (AttnParams::rows, mask): o_cls weighs the frames holding a real patch
// (cls_frame_weight), gc carries that weight and a frame of weight 0 adds no gradient;
// the frame kernel reads only the frame's real patches.
// A non-finite value stays where PyTorch puts it: a frame's result depends only on that
// frame's rows and the (b, h) cls vectors, and the sum over frames only on its (b, h).
// Patch rows use the spatial view: i0 = b, i1 = t, i2 = h, rows n.
#include "common.cuh"

namespace divattn {
namespace {

constexpr int kClsWarps = 4;

template <int DCH>
__device__ __forceinline__ float lanes_dot(const float (&a)[DCH], const float (&b)[DCH]) {
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < DCH; ++c) acc = fmaf(a[c], b[c], acc);
  return acc;
}

// Frame f = (b * H + h) * T + t of the (B, H, T) cls buffers.
struct Frame {
  int64_t f, bh, b, h, t;
};

// Frame f's indices. B * H * T frames is the spatial problem's sequence count, at most
// 2^31 - 1 (checked on the host): 32-bit division, inlined (see seq_index).
__device__ __forceinline__ Frame frame_at(uint32_t f, const AttnParams& p) {
  const uint32_t nT = static_cast<uint32_t>(p.T), nH = static_cast<uint32_t>(p.H);
  const uint32_t bh = f / nT, b = bh / nH;
  return {f, bh, b, bh - b * nH, f - bh * nT};
}

__device__ __forceinline__ Frame frame_of(const AttnParams& p) { return frame_at(blockIdx.x, p); }

template <typename T>
__global__ void __launch_bounds__(kClsWarps * kWarp) cls_bwd_prep_kernel(const AttnParams p) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kClsWarps + warp;
  if (f >= p.B * p.H * p.T) return;
  const Frame fr = frame_at(static_cast<uint32_t>(f), p);
  const int D = p.D;
  const T* doc = static_cast<const T*>(p.doc.ptr) + cls_offset(p.doc, fr.b, fr.h);
  const float w = cls_frame_weight(p, fr.b, fr.t);  // 0 for a frame without a real patch: no gradient
  const float* of = p.cls_frames + f * D;
  float acc = 0.f;
  for (int d = lane; d < D; d += kWarp) {
    const float g = to_float(gld(doc + d)) * w;
    acc = fmaf(gld(of + d), g, acc);
    gst(p.gc + f * D + d, g);
  }
  acc = warp_sum(acc);
  if (lane == 0) gst(p.delta_cls + f, acc);
}

template <typename T, int DCH>
__global__ void __launch_bounds__(kClsWarps * kWarp) cls_bwd_frame_kernel(const AttnParams p) {
  constexpr int DP = DCH * kWarp;
  DIVATTN_DYNAMIC_SMEM(float, smem);
  float(*red)[kClsWarps][DP] = reinterpret_cast<float(*)[kClsWarps][DP]>(smem);  // [3][kClsWarps][DP]
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const Frame fr = frame_of(p);
  const int D = p.D;
  const int64_t N = p.L;
  float qc[DCH], kc[DCH], vc[DCH], gc[DCH];
  load_lanes<T, DCH>(qc, static_cast<const T*>(p.qc.ptr) + cls_offset(p.qc, fr.b, fr.h), true, D, lane);
  load_lanes<T, DCH>(kc, static_cast<const T*>(p.kc.ptr) + cls_offset(p.kc, fr.b, fr.h), true, D, lane);
  load_lanes<T, DCH>(vc, static_cast<const T*>(p.vc.ptr) + cls_offset(p.vc, fr.b, fr.h), true, D, lane);
  load_lanes<float, DCH>(gc, p.gc + fr.f * D, true, D, lane);  // d o_cls times the frame's weight
  const float lse_t = gld(p.lse_cls + fr.f), delta_t = gld(p.delta_cls + fr.f);

  float dqc[DCH], dkc[DCH], dvc[DCH];
#pragma unroll
  for (int c = 0; c < DCH; ++c) dqc[c] = dkc[c] = dvc[c] = 0.f;
  if (warp == 0) {  // the frame's cls query against the cls key
    const float s_cls = warp_sum(lanes_dot(qc, kc)) * p.qk_scale;
    const float dp_cls = warp_sum(lanes_dot(gc, vc));
    const float p0 = exp2f(s_cls - lse_t);
    const float ds0 = p0 * (dp_cls - delta_t);
#pragma unroll
    for (int c = 0; c < DCH; ++c) {
      dqc[c] = ds0 * kc[c];
      dkc[c] = ds0 * qc[c];
      dvc[c] = p0 * gc[c];
    }
  }

  const int64_t rows = ((fr.b * p.T + fr.t) * p.H + fr.h) * N;  // lse / delta index of row 0 of (b, t, h)
  const SeqIndex seq{fr.b, fr.t, fr.h};
  const int64_t real = real_rows(p, seq).keys, mbase = mask_base(p, seq);  // the frame's real patches
  const T* qf = static_cast<const T*>(p.q.ptr) + fr.b * p.q.s0 + fr.t * p.q.s1 + fr.h * p.q.s2;
  const T* kf = static_cast<const T*>(p.k.ptr) + fr.b * p.k.s0 + fr.t * p.k.s1 + fr.h * p.k.s2;
  const T* vf = static_cast<const T*>(p.v.ptr) + fr.b * p.v.s0 + fr.t * p.v.s1 + fr.h * p.v.s2;
  const T* df = static_cast<const T*>(p.dout.ptr) + fr.b * p.dout.s0 + fr.t * p.dout.s1 + fr.h * p.dout.s2;
  for (int64_t n = warp; n < N && n < real; n += kClsWarps) {
    if (!mask_real(p, mbase, n)) continue;  // a patch the mask pads: not a key, not a query
    float kn[DCH], vn[DCH], qn[DCH], dn[DCH];
    load_lanes<T, DCH>(kn, kf + n * p.k.sL, true, D, lane);
    load_lanes<T, DCH>(vn, vf + n * p.v.sL, true, D, lane);
    load_lanes<T, DCH>(qn, qf + n * p.q.sL, true, D, lane);
    load_lanes<T, DCH>(dn, df + n * p.dout.sL, true, D, lane);
    float a = lanes_dot(qc, kn), bb = lanes_dot(gc, vn), c2 = lanes_dot(qn, kc), d2 = lanes_dot(dn, vc);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      a += __shfl_xor_sync(kFull, a, off);
      bb += __shfl_xor_sync(kFull, bb, off);
      c2 += __shfl_xor_sync(kFull, c2, off);
      d2 += __shfl_xor_sync(kFull, d2, off);
    }
    // the cls query against patch key n of the frame
    const float pc = exp2f(a * p.qk_scale - lse_t);
    const float dsc = pc * (bb - delta_t);
    // patch query n of the frame against the cls key
    const float pr = exp2f(c2 * p.qk_scale - gld(p.lse + rows + n));
    const float dsr = pr * (d2 - gld(p.delta + rows + n));
#pragma unroll
    for (int c = 0; c < DCH; ++c) {
      dqc[c] = fmaf(dsc, kn[c], dqc[c]);
      dkc[c] = fmaf(dsr, qn[c], dkc[c]);
      dvc[c] = fmaf(pr, dn[c], dvc[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < DCH; ++c) {
    red[0][warp][lane + c * kWarp] = dqc[c];
    red[1][warp][lane + c * kWarp] = dkc[c];
    red[2][warp][lane + c * kWarp] = dvc[c];
  }
  __syncthreads();
  const int64_t frames = p.B * p.H * p.T;
  for (int i = threadIdx.x; i < 3 * D; i += kClsWarps * kWarp) {
    const int which = i / D, d = i - which * D;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kClsWarps; ++w) sum += red[which][w][d];
    gst(p.cls_grad_frames + (which * frames + fr.f) * D + d, sum);
  }
}

// dst[b, h, :] = factor * sum_t src[(b * H + h) * T + t, :] for blockIdx.y = 0, 1, 2 of
// up to three (src, dst, factor) triples; one thread per (b, h, d), t in increasing order.
// A weighted job (o_cls of a padded batch) sums w_t * src[t] instead (cls_weight).
struct SumJob {
  const float* src;
  ClsView dst;
  float factor;
  bool weighted;
};

struct SumJobs {
  SumJob job[3];
};

constexpr int kSumThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kSumThreads) cls_sum_frames_kernel(const SumJobs jobs, const AttnParams p) {
  const SumJob job = blockIdx.y == 0 ? jobs.job[0] : (blockIdx.y == 1 ? jobs.job[1] : jobs.job[2]);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
  const int D = p.D;
  if (i >= p.B * p.H * D) return;
  const int64_t bh = i / D, d = i - bh * D, b = bh / p.H, h = bh - b * p.H;
  const float* src = job.src + bh * p.T * D + d;
  float sum = 0.f;
  if (job.weighted) {
    for (int64_t t = 0; t < p.T; ++t) {
      const float w = cls_frame_weight(p, b, t);
      if (w != 0.f) sum += w * gld(src + t * D);  // a frame of weight 0 is not read
    }
  } else {
    for (int64_t t = 0; t < p.T; ++t) sum += gld(src + t * D);
  }
  gst(static_cast<T*>(job.dst.ptr) + cls_offset(job.dst, b, h) + d, from_float<T>(sum * job.factor));
}

template <typename T>
cudaError_t sum_frames(const AttnParams& p, const SumJobs& jobs, int n_jobs, cudaStream_t stream) {
  const int64_t BH = p.B * p.H;
  const dim3 grid(static_cast<unsigned>((BH * p.D + kSumThreads - 1) / kSumThreads), static_cast<unsigned>(n_jobs));
  return launch_kernel("cls_sum_frames_kernel", cls_sum_frames_kernel<T>, grid, dim3(kSumThreads), 0, stream, jobs, p);
}

cudaError_t sum_frames_dtype(const AttnParams& p, const SumJobs& jobs, int n_jobs, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::f16:
      return sum_frames<__half>(p, jobs, n_jobs, stream);
    case DType::bf16:
      return sum_frames<__nv_bfloat16>(p, jobs, n_jobs, stream);
    default:
      return sum_frames<float>(p, jobs, n_jobs, stream);
  }
}

unsigned cls_frames_grid(const AttnParams& p) { return static_cast<unsigned>(p.B * p.H * p.T); }

// The per-frame cls kernel has no cls-less variant: the third parameter is always true.
template <typename T, int DCH, bool>
struct ClsBwdLaunch {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    return launch_kernel("cls_bwd_frame_kernel", cls_bwd_frame_kernel<T, DCH>, dim3(cls_frames_grid(p)),
                         dim3(kClsWarps * kWarp), 3 * kClsWarps * DCH * kWarp * sizeof(float), stream, p);
  }
};

bool cls_empty(const AttnParams& p) { return !p.has_cls || p.B * p.H == 0 || p.T == 0; }

}  // namespace

cudaError_t launch_cls_fwd(const AttnParams& p, cudaStream_t stream) {
  if (cls_empty(p)) return cudaSuccess;
  SumJobs jobs{};
  const bool padded = p.rows != nullptr || p.mask.ptr != nullptr;  // o_cls weighs the frames holding a real patch
  jobs.job[0] = {p.cls_frames, p.oc, padded ? 1.f : 1.f / static_cast<float>(p.T), padded};
  return sum_frames_dtype(p, jobs, 1, stream);
}

cudaError_t launch_cls_bwd_prep(const AttnParams& p, cudaStream_t stream) {
  if (cls_empty(p)) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>((p.B * p.H * p.T + kClsWarps - 1) / kClsWarps);
  const dim3 block(kClsWarps * kWarp);
  switch (p.dtype) {
    case DType::f16:
      return launch_kernel("cls_bwd_prep_kernel", cls_bwd_prep_kernel<__half>, dim3(grid), block, 0, stream, p);
    case DType::bf16:
      return launch_kernel("cls_bwd_prep_kernel", cls_bwd_prep_kernel<__nv_bfloat16>, dim3(grid), block, 0, stream, p);
    default:
      return launch_kernel("cls_bwd_prep_kernel", cls_bwd_prep_kernel<float>, dim3(grid), block, 0, stream, p);
  }
}

cudaError_t launch_cls_bwd(const AttnParams& p, cudaStream_t stream) {
  if (cls_empty(p)) return cudaSuccess;
  if (p.dtype == DType::f32) {  // fp16 / bf16: the tensor-core backward wrote the per-frame terms
    const cudaError_t err = dispatch_head<ClsBwdLaunch, true>(p, stream);
    if (err != cudaSuccess) return err;
  }
  const int64_t frames = p.B * p.H * p.T;
  SumJobs jobs{};
  jobs.job[0] = {p.cls_grad_frames, p.dqc, p.scale, false};
  jobs.job[1] = {p.cls_grad_frames + frames * p.D, p.dkc, p.scale, false};
  jobs.job[2] = {p.cls_grad_frames + 2 * frames * p.D, p.dvc, 1.f, false};
  return sum_frames_dtype(p, jobs, 3, stream);
}

}  // namespace divattn
