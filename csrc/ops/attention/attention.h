// Fused attention (FlashAttention-2 algorithm): out = softmax(scale * q k^T + bias + masks) v
// computed in tiles of queries x keys with an online softmax, never holding the T x S scores.
//
//   q (B, H, T, D); k, v (B, Hkv, S, D), H % Hkv == 0 (query head h reads kv head h / (H/Hkv));
//   causal: query i sees keys j <= i + S - T (aligned bottom-right, as for a KV cache);
//   key padding mask (B, S): nonzero = the key may be attended;
//   bias: additive, read through (B, H, T, S) strides (0 where broadcast), compute type;
//   dropout: P_ij kept with probability 1 - p and scaled by 1 / (1 - p), the keep decision a
//            counter-based hash of (seed, (b * H + h) * T + i, j) (dropout_keep below), so the
//            backward and every device recompute the same mask without storing it.
//   lse (B, H, T): log-sum-exp of each row's (undropped) logits; -inf for a row without keys,
//            whose output and gradients are 0.
// Backward (FlashAttention-2): P = exp(logits - lse) recomputed per tile, Delta_i = dO_i . O_i,
//   dV = Pd^T dO, dS = Pd * (dO V^T) - P * Delta, dQ = scale dS K, dK = scale dS^T Q
//   (Pd = P with dropout applied, = P without); the bias's gradient is dS itself, at every
//   (b, h, i, j), summed over broadcast dims by the glue (O(B H T S): only when asked for).
#pragma once
#include <cstdint>

#include "common/portable.h"

namespace fastpt {

struct AttentionShape {
  int64_t B, H, Hkv, T, S, D;
  // Strides in elements (last dim contiguous) of q, k, v and of the bias's (B, H, T, S) view.
  int64_t q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st;
  int64_t bias_sb, bias_sh, bias_st, bias_ss;
  const uint8_t* key_mask;  // (B, S) contiguous, or nullptr
  const void* bias;         // compute type (float, double for float64), or nullptr
  bool causal;
  double scale;
  double dropout_p;  // in [0, 1)
  uint64_t seed;
  DType dtype;  // of q, k, v, out, grads
};

struct AttentionFwdArgs {
  AttentionShape s;
  const void *q, *k, *v;
  void* out;  // (B, H, T, D) contiguous
  void* lse;  // (B, H, T) contiguous, float32 (float64 for float64 inputs)
};

struct AttentionBwdArgs {
  AttentionShape s;
  const void *q, *k, *v;
  const void* out;       // (B, H, T, D) contiguous
  const void* grad_out;  // (B, H, T, D) contiguous
  const void* lse;       // as in the forward
  void *grad_q, *grad_k, *grad_v;  // contiguous, shapes of q, k, v
  void* grad_bias;  // (B, H, T, S) contiguous, compute type, zero-filled; nullptr: not wanted
};

// Dropout's keep decision for logit (row, j), row = (b * H + h) * T + i. The row key mixes the
// seed with splitmix64 (64 bits); two rounds of murmur3's fmix32 then mix in the column.
FASTPT_HOST_DEVICE uint64_t dropout_row_key(uint64_t seed, uint64_t row) {
  uint64_t z = (seed ^ row) + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

FASTPT_HOST_DEVICE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// threshold = dropout_threshold(p): keep iff the 32-bit hash >= threshold.
FASTPT_HOST_DEVICE bool dropout_keep(uint64_t row_key, uint32_t j, uint32_t threshold) {
  const uint32_t h = fmix32(fmix32(j ^ uint32_t(row_key)) ^ uint32_t(row_key >> 32));
  return h >= threshold;
}

FASTPT_HOST_DEVICE uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 4294967295u : uint32_t(t);
}

}  // namespace fastpt
