// Runs every CUDA launcher of fastpt under the SIMT emulator (testing/simt.h) on small shapes
// (odd sizes, several blocks, unaligned pointers, fp32/bf16/fp16/fp64, forward and backward)
// and compares with float64 references using the project's tolerance rule (tests/tolerances.py):
//   fp32/fp64: error <= max(rtol * max|ref|, 2 x the error of the same formula computed in the
//              compute type) (rtol 1e-5 fwd / 1e-4 bwd for fp32, 1e-12 / 1e-10 for fp64);
//   bf16/fp16: error <= 2 x that "eager" error + eps(dtype) * max|ref|.
// The "eager" result is the op's formula evaluated in the compute type (float, double for
// fp64) from the same rounded inputs and rounded once to the storage type; when the CPU
// kernels are linked in (-DFASTPT_SIMT_CPU_KERNELS, their DEFAULT build), the CPU kernel runs
// on the same inputs too and the baseline error is the larger of the two ("2x the CPU
// kernel's error").
// Built and run by tests/test_cuda_emulated.py:
//   g++ -std=c++20 -O1 -pthread -DFASTPT_SIMT_EMULATOR -I csrc csrc/testing/run_kernels.cpp
//       csrc/ops/*/<op>_kernels.cu (as C++)
//   [+ -DFASTPT_SIMT_CPU_KERNELS and csrc/ops/*/<op>_kernel.cpp, common/cpu_features.cpp built
//    with -DCPU_CAPABILITY=DEFAULT against torch's headers, linked with libtorch_cpu]
// Output: one "KERNEL <name> launches <L> checks <C> failures <F>" line per launcher, then
// "<N> kernels emulated"; exit status 1 on any failure.
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

using namespace fastpt;

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

namespace {
int cpu_comparisons = 0;

std::mt19937 rng(0);

struct Stats {
  int launches = 0, checks = 0, failures = 0;
};
std::map<std::string, Stats> stats;
bool verbose = false;

template <typename T> DType dt();
template <> DType dt<float>() { return DType::kFloat32; }
template <> DType dt<double>() { return DType::kFloat64; }
template <> DType dt<__nv_bfloat16>() { return DType::kBFloat16; }
template <> DType dt<__half>() { return DType::kFloat16; }
template <typename T> const char* name();
template <> const char* name<float>() { return "f32"; }
template <> const char* name<double>() { return "f64"; }
template <> const char* name<__nv_bfloat16>() { return "bf16"; }
template <> const char* name<__half>() { return "f16"; }
template <typename T> double eps_of();
template <> double eps_of<float>() { return 1.1920928955078125e-07; }
template <> double eps_of<double>() { return 2.220446049250313e-16; }
template <> double eps_of<__nv_bfloat16>() { return 0.0078125; }
template <> double eps_of<__half>() { return 0.0009765625; }

template <typename T> double tod(T v) { return double(cuda::to_acc(v)); }
template <typename T> T fromd(double v) { return cuda::from_acc<T>(cuda::acc_t<T>(v)); }
template <typename T> double round_to(double v) { return tod(fromd<T>(v)); }

void launched(const std::string& kernel, cudaError_t e, const std::string& tag) {
  Stats& s = stats[kernel];
  ++s.launches;
  ++s.checks;
  if (e != cudaSuccess) {
    ++s.failures;
    std::printf("FAIL %s %s: launch error %d (%s)\n", kernel.c_str(), tag.c_str(), int(e),
                fastpt_simt::last_error_message().c_str());
  }
}

double max_err(const std::vector<double>& out, const std::vector<double>& ref) {
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
void exact(const std::string& kernel, const std::string& tag, bool ok) {
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

// ---------------------------------------------------------------- RMSNorm
template <typename T> void test_rms(int64_t rows, int64_t n, int off, int64_t num_partials) {
  using A = cuda::acc_t<T>;
  const int64_t N = rows * n;
  Buf<T> x(N, off), w(n, off), y(N, off), dy(N, off), dx(N, off);
  fill(x, N); fill(w, n); fill(dy, N);
  std::vector<A> rstd(rows, A(-1));
  const double eps = 1e-6;
  const std::string tag = std::string(name<T>()) + " rows " + std::to_string(rows) + " n " +
                          std::to_string(n) + " off " + std::to_string(off) + " partials " +
                          std::to_string(num_partials);
  launched("rms_norm_fwd", rms_norm_fwd_cuda({x.p(), w.p(), y.p(), rstd.data(), rows, n, eps, dt<T>()}, nullptr), tag);
  std::vector<A> part(num_partials * n, A(12345));
  launched("rms_norm_bwd",
           rms_norm_bwd_cuda({dy.p(), x.p(), w.p(), rstd.data(), dx.p(), part.data(), rows, n,
                              num_partials, dt<T>()}, nullptr), tag);
  std::vector<double> ry(N), ey(N), rr(rows), er(rows), rdx(N), edx(N), rdw(n, 0.0), edw(n, 0.0);
  std::vector<A> edw_a(n, A(0));
  for (int64_t i = 0; i < rows; ++i) {
    double ss = 0;
    A ss_a = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double v = tod(x[i * n + j]);
      ss += v * v;
      ss_a += A(v) * A(v);
    }
    const double r = 1 / std::sqrt(ss / n + eps);
    const A r_a = A(1) / std::sqrt(ss_a / A(n) + A(eps));
    rr[i] = r; er[i] = double(r_a);
    double c = 0;
    A c_a = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double xh = tod(x[i * n + j]) * r, g = tod(dy[i * n + j]), wj = tod(w[j]);
      const A xh_a = A(tod(x[i * n + j])) * r_a;
      ry[i * n + j] = xh * wj;
      ey[i * n + j] = round_to<T>(double(xh_a * A(wj)));
      c += g * wj * xh; c_a += A(g) * A(wj) * xh_a;
      rdw[j] += g * xh; edw_a[j] += A(g) * xh_a;
    }
    c /= n; c_a /= A(n);
    for (int64_t j = 0; j < n; ++j) {
      const double xv = tod(x[i * n + j]), g = tod(dy[i * n + j]), wj = tod(w[j]);
      rdx[i * n + j] = r * (g * wj - xv * r * c);
      edx[i * n + j] = round_to<T>(double(r_a * (A(g) * A(wj) - A(xv) * r_a * c_a)));
    }
  }
  std::vector<double> cy, crstd, cdx, cdw;
#if defined(FASTPT_SIMT_CPU_KERNELS)
  {
    Buf<T> y2(N, off), dx2(N, off);
    std::vector<A> rstd2(rows), part2(num_partials * n);
    cpu::DEFAULT::rms_norm_fwd({x.p(), w.p(), y2.p(), rstd2.data(), rows, n, eps, dt<T>()});
    cpu::DEFAULT::rms_norm_bwd({dy.p(), x.p(), w.p(), rstd2.data(), dx2.p(), part2.data(), rows, n,
                                num_partials, dt<T>()});
    cy = y2.doubles(N);
    cdx = dx2.doubles(N);
    for (int64_t i = 0; i < rows; ++i) crstd.push_back(double(rstd2[i]));
    cdw.assign(n, 0.0);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t p = 0; p < num_partials; ++p) cdw[j] += double(part2[p * n + j]);
  }
#endif
  std::vector<double> gdw(n, 0.0), grstd(rows);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t p = 0; p < num_partials; ++p) gdw[j] += double(part[p * n + j]);
    edw[j] = double(edw_a[j]);
  }
  for (int64_t i = 0; i < rows; ++i) grstd[i] = double(rstd[i]);
  // rstd and the dw partials are in the compute type: judge them as float / double.
  using R = std::conditional_t<std::is_same_v<T, double>, double, float>;
  compare<T>("rms_norm_fwd", tag + " y", false, y.doubles(N), ry, ey, cy);
  compare<R>("rms_norm_fwd", tag + " rstd", false, grstd, rr, er, crstd);
  compare<T>("rms_norm_bwd", tag + " dx", true, dx.doubles(N), rdx, edx, cdx);
  compare<R>("rms_norm_bwd", tag + " dw", true, gdw, rdw, edw, cdw);
}

