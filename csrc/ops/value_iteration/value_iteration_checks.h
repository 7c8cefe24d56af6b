// Value-iteration input checks, shared by the CPU glue and the CUDA glue so both devices
// reject the same inputs with the same messages. O(S*A) at most per call: the CSR arrays'
// bounds are checked once per set of arrays (csr_check.h), and the probabilities themselves by
// fastpt.mdp.MDP (finite, >= 0, rows summing to 1) or fastpt.ops.value_iteration(check=True)
// (finite only: the op sweeps any matrix it is given).
#pragma once

#include <cmath>

#include "common/glue.h"
#include "ops/value_iteration/csr_check.h"
#include "ops/value_iteration/value_iteration.h"

namespace fastpt {

inline DType value_iteration_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64, got ", t.scalar_type());
  return t.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
}

inline bool index_is_64(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
                   " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  return t.scalar_type() == at::kLong;
}

// Checks reward (states, A), v (num_states,), gamma, sweeps and first_state; fills the
// common fields of the kernel arguments.
inline ValueIterationArgs value_iteration_common(const at::Tensor& reward, const at::Tensor& v,
                                                 double gamma, int64_t sweeps, double tol,
                                                 int64_t first_state) {
  ValueIterationArgs a{};
  a.dtype = value_iteration_dtype(reward, "reward");
  check_same_dtype(v, reward, "v", "reward");
  check_same_device(v, reward, "v", "reward");
  TORCH_CHECK_VALUE(reward.dim() == 2 && reward.size(1) >= 1,
                    "reward must have shape (states, actions) with actions >= 1, got ", reward.sizes());
  TORCH_CHECK_VALUE(v.dim() == 1, "v must be 1-D (one value per state), got shape ", v.sizes());
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma > 0 && gamma <= 1,
                    "gamma must be in (0, 1], got ", gamma);
  TORCH_CHECK_VALUE(sweeps >= 1, "sweeps must be >= 1, got ", sweeps);
  TORCH_CHECK_VALUE(!std::isnan(tol), "tol must not be NaN");
  a.states = reward.size(0);
  a.actions = reward.size(1);
  a.num_states = v.size(0);
  a.first_state = first_state;
  // (first_state + states could overflow: compare against num_states - states instead)
  TORCH_CHECK_VALUE(first_state >= 0 && first_state <= a.num_states - a.states,
                    "states [first_state, first_state + reward.shape[0]) with first_state = ",
                    first_state, " and ", a.states, " states must lie within the ", a.num_states,
                    " states of v");
  TORCH_CHECK_VALUE(sweeps == 1 || (first_state == 0 && a.states == a.num_states),
                    "sweeps > 1 needs the whole MDP (first_state 0 and reward.shape[0] == v.shape[0]); "
                    "a partition of the states runs one sweep per call");
  a.sweeps = sweeps;
  a.gamma = gamma;
  a.tol = tol;
  return a;
}

inline void value_iteration_check_sparse(const at::Tensor& indptr, const at::Tensor& indices,
                                         const at::Tensor& values, const at::Tensor& reward,
                                         ValueIterationArgs& a) {
  a.indptr64 = index_is_64(indptr, "indptr");
  a.indices64 = index_is_64(indices, "indices");
  check_same_dtype(values, reward, "values", "reward");
  check_same_device(values, reward, "values", "reward");
  check_same_device(indptr, reward, "indptr", "reward");
  check_same_device(indices, reward, "indices", "reward");
  TORCH_CHECK_VALUE(values.dim() == 1 && values.size(0) == indices.size(0),
                    "values must be 1-D with one probability per index (", indices.size(0),
                    "), got shape ", values.sizes());
  TORCH_CHECK_VALUE(indptr.size(0) == a.states * a.actions + 1,
                    "indptr must have states * actions + 1 = ", a.states * a.actions + 1,
                    " entries (rows in state-major order s * actions + a), got ", indptr.size(0));
  check_csr_arrays(indptr, indices, a.num_states);
}

inline void value_iteration_check_dense(const at::Tensor& p, const at::Tensor& reward,
                                        ValueIterationArgs& a) {
  check_same_dtype(p, reward, "p", "reward");
  check_same_device(p, reward, "p", "reward");
  TORCH_CHECK_VALUE(p.dim() == 3 && p.size(0) == a.actions && p.size(1) == a.states &&
                        p.size(2) == a.num_states,
                    "p must have shape (actions, states, num_states) = (", a.actions, ", ", a.states,
                    ", ", a.num_states, "), got ", p.sizes());
}

}  // namespace fastpt
