// run_kernels, int8 (LLM.int8, LoRA dropout): the GEMM with its float epilogue, row
// quantization, outlier columns and hash dropout.
#include "ops/int8/int8_cuda.h"

#include "testing/run_kernels.h"

namespace run_kernels {
namespace {

// ---------------------------------------------------------------- int8 (LLM.int8, LoRA dropout)
// Integer results (GEMM sums, quantized values, masks) must equal the host reference and the
// CPU kernel exactly (exact()); the float epilogue follows the tolerance rule.

std::vector<int8_t> rand_int8(size_t n) {
  std::uniform_int_distribution<int> d(-128, 127);
  std::vector<int8_t> v(n);
  for (auto& e : v) e = static_cast<int8_t>(d(rng));
  return v;
}

template <typename T> void test_int8_gemm(int64_t m, int64_t n, int64_t k, bool with_bias) {
  const int64_t k_pad = round_up(k, kPadK), n_pad = round_up(n, kPadN), m_pad = round_up(m, 32);
  std::vector<int8_t> a(m_pad * k_pad, 0), w = rand_int8(n * k), packed(n_pad * k_pad, 0);
  const std::vector<int8_t> r = rand_int8(m * k);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; ++c) a[i * k_pad + c] = r[i * k + c];
  std::vector<int32_t> colsum(n_pad, 0);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < k; ++c) {
      packed[packed_offset(j, c, k_pad)] = w[j * k + c];
      colsum[j] += w[j * k + c];
    }
  std::vector<float> sa(m), sb(n), bias(n);
  std::uniform_real_distribution<float> u(0.001f, 0.02f);
  for (auto& v : sa) v = u(rng);
  for (auto& v : sb) v = u(rng);
  for (auto& v : bias) v = 10 * u(rng) - 0.1f;
  const std::string tag = std::string(name<T>()) + " m " + std::to_string(m) + " n " + std::to_string(n) +
                          " k " + std::to_string(k) + (with_bias ? " bias" : "");
  std::vector<int64_t> acc(m * n, 0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t c = 0; c < k; ++c) acc[i * n + j] += int64_t(r[i * k + c]) * w[j * k + c];
  auto args = [&](void* out, bool int32) {
    return Int8GemmArgs{a.data(), k_pad, packed.data(), colsum.data(), m, n, k_pad, sa.data(), sb.data(),
                        with_bias ? bias.data() : nullptr, out, n, int32, dt<T>(), Int8Path::kScalar};
  };
  std::vector<int32_t> out32(m * n, -1);
  launched("int8_gemm", int8_gemm_cuda(args(out32.data(), true), nullptr), tag + " int32");
  bool ok = true;
  for (int64_t i = 0; i < m * n; ++i) ok &= out32[i] == acc[i];
  exact("int8_gemm", tag + " int32 vs int64 sums", ok);
  Buf<T> out(m * n, 0);
  launched("int8_gemm", int8_gemm_cuda(args(out.p(), false), nullptr), tag);
  std::vector<double> ref(m * n), eager(m * n), cpu;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      ref[i * n + j] = double(acc[i * n + j]) * sa[i] * sb[j] + (with_bias ? bias[j] : 0.0);
      eager[i * n + j] = round_to<T>(double(float(acc[i * n + j]) * (sa[i] * sb[j]) + (with_bias ? bias[j] : 0.0f)));
    }
#if defined(FASTPT_SIMT_CPU_KERNELS)
  {
    std::vector<int32_t> c32(m * n);
    cpu::DEFAULT::int8_gemm(args(c32.data(), true));
    ok = true;
    for (int64_t i = 0; i < m * n; ++i) ok &= c32[i] == out32[i];
    exact("int8_gemm", tag + " int32 vs CPU kernel", ok);
    Buf<T> c(m * n, 0);
    cpu::DEFAULT::int8_gemm(args(c.p(), false));
    cpu = c.doubles(m * n);
  }
#endif
  compare<T>("int8_gemm", tag, false, out.doubles(m * n), ref, eager, cpu);
}

