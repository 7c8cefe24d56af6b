// Helpers for the CUDA glue files (*_cuda.cpp): device checks and launch errors. The glue
// is compiled by the host compiler against torch's CUDA headers; kernels never see torch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "common/cuda_compat.h"

namespace fastpt {

// ValueError naming `name` unless t lives on a CUDA device. The other tensors of an op are
// then held to t's device with check_same_device (common/glue.h).
inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

// Launchers return cudaError_t (kernel files cannot throw c10 errors); this raises it. An
// error that was pending before fastpt's launch is earlier work's, and is named as such.
inline void check_launch(cudaError_t err, const char* op) {
  if (err == cudaSuccess) return;
  TORCH_CHECK(!cuda::error_predates_launch(err), "fastpt::", op,
              ": a CUDA error from earlier work is pending, not caused by this launch (CUDA reports "
              "errors asynchronously: an earlier kernel's fault, or another library's unchecked launch): ",
              cudaGetErrorName(err), ": ", cudaGetErrorString(err));
  TORCH_CHECK(false, "fastpt::", op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

// Streaming multiprocessors of `device` (a cheap driver attribute query, no sync).
inline int sm_count(const at::Device& device) {
  int n = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device.index());
  TORCH_CHECK(err == cudaSuccess, "fastpt: cannot query the multiprocessor count of ", device,
              ": ", cudaGetErrorString(err));
  return n;
}

}  // namespace fastpt
