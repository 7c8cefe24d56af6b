// RoPE CPU glue: checks, the (B, M, T, D) strided view, dispatch to the CPU kernel build.
#include <torch/library.h>

#include "common/cpu_dispatch.h"
#include "common/cpu_alloc.h"
#include "common/glue.h"
#include "ops/rope/rope.h"
#include "ops/rope/rope_checks.h"

FASTPT_DECLARE_CPU_KERNEL(rope_apply, fastpt::RopeArgs)

namespace fastpt {
namespace {

using rope_glue::Rows;
using rope_glue::Tables;
using rope_glue::as_rows;

Tables check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                    const at::Tensor& sin, const std::optional<at::Tensor>& position_ids) {
  return rope_glue::check_inputs(q, k, cos, sin, position_ids, rope_glue::PositionCheck::kHost);
}

// Rotates src into dst (which may be src itself).
void apply(const Rows& src, const Rows& dst, const Tables& tb, bool interleaved, bool conjugate) {
  if (src.t.numel() == 0) return;
  cpu::rope_apply(rope_glue::make_args(src, dst, tb, interleaved, conjugate));
}

at::Tensor rotated(const at::Tensor& x, const Tables& tb, bool interleaved, bool conjugate) {
  const Rows src = as_rows(x);
  at::Tensor out = new_output_like(src.t, at::MemoryFormat::Preserve);
  apply(src, as_rows(out), tb, interleaved, conjugate);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& cos, const at::Tensor& sin,
                                            const std::optional<at::Tensor>& position_ids,
                                            bool interleaved) {
  const Tables tb = check_inputs(q, k, cos, sin, position_ids);
  return {rotated(q, tb, interleaved, false), rotated(k, tb, interleaved, false)};
}

// The rotation is orthogonal, so its backward is the rotation by -angle.
std::tuple<at::Tensor, at::Tensor> rope_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                     const at::Tensor& cos, const at::Tensor& sin,
                                                     const std::optional<at::Tensor>& position_ids,
                                                     bool interleaved) {
  const Tables tb = check_inputs(grad_q, grad_k, cos, sin, position_ids);
  return {rotated(grad_q, tb, interleaved, true), rotated(grad_k, tb, interleaved, true)};
}

void rotate_inplace(const at::Tensor& x, const Tables& tb, bool interleaved) {
  const Rows rows = as_rows(x);
  apply(rows, rows, tb, interleaved, false);
  if (!rows.t.is_same(x)) const_cast<at::Tensor&>(x).copy_(rows.t);  // layout needed a copy
}

void rope_inplace_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                      const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
                      bool interleaved) {
  const Tables tb = check_inputs(q, k, cos, sin, position_ids);
  rope_glue::check_rope_inplace_targets(q, k);
  rotate_inplace(q, tb, interleaved);
  rotate_inplace(k, tb, interleaved);
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CPU, m) {
  m.impl("rope", &fastpt::rope_cpu);
  m.impl("rope_backward", &fastpt::rope_backward_cpu);
  m.impl("rope_", &fastpt::rope_inplace_cpu);
}
