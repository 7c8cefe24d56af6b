// Matrix product C = op(A) op(B) (op(X) = X or X^T), row-major, fp32, bf16 or fp64, for linear
// layers on CPUs where torch's BLAS is slow (gemm_kernel.cpp). Argument struct shared by the
// kernel file and the glue.
#pragma once
#include <cstdint>

#include "common/portable.h"

namespace fastpt {

struct GemmArgs {
  bool trans_a, trans_b;
  int64_t m, n, k;
  const void* a;  // (m, k), or (k, m) when trans_a; unit stride along its last dim, row stride lda
  int64_t lda;
  const void* b;  // (k, n), or (n, k) when trans_b; row stride ldb
  int64_t ldb;
  void* c;  // (m, n) contiguous: float32 for fp32 and bf16 inputs, float64 for fp64
  DType dtype;  // of A and B: kFloat32, kBFloat16 or kFloat64
  bool accumulate = false;  // C += op(A) op(B) instead of C = op(A) op(B)
  // Optional second product added in the same pass, C = op(A) op(B) + op(A2) op(B2), with
  // A2 (m, k2) and B2 (k2, n) laid out as A and B are (k2 = 0: none). Each block of C gets
  // it while still in cache: a LoRA layer's x W^T + (x A^T) B^T without a second pass over C.
  bool trans_a2 = false, trans_b2 = false;
  int64_t k2 = 0;
  const void* a2 = nullptr;
  int64_t lda2 = 0;
  const void* b2 = nullptr;
  int64_t ldb2 = 0;
};

}  // namespace fastpt
