// run_kernels: what its op files (run_kernels_<op>.cpp) share: the counters printed at the end,
// the random inputs (one generator, drawn from in main's order), the dtype helpers, the
// tolerance rule (compare, described in run_kernels.cpp), exact checks, buffers with unaligned
// starts, the CPU kernels' declarations, and each op file's entry point for main.
#pragma once

#include "ops/attention/attention_cuda.h"
#include "ops/int8/int8_cuda.h"
#include "ops/rms_norm/rms_norm_cuda.h"
#include "ops/rope/rope_cuda.h"
#include "ops/swiglu/swiglu_cuda.h"
#include "ops/value_iteration/value_iteration_cuda.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#if defined(FASTPT_SIMT_CPU_KERNELS)
namespace fastpt::cpu::DEFAULT {
void rms_norm_fwd(const RmsNormFwdArgs& args);
void rms_norm_bwd(const RmsNormBwdArgs& args);
void swiglu_fwd(const SwigluFwdArgs& args);
void swiglu_bwd(const SwigluBwdArgs& args);
void rope_apply(const RopeArgs& args);
void value_iteration(const ValueIterationArgs& args);
void int8_gemm(const Int8GemmArgs& args);
void int8_quantize_rows(const Int8QuantArgs& args);
void int8_outlier_cols(const Int8OutlierArgs& args);
void hash_dropout(const DropoutArgs& args);
void attention_fwd(const AttentionFwdArgs& args);
void attention_bwd(const AttentionBwdArgs& args);
}  // namespace fastpt::cpu::DEFAULT
constexpr bool kWithCpu = true;
#else
constexpr bool kWithCpu = false;
#endif

namespace run_kernels {

using namespace fastpt;

inline int cpu_comparisons = 0;

inline std::mt19937 rng(0);

struct Stats {
  int launches = 0, checks = 0, failures = 0;
};
inline std::map<std::string, Stats> stats;
inline bool verbose = false;

template <typename T> DType dt();
template <> inline DType dt<float>() { return DType::kFloat32; }
template <> inline DType dt<double>() { return DType::kFloat64; }
template <> inline DType dt<__nv_bfloat16>() { return DType::kBFloat16; }
template <> inline DType dt<__half>() { return DType::kFloat16; }
template <typename T> const char* name();
template <> inline const char* name<float>() { return "f32"; }
template <> inline const char* name<double>() { return "f64"; }
template <> inline const char* name<__nv_bfloat16>() { return "bf16"; }
template <> inline const char* name<__half>() { return "f16"; }
template <typename T> double eps_of();
template <> inline double eps_of<float>() { return 1.1920928955078125e-07; }
template <> inline double eps_of<double>() { return 2.220446049250313e-16; }
template <> inline double eps_of<__nv_bfloat16>() { return 0.0078125; }
template <> inline double eps_of<__half>() { return 0.0009765625; }

template <typename T> double tod(T v) { return double(cuda::to_acc(v)); }
template <typename T> T fromd(double v) { return cuda::from_acc<T>(cuda::acc_t<T>(v)); }
template <typename T> double round_to(double v) { return tod(fromd<T>(v)); }

inline void launched(const std::string& kernel, cudaError_t e, const std::string& tag) {
  Stats& s = stats[kernel];
  ++s.launches;
  ++s.checks;
  if (e != cudaSuccess) {
    ++s.failures;
    std::printf("FAIL %s %s: launch error %d (%s)\n", kernel.c_str(), tag.c_str(), int(e),
                fastpt_simt::last_error_message().c_str());
  }
}

inline double max_err(const std::vector<double>& out, const std::vector<double>& ref) {
  double e = 0;
  for (size_t i = 0; i < out.size(); ++i)
    if (std::isfinite(ref[i])) e = std::max(e, std::abs(out[i] - ref[i]));
  return e;
}

// The tolerance rule of tests/tolerances.py with `eager` as the same-precision result.
template <typename T>
void compare(const std::string& kernel, const std::string& tag, bool bwd,
             const std::vector<double>& out, const std::vector<double>& ref,
             const std::vector<double>& eager, const std::vector<double>& cpu = {}) {
  Stats& s = stats[kernel];
  ++s.checks;
  double cpu_err = 0;
  if (!cpu.empty()) {
    ++cpu_comparisons;
    cpu_err = max_err(cpu, ref);
  }
  double scale = 0;
  bool nan_ok = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(out[i]) != std::isnan(ref[i])) nan_ok = false;
    if (std::isfinite(ref[i])) scale = std::max(scale, std::abs(ref[i]));
    else if (!std::isnan(ref[i]) && out[i] != ref[i]) nan_ok = false;
  }
  const double err = max_err(out, ref), eager_err = std::max(max_err(eager, ref), cpu_err);
  double bound;
  if constexpr (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) {
    bound = 2.0 * eager_err + eps_of<T>() * scale;
  } else {
    const double rtol = std::is_same_v<T, double> ? (bwd ? 1e-10 : 1e-12) : (bwd ? 1e-4 : 1e-5);
    bound = std::max(rtol * std::max(scale, 1e-30), 2.0 * eager_err);
    if (std::is_same_v<T, double>) bound = std::max(bound, 4 * eps_of<double>());
  }
  const bool ok = nan_ok && err <= bound;
  if (!ok) ++s.failures;
  if (!ok || verbose)
    std::printf("%s %s %s: err %.3g bound %.3g (baseline err %.3g, CPU kernel err %.3g, max|ref| %.3g)%s\n",
                ok ? "ok" : "FAIL", kernel.c_str(), tag.c_str(), err, bound, eager_err, cpu_err, scale,
                nan_ok ? "" : " NaN/Inf positions differ");
}

