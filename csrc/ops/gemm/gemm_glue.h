// fastpt's gemm for other glue files (the LoRA op's base product): the product on tensors, and
// whether it beats torch's BLAS for a tensor of this dtype and device here.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastpt {

// op(a) @ op(b) for 2-D float32 / float64 CPU tensors (checks as the gemm op).
at::Tensor gemm_tensors(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b);

// float32 on the CPU with an AVX-512 kernel build active on a non-Intel CPU (where MKL runs its
// AVX2 kernels; see csrc/common/gemm_avx512.h).
bool gemm_beats_blas(const at::Tensor& t);

}  // namespace fastpt
