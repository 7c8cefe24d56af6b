// Helpers for CPU kernel files: read T (float / BFloat16 / Half / double) as vectors of its
// compute type (float, or double for double) and write them back as T, two vectors (one
// "chunk") at a time, with a masked tail so rows of any length work. Included only by
// *_kernel.cpp (compiled once per CPU capability).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cpu_dispatch.h"
#include "common/portable.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename T>
using aVec = at::vec::Vectorized<acc_t<T>>;
template <typename T>
constexpr int64_t kChunk = 2 * aVec<T>::size();  // elements per load2/store2

// Full chunk.
template <typename T>
inline void load2(const T* p, aVec<T>& a, aVec<T>& b) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    a = aVec<T>::loadu(p);
    b = aVec<T>::loadu(p + aVec<T>::size());
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

// Non-temporal ("streaming") stores write a full cache line without first reading it
// (no read-for-ownership), so an output far larger than the caches costs one memory
// transfer instead of two. Kernels use them for outputs of stream_min_bytes() and more
// (cpu_dispatch.h; 32 MiB by default) and call stream_fence() before their parallel task
// ends. Not in the DEFAULT build.
#if defined(CPU_CAPABILITY_AVX512)
constexpr uintptr_t kStreamAlign = 64;
inline void stream_bytes(void* p, __m512i v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
inline __m512i as_bits(const at::vec::Vectorized<float>& v) { return _mm512_castps_si512(v); }
inline __m512i as_bits(const at::vec::Vectorized<double>& v) { return _mm512_castpd_si512(v); }
template <typename T>
inline __m512i as_bits(const at::vec::Vectorized<T>& v) { return v; }  // bf16 / fp16
#elif defined(CPU_CAPABILITY_AVX2)
constexpr uintptr_t kStreamAlign = 32;
inline void stream_bytes(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
inline __m256i as_bits(const at::vec::Vectorized<float>& v) { return _mm256_castps_si256(v); }
inline __m256i as_bits(const at::vec::Vectorized<double>& v) { return _mm256_castpd_si256(v); }
template <typename T>
inline __m256i as_bits(const at::vec::Vectorized<T>& v) { return v; }  // bf16 / fp16
#endif

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // streaming stores are weakly ordered: publish them before the task ends
#endif
}

template <bool kStream = false, typename T>
inline void store2(T* p, const aVec<T>& a, const aVec<T>& b) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (kStream) {
    if (reinterpret_cast<uintptr_t>(p) % kStreamAlign == 0) {
      if constexpr (std::is_same_v<T, acc_t<T>>) {
        stream_bytes(p, as_bits(a));
        stream_bytes(p + aVec<T>::size(), as_bits(b));
#if defined(CPU_CAPABILITY_AVX512_BF16)
      } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
        stream_bytes(p, (__m512i)_mm512_cvtne2ps_pbh(b, a));
#endif
      } else {
        stream_bytes(p, as_bits(at::vec::convert_from_float<T>(a, b)));
      }
      return;
    }
  }
#endif
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    a.store(p);
    b.store(p + aVec<T>::size());
#if defined(CPU_CAPABILITY_AVX512_BF16)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(b, a));
#endif
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// Calls fn(std::bool_constant<s>{}) so kernels can take kStream as a template argument.
template <typename Fn>
inline void with_stream(bool s, Fn&& fn) {
  if (s) fn(std::true_type{});
  else fn(std::false_type{});
}

// The AVX512_BF16 build rounds fp32 -> bf16 with one instruction (vcvtne2ps2bf16) instead
// of ATen's ~17-instruction emulation. Like ATen it rounds to nearest even and keeps NaN;
// unlike it, it flushes fp32 denormals (|x| < 1.2e-38) to zero.
// NOTE: RMSNorm bf16 forward at [4096, 4096]: 3.1 ms -> 1.7 ms; SwiGLU bf16 backward at
// [4096, 8192]: 17.3 ms -> 13.1 ms (2 threads, steady allocator).

// Partial chunk of n < kChunk<T> elements; lanes past n read as 0 and are not written.
template <typename T>
inline void load2(const T* p, aVec<T>& a, aVec<T>& b, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    const int64_t na = std::min<int64_t>(n, aVec<T>::size());
    a = aVec<T>::loadu(p, na);
    b = n > na ? aVec<T>::loadu(p + na, n - na) : aVec<T>(0);
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n));
  }
}

