// Packed int8 weights with ATen ops (int8_weight.h), registered for every device.
#include "ops/int8/int8_weight.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/constant_pad_nd.h>
#include <torch/library.h>

#include "common/glue.h"
#include "ops/int8/int8.h"
#include "ops/int8/int8_checks.h"

namespace fastpt {

std::tuple<at::Tensor, at::Tensor> pack_int8_weight(const at::Tensor& w) {
  check_int8(w, "weight");
  TORCH_CHECK_VALUE(w.dim() == 2, "weight must be 2-D (out_features, in_features), got shape ", w.sizes());
  const int64_t n = w.size(0), k = w.size(1), n_pad = round_up(n, kPadN), k_pad = round_up(k, kPadK);
  const at::Tensor wp = at::constant_pad_nd(w, {0, k_pad - k, 0, n_pad - n}, 0);
  at::Tensor packed = wp.view({n_pad / kPanelN, kPanelN, k_pad / 4, 4}).permute({0, 2, 1, 3}).contiguous();
  return {packed, wp.sum(1, false, at::kInt)};
}

at::Tensor unpack_int8_weight(const at::Tensor& packed, int64_t n, int64_t k) {
  check_int8(packed, "packed");
  TORCH_CHECK_VALUE(packed.dim() == 4 && packed.size(2) == kPanelN && packed.size(3) == 4 &&
                        n >= 0 && k >= 0 && round_up(n, kPadN) == packed.size(0) * kPanelN &&
                        round_up(k, kPadK) == packed.size(1) * 4,
                    "packed of shape ", packed.sizes(), " is not a packed (", n, ", ", k, ") weight");
  return packed.permute({0, 2, 1, 3})
      .reshape({packed.size(0) * kPanelN, packed.size(1) * 4})
      .narrow(0, 0, n)
      .narrow(1, 0, k)
      .contiguous();
}

at::Tensor dequantize_weight_columns(const at::Tensor& packed, const at::Tensor& scale, int64_t n,
                                     int64_t k, const at::Tensor& cols, at::ScalarType dtype) {
  const int64_t k_pad = round_up(k, kPadK);
  const at::Tensor rows = at::arange(n, cols.options()).unsqueeze(1);
  const at::Tensor c = cols.unsqueeze(0);
  // packed_offset(n, k, k_pad) of int8.h, elementwise
  const at::Tensor offsets = rows.div(kPanelN, "floor")
                                 .mul(k_pad / 4)
                                 .add(c.div(4, "floor"))
                                 .mul(kPanelN * 4)
                                 .add(rows.remainder(kPanelN).mul(4))
                                 .add(c.remainder(4));
  return packed.view({-1}).take(offsets).to(at::kFloat).mul_(scale.unsqueeze(1)).to(dtype);
}

void check_dropout(const std::optional<at::Tensor>& seed, double p) {
  TORCH_CHECK_VALUE(p >= 0 && p < 1, "dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(p == 0 || (seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong),
                    "dropout needs a seed: a one-element int64 tensor");
}

uint64_t dropout_seed(const std::optional<at::Tensor>& seed, double p) {
  check_dropout(seed, p);
  if (p == 0) return 0;
  return static_cast<uint64_t>(seed->cpu().item<int64_t>());
}

namespace {
at::Tensor unpack_op(const at::Tensor& packed, int64_t n, int64_t k) { return unpack_int8_weight(packed, n, k); }
}  // namespace

}  // namespace fastpt

TORCH_LIBRARY_IMPL(fastpt, CompositeExplicitAutograd, m) {
  m.impl("pack_int8_weight", &fastpt::pack_int8_weight);
  m.impl("unpack_int8_weight", &fastpt::unpack_op);
}
