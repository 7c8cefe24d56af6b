// Value-iteration CUDA kernels: Jacobi Bellman sweeps with the max over actions fused, the
// same formulas as value_iteration_kernel.cpp (CPU), float32 and float64.
//
// Parallel split: a warp per state. Sparse: for each action the 32 lanes stride over the
// row's nonzeros (coalesced reads of values and indices, random reads of V, which the L2
// holds for S up to ~10^7) and a shuffle reduction gives the row sum to every lane. Dense:
// blocks of kWarpsPerBlock warps take a tile of as many consecutive states (a block per row
// tile); each warp reads its rows with the lanes striding over the columns (coalesced), V
// from L1/L2. Lane 0 keeps the best action and the change of V.
//
// Sweeps: one launch per sweep (the next sweep needs every state's new value: a grid-wide
// dependency), ping-ponging between v_out and v_work as the CPU kernel does. Each block
// writes the min/max of dV over its states to its own slot (no atomics: deterministic); a
// one-block kernel reduces them into stats[sweep] and, when the residual is below tol,
// raises a device flag that turns the remaining sweeps into no-ops (NaN stats) without a
// host synchronisation. A last kernel copies v_work to v_out when the last sweep run wrote
// v_work.
//
// Bytes per sweep: as on the CPU (sparse: values + indices + row pointers + R + V + V' +
// policy; dense: A*S*S values). Not measured: no GPU here.
#include "common/cuda_compat.h"
#include "common/portable.h"
#include "ops/value_iteration/value_iteration.h"
#include "ops/value_iteration/value_iteration_cuda.h"

