// Value-iteration CPU kernels (compiled once per CPU capability, see common/cpu_dispatch.h).
//
// One sweep computes, per state s, Q(s,a) = R(s,a) + gamma * sum_k P_k V(succ_k) for every
// action, keeps the max and its action, and the change V'(s) - V(s): one pass over the
// transition data, nothing else is read or written (R, V, V', policy are O(S)). The
// transition data is the whole cost: sparse MDPs read 12 bytes per nonzero (fp64 value +
// int32 index; the successor's V is a random read that stays in cache for S up to ~10^6),
// dense MDPs read A*S*S values per sweep.
//
// Parallelism: fixed blocks of kGaussSeidelBlock states (at::parallel_for over blocks); each
// block writes its own min/max of dV, summed after the parallel region, so the result does
// not depend on the thread count. Several sweeps per call ping-pong between v_out and v_work
// (the last sweep lands in v_out), with a barrier (the end of parallel_for) between sweeps.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_vec.h"
#include "ops/value_iteration/value_iteration.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// sum_k w[k] * v[idx[k]] over k in [b, e): the Jacobi sparse row.
template <typename T, typename IX>
inline T sparse_dot(const T* w, const IX* idx, const T* v, int64_t b, int64_t e) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, double> && std::is_same_v<IX, int32_t>) {
    __m512d acc = _mm512_setzero_pd();
    int64_t k = b;
    for (; k + 8 <= e; k += 8) {
      // NOTE: two 4-wide gathers, not one 8-wide: on this project's AMD CPUs the sweep is
      // bound by gather throughput (it runs nearly as slowly with V in L1), and the ymm form
      // ran the S = 200k sweep 6-8% faster (fp32 below likewise: 2 x 8 instead of 16, 10%).
      const __m128i ix0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + k));
      const __m128i ix1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + k + 4));
      const __m512d g = _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_i32gather_pd(v, ix0, 8)),
                                           _mm256_i32gather_pd(v, ix1, 8), 1);
      acc = _mm512_fmadd_pd(_mm512_loadu_pd(w + k), g, acc);
    }
    if (k < e) {
      const __mmask8 m = static_cast<__mmask8>((1u << (e - k)) - 1);
      const __m256i ix = _mm256_maskz_loadu_epi32(m, idx + k);
      const __m512d g = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), m, ix, v, 8);
      acc = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(m, w + k), g, acc);
    }
    return _mm512_reduce_add_pd(acc);
  } else if constexpr (std::is_same_v<T, float> && std::is_same_v<IX, int32_t>) {
    __m512 acc = _mm512_setzero_ps();
    int64_t k = b;
    for (; k + 16 <= e; k += 16) {
      const __m256i ix0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + k));
      const __m256i ix1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + k + 8));
      const __m512 g = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_i32gather_ps(v, ix0, 4)),
                                          _mm256_i32gather_ps(v, ix1, 4), 1);
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), g, acc);
    }
    if (k < e) {
      const __mmask16 m = static_cast<__mmask16>((1u << (e - k)) - 1);
      const __m512i ix = _mm512_maskz_loadu_epi32(m, idx + k);
      const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, ix, v, 4);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), g, acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
#endif
  T acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
  int64_t k = b;
  for (; k + 4 <= e; k += 4) {
    acc0 += w[k] * v[idx[k]];
    acc1 += w[k + 1] * v[idx[k + 1]];
    acc2 += w[k + 2] * v[idx[k + 2]];
    acc3 += w[k + 3] * v[idx[k + 3]];
  }
  for (; k < e; ++k) acc0 += w[k] * v[idx[k]];
  return (acc0 + acc1) + (acc2 + acc3);
}

// Gauss-Seidel sparse row of state s (global): successors in [blk, s) have their new value
// in dst (local index c - first), every other successor its previous-sweep value in src.
template <typename T, typename IX>
inline T sparse_dot_gs(const T* w, const IX* idx, const T* src, const T* dst, int64_t b,
                       int64_t e, int64_t blk, int64_t s, int64_t first) {
  T acc = 0;
  for (int64_t k = b; k < e; ++k) {
    const int64_t c = static_cast<int64_t>(idx[k]);
    acc += w[k] * (c >= blk && c < s ? dst[c - first] : src[c]);
  }
  return acc;
}