// ---------------------------------------------------------------- SwiGLU
template <typename T> void test_swiglu(int64_t numel, int off) {
  using A = cuda::acc_t<T>;
  Buf<T> g(numel, off), u(numel, off), o(numel, off), d(numel, off), dg(numel, off), du(numel, off);
  fill(g, numel, -10, 10); fill(u, numel); fill(d, numel);
  const std::string tag = std::string(name<T>()) + " numel " + std::to_string(numel) + " off " + std::to_string(off);
  launched("swiglu_fwd", swiglu_fwd_cuda({g.p(), u.p(), o.p(), numel, dt<T>()}, nullptr), tag);
  launched("swiglu_bwd", swiglu_bwd_cuda({d.p(), g.p(), u.p(), dg.p(), du.p(), numel, dt<T>()}, nullptr), tag);
  std::vector<double> ro(numel), eo(numel), rg(numel), eg(numel), ru(numel), eu(numel);
  for (int64_t i = 0; i < numel; ++i) {
    const double gv = tod(g[i]), uv = tod(u[i]), dv = tod(d[i]);
    const double s = 1 / (1 + std::exp(-gv));
    const A ga = A(gv), sa = A(1) / (A(1) + std::exp(-ga));
    ro[i] = gv * s * uv;
    eo[i] = round_to<T>(double(ga * sa * A(uv)));
    rg[i] = dv * uv * s * (1 + gv * (1 - s));
    eg[i] = round_to<T>(double(A(dv) * A(uv) * sa * (A(1) + ga * (A(1) - sa))));
    ru[i] = dv * gv * s;
    eu[i] = round_to<T>(double(A(dv) * ga * sa));
  }
  std::vector<double> co, cg, cu;
#if defined(FASTPT_SIMT_CPU_KERNELS)
  {
    Buf<T> o2(numel, off), dg2(numel, off), du2(numel, off);
    cpu::DEFAULT::swiglu_fwd({g.p(), u.p(), o2.p(), numel, dt<T>()});
    cpu::DEFAULT::swiglu_bwd({d.p(), g.p(), u.p(), dg2.p(), du2.p(), numel, dt<T>()});
    co = o2.doubles(numel); cg = dg2.doubles(numel); cu = du2.doubles(numel);
  }
#endif
  compare<T>("swiglu_fwd", tag + " out", false, o.doubles(numel), ro, eo, co);
  compare<T>("swiglu_bwd", tag + " dgate", true, dg.doubles(numel), rg, eg, cg);
  compare<T>("swiglu_bwd", tag + " dup", true, du.doubles(numel), ru, eu, cu);
}

// ---------------------------------------------------------------- RoPE
// x stored as (B, T, M, D) when transposed (strided view), else (B, M, T, D).
template <typename T, typename C>
void test_rope(int64_t B, int64_t M, int64_t T_, int64_t D, int64_t R, bool inter, bool conj,
               bool inplace, bool transposed, bool use_pos, int off) {
  using A = cuda::acc_t<T>;
  const int64_t P = T_ + 3, n = B * M * T_ * D;
  Buf<T> x(n, off), o(n, off);
  fill(x, n);
  const std::vector<T> x0(x.mem);
  Buf<C> cs(P * R, off), sn(P * R, off);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < R; ++i) {
      const double a = p * std::pow(10000.0, -double(i) / R);
      cs[p * R + i] = fromd<C>(std::cos(a));
      sn[p * R + i] = fromd<C>(std::sin(a));
    }
  std::vector<int64_t> pos(B * T_);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T_; ++t) pos[b * T_ + t] = (t * 2 + b) % P;
  if (use_pos && B > 1) pos[T_ + 1] = P + 5;  // out-of-range position: that row must be NaN
  int64_t sb, sm, st;
  if (transposed) { sb = T_ * M * D; st = M * D; sm = D; } else { sb = M * T_ * D; sm = T_ * D; st = D; }
  T* out = inplace ? x.p() : o.p();
  RopeArgs a{x.p(), out, B, M, T_, D, sb, sm, st, sb, sm, st, cs.p(), sn.p(), P, R,
             use_pos ? pos.data() : nullptr, use_pos ? T_ : 0, inter, conj, dt<T>(), dt<C>()};
  const std::string tag = std::string(name<T>()) + "/" + name<C>() + " D " + std::to_string(D) +
                          " R " + std::to_string(R) + (inter ? " inter" : " half") + (conj ? " conj" : "") +
                          (inplace ? " inplace" : "") + (transposed ? " strided" : "") +
                          (use_pos ? " pos" : "") + " off " + std::to_string(off);
  launched("rope_apply", rope_apply_cuda(a, nullptr), tag);
  std::vector<T> cpu_mem;  // the CPU kernel's result, laid out like `out`
