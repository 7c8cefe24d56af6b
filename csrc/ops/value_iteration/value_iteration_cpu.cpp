// Value-iteration CPU glue: checks, allocation, dispatch to the CPU kernel build for this
// machine (value_iteration_kernel.cpp).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/cpu_dispatch.h"
#include "common/glue.h"
#include "ops/value_iteration/value_iteration.h"
#include "ops/value_iteration/value_iteration_checks.h"

FASTPT_DECLARE_CPU_KERNEL(value_iteration, fastpt::ValueIterationArgs)

namespace fastpt {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Allocates the outputs, points the arguments at them and runs the kernel.
Outputs run(ValueIterationArgs& a, const at::Tensor& reward, const at::Tensor& v, bool return_q,
            bool span, bool gauss_seidel) {
  at::Tensor v_out = at::empty({a.states}, v.options());
  at::Tensor policy = at::empty({a.states}, v.options().dtype(at::kLong));
  at::Tensor stats = at::empty({a.sweeps, 2}, v.options().dtype(at::kDouble));
  at::Tensor q = return_q ? at::empty({a.states, a.actions}, v.options()) : at::empty({0}, v.options());
  at::Tensor work = gauss_seidel  ? at::empty({a.num_states}, v.options())
                    : a.sweeps > 1 ? at::empty({a.states}, v.options())
                                   : at::Tensor();
  a.reward = reward.const_data_ptr();
  a.v_in = v.const_data_ptr();
  a.v_out = v_out.mutable_data_ptr();
  a.v_work = work.defined() ? work.mutable_data_ptr() : nullptr;
  a.policy = policy.mutable_data_ptr<int64_t>();
  a.q = return_q ? q.mutable_data_ptr() : nullptr;
  a.stats = stats.mutable_data_ptr<double>();
  a.span_residual = span;
  a.gauss_seidel = gauss_seidel;
  cpu::value_iteration(a);
  return {v_out, policy, stats, q};
}

Outputs value_iteration_sparse_cpu(const at::Tensor& indptr_in, const at::Tensor& indices_in,
                                   const at::Tensor& values_in, const at::Tensor& reward_in,
                                   const at::Tensor& v_in, double gamma, int64_t sweeps,
                                   bool gauss_seidel, bool return_q, double tol, bool span,
                                   int64_t first_state) {
  ValueIterationArgs a = value_iteration_common(reward_in, v_in, gamma, sweeps, tol, first_state);
  value_iteration_check_sparse(indptr_in, indices_in, values_in, reward_in, a);
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor reward = reward_in.contiguous(), v = v_in.contiguous();
  a.indptr = indptr.const_data_ptr();
  a.indices = indices.const_data_ptr();
  a.values = values.const_data_ptr();
  return run(a, reward, v, return_q, span, gauss_seidel);
}

Outputs value_iteration_dense_cpu(const at::Tensor& p_in, const at::Tensor& reward_in,
                                  const at::Tensor& v_in, double gamma, int64_t sweeps,
                                  bool gauss_seidel, bool return_q, double tol, bool span,
                                  int64_t first_state) {
  ValueIterationArgs a = value_iteration_common(reward_in, v_in, gamma, sweeps, tol, first_state);
  value_iteration_check_dense(p_in, reward_in, a);
  // Rows must be contiguous; a slice p[:, lo:hi, :] of a contiguous (A, S, S) is read in place.
  const at::Tensor p = p_in.stride(2) == 1 ? p_in : p_in.contiguous();
  const at::Tensor reward = reward_in.contiguous(), v = v_in.contiguous();
  a.p = p.const_data_ptr();
  a.action_stride = p.stride(0);
  a.row_stride = p.stride(1);
  return run(a, reward, v, return_q, span, gauss_seidel);
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CPU, m) {
  m.impl("value_iteration_sparse", &fastpt::value_iteration_sparse_cpu);
  m.impl("value_iteration_dense", &fastpt::value_iteration_dense_cpu);
}
