// Row helpers of the attention CPU kernel (attention_kernel.cpp, its only includer; compiled
// once per CPU capability with it): vectorised exp, max, sums and scalings of one row of
// logits or outputs, in the compute type A (float) with rows of the storage type T.
#pragma once

#include <cmath>
#include <limits>

#include "common/cpu_vec.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename A>
constexpr A kNegInf = -std::numeric_limits<A>::infinity();

// exp for P rounded to bf16 / fp16 (8 / 11 mantissa bits): ATen's cheaper degree-3 fexp_u20.
// The row sums use the unrounded values; its error there is far below the rounding of P.
// fexp_u20 maps NaN to a finite value: a NaN logit (from a NaN or inf input, or a NaN bias)
// is kept, as exp_nonpos keeps it, so it reaches the output instead of reading as masked.
template <typename T>
inline aVec<T> vexp_p(const aVec<T>& x) {
  if constexpr (std::is_same_v<T, acc_t<T>>) return exp_nonpos(x);
  else return aVec<T>::blendv(x.fexp_u20(), x, x.isnan());
}

// max without NaN propagation (one instruction instead of ATen's four): a NaN logit still
// reaches the output through exp and the sum.
template <typename A>
inline at::vec::Vectorized<A> vmax(const at::vec::Vectorized<A>& a, const at::vec::Vectorized<A>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) return _mm256_max_ps(a, b);
#endif
  return at::vec::maximum(a, b);
}

template <typename A>
inline A row_max(const A* x, int64_t n) {
  using V = at::vec::Vectorized<A>;
  V m0(kNegInf<A>), m1(kNegInf<A>);
  int64_t j = 0;
  for (; j + 2 * V::size() <= n; j += 2 * V::size()) {
    m0 = vmax(m0, V::loadu(x + j));
    m1 = vmax(m1, V::loadu(x + j + V::size()));
  }
  A m = at::vec::vec_reduce_all<A>([](V& a, V& b) { return at::vec::maximum(a, b); }, vmax(m0, m1));
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// exp of x - m <= 0 that keeps NaN (exp_u20 makes it +inf, and the decode step's lse inf).
template <typename A>
inline at::vec::Vectorized<A> exp_nonpos_nan(const at::vec::Vectorized<A>& d) {
  return at::vec::Vectorized<A>::blendv(exp_nonpos(d), d, d.isnan());
}

// x = exp(x - m) in place; returns the sum.
template <typename A>
inline A exp_sub_sum(A* x, int64_t n, A m) {
  using V = at::vec::Vectorized<A>;
  const V mv(m);
  V sv(0);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    const V e = exp_nonpos_nan(V::loadu(x + j) - mv);
    e.store(x + j);
    sv = sv + e;
  }
  if (j < n) {
    const int64_t r = n - j;
    const V e = exp_nonpos_nan(V::loadu(x + j, r) - mv);
    e.store(x + j, r);
    sv = sv + V::set(V(0), e, r);
  }
  return at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, sv);
}

// x = exp(x - m) in place (x <= m or -inf), and y = x rounded to the storage type when y is not
// null: the backward's P in one pass (fp32 for dS, rounded for the dV product).
template <typename T, typename A>
inline void exp_sub_store(A* x, int64_t n, A m, T* y) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t K = kChunk<T>;
  const V mv(m);
  int64_t j = 0;
  for (; j + K <= n; j += K) {
    const V e0 = exp_nonpos(V::loadu(x + j) - mv), e1 = exp_nonpos(V::loadu(x + j + V::size()) - mv);
    e0.store(x + j);
    e1.store(x + j + V::size());
    if (y) store2(y + j, e0, e1);
  }
  if (j < n) {
    const int64_t r = n - j, ra = std::min<int64_t>(r, V::size());
    const V e0 = exp_nonpos(V::loadu(x + j, ra) - mv);
    const V e1 = r > ra ? exp_nonpos(V::loadu(x + j + ra, r - ra) - mv) : V(0);
    e0.store(x + j, ra);
    if (r > ra) e1.store(x + j + ra, r - ra);
    if (y) store2(y + j, e0, e1, r);
  }
}

