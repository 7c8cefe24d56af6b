// run_kernels, attention: the SIMT kernels (every dtype) and the tensor-core ones (bf16, fp16)
// against naive attention, forward and backward, with GQA, causal and padding masks, bias,
// dropout, strided layouts and NaN rows; and how launch errors reach the glue.
#include "ops/attention/attention_cuda.h"

#include "testing/run_kernels.h"

namespace run_kernels {
namespace {

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

}  // namespace

void run_attention() {
  attention_all<float>(); attention_all<double>(); attention_all<__nv_bfloat16>(); attention_all<__half>();
  test_launch_errors();
}

void run_attention_wmma() {
  attention_wmma_all<__nv_bfloat16>(); attention_wmma_all<__half>();
}

}  // namespace run_kernels
