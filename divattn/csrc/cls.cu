// The cls token of spatial attention (official TimeSformer divided block): the cls query
// attends, in every frame t, to [cls] + that frame's N patch keys with a softmax of its
// own, and o_cls is the mean of the T per-frame outputs.
//
// Design: one block of 8 warps per (b, h), so every cls quantity is produced by a single
// block and summed in a fixed order (no atomics, deterministic).
// - cls_fwd: warp w takes frames w, w + 8, ...; lanes own head-dim elements, each key's
//   score is a warp reduction (keys are read straight from global memory, two at a time
//   for independent shuffle chains), and an online softmax seeded with the cls key runs
//   over the frame. The per-frame output (fp32) and its lse (base 2) are saved for the
//   backward; after a barrier the block averages the frames in order into o_cls.
// - cls_bwd_prep: gc = d o_cls / T and delta_cls[t] = cls_frames[t] . gc, which the patch
//   key gradients (attn_bwd.cu) need too.
// - cls_bwd: per frame, the cls query's gradient terms (against the cls key and every
//   patch key) and the cls key/value's gradient terms (from every patch query, through
//   the rows' saved lse and delta); per-warp partial sums are combined in warp order.
// Patch rows use the spatial view: i0 = b, i1 = t, i2 = h, rows n.
#include "common.cuh"

namespace divattn {
namespace {

constexpr int kClsWarps = 8;

template <int DCH>
__device__ __forceinline__ float lanes_dot(const float (&a)[DCH], const float (&b)[DCH]) {
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < DCH; ++c) acc = fmaf(a[c], b[c], acc);
  return acc;
}

template <typename T, int DCH>
__global__ void __launch_bounds__(kClsWarps * kWarp) cls_fwd_kernel(const AttnParams p) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int D = p.D;
  const int64_t N = p.L, T_ = p.T;
  float qc[DCH], kc[DCH], vc[DCH];
  load_lanes<T, DCH>(qc, static_cast<const T*>(p.qc.ptr) + cls_offset(p.qc, b, h), true, D, lane);
  load_lanes<T, DCH>(kc, static_cast<const T*>(p.kc.ptr) + cls_offset(p.kc, b, h), true, D, lane);
  load_lanes<T, DCH>(vc, static_cast<const T*>(p.vc.ptr) + cls_offset(p.vc, b, h), true, D, lane);
  const float s_cls = warp_sum(lanes_dot(qc, kc)) * p.qk_scale;

  const T* kptr = static_cast<const T*>(p.k.ptr);
  const T* vptr = static_cast<const T*>(p.v.ptr);
  for (int64_t t = warp; t < T_; t += kClsWarps) {
    const T* kf = kptr + b * p.k.s0 + t * p.k.s1 + h * p.k.s2;
    const T* vf = vptr + b * p.v.s0 + t * p.v.s1 + h * p.v.s2;
    float m = s_cls, l = 1.f, acc[DCH];
#pragma unroll
    for (int c = 0; c < DCH; ++c) acc[c] = vc[c];
    for (int64_t n = 0; n < N; n += 2) {
      const bool ok1 = n + 1 < N;
      float k0[DCH], k1[DCH], v0[DCH], v1[DCH];
      load_lanes<T, DCH>(k0, kf + n * p.k.sL, true, D, lane);
      load_lanes<T, DCH>(k1, ok1 ? kf + (n + 1) * p.k.sL : kf, ok1, D, lane);
      load_lanes<T, DCH>(v0, vf + n * p.v.sL, true, D, lane);
      load_lanes<T, DCH>(v1, ok1 ? vf + (n + 1) * p.v.sL : vf, ok1, D, lane);
      float a0 = lanes_dot(qc, k0), a1 = lanes_dot(qc, k1);
#pragma unroll
      for (int off = kWarp / 2; off > 0; off /= 2) {
        a0 += __shfl_xor_sync(kFull, a0, off);
        a1 += __shfl_xor_sync(kFull, a1, off);
      }
      const float s0 = a0 * p.qk_scale;
      const float s1 = ok1 ? a1 * p.qk_scale : -INFINITY;
      const float m_new = fmaxf(m, fmaxf(s0, s1));
      const float alpha = exp2f(m - m_new), p0 = exp2f(s0 - m_new), p1 = exp2f(s1 - m_new);
      l = l * alpha + p0 + p1;
#pragma unroll
      for (int c = 0; c < DCH; ++c) acc[c] = fmaf(p1, v1[c], fmaf(p0, v0[c], acc[c] * alpha));
      m = m_new;
    }
    const float inv = 1.f / l;
    float* out = p.cls_frames + (bh * T_ + t) * D;
#pragma unroll
    for (int c = 0; c < DCH; ++c) {
      const int d = lane + c * kWarp;
      if (d < D) out[d] = acc[c] * inv;
    }
    if (lane == 0) p.lse_cls[bh * T_ + t] = m + log2f(l);
  }
  __syncthreads();  // the block's own global writes are visible to the block after this
  T* oc = static_cast<T*>(p.oc.ptr) + cls_offset(p.oc, b, h);
  const float inv_T = 1.f / static_cast<float>(T_);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
    for (int64_t t = 0; t < T_; ++t) sum += p.cls_frames[(bh * T_ + t) * D + d];
    oc[d] = from_float<T>(sum * inv_T);
  }
}

