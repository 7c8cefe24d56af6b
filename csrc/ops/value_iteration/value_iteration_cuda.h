// CUDA launchers for value iteration (value_iteration_kernels.cu): raw pointers and a stream,
// no torch. They return the launch error; the glue (value_iteration_cuda.cpp) raises it.
#pragma once
#include <cstdint>

#include "common/cuda_compat.h"
#include "ops/value_iteration/value_iteration.h"

namespace fastpt {

// Runs args.sweeps Jacobi sweeps (args.gauss_seidel must be false: Gauss-Seidel is CPU only).
// All pointers are device pointers, args.stats included; `scratch` holds
// value_iteration_cuda_scratch_bytes(args.states) bytes, 8-byte aligned. v_work (states
// values) is needed when sweeps > 1.
cudaError_t value_iteration_cuda(const ValueIterationArgs& args, void* scratch, cudaStream_t stream);

int64_t value_iteration_cuda_scratch_bytes(int64_t states);

// Blocks of the sweep kernel (one min/max slot each in the scratch).
unsigned value_iteration_cuda_blocks(int64_t states);

}  // namespace fastpt