template <typename T>
inline void store2(T* p, const aVec<T>& a, const aVec<T>& b, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    const int64_t na = std::min<int64_t>(n, aVec<T>::size());
    a.store(p, na);
    if (n > na) b.store(p + na, n - na);
#if defined(CPU_CAPABILITY_AVX512_BF16)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm512_mask_storeu_epi16(p, (__mmask32)((1u << n) - 1), (__m512i)_mm512_cvtne2ps_pbh(b, a));
#endif
  } else {
    at::vec::convert_from_float<T>(a, b).store(p, n);
  }
}

// Chunks in lane order. load2/store2 keep memory order (a: elements 0..V-1, b: V..2V-1).
// A kernel in which every operand of a full chunk is read with load2_lanes and every
// result written with store2_lanes may let the lanes come in another fixed order; only
// reductions over the lanes see it (they sum in another order). bf16 in the AVX2 build
// splits the chunk into its even and odd elements: a bf16 is the high half of an fp32, so
// an even element widens by one shift of its 32-bit word and an odd one by one AND, and two
// rounded vectors pack by one shift and one 16-bit blend; ATen's memory-order conversion
// takes 5 instructions to widen 16 elements and 16 to round and pack them (no AVX512_BF16
// rounding instruction in that build). Partial chunks keep load2/store2.
// NOTE: AVX2 build on Zen 3, 2 threads, steady allocator, five A/B pairs in alternating
// processes (`fastpt bench --ops rms_norm,swiglu,rope --dtypes bf16 --alloc steady`), bf16
// forward+backward: RMSNorm [4096, 4096] 10.6-13.6 -> 7.2-8.7 ms, SwiGLU [4096, 8192]
// 33.7-44.4 -> 26.1-30.7 ms, RoPE (bf16 tables) 8.7-11.8 -> 6.6-8.7 ms.
#if defined(CPU_CAPABILITY_AVX2)
template <typename T>
constexpr bool kEvenOddLanes = std::is_same_v<T, c10::BFloat16>;
#else
template <typename T>
constexpr bool kEvenOddLanes = false;
#endif

template <typename T>
inline void load2_lanes(const T* p, aVec<T>& a, aVec<T>& b) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (kEvenOddLanes<T>) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xffff0000u))));
    return;
  }
#endif
  load2(p, a, b);
}

#if defined(CPU_CAPABILITY_AVX2)
// fp32 -> bf16 rounded to nearest even in the high 16 bits of each lane (the low 16 are
// garbage), NaN -> 0x7fc0: ATen's c10::BFloat16 rounding, lane for lane.
inline __m256i round_to_bf16_high(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i is_num = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_ORD_Q));
  return _mm256_blendv_epi8(_mm256_set1_epi32(0x7fc00000), rounded, is_num);
}
#endif

template <bool kStream = false, typename T>
inline void store2_lanes(T* p, const aVec<T>& a, const aVec<T>& b) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (kEvenOddLanes<T>) {
    const __m256i v =
        _mm256_blend_epi16(_mm256_srli_epi32(round_to_bf16_high(a), 16), round_to_bf16_high(b), 0xaa);
    if (kStream && reinterpret_cast<uintptr_t>(p) % kStreamAlign == 0) stream_bytes(p, v);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
    return;
  }
#endif
  store2<kStream>(p, a, b);
}

// An fp32 array that a kernel read and wrote in T's lane order alongside T chunks (a partial
// sum per element, say), put back in memory order: its first n_full elements, whole chunks.
template <typename T>
inline void lanes_to_memory_order(acc_t<T>* p, int64_t n_full) {
  if constexpr (kEvenOddLanes<T>) {
    constexpr int64_t V = aVec<T>::size();
    acc_t<T> tmp[2 * V];
    for (int64_t j = 0; j < n_full; j += 2 * V) {
      std::copy(p + j, p + j + 2 * V, tmp);
      for (int64_t i = 0; i < V; ++i) {
        p[j + 2 * i] = tmp[i];
        p[j + 2 * i + 1] = tmp[V + i];
      }
    }
  }
}

// exp of inputs <= 0 or -inf (x minus a row max): float ATen's exp_u20 (<= 20 ulp, ~2e-6
// relative; exp(-inf) = 0), double Sleef's exp.
template <typename A>
inline at::vec::Vectorized<A> exp_nonpos(const at::vec::Vectorized<A>& x) {
  if constexpr (std::is_same_v<A, double>) return x.exp();
  else return x.exp_u20();
}

// Calls fn(T{}) with T the C++ type of `dtype` (use decltype on the argument).
template <typename Fn>
inline void dispatch_float_types(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kBFloat16: fn(c10::BFloat16{}); break;
    case DType::kFloat16: fn(c10::Half{}); break;
    case DType::kFloat64: fn(double{}); break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
