// run_kernels, value iteration: sparse (CSR, 32/64-bit indices) and dense transitions, several
// sweeps, the sup and span stopping rules, a block of a state partition, Q wanted or not.
#include "ops/value_iteration/value_iteration_cuda.h"

#include "testing/run_kernels.h"

namespace run_kernels {
namespace {

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

}  // namespace

void run_value_iteration() {
  vi_all<float>(); vi_all<double>();
}

}  // namespace run_kernels
