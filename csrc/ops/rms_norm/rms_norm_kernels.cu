// RMSNorm CUDA kernels: y = (x * rstd) * w, rstd = 1 / sqrt(mean(x^2) + eps) per row of n
// features, and its backward (dx, and dw as per-block partial sums). Storage fp32 / bf16 /
// fp16 with fp32 arithmetic (double for float64 storage), the same formulas and operation
// order as rms_norm_kernel.cpp (CPU); rstd and the partials are in the compute type.
//
// Parallel split. A row is handled by one "row group": a warp when n <= kWarpRowMaxN (4 warps,
// so 4 rows, per 128-thread block), else the whole block (32..1024 threads, about one 16-byte
// access per thread and pass). Each thread of a group owns the columns j = lane*V + k*group*V,
// V = 16 / sizeof(T) (one 16-byte load) when n % V == 0 and the pointers are 16-byte aligned,
// else V = 1: any n works (1, 3, 13, 4097). The row sum is a warp shuffle reduction, plus one
// pass through shared memory in block mode.
//   forward: grid-stride over rows; pass 1 sums x^2, pass 2 writes y and rstd.
//   backward: block p owns the contiguous rows [p*per, (p+1)*per) and row p of dw_partial
//     (num_partials = gridDim.x rows, no atomics, deterministic); the glue sums the partial
//     rows. Pass 1 sums dy*w*xhat for the row's mean term and adds dy*xhat into the block's
//     dw accumulator; pass 2 writes dx. The accumulator lives in shared memory (one row per
//     warp in warp mode, summed at the end; one row per block in block mode while it fits in
//     kSmemAccMaxBytes) or directly in the block's own dw_partial row (larger n). Every
//     thread only touches its own columns of its accumulator row, so no barrier is needed
//     until the final sum.
//
// Bytes moved, s = sizeof(T), a = sizeof(compute type): forward reads x and writes y
// (2*rows*n*s) plus w (n*s) and rstd (a*rows); backward reads dy, x and writes dx
// (3*rows*n*s), plus a*num_partials*n for the partials. Each second pass re-reads the row
// just read, which L1/L2 should serve (not measured: no GPU here).
#include "common/cuda_compat.h"
#include "common/portable.h"
#include "ops/rms_norm/rms_norm.h"
#include "ops/rms_norm/rms_norm_cuda.h"

namespace fastpt {
namespace {

using cuda::acc_t;
using cuda::aligned_to;
using cuda::block_sum;
using cuda::dynamic_smem;
using cuda::kWarp;
using cuda::load_acc;
using cuda::store_acc;
using cuda::vec_width;
using cuda::warp_sum;

constexpr int64_t kWarpRowMaxN = 1024;  // up to here a warp per row: 32 values per lane at most
constexpr int kWarpsPerBlock = 4;       // warp mode: rows per block
constexpr size_t kSmemAccMaxBytes = 32768;  // backward, block mode: dw accumulator in smem

// Where a thread sits: its row group (warp or block), lane in that group, group size.
struct Group {
  int id, lane, size, per_block;
};

FASTPT_DEVICE Group row_group(bool warp_rows) {
  if (warp_rows)
    return {static_cast<int>(threadIdx.x) / kWarp, static_cast<int>(threadIdx.x) % kWarp, kWarp,
            static_cast<int>(blockDim.x) / kWarp};
  return {0, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), 1};
}

// Sum over the row group. In block mode every thread of the block must call it.
template <typename A>
FASTPT_DEVICE A group_sum(A v, bool warp_rows, A* scratch) {
  return warp_rows ? warp_sum(v) : block_sum(v, scratch);
}

// 1 / sqrt(mean + eps) in the compute type, as the CPU kernel computes it (IEEE sqrt and
// division, not rsqrt), so both devices agree on rstd.
template <typename A>
FASTPT_DEVICE A rstd_of(A sum_sq, int64_t n, double eps) {
  return A(1) / sqrt(sum_sq / static_cast<A>(n) + static_cast<A>(eps));
}

template <typename T, int V>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                    T* __restrict__ y, acc_t<T>* __restrict__ rstd, int64_t rows,
                                    int64_t n, double eps, bool warp_rows) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarp];
  const Group g = row_group(warp_rows);
  const int64_t step = static_cast<int64_t>(g.size) * V;
  // Uniform over the row group, so block mode's barriers are reached by every thread.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * g.per_block + g.id; row < rows;
       row += static_cast<int64_t>(gridDim.x) * g.per_block) {
    const T* xr = x + row * n;
    T* yr = y + row * n;
    A sum_sq = 0;
    for (int64_t j = static_cast<int64_t>(g.lane) * V; j < n; j += step) {
      A f[V];
      load_acc<V>(xr + j, f);
#pragma unroll
      for (int k = 0; k < V; ++k) sum_sq += f[k] * f[k];
    }
    const A r = rstd_of(group_sum(sum_sq, warp_rows, scratch), n, eps);
    if (g.lane == 0) rstd[row] = r;
    for (int64_t j = static_cast<int64_t>(g.lane) * V; j < n; j += step) {
      A f[V], wf[V];
      load_acc<V>(xr + j, f);
      load_acc<V>(w + j, wf);
#pragma unroll
      for (int k = 0; k < V; ++k) f[k] = f[k] * r * wf[k];
      store_acc<V>(yr + j, f);
    }
  }
}