template <typename T>
__global__ void __launch_bounds__(kClsWarps * kWarp) cls_bwd_prep_kernel(const AttnParams p) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int D = p.D;
  const T* doc = static_cast<const T*>(p.doc.ptr) + cls_offset(p.doc, b, h);
  const float inv_T = 1.f / static_cast<float>(p.T);
  if (warp == 0) {
    for (int d = lane; d < D; d += kWarp) p.gc[bh * D + d] = to_float(doc[d]) * inv_T;
  }
  for (int64_t t = warp; t < p.T; t += kClsWarps) {
    const float* of = p.cls_frames + (bh * p.T + t) * D;
    float acc = 0.f;
    for (int d = lane; d < D; d += kWarp) acc = fmaf(of[d], to_float(doc[d]) * inv_T, acc);
    acc = warp_sum(acc);
    if (lane == 0) p.delta_cls[bh * p.T + t] = acc;
  }
}

template <typename T, int DCH>
__global__ void __launch_bounds__(kClsWarps * kWarp) cls_bwd_kernel(const AttnParams p) {
  constexpr int DP = DCH * kWarp;
  __shared__ float red[3][kClsWarps][DP];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int D = p.D;
  const int64_t N = p.L, T_ = p.T, H = p.H;
  float qc[DCH], kc[DCH], vc[DCH], gc[DCH];
  load_lanes<T, DCH>(qc, static_cast<const T*>(p.qc.ptr) + cls_offset(p.qc, b, h), true, D, lane);
  load_lanes<T, DCH>(kc, static_cast<const T*>(p.kc.ptr) + cls_offset(p.kc, b, h), true, D, lane);
  load_lanes<T, DCH>(vc, static_cast<const T*>(p.vc.ptr) + cls_offset(p.vc, b, h), true, D, lane);
  load_lanes<float, DCH>(gc, p.gc + bh * D, true, D, lane);
  const float s_cls = warp_sum(lanes_dot(qc, kc)) * p.qk_scale;
  const float dp_cls = warp_sum(lanes_dot(gc, vc));

  float dqc[DCH], dkc[DCH], dvc[DCH];
#pragma unroll
  for (int c = 0; c < DCH; ++c) dqc[c] = dkc[c] = dvc[c] = 0.f;

  const T* qptr = static_cast<const T*>(p.q.ptr);
  const T* kptr = static_cast<const T*>(p.k.ptr);
  const T* vptr = static_cast<const T*>(p.v.ptr);
  const T* dptr = static_cast<const T*>(p.dout.ptr);
  for (int64_t t = warp; t < T_; t += kClsWarps) {
    const float lse_t = p.lse_cls[bh * T_ + t], delta_t = p.delta_cls[bh * T_ + t];
    // the cls query against the cls key
    const float p0 = exp2f(s_cls - lse_t);
    const float ds0 = p0 * (dp_cls - delta_t);
#pragma unroll
    for (int c = 0; c < DCH; ++c) {
      dqc[c] = fmaf(ds0, kc[c], dqc[c]);
      dkc[c] = fmaf(ds0, qc[c], dkc[c]);
      dvc[c] = fmaf(p0, gc[c], dvc[c]);
    }
    const int64_t rows = ((b * T_ + t) * H + h) * N;  // lse / delta index of row 0 of (b, t, h)
    const T* qf = qptr + b * p.q.s0 + t * p.q.s1 + h * p.q.s2;
    const T* kf = kptr + b * p.k.s0 + t * p.k.s1 + h * p.k.s2;
    const T* vf = vptr + b * p.v.s0 + t * p.v.s1 + h * p.v.s2;
    const T* df = dptr + b * p.dout.s0 + t * p.dout.s1 + h * p.dout.s2;
    for (int64_t n = 0; n < N; ++n) {
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
      // the cls query against patch key n of frame t
      const float pc = exp2f(a * p.qk_scale - lse_t);
      const float dsc = pc * (bb - delta_t);
      // patch query n of frame t against the cls key
      const float pr = exp2f(c2 * p.qk_scale - p.lse[rows + n]);
      const float dsr = pr * (d2 - p.delta[rows + n]);
#pragma unroll
      for (int c = 0; c < DCH; ++c) {
        dqc[c] = fmaf(dsc, kn[c], dqc[c]);
        dkc[c] = fmaf(dsr, qn[c], dkc[c]);
        dvc[c] = fmaf(pr, dn[c], dvc[c]);
      }
    }
  }
#pragma unroll
  for (int c = 0; c < DCH; ++c) {
    red[0][warp][lane + c * kWarp] = dqc[c];
    red[1][warp][lane + c * kWarp] = dkc[c];
    red[2][warp][lane + c * kWarp] = dvc[c];
  }
  __syncthreads();
  T* dq = static_cast<T*>(p.dqc.ptr) + cls_offset(p.dqc, b, h);
  T* dk = static_cast<T*>(p.dkc.ptr) + cls_offset(p.dkc, b, h);
  T* dv = static_cast<T*>(p.dvc.ptr) + cls_offset(p.dvc, b, h);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sq = 0.f, sk = 0.f, sv = 0.f;
#pragma unroll
    for (int w = 0; w < kClsWarps; ++w) {
      sq += red[0][w][d];
      sk += red[1][w][d];
      sv += red[2][w][d];
    }
    dq[d] = from_float<T>(sq * p.scale);
    dk[d] = from_float<T>(sk * p.scale);
    dv[d] = from_float<T>(sv);
  }
}

