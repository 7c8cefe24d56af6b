// SwiGLU CPU kernels (compiled once per CPU capability, see common/cpu_dispatch.h).
//
// Elementwise over the flattened tensors, split into contiguous ranges by at::parallel_for.
// Traffic: forward reads gate and up, writes out; backward reads grad_out, gate, up and
// writes grad_gate and grad_up. Arithmetic in fp32 (double for float64).
#include <ATen/Parallel.h>

#include <limits>

#include "common/cpu_vec.h"
#include "ops/swiglu/swiglu.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kGrain = 1 << 15;

// Non-temporal stores (cpu_vec.h) for large fp32/fp64 outputs only.
// NOTE: A/B in one process at [4096, 8192], 2 threads: fp32 forward 21.5 -> 19.4 ms and
// backward 25.4 -> 19.8 ms with them, but bf16 forward 11.6 -> 16.4 ms and backward
// 15.8 -> 22.7 ms, so the compute-bound bf16/fp16 paths keep ordinary stores.
template <typename T>
bool use_streaming(int64_t numel) {
  return sizeof(T) >= 4 && numel * int64_t(sizeof(T)) >= stream_min_bytes();
}

// exp(-g) in the compute type.
// float64: Sleef's exp (1 ulp). float32: ATen's exp_u20 (a degree-5 polynomial, <= 20 ulp,
// ~2e-6 relative: inside fp32's 1e-5 budget) with its saturation at ln(FLT_MAX) replaced by
// the true overflow to inf, so silu(-inf) = -inf / inf = NaN as in eager PyTorch.
// bfloat16/float16 keep only 8/11 mantissa bits: ATen's cheaper fexp_u20 (degree 3;
// overflow -> inf, underflow -> 0), whose error vanishes in the final rounding.
// NOTE: forward at [4096, 8192], 2 threads, steady allocator, Sleef's exp -> these:
// fp32 20.0 -> 18.2 ms; bf16 20.2 -> 14.1 ms (then slower than torch.compile; now 1.47x).
template <typename T>
inline aVec<T> exp_neg(const aVec<T>& g) {
  using V = aVec<T>;
  if constexpr (std::is_same_v<T, double>) {
    return g.neg().exp();
  } else if constexpr (std::is_same_v<T, float>) {
    const V z = g.neg();
    return V::blendv(z.exp_u20(), V(std::numeric_limits<float>::infinity()), z > V(88.72283935546875f));
  } else {
    return g.neg().fexp_u20();
  }
}

template <typename T>
inline aVec<T> silu(const aVec<T>& g) { return g / (aVec<T>(1) + exp_neg<T>(g)); }

template <typename T>
inline aVec<T> sigmoid(const aVec<T>& g) { return aVec<T>(1) / (aVec<T>(1) + exp_neg<T>(g)); }

template <bool kStream, typename T>
void fwd_range(const T* gate, const T* up, T* out, int64_t begin, int64_t end) {
  using V = aVec<T>;
  constexpr int64_t C = kChunk<T>;
  V g0, g1, u0, u1;
  auto step = [&](int64_t i, int64_t len) {
    if (len == C) { load2_lanes(gate + i, g0, g1); load2_lanes(up + i, u0, u1); }
    else { load2(gate + i, g0, g1, len); load2(up + i, u0, u1, len); }
    const V o0 = silu<T>(g0) * u0, o1 = silu<T>(g1) * u1;
    if (len == C) store2_lanes<kStream>(out + i, o0, o1); else store2(out + i, o0, o1, len);
  };
  int64_t i = begin;
  for (; i + C <= end; i += C) step(i, C);
  if (i < end) step(i, end - i);
}

template <bool kStream, typename T>
void bwd_range(const T* dout, const T* gate, const T* up, T* dgate, T* dup, int64_t begin, int64_t end) {
  using V = aVec<T>;
  constexpr int64_t C = kChunk<T>;
  const V one(1);
  V d0, d1, g0, g1, u0, u1;
  auto step = [&](int64_t i, int64_t len) {
    if (len == C) { load2_lanes(dout + i, d0, d1); load2_lanes(gate + i, g0, g1); load2_lanes(up + i, u0, u1); }
    else { load2(dout + i, d0, d1, len); load2(gate + i, g0, g1, len); load2(up + i, u0, u1, len); }
    const V s0 = sigmoid<T>(g0), s1 = sigmoid<T>(g1);
    // silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g)
    const V dg0 = d0 * u0 * s0 * (one + g0 * (one - s0));
    const V dg1 = d1 * u1 * s1 * (one + g1 * (one - s1));
    const V du0 = d0 * g0 * s0, du1 = d1 * g1 * s1;
    if (len == C) { store2_lanes<kStream>(dgate + i, dg0, dg1); store2_lanes<kStream>(dup + i, du0, du1); }
    else { store2(dgate + i, dg0, dg1, len); store2(dup + i, du0, du1, len); }
  };
  int64_t i = begin;
  for (; i + C <= end; i += C) step(i, C);
  if (i < end) step(i, end - i);
}

}  // namespace

void swiglu_fwd(const SwigluFwdArgs& a) {
  dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_stream(use_streaming<T>(a.numel), [&](auto stream) {
      at::parallel_for(0, a.numel, kGrain, [&](int64_t begin, int64_t end) {
        fwd_range<stream()>(static_cast<const T*>(a.gate), static_cast<const T*>(a.up),
                            static_cast<T*>(a.out), begin, end);
        stream_fence();
      });
    });
  });
}

void swiglu_bwd(const SwigluBwdArgs& a) {
  dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_stream(use_streaming<T>(a.numel), [&](auto stream) {
      at::parallel_for(0, a.numel, kGrain, [&](int64_t begin, int64_t end) {
        bwd_range<stream()>(static_cast<const T*>(a.grad_out), static_cast<const T*>(a.gate),
                            static_cast<const T*>(a.up), static_cast<T*>(a.grad_gate),
                            static_cast<T*>(a.grad_up), begin, end);
        stream_fence();
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
