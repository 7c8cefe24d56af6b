// SwiGLU CPU glue: checks, allocation, dispatch to the CPU kernel build for this machine.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/cpu_dispatch.h"
#include "common/cpu_alloc.h"
#include "common/glue.h"
#include "ops/swiglu/swiglu.h"
#include "ops/swiglu/swiglu_checks.h"

FASTPT_DECLARE_CPU_KERNEL(swiglu_fwd, fastpt::SwigluFwdArgs)
FASTPT_DECLARE_CPU_KERNEL(swiglu_bwd, fastpt::SwigluBwdArgs)

namespace fastpt {
namespace {

at::Tensor swiglu_cpu(const at::Tensor& gate_in, const at::Tensor& up_in) {
  const DType dtype = swiglu_check_pair(gate_in, up_in);
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = new_output_like(gate);
  if (gate.numel() == 0) return out;
  cpu::swiglu_fwd({gate.const_data_ptr(), up.const_data_ptr(), out.mutable_data_ptr(), gate.numel(), dtype});
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_out_in,
                                                       const at::Tensor& gate_in,
                                                       const at::Tensor& up_in) {
  const DType dtype = swiglu_check_backward(grad_out_in, gate_in, up_in);
  const at::Tensor grad_out = grad_out_in.contiguous(), gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor grad_gate = new_output_like(gate);
  at::Tensor grad_up = new_output_like(up);
  if (gate.numel() == 0) return {grad_gate, grad_up};
  cpu::swiglu_bwd({grad_out.const_data_ptr(), gate.const_data_ptr(), up.const_data_ptr(),
                   grad_gate.mutable_data_ptr(), grad_up.mutable_data_ptr(), gate.numel(), dtype});
  return {grad_gate, grad_up};
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CPU, m) {
  m.impl("swiglu", &fastpt::swiglu_cpu);
  m.impl("swiglu_backward", &fastpt::swiglu_backward_cpu);
}
