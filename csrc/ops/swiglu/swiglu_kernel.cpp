// SwiGLU CPU kernels (compiled once per CPU capability, see common/cpu_dispatch.h).
//
// Elementwise over the flattened tensors, split into contiguous ranges by at::parallel_for.
// Traffic: forward reads gate and up, writes out; backward reads grad_out, gate, up and
// writes grad_gate and grad_up. Arithmetic in fp32 (double for float64).
#include <ATen/Parallel.h>

#include "common/cpu_vec.h"
#include "ops/swiglu/swiglu.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kGrain = 1 << 15;

// exp(-g) in the compute type. float32/float64 use Sleef's exp (1 ulp), so results, NaN and
// Inf included (silu(-inf) = -inf / inf = NaN), match eager PyTorch's silu. bfloat16/float16
// outputs keep only 8/11 mantissa bits, so they use ATen's fexp_u20 (a degree-3 polynomial;
// overflow -> inf, underflow -> 0, like exp), whose error vanishes in the final rounding.
// NOTE: bf16 forward at [4096, 8192] went from 26.3 ms (30% of copy bandwidth, slower than
// torch.compile) with Sleef's exp to TODO.
template <typename T>
inline aVec<T> exp_neg(const aVec<T>& g) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) return g.neg().exp();
  else return g.neg().fexp_u20();
}

template <typename T>
inline aVec<T> silu(const aVec<T>& g) { return g / (aVec<T>(1) + exp_neg<T>(g)); }

template <typename T>
inline aVec<T> sigmoid(const aVec<T>& g) { return aVec<T>(1) / (aVec<T>(1) + exp_neg<T>(g)); }

template <typename T>
void fwd_range(const T* gate, const T* up, T* out, int64_t begin, int64_t end) {
  using V = aVec<T>;
  constexpr int64_t C = kChunk<T>;
  V g0, g1, u0, u1;
  auto step = [&](int64_t i, int64_t len) {
    if (len == C) { load2(gate + i, g0, g1); load2(up + i, u0, u1); }
    else { load2(gate + i, g0, g1, len); load2(up + i, u0, u1, len); }
    const V o0 = silu<T>(g0) * u0, o1 = silu<T>(g1) * u1;
    if (len == C) store2(out + i, o0, o1); else store2(out + i, o0, o1, len);
  };
  int64_t i = begin;
  for (; i + C <= end; i += C) step(i, C);
  if (i < end) step(i, end - i);
}

template <typename T>
void bwd_range(const T* dout, const T* gate, const T* up, T* dgate, T* dup, int64_t begin, int64_t end) {
  using V = aVec<T>;
  constexpr int64_t C = kChunk<T>;
  const V one(1);
  V d0, d1, g0, g1, u0, u1;
  auto step = [&](int64_t i, int64_t len) {
    if (len == C) { load2(dout + i, d0, d1); load2(gate + i, g0, g1); load2(up + i, u0, u1); }
    else { load2(dout + i, d0, d1, len); load2(gate + i, g0, g1, len); load2(up + i, u0, u1, len); }
    const V s0 = sigmoid<T>(g0), s1 = sigmoid<T>(g1);
    // silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g)
    const V dg0 = d0 * u0 * s0 * (one + g0 * (one - s0));
    const V dg1 = d1 * u1 * s1 * (one + g1 * (one - s1));
    const V du0 = d0 * g0 * s0, du1 = d1 * g1 * s1;
    if (len == C) { store2(dgate + i, dg0, dg1); store2(dup + i, du0, du1); }
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
    at::parallel_for(0, a.numel, kGrain, [&](int64_t begin, int64_t end) {
      fwd_range(static_cast<const T*>(a.gate), static_cast<const T*>(a.up), static_cast<T*>(a.out),
                begin, end);
    });
  });
}

void swiglu_bwd(const SwigluBwdArgs& a) {
  dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, a.numel, kGrain, [&](int64_t begin, int64_t end) {
      bwd_range(static_cast<const T*>(a.grad_out), static_cast<const T*>(a.gate),
                static_cast<const T*>(a.up), static_cast<T*>(a.grad_gate), static_cast<T*>(a.grad_up),
                begin, end);
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