// Buffer with `off` elements of slack in front (off = 1 breaks 16-byte alignment).
template <typename T> struct Buf {
  std::vector<T> mem;
  int off;
  Buf(size_t n, int off_) : mem(n + off_ + 8), off(off_) {}
  T* p() { return mem.data() + off; }
  T& operator[](size_t i) { return mem[off + i]; }
  std::vector<double> doubles(size_t n) {
    std::vector<double> d(n);
    for (size_t i = 0; i < n; ++i) d[i] = tod((*this)[i]);
    return d;
  }
};
template <typename T> void fill(Buf<T>& b, size_t n, double lo = -2, double hi = 2) {
  std::uniform_real_distribution<double> d(lo, hi);
  for (size_t i = 0; i < n; ++i) b[i] = fromd<T>(d(rng));
}

// Integer results (GEMM sums, quantized values, masks, bounds) must equal the expected ones.
inline void exact(const std::string& kernel, const std::string& tag, bool ok) {
  Stats& s = stats[kernel];
  ++s.checks;
  if (!ok) ++s.failures;
  if (!ok || verbose) std::printf("%s %s %s: exact comparison\n", ok ? "ok" : "FAIL", kernel.c_str(), tag.c_str());
}

// Lowers gridDim.y's limit (65535 on a GPU) for one test, so launchers that split a large count
// of rows of blocks into several launches do so on small shapes.
struct GridYLimit {
  unsigned saved = fastpt_simt::settings().max_grid_yz;
  explicit GridYLimit(unsigned limit) { fastpt_simt::settings().max_grid_yz = limit; }
  ~GridYLimit() { fastpt_simt::settings().max_grid_yz = saved; }
};

// Each op's launches on every dtype, one run_kernels_<op>.cpp each, called by main in this
// order (the inputs come from `rng`, so the order decides them).
void run_rms_norm();
void run_swiglu();
void run_attention();  // and the launch-error checks
void run_attention_wmma();
void run_rope();
void run_value_iteration();
void run_int8();

}  // namespace run_kernels
