// Value iteration: Bellman sweeps V'(s) = max_a [R(s,a) + gamma * sum_s' P(s'|s,a) V(s')] with
// the max over actions fused, the greedy policy, and the change dV = V' - V per sweep.
// Argument structs shared by the CPU kernel file, the CUDA kernel file and the glue.
//
// Layouts. Sparse: one CSR with rows in state-major order, row s*A + a holds P(.|s,a); an
// empty row is an exit (terminal state: Q(s,a) = R(s,a)). Dense: P (A, S_total) rows of
// length S_total, row (a, s) at p + a*action_stride + s*row_stride. Reward (S, A) contiguous.
//
// Partitions. A call updates `states` consecutive states starting at global state
// `first_state` and reads the values of all `num_states` states (v_in); distributed value
// iteration gives each rank its own block of states. Several sweeps per call need the whole
// MDP (first_state == 0, states == num_states).
//
// Gauss-Seidel: the states are split into min(states, kGaussSeidelPhases) phases of
// consecutive states (phase j: local states [j*S/P, (j+1)*S/P)), run one after the other, the
// blocks of kGaussSeidelBlock states of a phase in parallel. A state reads this sweep's value
// of a successor in an earlier phase and the previous sweep's value of every other successor
// (its own phase included). Phases and blocks depend on the number of states only, so the
// result does not depend on the thread count.
// NOTE: on the random S = 200k, A = 4, K = 16 MDP at gamma 0.9 (successors uniform over all
// states), the earlier rule (in place within each block of 256 states, Jacobi across blocks)
// needed Jacobi's 158 sweeps: a successor is almost never in the state's own block.
#pragma once
#include <cstdint>

#include "common/portable.h"

namespace fastpt {

constexpr int64_t kGaussSeidelBlock = 256;
constexpr int64_t kGaussSeidelPhases = 16;

struct ValueIterationArgs {
  // Sparse (indptr != nullptr): CSR of states*actions rows.
  const void* indptr;   // (states*actions + 1) int32 or int64, indptr[0] may be != 0
  const void* indices;  // successor states in [0, num_states), int32 or int64
  bool indptr64, indices64;
  // Dense (indptr == nullptr): p points at row (a=0, s=first_state).
  const void* p;
  int64_t action_stride, row_stride;  // in elements
  const void* values;   // sparse: nonzero probabilities (same dtype as reward)
  const void* reward;   // (states, actions)
  const void* v_in;     // (num_states)
  void* v_out;          // (states)
  void* v_work;         // Jacobi: (states) scratch for more than one sweep, else unused;
                        // Gauss-Seidel: (num_states), always
  int64_t* policy;      // (states) argmax over actions (first one on ties)
  void* q;              // (states, actions) Q of the last sweep, or nullptr
  double* stats;        // (sweeps, 2): min and max over states of V' - V per sweep; NaN if not run
  int64_t states, actions, num_states, first_state, sweeps;
  double gamma;
  double tol;          // stop after a sweep whose residual is < tol (0: run all sweeps)
  bool span_residual;  // residual = max dV - min dV (span), else max |dV| (sup)
  bool gauss_seidel;
  DType dtype;          // kFloat32 or kFloat64
};

}  // namespace fastpt
