// Multi-threaded C = op(A) op(B): C is cut into blocks of kBlockM x kBlockN, computed in parallel,
// each as single-threaded products (common/cpu_gemm.h: fastpt's AVX-512 micro-kernel on CPUs
// other than Intel's, MKL elsewhere) over slices of kBlockK of the inner dimension, accumulated
// in C. A product packs its kBlockK x kBlockN slice of B once and runs it against kBlockM rows
// (packing: 1 / kBlockM of the multiply-adds); the slice of A it reads (kBlockM x kBlockK) stays
// in cache across its column panels, which matters when A is read transposed (a weight
// gradient dY^T X: every step of k is another row of dY in memory).
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "common/cpu_gemm.h"
#include "common/cpu_vec.h"
#include "ops/gemm/gemm.h"

namespace fastpt::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// NOTE: 2 threads, fp32, AMD EPYC: k slices of 256 vs 512, 1024 and none: weight gradient
// dY^T X (4096 tokens, 1408 x 512) 14.4 vs 17.1, 18.0, 25.4 ms; the others within 10%.
// An inner dimension of up to 2 * kBlockK with A read row-major is one slice (C written
// once, not read back): 4 processes alternating, medians, x W^T with d 512: head logits
// (1048 x 32000) 84.2 -> 79.8 ms, MLP 4096 x 1408 13.55 -> 13.35, q/k/v 4096 x 768 7.4 ->
// 7.2, the same MLP product in bf16 6.85 -> 6.55.
constexpr int64_t kBlockM = 256;
constexpr int64_t kBlockN = 128;
constexpr int64_t kBlockK = 256;

// Rows of B per task of the matrix-vector path.
constexpr int64_t kGemvGrain = 64;

template <typename T>
void gemm_blocks(const GemmArgs& g) {
  using A = acc_t<T>;  // C's type: float (fp32, bf16 inputs) or double
  const T* a = static_cast<const T*>(g.a);
  const T* b = static_cast<const T*>(g.b);
  A* c = static_cast<A*>(g.c);
#if defined(CPU_CAPABILITY_AVX512)
  // A few rows of A against a row-major B^T (x W^T with nn.Linear's W, decoding): stream B once.
  if constexpr (!std::is_same_v<T, double>) {
    if (g.m <= avx512_gemm::kGemvRows && !g.trans_a && g.trans_b && g.k2 == 0 && !g.accumulate && own_gemm_active()) {
      using Bits = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;
      const Bits* ab = reinterpret_cast<const Bits*>(a);
      const Bits* bb = reinterpret_cast<const Bits*>(b);
      at::parallel_for(0, g.n, kGemvGrain, [&](int64_t begin, int64_t end) {
        avx512_gemm::gemv_nt(g.m, begin, end, g.k, ab, g.lda, bb, g.ldb, c, g.n);
      });
      return;
    }
  }
#endif
  const T* a2 = static_cast<const T*>(g.a2);
  const T* b2 = static_cast<const T*>(g.b2);
  const int64_t mb = (g.m + kBlockM - 1) / kBlockM, nb = (g.n + kBlockN - 1) / kBlockN;
  const int64_t kblock = !g.trans_a && g.k <= 2 * kBlockK ? g.k : kBlockK;
  at::parallel_for(0, mb * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      // Consecutive tasks share a column block of B (and its cache lines).
      const int64_t i0 = (t % mb) * kBlockM, j0 = (t / mb) * kBlockN;
      const int64_t rows = std::min(kBlockM, g.m - i0), cols = std::min(kBlockN, g.n - j0);
      const T* ai = g.trans_a ? a + i0 : a + i0 * g.lda;
      const T* bj = g.trans_b ? b + j0 * g.ldb : b + j0;
      for (int64_t p0 = 0; p0 < g.k; p0 += kblock) {
        const T* aip = g.trans_a ? ai + p0 * g.lda : ai + p0;
        const T* bjp = g.trans_b ? bj + p0 : bj + p0 * g.ldb;
        cpu_gemm::gemm<T, A>(g.trans_a, g.trans_b, rows, cols, std::min(kblock, g.k - p0), A(1), aip, g.lda,
                             bjp, g.ldb, A(p0 == 0 && !g.accumulate ? 0 : 1), c + i0 * g.n + j0, g.n);
      }
      if (g.k2 > 0) {  // the second product, into the block while it is in cache
        const T* a2i = g.trans_a2 ? a2 + i0 : a2 + i0 * g.lda2;
        const T* b2j = g.trans_b2 ? b2 + j0 * g.ldb2 : b2 + j0;
        cpu_gemm::gemm<T, A>(g.trans_a2, g.trans_b2, rows, cols, g.k2, A(1), a2i, g.lda2, b2j, g.ldb2,
                             A(g.k == 0 && !g.accumulate ? 0 : 1), c + i0 * g.n + j0, g.n);
      }
    }
  });
}

}  // namespace

void gemm(const GemmArgs& g) {
  if (g.dtype == DType::kFloat64) gemm_blocks<double>(g);
  else if (g.dtype == DType::kBFloat16) gemm_blocks<c10::BFloat16>(g);
  else gemm_blocks<float>(g);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastpt::cpu
