// Single-threaded products for CPU kernels (attention's tiles, the blocks of the gemm op):
// row-major C = alpha * op(A) op(B) + beta * C with C in the compute type (float; double for
// float64) and A, B in the storage type.
//
// The BLAS that torch's x86 wheels link (MKL, exported by libtorch_cpu) does these products:
// sgemm/dgemm, and gemm_bf16bf16f32 / gemm_f16f16f32, which use AMX or AVX512_BF16/FP16 where
// the CPU has them. ATen's own cpublas::gemm overloads would be the natural entry point, but
// libtorch_cpu does not export them (only its slow reference kernel behind gemm_stub).
// The symbols are weak: with a torch built without MKL they are null and a plain loop runs
// (correct, slow; such builds are not a target of this project).
// fp32 and fp16 on CPUs other than Intel's and bf16 on CPUs with AVX512_BF16 but no AMX:
// fastpt's own AVX-512 micro-kernels instead (gemm_avx512.h; MKL is slow there).
// NOTE: PyTorch's own CPU flash attention calls the same MKL sgemm for fp32 through cpublas.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "common/cpu_dispatch.h"
#include "common/cpu_features.h"
#include "common/gemm_avx512.h"

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
void gemm_bf16bf16f32_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*,
                       const int*) __attribute__((weak));
void gemm_f16f16f32_(const char*, const char*, const int*, const int*, const int*, const float*,
                     const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*,
                     const int*) __attribute__((weak));
}

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace cpu_gemm {

// Plain loop for builds without MKL: C = alpha * op(A) op(B) + beta * C, row-major.
template <typename T, typename A>
void gemm_loop(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      A s = 0;
      for (int64_t p = 0; p < k; ++p) s += A(ta ? a[p * lda + i] : a[i * lda + p]) * A(tb ? b[j * ldb + p] : b[p * ldb + j]);
      c[i * ldc + j] = alpha * s + (beta == A(0) ? A(0) : beta * c[i * ldc + j]);
    }
  }
}

// Whether BLAS, which takes int sizes and leading dims, can take these.
inline bool fits_blas_int(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  for (const int64_t v : {m, n, k, lda, ldb, ldc})
    if (v > INT_MAX) return false;
  return true;
}

// Row-major C (m x n) = alpha * op(A) (m x k) * op(B) (k x n) + beta * C; op(X) = X^T when its flag
// is set. Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: B goes first.
template <typename T, typename A>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const T* a, int64_t lda,
                 const T* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS would be fine, the loop too; keep the meaning explicit
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == A(0) ? A(0) : beta * c[i * ldc + j];
    return;
  }
  // The blocks are small, but a leading dim is an operand's own row stride, which a strided view
  // can make >= 2^31 (BLAS would reject it and leave C unwritten): such products take fastpt's
  // own kernels (int64 sizes) where this build has them, else the loop.
  const bool blas = fits_blas_int(m, n, k, lda, ldb, ldc);
  const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LDA = int(ldb), LDB = int(lda), LDC = int(ldc);
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    if (own_gemm_active() || !blas)
      return avx512_gemm::gemm_f32(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
    if (sgemm_ && blas) return sgemm_(&tA, &tB, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  } else if constexpr (std::is_same_v<T, double>) {
    if (dgemm_ && blas) return dgemm_(&tA, &tB, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(__AVX512BF16__)
    if (!cpu_features().amx_bf16 || !blas)  // with AMX, MKL is the faster one
      return avx512_gemm::gemm_bf16(ta, tb, m, n, k, alpha, reinterpret_cast<const uint16_t*>(a), lda,
                                    reinterpret_cast<const uint16_t*>(b), ldb, beta, c, ldc);
#endif
    if (gemm_bf16bf16f32_ && blas)
      return gemm_bf16bf16f32_(&tA, &tB, &M, &N, &K, &alpha, reinterpret_cast<const uint16_t*>(b), &LDA,
                               reinterpret_cast<const uint16_t*>(a), &LDB, &beta, c, &LDC);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#if defined(CPU_CAPABILITY_AVX512)
    if (own_gemm_active() || !blas)
      return avx512_gemm::gemm_f16(ta, tb, m, n, k, alpha, reinterpret_cast<const uint16_t*>(a), lda,
                                   reinterpret_cast<const uint16_t*>(b), ldb, beta, c, ldc);
#endif
    if (gemm_f16f16f32_ && blas)
      return gemm_f16f16f32_(&tA, &tB, &M, &N, &K, &alpha, reinterpret_cast<const uint16_t*>(b), &LDA,
                             reinterpret_cast<const uint16_t*>(a), &LDB, &beta, c, &LDC);
  }
  gemm_loop(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace cpu_gemm
}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