template <typename T, int V>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                    const T* __restrict__ w, const acc_t<T>* __restrict__ rstd,
                                    T* __restrict__ dx, acc_t<T>* __restrict__ dw_partial,
                                    int64_t rows, int64_t n, int64_t rows_per_block,
                                    bool warp_rows, bool acc_in_smem) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarp];
  A* acc_smem = dynamic_smem<A>();  // warp mode: per_block x n; block mode: n or unused
  const Group g = row_group(warp_rows);
  const int64_t step = static_cast<int64_t>(g.size) * V;
  const int64_t lane0 = static_cast<int64_t>(g.lane) * V;
  A* dw_row = dw_partial + static_cast<int64_t>(blockIdx.x) * n;
  A* acc = warp_rows ? acc_smem + g.id * n : (acc_in_smem ? acc_smem : dw_row);
  for (int64_t j = lane0; j < n; j += step) {
#pragma unroll
    for (int k = 0; k < V; ++k) acc[j + k] = 0;
  }
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t end = first + rows_per_block < rows ? first + rows_per_block : rows;
  for (int64_t row = first + g.id; row < end; row += g.per_block) {
    const T* dyr = dy + row * n;
    const T* xr = x + row * n;
    T* dxr = dx + row * n;
    const A r = rstd[row];
    A dot = 0;  // sum over the row of dy * w * xhat
    for (int64_t j = lane0; j < n; j += step) {
      A gf[V], xf[V], wf[V];
      load_acc<V>(dyr + j, gf);
      load_acc<V>(xr + j, xf);
      load_acc<V>(w + j, wf);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A xhat = xf[k] * r;
        dot += gf[k] * wf[k] * xhat;
        acc[j + k] += gf[k] * xhat;
      }
    }
    const A c = group_sum(dot, warp_rows, scratch) / static_cast<A>(n);
    for (int64_t j = lane0; j < n; j += step) {
      A gf[V], xf[V], wf[V];
      load_acc<V>(dyr + j, gf);
      load_acc<V>(xr + j, xf);
      load_acc<V>(w + j, wf);
#pragma unroll
      for (int k = 0; k < V; ++k) gf[k] = r * (gf[k] * wf[k] - xf[k] * r * c);
      store_acc<V>(dxr + j, gf);
    }
  }
  if (!warp_rows && !acc_in_smem) return;  // accumulated straight into dw_row
  __syncthreads();
  const int per_block = warp_rows ? g.per_block : 1;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    A s = 0;
    for (int q = 0; q < per_block; ++q) s += acc_smem[q * n + j];
    dw_row[j] = s;
  }
}

