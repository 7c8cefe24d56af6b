// CUDA launchers for SwiGLU (swiglu_kernels.cu): raw pointers and a stream, no torch.
// They return the launch error; the glue (swiglu_cuda.cpp) turns it into a c10 error.
#pragma once

#include "common/cuda_compat.h"
#include "ops/swiglu/swiglu.h"

namespace fastpt {

// CUDA launchers
cudaError_t swiglu_fwd_cuda(const SwigluFwdArgs& args, cudaStream_t stream);
cudaError_t swiglu_bwd_cuda(const SwigluBwdArgs& args, cudaStream_t stream);

}  // namespace fastpt
