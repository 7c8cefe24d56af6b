// CUDA launcher for RoPE (rope_kernels.cu): raw pointers and a stream, no torch. It
// returns the launch error; the glue (rope_cuda.cpp) turns it into a c10 error.
#pragma once

#include "common/cuda_compat.h"
#include "ops/rope/rope.h"

namespace fastpt {

// CUDA launchers
// Same contract as the CPU kernel (rope.h), except positions: a row whose position lies
// outside [0, P) gets NaN in its 2R rotated features (pass-through features are still
// copied), so bad positions never read outside the tables and never go unnoticed, without
// the host synchronisation a range check on the host would need.
cudaError_t rope_apply_cuda(const RopeArgs& args, cudaStream_t stream);

}  // namespace fastpt