#if defined(FASTPT_SIMT_CPU_KERNELS)
  {
    std::vector<T> xin(x0), oc(x0.size());
    RopeArgs ac = a;
    ac.x = xin.data() + off;
    ac.out = inplace ? xin.data() + off : oc.data() + off;
    cpu::DEFAULT::rope_apply(ac);
    cpu_mem = inplace ? xin : oc;
  }
#endif
  std::vector<double> got, ref, eager, cpu_out;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t t = 0; t < T_; ++t) {
        const int64_t p = use_pos ? pos[b * T_ + t] : t, base = b * sb + m * sm + t * st;
        const bool bad = p < 0 || p >= P;
        auto X = [&](int64_t j) { return tod(x0[x.off + base + j]); };
        auto O = [&](int64_t j) { return tod(out[base + j]); };
        auto Cpu = [&](int64_t j) {
          if (!cpu_mem.empty()) cpu_out.push_back(tod(cpu_mem[off + base + j]));
        };
        for (int64_t i = 0; i < R; ++i) {
          const int64_t j1 = inter ? 2 * i : i, j2 = inter ? 2 * i + 1 : i + R;
          got.push_back(O(j1)); got.push_back(O(j2));
          Cpu(j1); Cpu(j2);
          if (bad) {
            for (int k = 0; k < 2; ++k) { ref.push_back(NAN); eager.push_back(NAN); }
            continue;
          }
          const double c = tod(cs[p * R + i]), sv = (conj ? -1 : 1) * tod(sn[p * R + i]);
          ref.push_back(X(j1) * c - X(j2) * sv);
          ref.push_back(X(j2) * c + X(j1) * sv);
          eager.push_back(round_to<T>(double(A(X(j1)) * A(c) - A(X(j2)) * A(sv))));
          eager.push_back(round_to<T>(double(A(X(j2)) * A(c) + A(X(j1)) * A(sv))));
        }
        for (int64_t j = 2 * R; j < D; ++j) {
          got.push_back(O(j)); ref.push_back(X(j)); eager.push_back(X(j)); Cpu(j);
        }
      }
  compare<T>("rope_apply", tag, conj, got, ref, eager, cpu_out);
}

// ---------------------------------------------------------------- value iteration
// A random MDP (S states, A actions, K successors per (s, a), repeats allowed; state 0 is
// terminal: empty rows), Jacobi sweeps from a random V, in float64 and in T.
struct ViCase {
  int64_t S, A;
  std::vector<int64_t> indptr, idx;  // state-major CSR
  std::vector<double> w, r, v0;
};

ViCase vi_case(int64_t S, int64_t A, int64_t K) {
  ViCase c{S, A, {0}, {}, {}, {}, {}};
  std::uniform_int_distribution<int64_t> succ(0, S - 1);
  std::uniform_real_distribution<double> u(0.05, 1.0), rr(-1.0, 1.0);
  for (int64_t row = 0; row < S * A; ++row) {
    const int64_t k = row < A ? 0 : K;  // state 0: exits
    double sum = 0;
    const size_t first = c.w.size();
    for (int64_t j = 0; j < k; ++j) {
      c.idx.push_back(succ(rng));
      c.w.push_back(u(rng));
      sum += c.w.back();
    }
    for (size_t j = first; j < c.w.size(); ++j) c.w[j] /= sum;
    c.indptr.push_back(static_cast<int64_t>(c.w.size()));
    c.r.push_back(rr(rng));
  }
  for (int64_t s = 0; s < S; ++s) c.v0.push_back(3 * rr(rng));
  return c;
}