template <typename T> void test_int8_quantize(int64_t rows, int64_t cols, bool skip) {
  Buf<T> x(rows * cols, 0);
  fill(x, rows * cols, -3, 3);
  if (rows > 2) {
    x[1 * cols + cols / 2] = fromd<T>(NAN);  // a NaN row
    for (int64_t c = 0; c < cols; ++c) x[2 * cols + c] = fromd<T>(0.0);  // a zero row
  }
  if (rows > 3)  // a tiny row: 127 / amax would overflow without the prescale (int8.h)
    for (int64_t c = 0; c < cols; ++c) x[3 * cols + c] = fromd<T>(tod(x[3 * cols + c]) * 1e-38);
  std::vector<uint8_t> mask(cols, 0);
  std::vector<int64_t> idx;
  if (skip)
    for (int64_t c = 0; c < cols; c += 7) { mask[c] = 1; idx.push_back(c); }
  const int64_t ldq = round_up(cols, kPadK);
  std::vector<int8_t> q(rows * ldq, 99);
  std::vector<float> scale(rows, -1);
  const std::string tag = std::string(name<T>()) + " rows " + std::to_string(rows) + " cols " +
                          std::to_string(cols) + (skip ? " skip" : "");
  launched("int8_quantize", int8_quantize_rows_cuda({x.p(), rows, cols, cols, dt<T>(), nullptr, 0,
                                                     skip ? mask.data() : nullptr, q.data(), ldq, scale.data()},
                                                    nullptr), tag);
  bool ok = true;
  for (int64_t r = 0; r < rows; ++r) {
    float amax = 0;
    bool bad = false;
    for (int64_t c = 0; c < cols; ++c) {
      if (mask[c]) continue;
      const float v = std::abs(float(tod(x[r * cols + c])));
      bad |= !std::isfinite(v);
      amax = std::max(amax, v);
    }
    const float want = bad ? NAN : amax / 127.0f;
    ok &= bad ? std::isnan(scale[r]) : scale[r] == want;
    for (int64_t c = 0; c < ldq; ++c) {
      int8_t e = 0;
      if (!bad && amax > 0 && c < cols && !mask[c]) {
        const float pre = amax < kTinyRowAmax ? kTinyRowPrescale : 1.0f;
        e = int8_t(std::clamp(std::nearbyint(float(tod(x[r * cols + c])) * pre * (127.0f / (amax * pre))),
                              -127.0f, 127.0f));
      }
      ok &= q[r * ldq + c] == e;
    }
  }
  exact("int8_quantize", tag + " vs host", ok);
#if defined(FASTPT_SIMT_CPU_KERNELS)
  if constexpr (!std::is_same_v<T, double>) {
    std::vector<int8_t> q2(rows * ldq, 99);
    std::vector<float> s2(rows, -1);
    cpu::DEFAULT::int8_quantize_rows({x.p(), rows, cols, cols, dt<T>(), idx.empty() ? nullptr : idx.data(),
                                      int64_t(idx.size()), nullptr, q2.data(), ldq, s2.data()});
    ++cpu_comparisons;
    bool same = q2 == q;
    for (int64_t r = 0; r < rows; ++r) same &= (std::isnan(s2[r]) && std::isnan(scale[r])) || s2[r] == scale[r];
    exact("int8_quantize", tag + " vs CPU kernel", same);
  }
#endif
}

template <typename T> void test_int8_outliers(int64_t rows, int64_t cols) {
  Buf<T> x(rows * cols, 0);
  fill(x, rows * cols, -3, 3);
  std::vector<uint8_t> mask(cols, 7), want(cols, 0);
  for (int64_t i = 0; i < rows * cols; ++i) want[i % cols] |= std::abs(tod(x[i])) > 2.5;
  const std::string tag = std::string(name<T>()) + " rows " + std::to_string(rows) + " cols " + std::to_string(cols);
  launched("int8_outliers", int8_outlier_cols_cuda({x.p(), rows, cols, cols, dt<T>(), 2.5f, mask.data()}, nullptr), tag);
  exact("int8_outliers", tag + " vs host", mask == want);
#if defined(FASTPT_SIMT_CPU_KERNELS)
  std::vector<uint8_t> m2(cols, 7);
  cpu::DEFAULT::int8_outlier_cols({x.p(), rows, cols, cols, dt<T>(), 2.5f, m2.data()});
  ++cpu_comparisons;
  exact("int8_outliers", tag + " vs CPU kernel", m2 == mask);
#endif
}

template <typename T> void test_int8_dropout(int64_t numel, float p) {
  using A = cuda::acc_t<T>;
  Buf<T> x(numel, 0), out(numel, 0);
  fill(x, numel);
  const uint64_t seed = 0x1234567890abcdefull + numel;
  const std::string tag = std::string(name<T>()) + " numel " + std::to_string(numel) + " p " + std::to_string(p);
  launched("int8_dropout", int8_dropout_cuda({x.p(), out.p(), numel, dt<T>(), p, seed}, nullptr), tag);
  const uint32_t thr = dropout_threshold(p);
  const A inv = A(1) / (A(1) - A(p));
  bool ok = true;
  int64_t kept = 0;
  for (int64_t i = 0; i < numel; ++i) {
    const bool keep = dropout_hash(seed, uint64_t(i)) >= thr;
    kept += keep;
    ok &= tod(out[i]) == (keep ? round_to<T>(double(A(tod(x[i])) * inv)) : 0.0);
  }
  exact("int8_dropout", tag + " vs host", ok);
  if (numel > 10000) exact("int8_dropout", tag + " keep rate", std::abs(double(kept) / numel - (1 - p)) < 0.02);
#if defined(FASTPT_SIMT_CPU_KERNELS)
  Buf<T> o2(numel, 0);
  cpu::DEFAULT::hash_dropout({x.p(), o2.p(), numel, dt<T>(), p, seed});
  ++cpu_comparisons;
  exact("int8_dropout", tag + " vs CPU kernel", o2.doubles(numel) == out.doubles(numel));
#endif
}

template <typename T> void int8_all() {
  for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {7, 13, 5}, {33, 70, 65}, {40, 64, 200}})
    for (bool bias : {false, true}) test_int8_gemm<T>(m, n, k, bias);
  {  // gridDim.y limited to 2 (65535 on a GPU): 4 row tiles (on x, unlimited), 5 column tiles in 3 launches
    const GridYLimit limit(2);
    test_int8_gemm<T>(100, 150, 65, true);
  }
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {5, 13}, {9, 300}, {3, 1025}})
    for (bool skip : {false, true}) test_int8_quantize<T>(rows, cols, skip);
  test_int8_outliers<T>(37, 300);
  test_int8_outliers<T>(1, 5);
  for (float p : {0.0f, 0.1f, 0.5f}) test_int8_dropout<T>(20011, p);
  test_int8_dropout<T>(7, 0.3f);
}

}  // namespace

void run_int8() {
  int8_all<float>(); int8_all<__nv_bfloat16>(); int8_all<__half>();
  test_int8_dropout<double>(1025, 0.2f);
}

}  // namespace run_kernels
