// CUDA launchers for attention (attention_kernels.cu): raw pointers and a stream, no torch.
// They return the launch error; the glue (attention_cuda.cpp) turns it into a c10 error.
#pragma once

#include "common/cuda_compat.h"
#include "ops/attention/attention.h"

namespace fastpt {

// Head dims the CUDA kernels take (shared-memory tiles are sized for them).
constexpr int64_t kAttentionCudaMaxHeadDim = 128;

// CUDA launchers
// Same contract as the CPU kernel (attention.h); D <= kAttentionCudaMaxHeadDim.
cudaError_t attention_fwd_cuda(const AttentionFwdArgs& args, cudaStream_t stream);
// As the CPU kernel, except grad_k and grad_v: compute-type (float; double for float64)
// accumulators of shape (B, Hkv, S, D), zero-filled by the caller, which casts them.
cudaError_t attention_bwd_cuda(const AttentionBwdArgs& args, cudaStream_t stream);

// Tensor-core (WMMA) kernels, attention_wmma_kernels.cu: bf16 / fp16, D <= 128 (padded to a
// multiple of 16 in shared memory). Same contracts as the two above; the backward writes every
// element of grad_k and grad_v (no atomics: deterministic).
// Whether they take s on the current device: fp16 always; bf16 where the GPU runs code built
// for sm_80 or newer (bf16 WMMA does not exist before; older GPUs take the SIMT kernels).
bool attention_wmma_supported(const AttentionShape& s);
cudaError_t attention_wmma_fwd_cuda(const AttentionFwdArgs& args, cudaStream_t stream);
cudaError_t attention_wmma_bwd_cuda(const AttentionBwdArgs& args, cudaStream_t stream);

}  // namespace fastpt