// `sweeps` Jacobi sweeps of states [lo, hi) in the arithmetic of R from v (all S values),
// stopping like the kernel (residual < tol; residual max dV - min dV with `span`, else
// max |dV|): values, policy, Q, dv (min, max) per sweep.
template <typename R>
struct ViRef {
  std::vector<double> v, q, dv;
  std::vector<int64_t> policy;
};
template <typename R, typename T>
ViRef<R> vi_reference(const ViCase& c, int64_t lo, int64_t hi, int64_t sweeps, double gamma, double tol,
                      bool span = false) {
  ViRef<R> out;
  std::vector<R> v(c.v0.size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = R(tod(fromd<T>(c.v0[i])));
  std::vector<R> nv(v);
  for (int64_t k = 0; k < sweeps; ++k) {
    out.q.assign(static_cast<size_t>((hi - lo) * c.A), 0);
    out.policy.assign(static_cast<size_t>(hi - lo), 0);
    R dmin = INFINITY, dmax = -INFINITY;
    for (int64_t s = lo; s < hi; ++s) {
      R best = -INFINITY;
      for (int64_t a = 0; a < c.A; ++a) {
        const int64_t row = s * c.A + a;
        R acc = 0;
        for (int64_t j = c.indptr[row]; j < c.indptr[row + 1]; ++j)
          acc += R(tod(fromd<T>(c.w[j]))) * v[c.idx[j]];
        const R qa = R(tod(fromd<T>(c.r[row]))) + R(tod(fromd<T>(gamma))) * acc;
        out.q[(s - lo) * c.A + a] = double(qa);
        if (qa > best) { best = qa; out.policy[s - lo] = a; }
      }
      dmin = std::min(dmin, best - v[s]);
      dmax = std::max(dmax, best - v[s]);
      nv[s] = best;
    }
    out.dv.push_back(double(dmin));
    out.dv.push_back(double(dmax));
    v = nv;
    if ((span ? double(dmax) - double(dmin) : std::max(-double(dmin), double(dmax))) < tol) break;
  }
  for (int64_t s = lo; s < hi; ++s) out.v.push_back(double(v[s]));
  return out;
}

// span: the residual is the span max dV - min dV (span_residual); with early_stop, tol is
// chosen so that the span stops after sweep 3 and the sup rule max |dV| after another sweep
// (earlier or later), so a kernel that used the wrong rule runs a different number of sweeps.
// with_q = false: q = nullptr (Q not wanted), for the CUDA and the CPU kernel.
template <typename T, typename IP, typename IX>
void test_vi(int64_t S, int64_t A, int64_t K, bool dense, int64_t sweeps, bool early_stop,
             int64_t lo, int64_t hi, bool span = false, bool with_q = true) {
  const ViCase c = vi_case(S, A, K);
  const double gamma = 0.9;
  double tol = 0;
  if (early_stop) {
    const ViRef<double> full = vi_reference<double, T>(c, 0, S, 3, gamma, 0);
    double r_span[3], r_sup[3];
    for (int k = 0; k < 3; ++k) {
      r_span[k] = full.dv[2 * k + 1] - full.dv[2 * k];
      r_sup[k] = std::max(-full.dv[2 * k], full.dv[2 * k + 1]);
    }
    if (!span) {  // halfway (geometrically) between the residuals of sweeps 2 and 3
      tol = std::sqrt(r_sup[1] * r_sup[2]);
    } else {  // the span stops after sweep 3 iff r_span[2] < tol <= min(r_span[0], r_span[1])
      const double lo = r_span[2], hi = std::min(r_span[0], r_span[1]);
      // the sup stops earlier: tol > min(r_sup[0], r_sup[1]); later: tol <= min(r_sup[0..2])
      const double a_lo = std::max(lo, std::min(r_sup[0], r_sup[1])), a_hi = hi;
      const double b_lo = lo, b_hi = std::min({hi, r_sup[0], r_sup[1], r_sup[2]});
      tol = a_hi / a_lo >= b_hi / b_lo ? std::sqrt(a_lo * a_hi) : std::sqrt(b_lo * b_hi);
    }
  }
  const int64_t n = hi - lo;
  std::vector<IP> ip;
  for (int64_t row = lo * A; row <= hi * A; ++row) ip.push_back(static_cast<IP>(c.indptr[row]));
  std::vector<IX> ix(c.idx.begin(), c.idx.end());
  std::vector<T> w, r, v, p;
  for (double x : c.w) w.push_back(fromd<T>(x));
  for (int64_t i = lo * A; i < hi * A; ++i) r.push_back(fromd<T>(c.r[i]));
  for (double x : c.v0) v.push_back(fromd<T>(x));
  if (dense) {
    p.assign(static_cast<size_t>(A * n * S), T(0));
    for (int64_t s = lo; s < hi; ++s)
      for (int64_t a = 0; a < A; ++a)
        for (int64_t j = c.indptr[s * A + a]; j < c.indptr[s * A + a + 1]; ++j) {
          T& e = p[(a * n + (s - lo)) * S + c.idx[j]];
          e = fromd<T>(tod(e) + c.w[j]);
        }
  }
  ValueIterationArgs a{};
  if (dense) {
    a.p = p.data();
    a.action_stride = n * S;
    a.row_stride = S;
  } else {
    a.indptr = ip.data();
    a.indices = ix.data();
    a.values = w.data();
    a.indptr64 = sizeof(IP) == 8;
    a.indices64 = sizeof(IX) == 8;
  }
  a.reward = r.data();
  a.v_in = v.data();
  a.states = n; a.actions = A; a.num_states = S; a.first_state = lo; a.sweeps = sweeps;
  a.gamma = gamma; a.tol = tol; a.span_residual = span; a.gauss_seidel = false;
  a.dtype = dt<T>();
  struct Out {
    std::vector<T> v, work, q;
    std::vector<int64_t> policy;
    std::vector<double> stats;
  };
  auto alloc = [&](Out& o, ValueIterationArgs& args) {
    o.v.assign(n, T(0)); o.work.assign(n, T(0)); o.q.assign(n * A, T(0));
    o.policy.assign(n, -1); o.stats.assign(2 * sweeps, 0);
    args.v_out = o.v.data(); args.v_work = o.work.data(); args.q = with_q ? o.q.data() : nullptr;
    args.policy = o.policy.data(); args.stats = o.stats.data();
  };
  Out gpu, cpu_o;
  alloc(gpu, a);
  std::vector<double> scratch(value_iteration_cuda_scratch_bytes(n) / 8 + 1);
  const std::string kernel = dense ? "value_iteration_dense" : "value_iteration_sparse";
  const std::string tag = std::string(name<T>()) + " S " + std::to_string(S) + " A " +
                          std::to_string(A) + " K " + std::to_string(K) + " idx " +
                          std::to_string(8 * sizeof(IP)) + "/" + std::to_string(8 * sizeof(IX)) +
                          " sweeps " + std::to_string(sweeps) + (early_stop ? " tol" : "") +
                          (span ? " span" : "") + (with_q ? "" : " no q") + " states [" +
                          std::to_string(lo) + ", " + std::to_string(hi) + ")";
  launched(kernel, value_iteration_cuda(a, scratch.data(), nullptr), tag);
  const ViRef<double> ref = vi_reference<double, T>(c, lo, hi, sweeps, gamma, tol, span);
  const ViRef<cuda::acc_t<T>> eager = vi_reference<cuda::acc_t<T>, T>(c, lo, hi, sweeps, gamma, tol, span);
  if (span && early_stop) {
    // The case must tell the two residuals apart: the span stops after sweep 3, the sup rule
    // after another one (a kernel that used the sup would give other values and NaN rows).
    const ViRef<double> sup = vi_reference<double, T>(c, lo, hi, sweeps, gamma, tol, false);
    exact(kernel, tag + ": the span stops after 3 sweeps, the sup rule after another",
          ref.dv.size() == 6 && sup.dv.size() != 6);
  }
  std::vector<double> cpu_v, cpu_q, cpu_dv;
#if defined(FASTPT_SIMT_CPU_KERNELS)
  {
    ValueIterationArgs ac = a;
    alloc(cpu_o, ac);
    cpu::DEFAULT::value_iteration(ac);
    for (T x : cpu_o.v) cpu_v.push_back(tod(x));
    for (T x : cpu_o.q) cpu_q.push_back(tod(x));
    cpu_dv.assign(cpu_o.stats.begin(), cpu_o.stats.begin() + ref.dv.size());
  }
#endif
  std::vector<double> got_v, got_q, got_dv(gpu.stats.begin(), gpu.stats.begin() + ref.dv.size());
  for (T x : gpu.v) got_v.push_back(tod(x));
  for (T x : gpu.q) got_q.push_back(tod(x));
  compare<T>(kernel, tag + " v", false, got_v, ref.v, eager.v, cpu_v);
  if (with_q) compare<T>(kernel, tag + " q", false, got_q, ref.q, eager.q, cpu_q);
  else exact(kernel, tag + ": q = nullptr, the q buffer is left alone",
             std::all_of(gpu.q.begin(), gpu.q.end(), [](T x) { return x == T(0); }));
  compare<T>(kernel, tag + " dv", false, got_dv, ref.dv, eager.dv, cpu_dv);
  // Sweeps not run (tolerance reached) are NaN rows; the greedy policy is that of the
  // float64 reference (random data: no near-ties at these sizes).
  Stats& st = stats[kernel];
  ++st.checks;
  bool ok = gpu.policy == ref.policy;
  for (size_t k = ref.dv.size(); k < gpu.stats.size(); ++k) ok = ok && std::isnan(gpu.stats[k]);
  if (!ok) {
    ++st.failures;
    std::printf("FAIL %s %s: policy or skipped-sweep stats differ\n", kernel.c_str(), tag.c_str());
  }
}

template <typename T> void vi_all() {
  for (bool dense : {false, true}) {
    test_vi<T, int32_t, int32_t>(1, 1, 1, dense, 1, false, 0, 1);
    test_vi<T, int32_t, int32_t>(37, 3, 5, dense, 1, false, 0, 37);
    test_vi<T, int64_t, int32_t>(70, 4, 40, dense, 3, false, 0, 70);  // rows longer than a warp
    test_vi<T, int32_t, int32_t>(50, 2, 3, dense, 6, true, 0, 50);    // stops after 3 sweeps
    test_vi<T, int32_t, int64_t>(61, 3, 4, dense, 1, false, 13, 45);  // a block of a partition
    test_vi<T, int64_t, int64_t>(29, 5, 7, dense, 2, false, 0, 29);
    // span_residual: stops after 3 sweeps on the span (the sup rule: after another sweep)
    test_vi<T, int32_t, int32_t>(50, 2, 3, dense, 6, true, 0, 50, true);
    test_vi<T, int64_t, int32_t>(61, 3, 4, dense, 5, true, 0, 61, true, false);  // and q = nullptr
    // q = nullptr: several sweeps, stopping on the sup; one sweep of a partition's block
    test_vi<T, int32_t, int32_t>(50, 2, 3, dense, 6, true, 0, 50, false, false);
    test_vi<T, int32_t, int64_t>(61, 3, 4, dense, 1, false, 13, 45, false, false);
  }
}

// ---------------------------------------------------------------- attention
// Naive attention and its gradients in R (double: the reference; the compute type: "eager"),
// on the same rounded inputs, with the kernel's masks and dropout mask. Layout contiguous:
// q, out (B, H, T, D), k, v (B, Hkv, S, D). `stored` rounds the output before the backward's
// Delta = dO . O: the eager baseline stores O in the inputs' dtype, as every kernel does.
struct AttnResult {
  std::vector<double> out, dq, dk, dv, dbias;  // dbias: dS at every (b, h, i, j)
};

template <typename R>
AttnResult attention_naive(const AttentionShape& s, const std::vector<double>& q, const std::vector<double>& k,
                           const std::vector<double>& v, const std::vector<double>& dout,
                           const std::vector<double>& bias, const std::vector<uint8_t>& mask,
                           double (*stored)(double) = nullptr) {
  const int64_t B = s.B, H = s.H, T = s.T, S = s.S, D = s.D, G = s.H / s.Hkv;
  AttnResult res{std::vector<double>(B * H * T * D), std::vector<double>(B * H * T * D),
                 std::vector<double>(B * s.Hkv * S * D, 0.0), std::vector<double>(B * s.Hkv * S * D, 0.0),
                 std::vector<double>(B * H * T * S, 0.0)};
  const uint32_t thr = dropout_threshold(s.dropout_p);
  std::vector<R> p(S), pd(S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const int64_t kv = (b * s.Hkv + h / G) * S, row = (b * H + h) * T + i;
        const uint64_t key = dropout_row_key(s.seed, uint64_t(row));
        R mx = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          const bool seen = (!s.causal || j <= i + S - T) && (mask.empty() || mask[b * S + j]);
          R x = -INFINITY;
          if (seen) {
            R dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += R(q[row * D + d]) * R(k[(kv + j) * D + d]);
            x = dot * R(s.scale) + (bias.empty() ? R(0) : R(bias[row * S + j]));
          }
          p[j] = x;
          mx = std::max(mx, x);
        }
        R sum = 0;
        for (int64_t j = 0; j < S; ++j) sum += (p[j] = mx == R(-INFINITY) ? R(0) : R(std::exp(p[j] - mx)));
        for (int64_t j = 0; j < S; ++j) {
          p[j] = sum > 0 ? p[j] / sum : R(0);
          const bool keep = s.dropout_p == 0 || dropout_keep(key, uint32_t(j), thr);
          pd[j] = keep ? p[j] / R(1 - s.dropout_p) : R(0);
        }
        std::vector<R> o(D, R(0));
        for (int64_t j = 0; j < S; ++j)
          for (int64_t d = 0; d < D; ++d) o[d] += pd[j] * R(v[(kv + j) * D + d]);
        R delta = 0;
        for (int64_t d = 0; d < D; ++d) {
          res.out[row * D + d] = double(o[d]);
          delta += R(dout[row * D + d]) * (stored ? R(stored(double(o[d]))) : o[d]);
        }
        for (int64_t j = 0; j < S; ++j) {
          R dp = 0;
          for (int64_t d = 0; d < D; ++d) dp += R(dout[row * D + d]) * R(v[(kv + j) * D + d]);
          const R ds = pd[j] * dp - p[j] * delta;
          res.dbias[row * S + j] = double(ds);
          for (int64_t d = 0; d < D; ++d) {
            res.dq[row * D + d] += double(R(s.scale) * ds * R(k[(kv + j) * D + d]));
            res.dk[(kv + j) * D + d] += double(R(s.scale) * ds * R(q[row * D + d]));
            res.dv[(kv + j) * D + d] += double(pd[j] * R(dout[row * D + d]));
          }
        }
      }
  return res;
}

