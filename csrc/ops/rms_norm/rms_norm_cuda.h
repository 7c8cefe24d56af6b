// CUDA launchers for RMSNorm (rms_norm_kernels.cu): raw pointers and a stream, no torch.
// They return the launch error; the glue (rms_norm_cuda.cpp) turns it into a c10 error.
#pragma once
#include <cstdint>

#include "common/cuda_compat.h"
#include "ops/rms_norm/rms_norm.h"

namespace fastpt {

// CUDA launchers
cudaError_t rms_norm_fwd_cuda(const RmsNormFwdArgs& args, cudaStream_t stream);

// args.dw_partial must hold args.num_partials rows of n floats, with 1 <= num_partials <=
// rows (one row-block per partial row); the caller sums the rows into dw.
cudaError_t rms_norm_bwd_cuda(const RmsNormBwdArgs& args, cudaStream_t stream);

// The number of row-blocks (and so dw partial rows) rms_norm_bwd_cuda should get: enough
// blocks to fill `sm_count` multiprocessors, at most one per row.
int64_t rms_norm_bwd_cuda_num_partials(int64_t rows, int64_t n, int sm_count);

}  // namespace fastpt