// dS = P * dP - P * delta for one row without dropout: over dP in place when keep (the fp32
// products, the bias gradient), and rounded into y when y is not null (the bf16/fp16 products).
template <typename T, typename A>
inline void grad_logits_row(const A* p, A* ds, int64_t n, A delta, T* y, bool keep) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t K = kChunk<T>;
  const V dv(delta);
  const auto f = [&](const V& pv, const V& dpv) { return pv * dpv - pv * dv; };
  int64_t j = 0;
  for (; j + K <= n; j += K) {
    const V a = f(V::loadu(p + j), V::loadu(ds + j));
    const V b = f(V::loadu(p + j + V::size()), V::loadu(ds + j + V::size()));
    if (keep) {
      a.store(ds + j);
      b.store(ds + j + V::size());
    }
    if (y) store2(y + j, a, b);
  }
  if (j < n) {
    const int64_t r = n - j, ra = std::min<int64_t>(r, V::size());
    const V a = f(V::loadu(p + j, ra), V::loadu(ds + j, ra));
    const V b = r > ra ? f(V::loadu(p + j + ra, r - ra), V::loadu(ds + j + ra, r - ra)) : V(0);
    if (keep) {
      a.store(ds + j, ra);
      if (r > ra) b.store(ds + j + ra, r - ra);
    }
    if (y) store2(y + j, a, b, r);
  }
}

// y = exp(scale * x - m) in the storage type (y may be x when T is the compute type); returns
// the sum of the values before rounding. One pass: exp, sum and the bf16/fp16 rounding.
template <typename T, typename A = acc_t<T>>
inline A exp_sum_store(const A* x, int64_t n, A scale, A m, T* y) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t K = kChunk<T>;
  const V mv(-m), sv(scale);
  V s0(0), s1(0);
  int64_t j = 0;
  for (; j + K <= n; j += K) {
    const V e0 = vexp_p<T>(at::vec::fmadd(V::loadu(x + j), sv, mv));
    const V e1 = vexp_p<T>(at::vec::fmadd(V::loadu(x + j + V::size()), sv, mv));
    s0 = s0 + e0;
    s1 = s1 + e1;
    store2(y + j, e0, e1);
  }
  if (j < n) {
    const int64_t r = n - j, ra = std::min<int64_t>(r, V::size());
    const V e0 = V::set(V(0), vexp_p<T>(at::vec::fmadd(V::loadu(x + j, ra), sv, mv)), ra);
    const V e1 = r > ra ? V::set(V(0), vexp_p<T>(at::vec::fmadd(V::loadu(x + j + ra, r - ra), sv, mv)), r - ra) : V(0);
    s0 = s0 + e0;
    s1 = s1 + e1;
    store2(y + j, e0, e1, r);
  }
  return at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, s0 + s1);
}

template <typename A>
inline void add_row(A* x, const A* y, int64_t n) {
  using V = at::vec::Vectorized<A>;
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(x + j) + V::loadu(y + j)).store(x + j);
  if (j < n) (V::loadu(x + j, n - j) + V::loadu(y + j, n - j)).store(x + j, n - j);
}

template <typename A>
inline void scale_row(A* x, int64_t n, A f) {
  using V = at::vec::Vectorized<A>;
  const V fv(f);
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) (V::loadu(x + j) * fv).store(x + j);
  if (j < n) (V::loadu(x + j, n - j) * fv).store(x + j, n - j);
}

// y (storage type) = f * x (compute type).
template <typename T, typename A>
inline void store_row(const A* x, T* y, int64_t n, A f) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t K = kChunk<T>;
  const V fv(f);
  int64_t j = 0;
  for (; j + K <= n; j += K) store2(y + j, V::loadu(x + j) * fv, V::loadu(x + j + V::size()) * fv);
  if (j < n) {
    const int64_t r = n - j, ra = std::min<int64_t>(r, V::size());
    const V a = V::loadu(x + j, ra) * fv;
    const V b = r > ra ? V::loadu(x + j + ra, r - ra) * fv : V(0);
    store2(y + j, a, b, r);
  }
}

// Dot product of two storage-type rows in the compute type.
template <typename T>
inline acc_t<T> dot_row(const T* x, const T* y, int64_t n) {
  using V = aVec<T>;
  constexpr int64_t K = kChunk<T>;
  V s0(0), s1(0), a0, a1, b0, b1;
  int64_t j = 0;
  for (; j + K <= n; j += K) {
    load2(x + j, a0, a1);
    load2(y + j, b0, b1);
    s0 = at::vec::fmadd(a0, b0, s0);
    s1 = at::vec::fmadd(a1, b1, s1);
  }
  if (j < n) {
    load2(x + j, a0, a1, n - j);
    load2(y + j, b0, b1, n - j);
    s0 = at::vec::fmadd(a0, b0, s0);
    s1 = at::vec::fmadd(a1, b1, s1);
  }
  return at::vec::vec_reduce_all<acc_t<T>>([](V& a, V& b) { return a + b; }, s0 + s1);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