// (B, T, H, D) -> (B, H, T, D)
std::vector<double> to_bhtd(const std::vector<double>& x, int64_t B, int64_t H, int64_t T, int64_t D) {
  std::vector<double> y(x.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) y[((b * H + h) * T + t) * D + d] = x[((b * T + t) * H + h) * D + d];
  return y;
}

template <typename T>
void test_attention(int64_t B, int64_t H, int64_t Hkv, int64_t T_, int64_t S, int64_t D, bool causal,
                    bool masked, bool biased, double dropout, bool wmma = false, bool strided = false) {
  // strided: q, k, v in (B, T, H, D) layout read through strides (as the glue passes
  // x.transpose(1, 2)), the bias (H, T, S) broadcast over the batch (stride 0).
  using A = cuda::acc_t<T>;
  const int64_t nq = B * H * T_ * D, nk = B * Hkv * S * D;
  Buf<T> q(nq, 0), k(nk, 0), v(nk, 0), dout(nq, 0), out(nq, 0), dq(nq, 0);
  fill(q, nq); fill(k, nk); fill(v, nk); fill(dout, nq);
  std::vector<uint8_t> mask;
  if (masked) {
    mask.assign(B * S, 1);
    for (int64_t j = 0; j < S; j += 3) mask[j] = 0;
    for (int64_t j = 0; j < S && B > 1; ++j) mask[S + j] = 0;  // batch row 1 sees no key
  }
  std::vector<A> bias_full;
  std::vector<double> bias_d;
  if (biased) {
    for (int64_t e = 0; e < (strided ? 1 : B) * H * T_ * S; ++e) bias_full.push_back(A(std::sin(0.37 * double(e))));
    for (int64_t e = 0; e < B * H * T_ * S; ++e) bias_d.push_back(double(bias_full[e % bias_full.size()]));
  }
  AttentionShape sh{B, H, Hkv, T_, S, D, H * T_ * D, T_ * D, D, Hkv * S * D, S * D, D, Hkv * S * D, S * D, D,
                    strided ? 0 : H * T_ * S, T_ * S, S, 1, masked ? mask.data() : nullptr,
                    biased ? bias_full.data() : nullptr, causal, 1.0 / std::sqrt(double(D)), dropout,
                    0x1234567890abcdefull, dt<T>()};
  if (strided) {
    sh.q_sb = T_ * H * D, sh.q_sh = D, sh.q_st = H * D;
    sh.k_sb = sh.v_sb = S * Hkv * D, sh.k_sh = sh.v_sh = D, sh.k_st = sh.v_st = Hkv * D;
  }
  std::vector<A> lse(B * H * T_), gk(nk, A(0)), gv(nk, A(0)), gbias(biased ? B * H * T_ * S : 0, A(0));
  const std::string tag = std::string(name<T>()) + " B " + std::to_string(B) + " H " + std::to_string(H) + "/" +
                          std::to_string(Hkv) + " T " + std::to_string(T_) + " S " + std::to_string(S) + " D " +
                          std::to_string(D) + (causal ? " causal" : "") + (masked ? " mask" : "") +
                          (biased ? " bias" : "") + (dropout > 0 ? " dropout" : "");
  // The tensor-core kernels (bf16 / fp16) are separate launchers with their own counts.
  const std::string fwd = wmma ? "attention_wmma_fwd" : "attention_fwd";
  const std::string bwd = wmma ? "attention_wmma_bwd" : "attention_bwd";
  const AttentionFwdArgs fa{sh, q.p(), k.p(), v.p(), out.p(), lse.data()};
  launched(fwd, wmma ? attention_wmma_fwd_cuda(fa, nullptr) : attention_fwd_cuda(fa, nullptr), tag);
  if (wmma) std::fill(gk.begin(), gk.end(), A(NAN)), std::fill(gv.begin(), gv.end(), A(NAN));  // it must write all
  const AttentionBwdArgs ba{sh, q.p(), k.p(), v.p(), out.p(), dout.p(), lse.data(), dq.p(), gk.data(), gv.data(),
                            biased ? gbias.data() : nullptr};
  launched(bwd, wmma ? attention_wmma_bwd_cuda(ba, nullptr) : attention_bwd_cuda(ba, nullptr), tag);
  auto qd = q.doubles(nq), kd = k.doubles(nk), vd = v.doubles(nk);
  const auto dod = dout.doubles(nq);
  if (strided) {  // the reference reads (B, H, T, D)
    qd = to_bhtd(qd, B, H, T_, D), kd = to_bhtd(kd, B, Hkv, S, D), vd = to_bhtd(vd, B, Hkv, S, D);
  }
  const AttnResult ref = attention_naive<double>(sh, qd, kd, vd, dod, bias_d, mask);
  auto rounded = [](std::vector<double> x) {  // to the storage type, as the glue returns it
    for (double& e : x) e = round_to<T>(e);
    return x;
  };
  AttnResult eager = attention_naive<A>(sh, qd, kd, vd, dod, bias_d, mask, &round_to<T>);
  eager.out = rounded(eager.out);
  eager.dq = rounded(eager.dq);
  // The CPU kernel on the same inputs, forward then backward from its own out and lse (so an
  // error of the emulated forward does not reach the baseline). Its grad_k, grad_v are in the
  // storage type, (B, Hkv, S, D); grad_bias in the compute type, as the CUDA kernel's.
  AttnResult cres;
#if defined(FASTPT_SIMT_CPU_KERNELS)
  {
    Buf<T> out2(nq, 0), dq2(nq, 0), dk2(nk, 0), dv2(nk, 0);
    std::vector<A> lse2(B * H * T_), gbias2(biased ? B * H * T_ * S : 0, A(0));
    cpu::DEFAULT::attention_fwd({sh, q.p(), k.p(), v.p(), out2.p(), lse2.data()});
    cpu::DEFAULT::attention_bwd({sh, q.p(), k.p(), v.p(), out2.p(), dout.p(), lse2.data(), dq2.p(), dk2.p(),
                                 dv2.p(), biased ? gbias2.data() : nullptr});
    cres.out = out2.doubles(nq), cres.dq = dq2.doubles(nq), cres.dk = dk2.doubles(nk), cres.dv = dv2.doubles(nk);
    if (biased) cres.dbias.assign(gbias2.begin(), gbias2.end());
  }
#endif
  compare<T>(fwd, tag, false, out.doubles(nq), ref.out, eager.out, cres.out);
  compare<T>(bwd, tag + " dq", true, dq.doubles(nq), ref.dq, eager.dq, cres.dq);
  // dK, dV: the values the glue returns (the kernels' compute-type accumulators rounded to the
  // storage type) against the formula rounded the same way and the CPU kernel's (stored in
  // that type too); for bf16 / fp16 also the accumulators themselves against the unrounded
  // formula (a tighter bound).
  const std::vector<double> gkd(gk.begin(), gk.end()), gvd(gv.begin(), gv.end());
  if constexpr (!std::is_same_v<T, A>) {
    compare<T>(bwd, tag + " dk acc", true, gkd, ref.dk, eager.dk);
    compare<T>(bwd, tag + " dv acc", true, gvd, ref.dv, eager.dv);
  }
  compare<T>(bwd, tag + " dk", true, rounded(gkd), ref.dk, rounded(eager.dk), cres.dk);
  compare<T>(bwd, tag + " dv", true, rounded(gvd), ref.dv, rounded(eager.dv), cres.dv);
  if (biased)
    compare<T>(bwd, tag + " dbias", true, std::vector<double>(gbias.begin(), gbias.end()), ref.dbias, eager.dbias,
               cres.dbias);
}