// Block mode: about one V-wide access per thread and pass, in whole warps.
int block_threads(int64_t n, int V) {
  const int64_t accesses = (n + V - 1) / V;
  const int64_t threads = (accesses + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(threads < 1024 ? threads : 1024);
}

template <typename T, int V>
cudaError_t launch_fwd(const RmsNormFwdArgs& a, cudaStream_t stream) {
  const bool warp_rows = a.n <= kWarpRowMaxN;
  const int threads = warp_rows ? kWarpsPerBlock * kWarp : block_threads(a.n, V);
  const unsigned grid = cuda::grid_for(a.rows, warp_rows ? kWarpsPerBlock : 1);
  auto kernel = &rms_norm_fwd_kernel<T, V>;
  FASTPT_LAUNCH(kernel, grid, threads, 0, stream, static_cast<const T*>(a.x),
                static_cast<const T*>(a.w), static_cast<T*>(a.y), static_cast<acc_t<T>*>(a.rstd), a.rows, a.n, a.eps,
                warp_rows);
  return cudaSuccess;
}

template <typename T, int V>
cudaError_t launch_bwd(const RmsNormBwdArgs& a, cudaStream_t stream) {
  const bool warp_rows = a.n <= kWarpRowMaxN;
  const bool acc_in_smem =
      warp_rows || sizeof(acc_t<T>) * static_cast<size_t>(a.n) <= kSmemAccMaxBytes;
  const int threads = warp_rows ? kWarpsPerBlock * kWarp : block_threads(a.n, V);
  const size_t smem = acc_in_smem ? sizeof(acc_t<T>) * static_cast<size_t>(a.n) *
                                         (warp_rows ? kWarpsPerBlock : 1)
                                   : 0;
  const int64_t rows_per_block = (a.rows + a.num_partials - 1) / a.num_partials;
  auto kernel = &rms_norm_bwd_kernel<T, V>;
  FASTPT_LAUNCH(kernel, static_cast<unsigned>(a.num_partials), threads, smem, stream,
                static_cast<const T*>(a.dy), static_cast<const T*>(a.x), static_cast<const T*>(a.w),
                static_cast<const acc_t<T>*>(a.rstd), static_cast<T*>(a.dx),
                static_cast<acc_t<T>*>(a.dw_partial), a.rows, a.n, rows_per_block, warp_rows,
                acc_in_smem);
  return cudaSuccess;
}

}  // namespace

cudaError_t rms_norm_fwd_cuda(const RmsNormFwdArgs& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.n <= 0) return cudaSuccess;
  return cuda::dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec_width<T>();
    if (a.n % V == 0 && aligned_to(16, a.x, a.w, a.y)) return launch_fwd<T, V>(a, stream);
    return launch_fwd<T, 1>(a, stream);
  });
}

cudaError_t rms_norm_bwd_cuda(const RmsNormBwdArgs& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.n <= 0) return cudaSuccess;
  if (a.num_partials < 1 || a.num_partials > a.rows || a.num_partials > 0x7fffffff)
    return cudaErrorInvalidValue;
  return cuda::dispatch_float_types(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec_width<T>();
    if (a.n % V == 0 && aligned_to(16, a.dy, a.x, a.w, a.dx)) return launch_bwd<T, V>(a, stream);
    return launch_bwd<T, 1>(a, stream);
  });
}

int64_t rms_norm_bwd_cuda_num_partials(int64_t rows, int64_t n, int sm_count) {
  // Warp mode blocks are small (128 threads), so more of them fit on a multiprocessor.
  const int64_t per_sm = n <= kWarpRowMaxN ? 4 : 2;
  const int64_t want = per_sm * (sm_count > 0 ? sm_count : 1);
  return rows < want ? (rows > 0 ? rows : 1) : want;
}

}  // namespace fastpt