// The cls kernels have no cls-less variant: the third parameter is always true.
template <typename T, int DCH, bool>
struct ClsFwdLaunch {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    cls_fwd_kernel<T, DCH><<<static_cast<unsigned>(p.B * p.H), kClsWarps * kWarp, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

template <typename T, int DCH, bool>
struct ClsBwdLaunch {
  static cudaError_t run(const AttnParams& p, cudaStream_t stream) {
    cls_bwd_kernel<T, DCH><<<static_cast<unsigned>(p.B * p.H), kClsWarps * kWarp, 0, stream>>>(p);
    return cudaGetLastError();
  }
};

bool cls_empty(const AttnParams& p) { return !p.has_cls || p.B * p.H == 0 || p.T == 0; }

}  // namespace

cudaError_t launch_cls_fwd(const AttnParams& p, cudaStream_t stream) {
  if (cls_empty(p)) return cudaSuccess;
  return dispatch_dtype<ClsFwdLaunch, true>(p, stream);
}

cudaError_t launch_cls_bwd_prep(const AttnParams& p, cudaStream_t stream) {
  if (cls_empty(p)) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(p.B * p.H);
  switch (p.dtype) {
    case DType::f16:
      cls_bwd_prep_kernel<__half><<<grid, kClsWarps * kWarp, 0, stream>>>(p);
      break;
    case DType::bf16:
      cls_bwd_prep_kernel<__nv_bfloat16><<<grid, kClsWarps * kWarp, 0, stream>>>(p);
      break;
    default:
      cls_bwd_prep_kernel<float><<<grid, kClsWarps * kWarp, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_cls_bwd(const AttnParams& p, cudaStream_t stream) {
  if (cls_empty(p)) return cudaSuccess;
  return dispatch_dtype<ClsBwdLaunch, true>(p, stream);
}

}  // namespace divattn
