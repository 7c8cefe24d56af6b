// SwiGLU input checks, shared by the CPU glue (swiglu_cpu.cpp) and the CUDA glue
// (swiglu_cuda.cpp) so both devices reject the same inputs with the same messages.
#pragma once

#include "common/glue.h"

namespace fastpt {

// gate and up: same float dtype, device and shape. Returns the kernels' dtype.
inline DType swiglu_check_pair(const at::Tensor& gate, const at::Tensor& up) {
  const DType dtype = float_dtype(gate, "gate");
  check_same_dtype(up, gate, "up", "gate");
  check_same_device(up, gate, "up", "gate");
  check_same_shape(up, gate, "up", "gate");
  return dtype;
}

inline DType swiglu_check_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                                   const at::Tensor& up) {
  const DType dtype = swiglu_check_pair(gate, up);
  check_same_dtype(grad_out, gate, "grad_out", "gate");
  check_same_device(grad_out, gate, "grad_out", "gate");
  check_same_shape(grad_out, gate, "grad_out", "gate");
  return dtype;
}

}  // namespace fastpt