// A NaN in one row of q, or of dO, makes its head's gradients NaN and nothing else: the other
// head's dK, dV (stored right after) stay finite and nothing is written past grad_k, grad_v (a
// canary of 64 rows). S = 37 is not a multiple of the key tile (32; 8 for fp64): the SIMT
// backward used to add the NaN row's gradient to the keys past S of its last tile.
template <typename T>
void test_attention_nan_row(bool wmma, bool in_dout) {
  using A = cuda::acc_t<T>;
  const int64_t B = 1, H = 2, T_ = 3, S = 37, D = 8, nq = B * H * T_ * D, nk = B * H * S * D, canary = 64 * D;
  Buf<T> q(nq, 0), k(nk, 0), v(nk, 0), dout(nq, 0), out(nq, 0), dq(nq, 0);
  fill(q, nq); fill(k, nk); fill(v, nk); fill(dout, nq);
  // In q: head 0, whose keys are followed by head 1's; in dO: head 1, the last, followed by the canary.
  const int64_t bad = in_dout ? 1 : 0;
  (in_dout ? dout : q)[(bad * T_ + 1) * D] = fromd<T>(NAN);
  std::vector<A> lse(B * H * T_), gk(nk + canary, A(0)), gv(nk + canary, A(0));
  const AttentionShape sh{B, H, H, T_, S, D, H * T_ * D, T_ * D, D, H * S * D, S * D, D, H * S * D, S * D, D,
                          0, 0, 0, 0, nullptr, nullptr, false, 1.0 / std::sqrt(double(D)), 0.0, 0, dt<T>()};
  const std::string tag = std::string(name<T>()) + " S 37 NaN in " + (in_dout ? "dO" : "q");
  const std::string fwd = wmma ? "attention_wmma_fwd" : "attention_fwd";
  const std::string bwd = wmma ? "attention_wmma_bwd" : "attention_bwd";
  const AttentionFwdArgs fa{sh, q.p(), k.p(), v.p(), out.p(), lse.data()};
  launched(fwd, wmma ? attention_wmma_fwd_cuda(fa, nullptr) : attention_fwd_cuda(fa, nullptr), tag);
  const AttentionBwdArgs ba{sh, q.p(), k.p(), v.p(), out.p(), dout.p(), lse.data(), dq.p(), gk.data(), gv.data(),
                            nullptr};
  launched(bwd, wmma ? attention_wmma_bwd_cuda(ba, nullptr) : attention_bwd_cuda(ba, nullptr), tag);
  bool nan_reached = false, others_finite = true, canary_zero = true;
  for (int64_t e = 0; e < nk; ++e) {
    if (e / (S * D) == bad) nan_reached |= std::isnan(double(gk[e]));
    else others_finite &= std::isfinite(double(gk[e])) && std::isfinite(double(gv[e]));
  }
  for (int64_t e = 0; e < nq; ++e)
    if (e / (T_ * D) != bad) others_finite &= std::isfinite(tod(dq[e]));
  for (int64_t e = nk; e < nk + canary; ++e) canary_zero &= gk[e] == A(0) && gv[e] == A(0);
  exact(bwd, tag + ": the NaN reaches its head's dK", nan_reached);
  exact(bwd, tag + ": the other head's dQ, dK, dV are finite", others_finite);
  exact(bwd, tag + ": nothing written past grad_k, grad_v", canary_zero);
}