namespace fastpt {
namespace {

using cuda::kWarp;
using cuda::warp_sum;

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * kWarp;
constexpr int kReduceThreads = 256;

template <typename T>
FASTPT_DEVICE T infinity() {
  if constexpr (std::is_same_v<T, double>) return __longlong_as_double(0x7ff0000000000000LL);
  else return __int_as_float(0x7f800000);
}

// Sparse row: sum over the nonzeros of row r of w[k] * v[idx[k]], in every lane.
template <typename T, typename IP, typename IX>
struct SparseRows {
  const IP* indptr;
  const IX* idx;
  const T* w;
  FASTPT_DEVICE T dot(int64_t i, int64_t act, int64_t actions, const T* v, int lane) const {
    const int64_t r = i * actions + act;
    const int64_t b = static_cast<int64_t>(indptr[r]), e = static_cast<int64_t>(indptr[r + 1]);
    T acc = 0;
    for (int64_t k = b + lane; k < e; k += kWarp) acc += w[k] * v[static_cast<int64_t>(idx[k])];
    return warp_sum(acc);
  }
};

// Dense row (a, i) of p: lanes stride over the num_states columns.
template <typename T>
struct DenseRows {
  const T* p;
  int64_t action_stride, row_stride, n;
  FASTPT_DEVICE T dot(int64_t i, int64_t act, int64_t, const T* v, int lane) const {
    const T* row = p + act * action_stride + i * row_stride;
    T acc = 0;
    for (int64_t j = lane; j < n; j += kWarp) acc += row[j] * v[j];
    return warp_sum(acc);
  }
};

// One sweep over the local states, a warp per state; block_mm[2*blockIdx.x + {0,1}] gets the
// block's min and max of dV. Returns at once (every thread alike) once *done is set.
template <typename T, typename Rows>
__global__ void vi_sweep_kernel(Rows rows, const T* __restrict__ reward, const T* __restrict__ src,
                                T* __restrict__ dst, int64_t* __restrict__ policy, T* __restrict__ q,
                                double* __restrict__ block_mm, const int* __restrict__ done,
                                int64_t states, int64_t actions, int64_t first, T gamma) {
  __shared__ double smin[kWarpsPerBlock], smax[kWarpsPerBlock];
  if (*done) return;
  const int warp = static_cast<int>(threadIdx.x) / kWarp, lane = static_cast<int>(threadIdx.x) % kWarp;
  T dmin = infinity<T>(), dmax = -infinity<T>();
  T nonfinite = 0;  // d - d: 0, or NaN once a change is NaN or infinite (values overflowed)
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; i < states;
       i += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    T best = -infinity<T>();
    int64_t best_a = 0;
    for (int64_t act = 0; act < actions; ++act) {
      const T qa = reward[i * actions + act] + gamma * rows.dot(i, act, actions, src, lane);
      if (q != nullptr && lane == 0) q[i * actions + act] = qa;
      if (qa > best) {
        best = qa;
        best_a = act;
      }
    }
    const T d = best - src[first + i];
    dmin = d < dmin ? d : dmin;
    dmax = d > dmax ? d : dmax;
    nonfinite += d - d;
    if (lane == 0) {
      dst[i] = best;
      policy[i] = best_a;
    }
  }
  if (lane == 0) {  // as on the CPU: a non-finite change gives an infinite residual, never met
    const bool finite = nonfinite == 0;
    smin[warp] = finite ? static_cast<double>(dmin) : -infinity<double>();
    smax[warp] = finite ? static_cast<double>(dmax) : infinity<double>();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double lo = smin[0], hi = smax[0];
    for (int k = 1; k < kWarpsPerBlock; ++k) {
      lo = smin[k] < lo ? smin[k] : lo;
      hi = smax[k] > hi ? smax[k] : hi;
    }
    block_mm[2 * blockIdx.x] = lo;
    block_mm[2 * blockIdx.x + 1] = hi;
  }
}

// One block: stats[sweep] = min/max over the blocks' slots; sets *done and *last.
__global__ void vi_reduce_kernel(const double* __restrict__ block_mm, int nblocks,
                                 double* __restrict__ stats, int64_t sweep, int* done,
                                 int64_t* last, double tol, bool span) {
  __shared__ double smin[kReduceThreads], smax[kReduceThreads];
  const int t = static_cast<int>(threadIdx.x);
  const bool skipped = *done != 0;
  __syncthreads();  // every thread has read *done before thread 0 may set it below
  if (skipped) {
    if (t == 0) stats[2 * sweep] = stats[2 * sweep + 1] = cuda::quiet_nan<double>();
    return;
  }
  double lo = infinity<double>(), hi = -infinity<double>();
  for (int b = t; b < nblocks; b += kReduceThreads) {
    lo = block_mm[2 * b] < lo ? block_mm[2 * b] : lo;
    hi = block_mm[2 * b + 1] > hi ? block_mm[2 * b + 1] : hi;
  }
  smin[t] = lo;
  smax[t] = hi;
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half /= 2) {
    if (t < half) {
      smin[t] = smin[t + half] < smin[t] ? smin[t + half] : smin[t];
      smax[t] = smax[t + half] > smax[t] ? smax[t + half] : smax[t];
    }
    __syncthreads();
  }
  if (t == 0) {
    // No states: no change (as on the CPU).
    const double dmin = smin[0] <= smax[0] ? smin[0] : 0.0, dmax = smin[0] <= smax[0] ? smax[0] : 0.0;
    stats[2 * sweep] = dmin;
    stats[2 * sweep + 1] = dmax;
    *last = sweep;
    const double residual = span ? dmax - dmin : (-dmin > dmax ? -dmin : dmax);
    if (residual < tol) *done = 1;
  }
}

// After the sweeps: v_out = v_work when the last sweep run wrote v_work.
template <typename T>
__global__ void vi_finish_kernel(const T* __restrict__ work, T* __restrict__ out, int64_t states,
                                 const int64_t* __restrict__ last, int64_t sweeps) {
  if ((sweeps - 1 - *last) % 2 == 0) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < states;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = work[i];
}

__global__ void vi_init_kernel(int* done, int64_t* last) {
  if (threadIdx.x == 0) {
    *done = 0;
    *last = 0;
  }
}

