// The packed int8 weight (layout in int8.h) built and read with ATen ops, so the same code
// serves every device: packing (once per weight), unpacking (for the backward and for
// merging LoRA), and the dequantized columns of LLM.int8's outlier features.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fastpt {

// (packed, colsum) of an (n, k) int8 weight; colsum (n_pad) int32 = sum_k w[n][k].
std::tuple<at::Tensor, at::Tensor> pack_int8_weight(const at::Tensor& w);
// The (n, k) int8 weight back from its packed form.
at::Tensor unpack_int8_weight(const at::Tensor& packed, int64_t n, int64_t k);
// (n, len(cols)) = w[:, cols] * scale[:, None] in dtype (computed in float32).
at::Tensor dequantize_weight_columns(const at::Tensor& packed, const at::Tensor& scale, int64_t n,
                                     int64_t k, const at::Tensor& cols, at::ScalarType dtype);
// Checks dropout_p in [0, 1) and, when p > 0, the seed: a one-element int64 tensor.
void check_dropout(const std::optional<at::Tensor>& seed, double p);
// check_dropout, then the seed's value (read on the host); 0 when p == 0.
uint64_t dropout_seed(const std::optional<at::Tensor>& seed, double p);

}  // namespace fastpt