// out[g] += sum_j row_g[j] * v[j] over j < n for G rows row_g = row0 + g * stride: the G
// action rows of one state read side by side, so G streams are in flight at once and each
// load of V serves all of them.
// NOTE: one row after the other (8 x 16 KB per state at S = 2000) ran at ~0.65x numpy's
// single gemv over the (A*S, S) matrix; side by side it streams like the gemv.
template <int G, typename T>
inline void dense_dots_group(const T* row0, int64_t stride, const T* v, int64_t n, T* out) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  V acc[G];
  for (int g = 0; g < G; ++g) acc[g] = V(0);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V x = V::loadu(v + j);
    for (int g = 0; g < G; ++g) acc[g] = at::vec::fmadd(V::loadu(row0 + g * stride + j), x, acc[g]);
  }
  if (j < n) {
    const int64_t len = n - j;
    const V x = V::loadu(v + j, len);
    for (int g = 0; g < G; ++g)
      acc[g] = at::vec::fmadd(V::loadu(row0 + g * stride + j, len), x, acc[g]);
  }
  for (int g = 0; g < G; ++g) out[g] += at::vec::vec_reduce_all<T>(std::plus<V>(), acc[g]);
}

// out[a] += sum_j row_a[j] * v[j] for the A rows row_a = row0 + a * stride, 8 at a time.
template <typename T>
inline void dense_dots(const T* row0, int64_t stride, int64_t A, const T* v, int64_t n, T* out) {
  if (n <= 0) return;
  int64_t a = 0;
  for (; a + 8 <= A; a += 8) dense_dots_group<8>(row0 + a * stride, stride, v, n, out + a);
  const T* r = row0 + a * stride;
  switch (A - a) {
    case 7: dense_dots_group<7>(r, stride, v, n, out + a); break;
    case 6: dense_dots_group<6>(r, stride, v, n, out + a); break;
    case 5: dense_dots_group<5>(r, stride, v, n, out + a); break;
    case 4: dense_dots_group<4>(r, stride, v, n, out + a); break;
    case 3: dense_dots_group<3>(r, stride, v, n, out + a); break;
    case 2: dense_dots_group<2>(r, stride, v, n, out + a); break;
    case 1: dense_dots_group<1>(r, stride, v, n, out + a); break;
    default: break;
  }
}

template <typename T>
struct Sweep {
  const ValueIterationArgs& a;
  const T* reward;
  // Updates local states [i0, i1): reads src (all num_states values, previous sweep), writes
  // dst (local), and records min/max of dV. row_dot(i, a, s_global) gives sum_s' P V.
  template <typename RowDot>
  void states(int64_t i0, int64_t i1, const T* src, T* dst, T* q, RowDot&& row_dot, double* mm) const {
    const int64_t A = a.actions;
    const T gamma = static_cast<T>(a.gamma);
    T dmin = std::numeric_limits<T>::infinity(), dmax = -dmin;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = a.first_state + i;
      T best = -std::numeric_limits<T>::infinity();
      int64_t best_a = 0;
      for (int64_t act = 0; act < A; ++act) {
        const T qa = reward[i * A + act] + gamma * row_dot(i, act, s);
        if (q) q[i * A + act] = qa;
        if (qa > best) {
          best = qa;
          best_a = act;
        }
      }
      const T d = best - src[s];
      dmin = std::min(dmin, d);
      dmax = std::max(dmax, d);
      dst[i] = best;
      a.policy[i] = best_a;
    }
    mm[0] = static_cast<double>(dmin);
    mm[1] = static_cast<double>(dmax);
  }
};

