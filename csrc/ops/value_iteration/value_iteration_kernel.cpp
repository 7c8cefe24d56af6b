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
// not depend on the thread count. Jacobi: several sweeps per call ping-pong between v_out and
// v_work (the last sweep lands in v_out), with a barrier (the end of parallel_for) between
// sweeps. Gauss-Seidel (phases, value_iteration.h): every row reads one array of all values
// (v_work), into which each phase's new values are copied once the phase is done, so the
// rows are the Jacobi rows and the Gauss-Seidel order costs only the phases' barriers.
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

#if defined(CPU_CAPABILITY_AVX512)
// v[ix[0..3]] as one vector: by a gather, or by four plain loads.
inline __m256d gather4(const double* v, const int32_t* ix) {
  return _mm256_i32gather_pd(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(ix)), 8);
}
inline __m256d load4(const double* v, const int32_t* ix) {
  const __m128d lo = _mm_loadh_pd(_mm_load_sd(v + ix[0]), v + ix[1]);
  const __m128d hi = _mm_loadh_pd(_mm_load_sd(v + ix[2]), v + ix[3]);
  return _mm256_insertf128_pd(_mm256_castpd128_pd256(lo), hi, 1);
}
#endif

// sum_k w[k] * v[idx[k]] over k in [b, e): the Jacobi sparse row.
template <typename T, typename IX>
inline T sparse_dot(const T* w, const IX* idx, const T* v, int64_t b, int64_t e) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, double> && std::is_same_v<IX, int32_t>) {
    // NOTE: 4-wide gathers into two ymm accumulators, and every fourth group of 4 read with
    // plain loads instead: on this project's AMD CPUs the sweep is bound by gather throughput
    // (it runs nearly as slowly with V in L1), and plain loads run beside the gathers. One
    // sweep at S = 200k, 2 threads, in a standalone copy of this loop: two 4-wide gathers
    // inserted into one zmm accumulator 5.3 ms, ymm accumulators 4.9 ms, one group in four
    // on plain loads 4.7-4.8 ms; all plain loads 8.5 ms (they stall on V's cache misses,
    // which the gathers overlap). The kernel: 5.7 -> 5.4 ms.
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    int64_t k = b;
    for (; k + 16 <= e; k += 16) {
      acc0 = _mm256_fmadd_pd(_mm256_loadu_pd(w + k), gather4(v, idx + k), acc0);
      acc1 = _mm256_fmadd_pd(_mm256_loadu_pd(w + k + 4), gather4(v, idx + k + 4), acc1);
      acc0 = _mm256_fmadd_pd(_mm256_loadu_pd(w + k + 8), gather4(v, idx + k + 8), acc0);
      acc1 = _mm256_fmadd_pd(_mm256_loadu_pd(w + k + 12), load4(v, idx + k + 12), acc1);
    }
    for (; k + 4 <= e; k += 4) acc0 = _mm256_fmadd_pd(_mm256_loadu_pd(w + k), gather4(v, idx + k), acc0);
    if (k < e) {
      const __mmask8 m = static_cast<__mmask8>((1u << (e - k)) - 1);
      const __m128i ix = _mm_maskz_loadu_epi32(m, idx + k);
      const __m256d g = _mm256_mmask_i32gather_pd(_mm256_setzero_pd(), m, ix, v, 8);
      acc1 = _mm256_fmadd_pd(_mm256_maskz_loadu_pd(m, w + k), g, acc1);
    }
    const __m256d acc = _mm256_add_pd(acc0, acc1);
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(acc), _mm256_extractf128_pd(acc, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
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
  // Updates local states [i0, i1): reads src (all num_states values), writes dst (local), and
  // records min/max of dV. row_dot(i, a) gives sum_s' P V for local state i.
  // NOTE: noinline: inlined into run_sweeps' phase loop, GCC kept the gathers' all-ones mask
  // on the stack, and the S = 200k sparse sweep ran at 8.2 instead of 6.0 ms. The local copy
  // of row_dot (whose captures are values) saved reloading them on every row: 6.0 -> 5.5 ms.
  template <typename RowDot>
  __attribute__((noinline)) void states(int64_t i0, int64_t i1, const T* src, T* dst, T* q, RowDot&& row_dot,
                                       double* mm) const {
    const int64_t A = a.actions;
    const T gamma = static_cast<T>(a.gamma);
    const auto dot = row_dot;  // a local copy: its captures stay in registers across rows
    T dmin = std::numeric_limits<T>::infinity(), dmax = -dmin;
    T nonfinite = 0;  // d - d: 0, or NaN once a change is NaN or infinite (values overflowed)
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = a.first_state + i;
      T best = -std::numeric_limits<T>::infinity();
      int64_t best_a = 0;
      for (int64_t act = 0; act < A; ++act) {
        const T qa = reward[i * A + act] + gamma * dot(i, act);
        if (q) q[i * A + act] = qa;
        if (qa > best) {
          best = qa;
          best_a = act;
        }
      }
      const T d = best - src[s];
      dmin = std::min(dmin, d);
      dmax = std::max(dmax, d);
      nonfinite += d - d;
      dst[i] = best;
      a.policy[i] = best_a;
    }
    // std::min / max skip NaN: without this a sweep of overflowed (inf - inf) values would
    // report a residual of -inf, below any tolerance. An infinite residual instead never meets
    // the rule, and the caller tells it from a sweep not run (NaN stats).
    const bool finite = nonfinite == 0;
    mm[0] = finite ? static_cast<double>(dmin) : -std::numeric_limits<double>::infinity();
    mm[1] = finite ? static_cast<double>(dmax) : std::numeric_limits<double>::infinity();
  }
};

