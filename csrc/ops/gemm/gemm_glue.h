// fastpt's gemm for other glue files (the LoRA op's base product): the product on tensors, and
// whether it beats torch's BLAS for a tensor of this dtype and device here.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastpt {

// op(a) @ op(b) for 2-D float32 / float64 CPU tensors (checks as the gemm op).
at::Tensor gemm_tensors(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b);

// op(a) @ op(b) + op(a2) @ op(b2) in one pass over the output (GemmArgs::k2): a LoRA layer's
// base product plus its rank-r update. Same checks; a2 and b2 have a's dtype and device.
at::Tensor gemm2_tensors(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b, const at::Tensor& a2,
                         const at::Tensor& b2, bool trans_a2, bool trans_b2);

// c (float32; float64 for float64) = or += op(a) @ op(b), in place (the gemm_into_ op).
void gemm_into_cpu(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b,
                   bool accumulate);

// float32 on the CPU with an AVX-512 kernel build active on a non-Intel CPU (where MKL runs its
// AVX2 kernels; see csrc/common/gemm_avx512.h).
bool gemm_beats_blas(const at::Tensor& t);

}  // namespace fastpt
