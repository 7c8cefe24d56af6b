// The CSR arrays' own consistency, checked by the value-iteration ops themselves: the sweep
// reads indices[indptr[r] .. indptr[r + 1]) and V at those indices with no bounds checks, so
// a bad array would read outside memory. The check is O(nnz) (as much as a sweep), so it
// runs once per set of arrays and is remembered: a solver or a benchmark calls the op many
// times on the same arrays. Glue only (ATen ops, any device).
//
// A remembered set is keyed by each array's storage (held weakly: a freed storage whose
// address is reused does not match), dtype, offset, size, stride and version counter, so an
// in-place torch write to either array, or the same memory read as another dtype (an int32
// array viewed as int64), is checked again. Writes that bypass the version counter (through
// `.data`, a numpy view of the same memory, raw pointers) are not seen.
#pragma once

#include <ATen/ops/aminmax.h>
#include <c10/core/Storage.h>

#include <array>
#include <mutex>
#include <vector>

#include "common/glue.h"

namespace fastpt {

struct CsrArraysKey {
  struct Array {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    const c10::StorageImpl* address;
    c10::ScalarType dtype;
    int64_t offset, numel, stride, version;

    explicit Array(const at::Tensor& t)
        : storage(t.storage().getWeakStorageImpl()), address(t.storage().unsafeGetStorageImpl()),
          dtype(t.scalar_type()), offset(t.storage_offset()), numel(t.numel()), stride(t.stride(0)),
          version(t._version()) {}

    bool same(const Array& o) const {
      return !storage.expired() && address == o.address && dtype == o.dtype && offset == o.offset &&
             numel == o.numel && stride == o.stride && version == o.version;
    }
  };
  Array indptr, indices;
  int64_t num_states;

  bool same(const CsrArraysKey& o) const {
    return num_states == o.num_states && indptr.same(o.indptr) && indices.same(o.indices);
  }
};

// indptr non-decreasing, within [0, indices.numel()], and every successor it points at in
// [0, num_states); a ValueError naming the first problem otherwise.
inline void check_csr_arrays_now(const at::Tensor& indptr, const at::Tensor& indices,
                                 int64_t num_states) {
  const int64_t rows = indptr.numel() - 1;
  const int64_t first = indptr[0].item<int64_t>(), last = indptr[rows].item<int64_t>();
  TORCH_CHECK_VALUE(first >= 0 && last <= indices.numel(), "indptr must point within the ",
                    indices.numel(), " indices, got indptr[0] = ", first, " and indptr[-1] = ", last);
  TORCH_CHECK_VALUE(rows == 0 || indptr.slice(0, 1).ge(indptr.slice(0, 0, rows)).all().item<bool>(),
                    "indptr must be non-decreasing");
  if (last > first) {
    const auto [lo, hi] = at::aminmax(indices.slice(0, first, last));
    const int64_t min_ix = lo.item<int64_t>(), max_ix = hi.item<int64_t>();
    TORCH_CHECK_VALUE(min_ix >= 0 && max_ix < num_states, "successor indices must be in [0, ",
                      num_states, "), got values in [", min_ix, ", ", max_ix, "]");
  }
}

inline void check_csr_arrays(const at::Tensor& indptr, const at::Tensor& indices, int64_t num_states) {
  if (indptr.is_meta() || indices.is_meta()) return;  // no data (shape checks only)
  if (indptr.is_inference() || indices.is_inference()) {  // no version counter: always check
    check_csr_arrays_now(indptr, indices, num_states);
    return;
  }
  static std::mutex mutex;
  static std::vector<CsrArraysKey> checked;  // the last few sets, oldest first
  const CsrArraysKey key{CsrArraysKey::Array(indptr), CsrArraysKey::Array(indices), num_states};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    for (const auto& k : checked)
      if (k.same(key)) return;
  }
  check_csr_arrays_now(indptr, indices, num_states);
  const std::lock_guard<std::mutex> lock(mutex);
  if (checked.size() == 8) checked.erase(checked.begin());
  checked.push_back(key);
}

}  // namespace fastpt
