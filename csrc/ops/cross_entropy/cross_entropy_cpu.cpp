// Softmax cross-entropy CPU glue: checks, output, dispatch to the CPU kernel build for this
// machine. CPU only: fastpt.models.loss keeps eager PyTorch on other devices.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/cpu_dispatch.h"
#include "common/glue.h"
#include "ops/cross_entropy/cross_entropy.h"

FASTPT_DECLARE_CPU_KERNEL(softmax_xent, fastpt::SoftmaxXentArgs)

namespace fastpt {
namespace {

// Row losses (float32; float64 for float64 logits). With write_grad, logits are overwritten
// with d(grad_scale * sum of row losses)/d(logits).
at::Tensor softmax_cross_entropy_cpu(at::Tensor& logits, const at::Tensor& labels, double grad_scale,
                                     int64_t ignore_index, bool write_grad) {
  const DType dtype = float_dtype(logits, "softmax_cross_entropy_: logits");
  TORCH_CHECK_VALUE(logits.dim() == 2, "softmax_cross_entropy_: logits must be 2-D (rows, classes), got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.stride(1) == 1 || logits.size(1) <= 1,
                    "softmax_cross_entropy_: logits must have unit stride along classes (it is written in "
                    "place), got strides ", logits.strides());
  TORCH_CHECK_VALUE(!write_grad || logits.size(0) <= 1 || logits.stride(0) >= logits.size(1),
                    "softmax_cross_entropy_: logits rows overlap (row stride ", logits.stride(0), " < ",
                    logits.size(1), " classes); with write_grad it is written in place");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "softmax_cross_entropy_: labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == logits.size(0),
                    "softmax_cross_entropy_: labels must have shape (", logits.size(0), "), got ", labels.sizes());
  check_same_device(labels, logits, "softmax_cross_entropy_: labels", "logits");
  const int64_t rows = logits.size(0), cols = logits.size(1);
  const at::Tensor lab = labels.contiguous();
  const int64_t* l = lab.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(l[r] == ignore_index || (l[r] >= 0 && l[r] < cols), "softmax_cross_entropy_: label ",
                      l[r], " in row ", r, " is outside [0, ", cols, ") and is not ignore_index (",
                      ignore_index, ")");
  }
  at::Tensor loss = at::empty({rows}, logits.options().dtype(compute_type(logits.scalar_type())));
  if (rows == 0) return loss;
  TORCH_CHECK_VALUE(cols > 0, "softmax_cross_entropy_: logits has no classes (shape ", logits.sizes(), ")");
  cpu::softmax_xent({logits.mutable_data_ptr(), rows, cols, logits.stride(0), l, ignore_index, grad_scale,
                     write_grad, loss.mutable_data_ptr(), dtype});
  return loss;
}

}  // namespace
}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CPU, m) { m.impl("softmax_cross_entropy_", &fastpt::softmax_cross_entropy_cpu); }
