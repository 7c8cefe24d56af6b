// SIMT emulator, the CUDA C++ built-ins that need no emulator state: keywords (`__global__`,
// `__shared__`, ...), runtime types (cudaError_t, dim3) and the thread index variables,
// `__half` / `__nv_bfloat16`, bit casts and math intrinsics, atomics. Included by simt.h only,
// after the system headers (the keyword macros must not reach them).
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>

// ---- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// A `__shared__` variable is a `static` whose mangled name carries the ABI tag "fastpt_smem"
// (`_ZZ<function>E<name>B11fastpt_smem`), so that the launch finds every one of them in the
// symbol table of the program and poisons them before each block (see simt_static_smem.h). A
// section attribute would be simpler, but g++ ignores it on the statics of function templates
// and puts the statics of different inline functions into one COMDAT group.
#define __shared__ static __attribute__((abi_tag("fastpt_smem")))
#define __constant__ static
#ifndef __restrict__
#define __restrict__ __restrict
#endif

// ---- runtime types
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

// ---- half / bfloat16: 16-bit storage, arithmetic through float, round-to-nearest-even.
struct __half {
  uint16_t x = 0;
  __half() = default;
  explicit __half(float f) { _Float16 h = static_cast<_Float16>(f); std::memcpy(&x, &h, 2); }
  operator float() const { _Float16 h; std::memcpy(&h, &x, 2); return static_cast<float>(h); }
};
struct __nv_bfloat16 {
  uint16_t x = 0;
  __nv_bfloat16() = default;
  explicit __nv_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) { x = static_cast<uint16_t>((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    x = static_cast<uint16_t>(u >> 16);
  }
  operator float() const { uint32_t u = uint32_t(x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
using half = __half;
using nv_bfloat16 = __nv_bfloat16;

#define FASTPT_SIMT_HALF_OPS(H)                                                              \
  inline H operator+(H a, H b) { return H(float(a) + float(b)); }                           \
  inline H operator-(H a, H b) { return H(float(a) - float(b)); }                           \
  inline H operator*(H a, H b) { return H(float(a) * float(b)); }                           \
  inline H operator/(H a, H b) { return H(float(a) / float(b)); }                           \
  inline H operator-(H a) { H r = a; r.x ^= 0x8000u; return r; }                           \
  inline H& operator+=(H& a, H b) { return a = a + b; }                                     \
  inline H& operator-=(H& a, H b) { return a = a - b; }                                     \
  inline H& operator*=(H& a, H b) { return a = a * b; }                                     \
  inline H& operator/=(H& a, H b) { return a = a / b; }                                     \
  inline bool operator==(H a, H b) { return float(a) == float(b); }                         \
  inline bool operator!=(H a, H b) { return float(a) != float(b); }                         \
  inline bool operator<(H a, H b) { return float(a) < float(b); }                           \
  inline bool operator>(H a, H b) { return float(a) > float(b); }                           \
  inline bool operator<=(H a, H b) { return float(a) <= float(b); }                         \
  inline bool operator>=(H a, H b) { return float(a) >= float(b); }
FASTPT_SIMT_HALF_OPS(__half)
FASTPT_SIMT_HALF_OPS(__nv_bfloat16)
#undef FASTPT_SIMT_HALF_OPS

inline float __half2float(__half h) { return float(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }

// ---- bit casts and math intrinsics (the accurate host versions)
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float v) { return v < 0.f ? 0.f : (v > 1.f ? 1.f : v); }

// ---- atomics: threads of a block never run at the same time and blocks run one after
// another, so plain read-modify-write is atomic here.
template <typename T>
T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
template <typename T>
T atomicSub(T* p, T v) { const T old = *p; *p = old - v; return old; }
template <typename T>
T atomicMax(T* p, T v) { const T old = *p; *p = old < v ? v : old; return old; }
template <typename T>
T atomicMin(T* p, T v) { const T old = *p; *p = v < old ? v : old; return old; }
template <typename T>
T atomicExch(T* p, T v) { const T old = *p; *p = v; return old; }
template <typename T>
T atomicCAS(T* p, T cmp, T v) { const T old = *p; if (old == cmp) *p = v; return old; }
