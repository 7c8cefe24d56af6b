// Helpers for CPU kernel files: read T (float / BFloat16 / Half) as fp32 vectors and write
// fp32 vectors back as T, two Vectorized<float> (one "chunk") at a time, with a masked tail
// so rows of any length work. Included only by *_kernel.cpp (compiled per capability).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "common/portable.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 2 * fVec::size();  // elements per load2/store2

// Full chunk.
template <typename T>
inline void load2(const T* p, fVec& a, fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + fVec::size());
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store2(T* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + fVec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// Partial chunk of n < kChunk elements; lanes past n read as 0 and are not written.
template <typename T>
inline void load2(const T* p, fVec& a, fVec& b, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t na = std::min<int64_t>(n, fVec::size());
    a = fVec::loadu(p, na);
    b = n > na ? fVec::loadu(p + na, n - na) : fVec(0.f);
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n));
  }
}

template <typename T>
inline void store2(T* p, const fVec& a, const fVec& b, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t na = std::min<int64_t>(n, fVec::size());
    a.store(p, na);
    if (n > na) b.store(p + na, n - na);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p, n);
  }
}

// Calls fn(T{}) with T the C++ type of `dtype` (use decltype on the argument).
template <typename Fn>
inline void dispatch_float_types(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kBFloat16: fn(c10::BFloat16{}); break;
    case DType::kFloat16: fn(c10::Half{}); break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
