// RoPE input checks and the (B, M, T, D) strided view, shared by the CPU glue (rope_cpu.cpp)
// and the CUDA glue (rope_cuda.cpp) so both devices accept the same inputs.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/zeros.h>
#include <optional>

#include "common/glue.h"
#include "ops/rope/rope.h"

namespace fastpt::rope_glue {

// x (..., T, D) as (B, M, T, D) strides without copying where the layout allows it:
// B = dim 0 (1 for 2-D input), M = the dims between B and T.
struct Rows {
  at::Tensor t;
  int64_t B, M, T, D, sb, sm, st;
};

inline Rows as_rows(at::Tensor x) {
  if (x.stride(-1) != 1 || x.dim() > 4) x = x.contiguous();
  const int64_t d = x.dim(), T = x.size(-2), D = x.size(-1);
  if (d == 2) return {x, 1, 1, T, D, 0, 0, x.stride(0)};
  if (d == 3) return {x, x.size(0), 1, T, D, x.stride(0), 0, x.stride(1)};
  if (d == 4) return {x, x.size(0), x.size(1), T, D, x.stride(0), x.stride(1), x.stride(2)};
  const int64_t B = x.size(0), M = x.numel() / std::max<int64_t>(B * T * D, 1);
  return {x, B, M, T, D, M * T * D, T * D, D};  // contiguous
}

struct Tables {
  at::Tensor cos, sin;  // (P, R) contiguous; float64 for float64 q (tables are tiny)
  int64_t P, R;
  at::Tensor pos;  // int64 contiguous, or undefined
  int64_t pos_sb;
};

// Where position_ids are checked against [0, P).
enum class PositionCheck {
  kHost,    // aminmax + item: a ValueError, at the cost of a device->host sync (CPU glue)
  kDevice,  // left to the kernel, which writes NaN for bad rows (CUDA glue, see rope_cuda.h)
};

inline Tables check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                           const at::Tensor& sin, const std::optional<at::Tensor>& position_ids,
                           PositionCheck position_check) {
  float_dtype(q, "q");
  check_same_dtype(k, q, "k", "q");
  check_same_device(k, q, "k", "q");
  TORCH_CHECK_VALUE(q.dim() >= 2 && k.dim() >= 2, "q and k must be (..., T, D), got shapes ",
                    q.sizes(), " and ", k.sizes());
  TORCH_CHECK_VALUE(q.size(-1) == k.size(-1) && q.size(-2) == k.size(-2),
                    "q and k must have the same T and D, got shapes ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK_VALUE(q.dim() == 2 || k.dim() == 2 || q.size(0) == k.size(0),
                    "q and k must have the same batch size (dim 0), got ", q.size(0), " and ", k.size(0));
  float_dtype(cos, "cos");
  TORCH_CHECK_TYPE(cos.scalar_type() == at::kFloat || cos.scalar_type() == q.scalar_type(),
                   "cos and sin must be float32 or the dtype of q (", q.scalar_type(), "), got ",
                   cos.scalar_type());
  check_same_dtype(sin, cos, "sin", "cos");
  check_same_device(cos, q, "cos", "q");
  check_same_device(sin, q, "sin", "q");
  check_same_shape(sin, cos, "sin", "cos");
  const int64_t D = q.size(-1), T = q.size(-2);
  TORCH_CHECK_VALUE(cos.dim() == 2 && cos.size(1) >= 1 && 2 * cos.size(1) <= D,
                    "cos and sin must be (P, R) tables with 1 <= R <= D/2 = ", D / 2, ", got ", cos.sizes());
  const int64_t P = cos.size(0), R = cos.size(1);
  const bool f64 = q.scalar_type() == at::kDouble;
  Tables tb{(f64 ? cos.to(at::kDouble) : cos).contiguous(), (f64 ? sin.to(at::kDouble) : sin).contiguous(),
            P, R, at::Tensor(), 0};
  if (!position_ids.has_value()) {
    TORCH_CHECK_VALUE(T <= P, "without position_ids, positions are 0..T-1: T = ", T,
                      " needs at least T rows in cos/sin, got ", P);
    return tb;
  }
  const at::Tensor& pos = *position_ids;
  check_same_device(pos, q, "position_ids", "q");
  TORCH_CHECK_TYPE(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt,
                   "position_ids must be int64 or int32, got ", pos.scalar_type());
  const int64_t B = q.dim() > 2 ? q.size(0) : k.dim() > 2 ? k.size(0) : 1;
  TORCH_CHECK_VALUE((pos.dim() == 1 && pos.size(0) == T) ||
                        (pos.dim() == 2 && pos.size(1) == T && (pos.size(0) == B || pos.size(0) == 1)),
                    "position_ids must be (T,) or (B, T) = (", B, ", ", T, "), got ", pos.sizes());
  // A 2-D q or k has no batch dim: rows of positions per batch cannot all apply to it (the
  // kernel would rotate it by the first row).
  TORCH_CHECK_VALUE(pos.dim() == 1 || pos.size(0) == 1 || (q.dim() > 2 && k.dim() > 2),
                    "position_ids with one row per batch (", pos.sizes(), ") need q and k both batched, got "
                    "q ", q.sizes(), " and k ", k.sizes(), ": a 2-D q or k has no batch to match them");
  tb.pos = pos.to(at::kLong).contiguous();
  tb.pos_sb = (pos.dim() == 2 && pos.size(0) == B && B > 1) ? T : 0;
  if (position_check == PositionCheck::kHost && tb.pos.numel() > 0) {
    auto [lo, hi] = at::aminmax(tb.pos);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < P, "position_ids must lie in [0, ", P,
                      ") (rows of cos/sin), got values in [", lo_v, ", ", hi_v, "]");
  }
  return tb;
}

