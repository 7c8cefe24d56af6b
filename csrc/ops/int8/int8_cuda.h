// CUDA launchers for the int8 ops (int8_kernels.cu): raw pointers and a stream, no torch.
// They return the launch error; the glue (int8_cuda.cpp) turns it into a c10 error.
#pragma once

#include "common/cuda_compat.h"
#include "ops/int8/int8.h"

namespace fastpt {

// CUDA launchers
// a: (m, lda) with lda >= k_pad and columns [K, k_pad) zero; rows are bounds-checked.
cudaError_t int8_gemm_cuda(const Int8GemmArgs& args, cudaStream_t stream);
// skip_mask (not skip_idx) marks the skipped columns.
cudaError_t int8_quantize_rows_cuda(const Int8QuantArgs& args, cudaStream_t stream);
cudaError_t int8_outlier_cols_cuda(const Int8OutlierArgs& args, cudaStream_t stream);
cudaError_t int8_dropout_cuda(const DropoutArgs& args, cudaStream_t stream);

}  // namespace fastpt
