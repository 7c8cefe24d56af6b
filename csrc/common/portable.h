// Shared by CPU kernel files, CUDA kernel files and glue: no torch headers here.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTPT_HOST_DEVICE inline
#endif

namespace fastpt {

// Element types the kernels accept. Glue maps torch dtypes onto these, so kernel
// sources never see at::ScalarType (and never include its header). kFloat64 exists for
// float64 references and gradcheck; CPU kernels compute in double for it, float otherwise.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

}  // namespace fastpt