template <typename T, typename Block>
void run_sweeps(const ValueIterationArgs& a, Block&& block) {
  const int64_t nblocks = (a.states + kGaussSeidelBlock - 1) / kGaussSeidelBlock;
  std::vector<double> mm(static_cast<size_t>(2 * nblocks));
  for (int64_t k = 0; k < 2 * a.sweeps; ++k) a.stats[k] = std::numeric_limits<double>::quiet_NaN();
  const T* src = static_cast<const T*>(a.v_in);
  T* const out = static_cast<T*>(a.v_out);
  T* const work = static_cast<T*>(a.v_work);
  for (int64_t k = 0; k < a.sweeps; ++k) {
    T* dst = (a.sweeps - 1 - k) % 2 == 0 ? out : work;
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        block(b * kGaussSeidelBlock, std::min(a.states, (b + 1) * kGaussSeidelBlock), src, dst,
              &mm[2 * b]);
    });
    double dmin = std::numeric_limits<double>::infinity(), dmax = -dmin;
    for (int64_t b = 0; b < nblocks; ++b) {
      dmin = std::min(dmin, mm[2 * b]);
      dmax = std::max(dmax, mm[2 * b + 1]);
    }
    if (nblocks == 0) dmin = dmax = 0;
    a.stats[2 * k] = dmin;
    a.stats[2 * k + 1] = dmax;
    const double residual = a.span_residual ? dmax - dmin : std::max(-dmin, dmax);
    src = dst;
    if (residual < a.tol) break;  // (NaN never stops)
  }
  if (src != out && a.states > 0) std::memcpy(out, src, sizeof(T) * a.states);
}

template <typename T, typename IP, typename IX>
void sparse_sweeps(const ValueIterationArgs& a) {
  const IP* indptr = static_cast<const IP*>(a.indptr);
  const IX* idx = static_cast<const IX*>(a.indices);
  const T* w = static_cast<const T*>(a.values);
  const Sweep<T> sw{a, static_cast<const T*>(a.reward)};
  T* q = static_cast<T*>(a.q);
  const int64_t A = a.actions;
  run_sweeps<T>(a, [&](int64_t i0, int64_t i1, const T* src, T* dst, double* mm) {
    if (!a.gauss_seidel) {
      sw.states(i0, i1, src, dst, q, [&](int64_t i, int64_t act, int64_t) {
        const int64_t r = i * A + act;
        return sparse_dot(w, idx, src, static_cast<int64_t>(indptr[r]), static_cast<int64_t>(indptr[r + 1]));
      }, mm);
    } else {
      const int64_t blk = a.first_state + i0;
      sw.states(i0, i1, src, dst, q, [&](int64_t i, int64_t act, int64_t s) {
        const int64_t r = i * A + act;
        return sparse_dot_gs(w, idx, src, dst, static_cast<int64_t>(indptr[r]),
                             static_cast<int64_t>(indptr[r + 1]), blk, s, a.first_state);
      }, mm);
    }
  });
}

template <typename T>
void dense_sweeps(const ValueIterationArgs& a) {
  const T* p = static_cast<const T*>(a.p);
  const Sweep<T> sw{a, static_cast<const T*>(a.reward)};
  T* q = static_cast<T*>(a.q);
  const int64_t n = a.num_states, A = a.actions, first = a.first_state;
  run_sweeps<T>(a, [&](int64_t i0, int64_t i1, const T* src, T* dst, double* mm) {
    const int64_t blk = first + i0;
    std::vector<T> sums(static_cast<size_t>(A));
    // States() asks for action 0 first: all A row sums of the state are computed then.
    sw.states(i0, i1, src, dst, q, [&](int64_t i, int64_t act, int64_t s) {
      if (act == 0) {
        const T* row0 = p + i * a.row_stride;
        std::fill(sums.begin(), sums.end(), T(0));
        if (!a.gauss_seidel) {
          dense_dots(row0, a.action_stride, A, src, n, sums.data());
        } else {  // columns [blk, s) from this sweep's values
          dense_dots(row0, a.action_stride, A, src, blk, sums.data());
          dense_dots(row0 + blk, a.action_stride, A, dst + (blk - first), s - blk, sums.data());
          dense_dots(row0 + s, a.action_stride, A, src + s, n - s, sums.data());
        }
      }
      return sums[act];
    }, mm);
  });
}

template <typename T>
void dispatch_sparse(const ValueIterationArgs& a) {
  if (a.indptr64) {
    if (a.indices64) sparse_sweeps<T, int64_t, int64_t>(a);
    else sparse_sweeps<T, int64_t, int32_t>(a);
  } else {
    if (a.indices64) sparse_sweeps<T, int32_t, int64_t>(a);
    else sparse_sweeps<T, int32_t, int32_t>(a);
  }
}

}  // namespace

void value_iteration(const ValueIterationArgs& a) {
  const bool sparse = a.indptr != nullptr;
  if (a.dtype == DType::kFloat64) sparse ? dispatch_sparse<double>(a) : dense_sweeps<double>(a);
  else sparse ? dispatch_sparse<float>(a) : dense_sweeps<float>(a);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