// Kernel arguments rotating src into dst (dst may be src: in place).
// rope_ writes q and k in place: neither may have elements sharing memory (an expanded view)
// and they may not share any element with each other (each would be rotated twice).
// ATen's overlap test decides most layouts at once; two strided views of one storage (q and k
// sliced from a packed qkv, say) it cannot decide, and then the element offsets are compared
// exactly: O(numel + the storage span they cover), only in that case.
inline void check_rope_inplace_targets(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(q) != at::MemOverlap::Yes &&
                        at::has_internal_overlap(k) != at::MemOverlap::Yes,
                    "rope_: q and k must not have elements that share memory (an expanded view?); "
                    "use fastpt.ops.rope");
  // Separate storages never overlap; ATen says "too hard" for any non-dense tensor, and the
  // offsets below only mean something within one storage.
  if (!q.is_alias_of(k)) return;
  const at::MemOverlapStatus status = at::get_overlap_status(q, k);
  bool overlap = status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
  if (status == at::MemOverlapStatus::TooHard && q.numel() > 0 && k.numel() > 0) {
    const int64_t base = std::min(q.storage_offset(), k.storage_offset());
    auto offsets = [&](const at::Tensor& t) {  // storage offsets of t's elements, from base
      int64_t span = 1;
      for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
      const int64_t start = t.storage_offset() - base;
      return at::arange(start + span, at::TensorOptions().dtype(at::kLong).device(t.device()))
          .as_strided(t.sizes(), t.strides(), start)
          .reshape({-1});
    };
    const at::Tensor oq = offsets(q), ok = offsets(k);
    const int64_t size = std::max(oq.max().item<int64_t>(), ok.max().item<int64_t>()) + 1;
    at::Tensor seen = at::zeros({size}, oq.options().dtype(at::kBool));
    seen.index_fill_(0, oq, true);
    overlap = seen.index_select(0, ok).any().item<bool>();
  }
  TORCH_CHECK_VALUE(!overlap, "rope_: q and k share memory (each element would be rotated twice); "
                    "pass separate tensors or use fastpt.ops.rope");
}

inline RopeArgs make_args(const Rows& src, const Rows& dst, const Tables& tb, bool interleaved,
                          bool conjugate) {
  return {src.t.const_data_ptr(), dst.t.mutable_data_ptr(), src.B, src.M, src.T, src.D,
          src.sb, src.sm, src.st, dst.sb, dst.sm, dst.st, tb.cos.const_data_ptr(),
          tb.sin.const_data_ptr(), tb.P, tb.R,
          tb.pos.defined() ? tb.pos.const_data_ptr<int64_t>() : nullptr, tb.pos_sb,
          interleaved, conjugate, float_dtype(src.t, "q"), float_dtype(tb.cos, "cos")};
}

}  // namespace fastpt::rope_glue
