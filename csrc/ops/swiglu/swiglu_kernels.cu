// SwiGLU CUDA kernels: out = silu(gate) * up, silu(g) = g / (1 + exp(-g)), and its backward
//   grad_gate = grad_out * up * s * (1 + g * (1 - s)),  grad_up = grad_out * g * s,
// s = sigmoid(g). Storage fp32 / bf16 / fp16 with fp32 arithmetic (double for float64), the
// same formulas and operation order as swiglu_kernel.cpp (CPU).
//
// Parallel split: elementwise over the flattened tensors with a grid-stride loop, 256
// threads per block. Each step moves one 16-byte pack per tensor (V = 16 / sizeof(T)
// elements) when every pointer is 16-byte aligned; the numel % V tail, or everything when
// a pointer is not aligned, goes through the same loop with V = 1, so any numel works.
//
// Bytes moved, s = sizeof(T): forward reads gate and up and writes out (3 * numel * s);
// backward reads grad_out, gate and up and writes grad_gate and grad_up (5 * numel * s).
// Arithmetic intensity is a few FLOPs per byte, so both are bound by memory bandwidth and
// the exact expf (not __expf) should hide behind the loads (not measured: no GPU here).
#include "common/cuda_compat.h"
#include "common/portable.h"
#include "ops/swiglu/swiglu.h"
#include "ops/swiglu/swiglu_cuda.h"

namespace fastpt {
namespace {

using cuda::acc_t;
using cuda::aligned_to;
using cuda::load_acc;
using cuda::store_acc;
using cuda::vec_width;

constexpr int kThreads = 256;

// The formulas of ATen's silu kernels and the CPU kernel: exact expf / exp (CUDA's expf is
// within 2 ulp over the whole range; __expf is not), no clamping, so NaN and Inf come out as
// in eager PyTorch (silu(-inf) = -inf / inf = NaN).
FASTPT_DEVICE float exp_neg(float g) { return expf(-g); }
FASTPT_DEVICE double exp_neg(double g) { return exp(-g); }

template <typename A>
FASTPT_DEVICE A silu(A g) {
  return g / (A(1) + exp_neg(g));
}
template <typename A>
FASTPT_DEVICE A sigmoid(A g) {
  return A(1) / (A(1) + exp_neg(g));
}

// Elements [i, i + V) of every tensor; i is a multiple of V.
template <typename T, int V>
FASTPT_DEVICE void fwd_step(const T* gate, const T* up, T* out, int64_t i) {
  using A = acc_t<T>;
  A g[V], u[V];
  load_acc<V>(gate + i, g);
  load_acc<V>(up + i, u);
#pragma unroll
  for (int k = 0; k < V; ++k) g[k] = silu(g[k]) * u[k];
  store_acc<V>(out + i, g);
}

template <typename T, int V>
FASTPT_DEVICE void bwd_step(const T* dout, const T* gate, const T* up, T* dgate, T* dup,
                            int64_t i) {
  using A = acc_t<T>;
  A d[V], g[V], u[V], dg[V], du[V];
  load_acc<V>(dout + i, d);
  load_acc<V>(gate + i, g);
  load_acc<V>(up + i, u);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const A s = sigmoid(g[k]);
    dg[k] = d[k] * u[k] * s * (A(1) + g[k] * (A(1) - s));
    du[k] = d[k] * g[k] * s;
  }
  store_acc<V>(dgate + i, dg);
  store_acc<V>(dup + i, du);
}

// V-wide steps over [0, numel / V * V), then a scalar grid-stride tail.
template <typename T, int V>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                  T* __restrict__ out, int64_t numel) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vec_end = numel / V * V;
  for (int64_t i = tid * V; i < vec_end; i += stride * V) fwd_step<T, V>(gate, up, out, i);
  for (int64_t i = vec_end + tid; i < numel; i += stride) fwd_step<T, 1>(gate, up, out, i);
}

template <typename T, int V>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ gate,
                                  const T* __restrict__ up, T* __restrict__ dgate,
                                  T* __restrict__ dup, int64_t numel) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vec_end = numel / V * V;
  for (int64_t i = tid * V; i < vec_end; i += stride * V)
    bwd_step<T, V>(dout, gate, up, dgate, dup, i);
  for (int64_t i = vec_end + tid; i < numel; i += stride)
    bwd_step<T, 1>(dout, gate, up, dgate, dup, i);
}

template <typename T, int V>
cudaError_t launch_fwd(const SwigluFwdArgs& a, cudaStream_t stream) {
  auto kernel = &swiglu_fwd_kernel<T, V>;
  FASTPT_LAUNCH(kernel, cuda::grid_for((a.numel + V - 1) / V, kThreads), kThreads, 0, stream,
                static_cast<const T*>(a.gate), static_cast<const T*>(a.up), static_cast<T*>(a.out),
                a.numel);
  return cudaSuccess;
}

template <typename T, int V>
cudaError_t launch_bwd(const SwigluBwdArgs& a, cudaStream_t stream) {
  auto kernel = &swiglu_bwd_kernel<T, V>;
  FASTPT_LAUNCH(kernel, cuda::grid_for((a.numel + V - 1) / V, kThreads), kThreads, 0, stream,
                static_cast<const T*>(a.grad_out), static_cast<const T*>(a.gate),
                static_cast<const T*>(a.up), static_cast<T*>(a.grad_gate),
                static_cast<T*>(a.grad_up), a.numel);
  return cudaSuccess;
}

}  // namespace

cudaError_t swiglu_fwd_cuda(const SwigluFwdArgs& a, cudaStream_t stream) {
  if (a.numel <= 0) return cudaSuccess;
  return cuda::dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (aligned_to(16, a.gate, a.up, a.out)) return launch_fwd<T, vec_width<T>()>(a, stream);
    return launch_fwd<T, 1>(a, stream);
  });
}

cudaError_t swiglu_bwd_cuda(const SwigluBwdArgs& a, cudaStream_t stream) {
  if (a.numel <= 0) return cudaSuccess;
  return cuda::dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (aligned_to(16, a.grad_out, a.gate, a.up, a.grad_gate, a.grad_up))
      return launch_bwd<T, vec_width<T>()>(a, stream);
    return launch_bwd<T, 1>(a, stream);
  });
}

}  // namespace fastpt
