// Int8 matmul in the style of LLM.int8() (Dettmers et al. 2022): row-wise absmax int8
// quantization, an int8 x int8 -> int32 GEMM (exact integer sums) with a fused
// dequantization epilogue, and the weight layout the kernels read.
// Argument structs shared by the CPU kernel file, the CUDA kernel file and the glue.
#pragma once
#include <cstdint>

#include "common/portable.h"

namespace fastpt {

// Packed weight ("B") layout, the same on every device: W (N, K) int8, zero-padded to
// N_pad = ceil(N / 32) * 32 rows and K_pad = ceil(K / 64) * 64 columns, stored as
// [N_pad / 16][K_pad / 4][16][4]: for each panel of 16 output channels, K in groups of 4
// consecutive k, and per group the 16 channels' 4 bytes. One group (64 bytes) is one
// AVX-512 VNNI operand and one row of an AMX B tile (16 rows = 64 k), so the kernels
// stream a panel linearly without repacking.
constexpr int64_t kPanelN = 16;
constexpr int64_t kPadN = 32;
constexpr int64_t kPadK = 64;
FASTPT_HOST_DEVICE int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
// Byte offset of W[n][k] in the packed buffer.
FASTPT_HOST_DEVICE int64_t packed_offset(int64_t n, int64_t k, int64_t k_pad) {
  return ((n / kPanelN) * (k_pad / 4) + k / 4) * (kPanelN * 4) + (n % kPanelN) * 4 + k % 4;
}

// (N, K) row-major int8 -> the packed layout above, and colsum[n] = sum_k W[n][k] (zero
// for padding rows).
struct Int8PackArgs {
  const int8_t* w;  // (n, k) contiguous
  int64_t n, k;
  int8_t* packed;   // (round_up(n, kPadN) / 16, round_up(k, kPadK) / 4, 16, 4)
  int32_t* colsum;  // (round_up(n, kPadN))
};

// CPU int8 GEMM paths, slowest to fastest. The glue picks one the running CPU (and the
// selected kernel build) supports: see int8_path.h.
enum class Int8Path : int { kScalar = 0, kAvx2 = 1, kVnni = 2, kAmx = 3 };

// out[m][n] = acc[m][n] * (scale_a[m] * scale_b[n]) + bias[n] in out_dtype, or the exact
// int32 acc itself when out_int32, with acc[m][n] = sum_k a[m][k] * W[n][k] in int32.
struct Int8GemmArgs {
  const int8_t* a;        // (m_pad, lda) row-major; lda >= k_pad, columns [K, k_pad) zero;
                          // rows [m, m_pad) readable (m_pad = round_up(m, 32) on CPU)
  int64_t lda;
  const int8_t* b;        // packed (see above)
  const int32_t* b_colsum;  // (N_pad) sum_k W[n][k]: the VNNI path's +128 correction
  int64_t m, n, k_pad;
  const float* scale_a;   // (m), unused when out_int32
  const float* scale_b;   // (n)
  const float* bias;      // (n) or nullptr
  void* out;              // (m, ldo)
  int64_t ldo;
  bool out_int32;
  DType out_dtype;        // when !out_int32
  Int8Path path;          // CPU only
  // CPU, !out_int32: a rank-r product added before the output is rounded (LLM.int8's
  // outlier columns): out[m][n] += sum_o outlier_x[m][o] * outlier_wt[o][n], float32,
  // (m, r) and (r, n) row-major; r = 0: none.
  const float* outlier_x = nullptr;
  const float* outlier_wt = nullptr;
  int64_t outlier_rank = 0;
};

// q[r][c] = round(x[r][c] / scale[r]) with scale[r] = max_c |x[r][c]| / 127 (round half to
// even, |q| <= 127), skipping the columns skip_idx[0..n_skip) (q = 0 there; LLM.int8's
// outlier columns). A row of zeros gets scale 0; a row with NaN or +-Inf (outside skipped
// columns) gets scale NaN and q = 0, so the matmul's output row is NaN. Columns
// [cols, ldq) of q are written as 0 (K padding).
// Computed as q = round(x * (127 / amax)) in float32 on every device, except that a row with
// amax < kTinyRowAmax is first multiplied by kTinyRowPrescale (exact: a power of two), as is
// its amax: 127 / amax overflows to inf below ~3.7e-37, and inf * x would flip signs and
// saturate. Above the threshold the prescale would change no bit, so rows are unaffected.
constexpr float kTinyRowAmax = 5.42101086e-20f;      // 2^-64
constexpr float kTinyRowPrescale = 1.84467441e+19f;  // 2^64
struct Int8QuantArgs {
  const void* x;  // (rows, ldx)
  int64_t rows, cols, ldx;
  DType dtype;
  const int64_t* skip_idx;  // CPU: column indices, or nullptr when n_skip == 0
  int64_t n_skip;
  const uint8_t* skip_mask;  // CUDA: (cols) 0/1, or nullptr
  int8_t* q;            // (rows, ldq)
  int64_t ldq;
  float* scale;         // (rows)
};

// mask[c] = 1 if any |x[r][c]| > threshold (NaN is not an outlier), else 0.
struct Int8OutlierArgs {
  const void* x;  // (rows, ldx)
  int64_t rows, cols, ldx;
  DType dtype;
  float threshold;
  uint8_t* mask;  // (cols)
};

// Inverted dropout with a counter-based mask, so forward and backward regenerate the same
// mask from (seed, index) without storing it: out[i] = x[i] * keep(i) / (1 - p), keep(i) =
// dropout_hash(seed, i) >= p * 2^32. The same function on CPU and CUDA.
struct DropoutArgs {
  const void* x;
  void* out;
  int64_t numel;
  DType dtype;
  float p;
  uint64_t seed;
};

FASTPT_HOST_DEVICE uint32_t dropout_hash(uint64_t seed, uint64_t i) {
  // splitmix64 finaliser of (seed, i): statistically independent bits per index.
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}
// keep(i) <=> dropout_hash(seed, i) >= threshold; exact for p = 0 (threshold 0 keeps all).
FASTPT_HOST_DEVICE uint32_t dropout_threshold(float p) {
  const double t = static_cast<double>(p) * 4294967296.0;
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

}  // namespace fastpt
