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
#include "ops/rms_norm/rms_norm_cuda.h"
#include "ops/rope/rope_cuda.h"
#include "ops/swiglu/swiglu_cuda.h"

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

// ---------------------------------------------------------------- attention
// Naive attention and its gradients in R (double: the reference; the compute type: "eager"),
// on the same rounded inputs, with the kernel's masks and dropout mask. Layout contiguous:
// q, out (B, H, T, D), k, v (B, Hkv, S, D).
struct AttnResult {
  std::vector<double> out, dq, dk, dv;
};

template <typename R>
AttnResult attention_naive(const AttentionShape& s, const std::vector<double>& q, const std::vector<double>& k,
                           const std::vector<double>& v, const std::vector<double>& dout,
                           const std::vector<double>& bias, const std::vector<uint8_t>& mask) {
  const int64_t B = s.B, H = s.H, T = s.T, S = s.S, D = s.D, G = s.H / s.Hkv;
  AttnResult res{std::vector<double>(B * H * T * D), std::vector<double>(B * H * T * D),
                 std::vector<double>(B * s.Hkv * S * D, 0.0), std::vector<double>(B * s.Hkv * S * D, 0.0)};
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
          delta += R(dout[row * D + d]) * o[d];
        }
        for (int64_t j = 0; j < S; ++j) {
          R dp = 0;
          for (int64_t d = 0; d < D; ++d) dp += R(dout[row * D + d]) * R(v[(kv + j) * D + d]);
          const R ds = pd[j] * dp - p[j] * delta;
          for (int64_t d = 0; d < D; ++d) {
            res.dq[row * D + d] += double(R(s.scale) * ds * R(k[(kv + j) * D + d]));
            res.dk[(kv + j) * D + d] += double(R(s.scale) * ds * R(q[row * D + d]));
            res.dv[(kv + j) * D + d] += double(pd[j] * R(dout[row * D + d]));
          }
        }
      }
  return res;
}

template <typename T>
void test_attention(int64_t B, int64_t H, int64_t Hkv, int64_t T_, int64_t S, int64_t D, bool causal,
                    bool masked, bool biased, double dropout) {
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
    for (int64_t e = 0; e < B * H * T_ * S; ++e) bias_full.push_back(A(std::sin(0.37 * double(e))));
    bias_d.assign(bias_full.begin(), bias_full.end());
  }
  AttentionShape sh{B, H, Hkv, T_, S, D, H * T_ * D, T_ * D, D, Hkv * S * D, S * D, D, Hkv * S * D, S * D, D,
                    H * T_ * S, T_ * S, S, 1, masked ? mask.data() : nullptr,
                    biased ? bias_full.data() : nullptr, causal, 1.0 / std::sqrt(double(D)), dropout,
                    0x1234567890abcdefull, dt<T>()};
  std::vector<A> lse(B * H * T_), gk(nk, A(0)), gv(nk, A(0)), gbias(biased ? B * H * T_ * S : 0, A(0));
  const std::string tag = std::string(name<T>()) + " B " + std::to_string(B) + " H " + std::to_string(H) + "/" +
                          std::to_string(Hkv) + " T " + std::to_string(T_) + " S " + std::to_string(S) + " D " +
                          std::to_string(D) + (causal ? " causal" : "") + (masked ? " mask" : "") +
                          (biased ? " bias" : "") + (dropout > 0 ? " dropout" : "");
  launched("attention_fwd", attention_fwd_cuda({sh, q.p(), k.p(), v.p(), out.p(), lse.data()}, nullptr), tag);
  launched("attention_bwd",
           attention_bwd_cuda({sh, q.p(), k.p(), v.p(), out.p(), dout.p(), lse.data(), dq.p(), gk.data(), gv.data(),
                               biased ? gbias.data() : nullptr}, nullptr),
           tag);
  const auto qd = q.doubles(nq), kd = k.doubles(nk), vd = v.doubles(nk), dod = dout.doubles(nq);
  const AttnResult ref = attention_naive<double>(sh, qd, kd, vd, dod, bias_d, mask);
  AttnResult eager = attention_naive<A>(sh, qd, kd, vd, dod, bias_d, mask);
  for (auto* x : {&eager.out, &eager.dq})
    for (double& e : *x) e = round_to<T>(e);
  compare<T>("attention_fwd", tag, false, out.doubles(nq), ref.out, eager.out);
  compare<T>("attention_bwd", tag + " dq", true, dq.doubles(nq), ref.dq, eager.dq);
  compare<T>("attention_bwd", tag + " dk", true, std::vector<double>(gk.begin(), gk.end()), ref.dk, eager.dk);
  compare<T>("attention_bwd", tag + " dv", true, std::vector<double>(gv.begin(), gv.end()), ref.dv, eager.dv);
}

template <typename T> void attention_all() {
  test_attention<T>(2, 4, 2, 19, 37, 40, false, false, false, 0.0);   // GQA, cross lengths, 2 query blocks
  test_attention<T>(2, 4, 2, 19, 37, 40, true, true, false, 0.0);     // causal + padding, an empty batch row
  test_attention<T>(1, 2, 1, 1, 45, 64, true, false, true, 0.0);      // decode step, MQA, bias
  test_attention<T>(1, 2, 2, 33, 9, 80, true, false, false, 0.0);     // T > S: rows without keys
  test_attention<T>(1, 2, 2, 17, 17, 32, false, false, false, 0.3);   // dropout
  test_attention<T>(1, 1, 1, 5, 70, 128, false, false, false, 0.0);   // largest head dim, 3 key tiles
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

}  // namespace

int main(int argc, char** argv) {
  std::string only;  // --only <op>: run one op's launchers (rms_norm, swiglu, rope, attention)
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--only" && i + 1 < argc) only = argv[++i];
    else if (a == "-v") verbose = true;
    else if (a == "--reverse") fastpt_simt::set_order(fastpt_simt::Order::kReverse);
    else if (a == "--shuffle") fastpt_simt::set_order(fastpt_simt::Order::kShuffle, 12345);
  }
  if (only.empty() || only == "rms_norm") {
    rms_all<float>(); rms_all<double>(); rms_all<__nv_bfloat16>(); rms_all<__half>();
  }
  if (only.empty() || only == "swiglu") {
    swiglu_all<float>(); swiglu_all<double>(); swiglu_all<__nv_bfloat16>(); swiglu_all<__half>();
  }
  if (only.empty() || only == "attention") {
    attention_all<float>(); attention_all<double>(); attention_all<__nv_bfloat16>(); attention_all<__half>();
  }
  if (only.empty() || only == "rope") {
    rope_all<float, float>(); rope_all<double, double>(); rope_all<__nv_bfloat16, __nv_bfloat16>();
    rope_all<__nv_bfloat16, float>(); rope_all<__half, float>(); rope_all<__half, __half>();
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