// The block sweeps of one call. Jacobi: src is v_in, then the last sweep's output. Gauss-Seidel:
// src is v_work, a copy of all values, updated phase by phase.
template <typename T, typename Block>
void run_sweeps(const ValueIterationArgs& a, Block&& block) {
  const int64_t S = a.states, first = a.first_state;
  const int64_t phases = std::min(S, a.gauss_seidel ? kGaussSeidelPhases : int64_t(1));
  // Phase j: local states [phase_begin[j], phase_begin[j + 1]), blocks [first_block[j],
  // first_block[j + 1]) of kGaussSeidelBlock states (the last one of a phase may be shorter).
  std::vector<int64_t> phase_begin(static_cast<size_t>(phases + 1)), first_block(static_cast<size_t>(phases + 1));
  for (int64_t j = 0; j <= phases; ++j) {
    phase_begin[j] = phases ? j * S / phases : 0;
    const int64_t len = j ? phase_begin[j] - phase_begin[j - 1] : 0;
    first_block[j] = (j ? first_block[j - 1] : 0) + (len + kGaussSeidelBlock - 1) / kGaussSeidelBlock;
  }
  const int64_t nblocks = first_block[phases];
  std::vector<double> mm(static_cast<size_t>(2 * nblocks));
  for (int64_t k = 0; k < 2 * a.sweeps; ++k) a.stats[k] = std::numeric_limits<double>::quiet_NaN();
  const T* src = static_cast<const T*>(a.v_in);
  T* const out = static_cast<T*>(a.v_out);
  T* const work = static_cast<T*>(a.v_work);
  if (a.gauss_seidel) {
    if (a.num_states > 0) std::memcpy(work, src, sizeof(T) * a.num_states);
    src = work;
  }
  for (int64_t k = 0; k < a.sweeps; ++k) {
    T* dst = a.gauss_seidel || (a.sweeps - 1 - k) % 2 == 0 ? out : work;
    for (int64_t j = 0; j < phases; ++j) {
      const int64_t lo = phase_begin[j], hi = phase_begin[j + 1];
      // NOTE: handing out blocks one at a time (an atomic counter) ran the sweep 15% slower
      // than these contiguous shares per thread (6.4 vs 5.6 ms at S = 200k).
      at::parallel_for(first_block[j], first_block[j + 1], 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t i0 = lo + (b - first_block[j]) * kGaussSeidelBlock;
          block(i0, std::min(hi, i0 + kGaussSeidelBlock), src, dst, &mm[2 * b]);
        }
      });
      // The later phases read this phase's new values (and this phase read none of its own).
      if (a.gauss_seidel) std::memcpy(work + first + lo, dst + lo, sizeof(T) * (hi - lo));
    }
    double dmin = std::numeric_limits<double>::infinity(), dmax = -dmin;
    for (int64_t b = 0; b < nblocks; ++b) {
      dmin = std::min(dmin, mm[2 * b]);
      dmax = std::max(dmax, mm[2 * b + 1]);
    }
    if (nblocks == 0) dmin = dmax = 0;
    a.stats[2 * k] = dmin;
    a.stats[2 * k + 1] = dmax;
    const double residual = a.span_residual ? dmax - dmin : std::max(-dmin, dmax);
    if (!a.gauss_seidel) src = dst;
    if (residual < a.tol) break;
  }
  if (!a.gauss_seidel && src != out && S > 0) std::memcpy(out, src, sizeof(T) * S);
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
    sw.states(i0, i1, src, dst, q, [=](int64_t i, int64_t act) {
      const int64_t r = i * A + act;
      return sparse_dot(w, idx, src, static_cast<int64_t>(indptr[r]), static_cast<int64_t>(indptr[r + 1]));
    }, mm);
  });
}

template <typename T>
void dense_sweeps(const ValueIterationArgs& a) {
  const T* p = static_cast<const T*>(a.p);
  const Sweep<T> sw{a, static_cast<const T*>(a.reward)};
  T* q = static_cast<T*>(a.q);
  const int64_t n = a.num_states, A = a.actions;
  run_sweeps<T>(a, [&](int64_t i0, int64_t i1, const T* src, T* dst, double* mm) {
    std::vector<T> sums(static_cast<size_t>(A));
    // States() asks for action 0 first: all A row sums of the state are computed then.
    sw.states(i0, i1, src, dst, q, [&](int64_t i, int64_t act) {
      if (act == 0) {
        std::fill(sums.begin(), sums.end(), T(0));
        dense_dots(p + i * a.row_stride, a.action_stride, A, src, n, sums.data());
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
