// SwiGLU CUDA glue: the CPU glue's checks plus device checks, allocation on gate's device,
// launch on the current stream (kernels in swiglu_kernels.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "common/glue.h"
#include "ops/swiglu/swiglu_checks.h"
#include "ops/swiglu/swiglu_cuda.h"

namespace fastpt {
namespace {

at::Tensor swiglu_cuda(const at::Tensor& gate_in, const at::Tensor& up_in) {
  const DType dtype = swiglu_check_pair(gate_in, up_in);
  check_cuda(gate_in, "gate");
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = at::empty_like(gate, at::MemoryFormat::Contiguous);
  if (gate.numel() == 0) return out;
  check_launch(swiglu_fwd_cuda({gate.const_data_ptr(), up.const_data_ptr(), out.mutable_data_ptr(),
                                gate.numel(), dtype},
                               c10::cuda::getCurrentCUDAStream().stream()),
               "swiglu");
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad_out_in,
                                                        const at::Tensor& gate_in,
                                                        const at::Tensor& up_in) {
  const DType dtype = swiglu_check_backward(grad_out_in, gate_in, up_in);
  check_cuda(gate_in, "gate");
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous(), gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor grad_gate = at::empty_like(gate, at::MemoryFormat::Contiguous);
  at::Tensor grad_up = at::empty_like(up, at::MemoryFormat::Contiguous);
  if (gate.numel() == 0) return {grad_gate, grad_up};
  check_launch(swiglu_bwd_cuda({grad_out.const_data_ptr(), gate.const_data_ptr(), up.const_data_ptr(),
                                grad_gate.mutable_data_ptr(), grad_up.mutable_data_ptr(),
                                gate.numel(), dtype},
                               c10::cuda::getCurrentCUDAStream().stream()),
               "swiglu_backward");
  return {grad_gate, grad_up};
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CUDA, m) {
  m.impl("swiglu", &fastpt::swiglu_cuda);
  m.impl("swiglu_backward", &fastpt::swiglu_backward_cuda);
}