template <typename T, typename Rows>
cudaError_t run_sweeps(const ValueIterationArgs& a, const Rows& rows, void* scratch,
                       cudaStream_t stream) {
  const unsigned grid = value_iteration_cuda_blocks(a.states);
  double* block_mm = static_cast<double*>(scratch);
  int64_t* last = reinterpret_cast<int64_t*>(block_mm + 2 * static_cast<int64_t>(grid));
  int* done = reinterpret_cast<int*>(last + 1);
  FASTPT_LAUNCH(vi_init_kernel, 1, kWarp, 0, stream, done, last);
  const T* src = static_cast<const T*>(a.v_in);
  T* out = static_cast<T*>(a.v_out);
  T* work = static_cast<T*>(a.v_work);
  auto sweep = &vi_sweep_kernel<T, Rows>;
  for (int64_t k = 0; k < a.sweeps; ++k) {
    T* dst = (a.sweeps - 1 - k) % 2 == 0 ? out : work;
    FASTPT_LAUNCH(sweep, grid, kThreads, 0, stream, rows, static_cast<const T*>(a.reward), src, dst,
                  a.policy, static_cast<T*>(a.q), block_mm, done, a.states, a.actions,
                  a.first_state, static_cast<T>(a.gamma));
    FASTPT_LAUNCH(vi_reduce_kernel, 1, kReduceThreads, 0, stream, block_mm, static_cast<int>(grid),
                  a.stats, k, done, last, a.tol, a.span_residual);
    src = dst;
  }
  if (a.sweeps > 1) {
    auto finish = &vi_finish_kernel<T>;
    FASTPT_LAUNCH(finish, cuda::grid_for(a.states, 256), 256, 0, stream, work, out, a.states, last,
                  a.sweeps);
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch_rows(const ValueIterationArgs& a, void* scratch, cudaStream_t stream) {
  const T* w = static_cast<const T*>(a.values);
  if (a.indptr == nullptr)
    return run_sweeps<T>(a, DenseRows<T>{static_cast<const T*>(a.p), a.action_stride, a.row_stride,
                                          a.num_states}, scratch, stream);
  if (a.indptr64) {
    const int64_t* ip = static_cast<const int64_t*>(a.indptr);
    if (a.indices64)
      return run_sweeps<T>(a, SparseRows<T, int64_t, int64_t>{ip, static_cast<const int64_t*>(a.indices), w},
                           scratch, stream);
    return run_sweeps<T>(a, SparseRows<T, int64_t, int32_t>{ip, static_cast<const int32_t*>(a.indices), w},
                         scratch, stream);
  }
  const int32_t* ip = static_cast<const int32_t*>(a.indptr);
  if (a.indices64)
    return run_sweeps<T>(a, SparseRows<T, int32_t, int64_t>{ip, static_cast<const int64_t*>(a.indices), w},
                         scratch, stream);
  return run_sweeps<T>(a, SparseRows<T, int32_t, int32_t>{ip, static_cast<const int32_t*>(a.indices), w},
                       scratch, stream);
}

}  // namespace

unsigned value_iteration_cuda_blocks(int64_t states) {
  return cuda::grid_for(states, kWarpsPerBlock);
}

int64_t value_iteration_cuda_scratch_bytes(int64_t states) {
  return static_cast<int64_t>(sizeof(double)) * 2 * value_iteration_cuda_blocks(states) +
         static_cast<int64_t>(sizeof(int64_t)) + static_cast<int64_t>(sizeof(int));
}

cudaError_t value_iteration_cuda(const ValueIterationArgs& a, void* scratch, cudaStream_t stream) {
  if (a.gauss_seidel || a.sweeps < 1 || (a.sweeps > 1 && a.v_work == nullptr)) return cudaErrorInvalidValue;
  if (a.dtype == DType::kFloat64) return dispatch_rows<double>(a, scratch, stream);
  if (a.dtype == DType::kFloat32) return dispatch_rows<float>(a, scratch, stream);
  return cudaErrorInvalidValue;
}

}  // namespace fastpt