// Launch errors (common/cuda_compat.h): an error left pending by earlier work (here a launch
// outside fastpt with a bad grid) is returned as it is, left pending, and nothing is launched,
// so the glue reports it as earlier work's; a launch's own error is consumed and reported as its.
void test_launch_errors() {
  const int64_t n = 4 * 3 * 8;
  Buf<float> q(n, 0), k(n, 0), v(n, 0), out(n, 0);
  fill(q, n); fill(k, n); fill(v, n);
  std::vector<float> lse(4 * 3, -7.0f);
  const AttentionShape sh{1, 4, 4, 3, 3, 8, 4 * 3 * 8, 3 * 8, 8, 4 * 3 * 8, 3 * 8, 8, 4 * 3 * 8, 3 * 8, 8,
                          0, 0, 0, 0, nullptr, nullptr, false, 0.3, 0.0, 0, DType::kFloat32};
  const AttentionFwdArgs fa{sh, q.p(), k.p(), v.p(), out.p(), lse.data()};
  auto noop = +[](int) {};
  const cudaError_t earlier = FASTPT_SIMT_LAUNCH(noop, dim3(1, 70000), dim3(32), 0, nullptr, 0);
  cudaError_t e = attention_fwd_cuda(fa, nullptr);
  bool ok = earlier == cudaErrorInvalidConfiguration && e == earlier && cuda::error_predates_launch(e) &&
            std::all_of(lse.begin(), lse.end(), [](float x) { return x == -7.0f; });
  exact("attention_fwd", "error pending before the launch: returned, left pending, not launched", ok);
  (void)cudaGetLastError();  // its owner takes it
  launched("attention_fwd", attention_fwd_cuda(fa, nullptr), "after the earlier error was taken");
  const size_t smem = fastpt_simt::settings().max_dynamic_smem;
  fastpt_simt::settings().max_dynamic_smem = 1024;  // the launch asks for more
  e = attention_fwd_cuda(fa, nullptr);
  fastpt_simt::settings().max_dynamic_smem = smem;
  ok = e == cudaErrorInvalidConfiguration && !cuda::error_predates_launch(e) && cudaPeekAtLastError() == cudaSuccess;
  exact("attention_fwd", "the launch's own error: returned and consumed", ok);
}

