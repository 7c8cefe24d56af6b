// RoPE CUDA glue: the CPU glue's checks plus device checks, the (B, M, T, D) strided view,
// launch on the current stream (kernel in rope_kernels.cu).
//
// position_ids range: the CPU glue checks [0, P) with aminmax + item, a device->host sync
// that would stall every call (and break CUDA graph capture, e.g. decoding with
// torch.compile(mode="reduce-overhead")). Here the kernel checks each row's position
// instead and writes NaN into the rotated features of a row whose position is out of
// range, without reading the tables: the error is loud (NaN in the output, so in the loss
// or logits) and memory-safe, but it is not a ValueError as on the CPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "common/glue.h"
#include "ops/rope/rope_checks.h"
#include "ops/rope/rope_cuda.h"

namespace fastpt {
namespace {

using rope_glue::Rows;
using rope_glue::Tables;

Tables check_inputs_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                         const at::Tensor& sin, const std::optional<at::Tensor>& position_ids) {
  const Tables tb =
      rope_glue::check_inputs(q, k, cos, sin, position_ids, rope_glue::PositionCheck::kDevice);
  check_cuda(q, "q");
  return tb;
}

// Rotates src into dst (which may be src itself).
void apply(const Rows& src, const Rows& dst, const Tables& tb, bool interleaved, bool conjugate,
           const char* op) {
  if (src.t.numel() == 0) return;
  check_launch(
      rope_apply_cuda(rope_glue::make_args(src, dst, tb, interleaved, conjugate),
                      c10::cuda::getCurrentCUDAStream().stream()),
      op);
}

at::Tensor rotated(const at::Tensor& x, const Tables& tb, bool interleaved, bool conjugate,
                   const char* op) {
  const Rows src = rope_glue::as_rows(x);
  at::Tensor out = at::empty_like(src.t);
  apply(src, rope_glue::as_rows(out), tb, interleaved, conjugate, op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& cos, const at::Tensor& sin,
                                             const std::optional<at::Tensor>& position_ids,
                                             bool interleaved) {
  const Tables tb = check_inputs_cuda(q, k, cos, sin, position_ids);
  const c10::cuda::CUDAGuard guard(q.device());
  return {rotated(q, tb, interleaved, false, "rope"), rotated(k, tb, interleaved, false, "rope")};
}

// The rotation is orthogonal, so its backward is the rotation by -angle.
std::tuple<at::Tensor, at::Tensor> rope_backward_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                      const at::Tensor& cos, const at::Tensor& sin,
                                                      const std::optional<at::Tensor>& position_ids,
                                                      bool interleaved) {
  const Tables tb = check_inputs_cuda(grad_q, grad_k, cos, sin, position_ids);
  const c10::cuda::CUDAGuard guard(grad_q.device());
  return {rotated(grad_q, tb, interleaved, true, "rope_backward"),
          rotated(grad_k, tb, interleaved, true, "rope_backward")};
}

void rotate_inplace(const at::Tensor& x, const Tables& tb, bool interleaved) {
  const Rows rows = rope_glue::as_rows(x);
  apply(rows, rows, tb, interleaved, false, "rope_");
  if (!rows.t.is_same(x)) const_cast<at::Tensor&>(x).copy_(rows.t);  // layout needed a copy
}

void rope_inplace_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                       const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
                       bool interleaved) {
  const Tables tb = check_inputs_cuda(q, k, cos, sin, position_ids);
  const c10::cuda::CUDAGuard guard(q.device());
  rope_glue::check_rope_inplace_targets(q, k);
  rotate_inplace(q, tb, interleaved);
  rotate_inplace(k, tb, interleaved);
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CUDA, m) {
  m.impl("rope", &fastpt::rope_cuda);
  m.impl("rope_backward", &fastpt::rope_backward_cuda);
  m.impl("rope_", &fastpt::rope_inplace_cuda);
}
