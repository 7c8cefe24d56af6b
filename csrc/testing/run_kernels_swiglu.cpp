// run_kernels, SwiGLU: forward and backward (dgate, dup) on odd sizes, unaligned pointers.
#include "ops/swiglu/swiglu_cuda.h"

#include "testing/run_kernels.h"

namespace run_kernels {
namespace {

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

template <typename T> void swiglu_all() {
  for (int off : {0, 1})
    for (int64_t numel : {1, 3, 7, 13, 97, 1025, 20011}) test_swiglu<T>(numel, off);
}

}  // namespace

void run_swiglu() {
  swiglu_all<float>(); swiglu_all<double>(); swiglu_all<__nv_bfloat16>(); swiglu_all<__half>();
}

}  // namespace run_kernels