template <typename T> void attention_all() {
  test_attention<T>(2, 4, 2, 19, 37, 40, false, false, false, 0.0);   // GQA, cross lengths, 2 query blocks
  test_attention<T>(2, 4, 2, 19, 37, 40, true, true, false, 0.0);     // causal + padding, an empty batch row
  test_attention<T>(1, 2, 1, 1, 45, 64, true, false, true, 0.0);      // decode step, MQA, bias
  test_attention<T>(1, 2, 2, 33, 9, 80, true, false, false, 0.0);     // T > S: rows without keys
  test_attention<T>(1, 2, 2, 17, 17, 32, false, false, false, 0.3);   // dropout
  test_attention<T>(1, 1, 1, 5, 70, 128, false, false, false, 0.0);   // largest head dim, 3 key tiles
  test_attention<T>(1, 2, 1, 9, 20, 96, true, false, false, 0.0);     // D = 96 (the list)
  // (B, T, H, D) strides, bias over (H, T, S)
  test_attention<T>(2, 4, 2, 19, 21, 48, true, true, true, 0.1, false, true);
  {  // B H = 12 heads with gridDim.y limited to 3 (65535 on a GPU): 4 launches
    const GridYLimit limit(3);
    test_attention<T>(3, 4, 2, 7, 11, 16, true, false, false, 0.0);
  }
  test_attention_nan_row<T>(false, false);
  test_attention_nan_row<T>(false, true);
}

// The tensor-core kernels: bf16 / fp16, D padded to a multiple of 16 (40 -> 48), 32 x 32 tiles.
template <typename T> void attention_wmma_all() {
  test_attention<T>(2, 4, 2, 19, 37, 64, false, false, false, 0.0, true);  // GQA, cross lengths, 2 key tiles
  test_attention<T>(2, 4, 2, 45, 37, 40, true, true, false, 0.0, true);    // causal T > S, padding, a masked batch row
  test_attention<T>(1, 2, 1, 1, 45, 64, true, false, true, 0.0, true);     // decode step, MQA, bias
  test_attention<T>(1, 4, 2, 70, 33, 80, true, false, true, 0.0, true);    // T > S: rows without keys, 3 query blocks
  test_attention<T>(1, 2, 2, 17, 40, 32, false, true, false, 0.3, true);   // dropout with padding
  test_attention<T>(1, 2, 1, 40, 70, 128, true, false, false, 0.0, true);  // largest head dim, causal T < S
  test_attention<T>(1, 1, 1, 7, 5, 8, false, false, false, 0.0, true);     // D = 8 padded to 16
  test_attention<T>(1, 2, 1, 9, 20, 96, false, false, false, 0.0, true);   // D = 96 (the list)
  // (B, T, H, D) strides, bias over (H, T, S)
  test_attention<T>(2, 4, 2, 35, 21, 48, true, true, true, 0.1, true, true);
  {  // B H = 12 heads, B Hkv = 6 kv heads (dK dV kernel) with gridDim.y limited to 3: 4 and 2 launches
    const GridYLimit limit(3);
    test_attention<T>(3, 4, 2, 7, 11, 16, true, false, false, 0.0, true);
  }
  test_attention_nan_row<T>(true, false);
  test_attention_nan_row<T>(true, true);
}

template <typename T> void rms_all() {
  for (int off : {0, 1})
    for (int64_t n : {1, 3, 13, 64, 97, 1024, 1025, 4096, 4097})
      for (int64_t rows : {1, 7, 33}) {
        if (n > 1100 && rows > 7) continue;
        // few partials (1..3 blocks in the backward) keep the emulation fast
        test_rms<T>(rows, n, off, std::min<int64_t>(rows, 3));
      }
}
template <typename T> void swiglu_all() {
  for (int off : {0, 1})
    for (int64_t numel : {1, 3, 7, 13, 97, 1025, 20011}) test_swiglu<T>(numel, off);
}
template <typename T, typename C> void rope_all() {
  for (int off : {0, 1})
    for (auto [D, R] : {std::pair<int64_t, int64_t>{8, 4}, {64, 32}, {64, 16}, {40, 20}, {13, 6},
                        {128, 64}, {80, 24}})
      for (bool inter : {false, true})
        for (bool inplace : {false, true})
          for (bool tr : {false, true})
            test_rope<T, C>(2, 3, 5, D, R, inter, inplace && tr, inplace, tr, inplace || tr, off);
  test_rope<T, C>(1, 1, 1, 2, 1, false, false, false, false, false, 0);   // one row, one pair
  test_rope<T, C>(3, 2, 97, 64, 32, true, true, false, false, true, 0);   // many blocks
}

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

int main(int argc, char** argv) {
  // --only <op>: run one op's launchers (rms_norm, swiglu, attention, attention_wmma, rope,
  // value_iteration, int8)
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--only" && i + 1 < argc) only = argv[++i];
    else if (a == "-v") verbose = true;
    else if (a == "--reverse") fastpt_simt::set_order(fastpt_simt::Order::kReverse);
    else if (a == "--shuffle") fastpt_simt::set_order(fastpt_simt::Order::kShuffle, 12345);
    else if (a == "--warp-serial") fastpt_simt::set_warp_serial(true);
  }
  if (only.empty() || only == "rms_norm") {
    rms_all<float>(); rms_all<double>(); rms_all<__nv_bfloat16>(); rms_all<__half>();
  }
  if (only.empty() || only == "swiglu") {
    swiglu_all<float>(); swiglu_all<double>(); swiglu_all<__nv_bfloat16>(); swiglu_all<__half>();
  }
  if (only.empty() || only == "attention") {
    attention_all<float>(); attention_all<double>(); attention_all<__nv_bfloat16>(); attention_all<__half>();
    test_launch_errors();
  }
  if (only.empty() || only == "attention" || only == "attention_wmma") {
    attention_wmma_all<__nv_bfloat16>(); attention_wmma_all<__half>();
  }
  if (only.empty() || only == "rope") {
    rope_all<float, float>(); rope_all<double, double>(); rope_all<__nv_bfloat16, __nv_bfloat16>();
    rope_all<__nv_bfloat16, float>(); rope_all<__half, float>(); rope_all<__half, __half>();
  }
  if (only.empty() || only == "value_iteration") {
    vi_all<float>(); vi_all<double>();
  }
  if (only.empty() || only == "int8") {
    int8_all<float>(); int8_all<__nv_bfloat16>(); int8_all<__half>();
    test_int8_dropout<double>(1025, 0.2f);
  }
  int failures = 0, checks = 0;
  for (auto& [k, s] : stats) {
    std::printf("KERNEL %s launches %d checks %d failures %d\n", k.c_str(), s.launches, s.checks, s.failures);
    failures += s.failures;
    checks += s.checks;
  }
  std::printf("%d checks (%d also against the CPU kernel%s), %d failures\n%zu kernels emulated\n",
              checks, cpu_comparisons, kWithCpu ? "" : ": not linked", failures, stats.size());
  return failures != 0;
}
