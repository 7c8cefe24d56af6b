// run_kernels, RoPE: interleaved and half-split pairs, partial rotary dims, conjugate, in place,
// strided (B, T, M, D) views, explicit positions (one out of range), mixed cos/sin dtypes.
#include "ops/rope/rope_cuda.h"

#include "testing/run_kernels.h"

namespace run_kernels {
namespace {

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

void run_rope() {
  rope_all<float, float>(); rope_all<double, double>(); rope_all<__nv_bfloat16, __nv_bfloat16>();
  rope_all<__nv_bfloat16, float>(); rope_all<__half, float>(); rope_all<__half, __half>();
}

}  // namespace run_kernels
