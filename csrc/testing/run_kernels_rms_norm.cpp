// run_kernels, RMSNorm: forward (y, rstd) and backward (dx, the dw partials) on widths 1 to 4097
// (a warp or a whole block per row), 1 to 33 rows, unaligned pointers.
#include "ops/rms_norm/rms_norm_cuda.h"

#include "testing/run_kernels.h"

namespace run_kernels {
namespace {

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

template <typename T> void rms_all() {
  for (int off : {0, 1})
    for (int64_t n : {1, 3, 13, 64, 97, 1024, 1025, 4096, 4097})
      for (int64_t rows : {1, 7, 33}) {
        if (n > 1100 && rows > 7) continue;
        // few partials (1..3 blocks in the backward) keep the emulation fast
        test_rms<T>(rows, n, off, std::min<int64_t>(rows, 3));
      }
}

}  // namespace

void run_rms_norm() {
  rms_all<float>(); rms_all<double>(); rms_all<__nv_bfloat16>(); rms_all<__half>();
}

}  // namespace run_kernels
