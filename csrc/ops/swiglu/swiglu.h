// SwiGLU: out = silu(gate) * up, silu(g) = g * sigmoid(g); computed in fp32.
// Argument structs shared by the CPU kernel file, the CUDA kernel file and the glue.
#pragma once
#include <cstdint>

#include "common/portable.h"

namespace fastpt {

struct SwigluFwdArgs {
  const void* gate;  // (numel) contiguous
  const void* up;
  void* out;
  int64_t numel;
  DType dtype;
};

struct SwigluBwdArgs {
  const void* grad_out;
  const void* gate;
  const void* up;
  void* grad_gate;  // = grad_out * up * silu'(gate)
  void* grad_up;    // = grad_out * silu(gate)
  int64_t numel;
  DType dtype;
};

// Backward: silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g).

}  // namespace fastpt
