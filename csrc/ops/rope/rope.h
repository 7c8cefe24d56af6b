// Rotary position embedding on one tensor viewed as (B, M, T, D), rotating the first 2R
// features of each row by the angles of its position p (cos/sin tables of shape (P, R)):
//   half layout (Llama / GPT-NeoX): pairs (i, i + R);   interleaved (GPT-J): pairs (2i, 2i + 1)
//   (x1, x2) -> (x1 c - x2 s, x2 c + x1 s);  conjugate (the backward) uses -s.
// Features past 2R pass through unchanged (partial rotary).
#pragma once
#include <cstdint>

#include "common/portable.h"

namespace fastpt {

struct RopeArgs {
  const void* x;  // (B, M, T, D), strides in elements, last dim contiguous
  void* out;      // may equal x (in-place)
  int64_t B, M, T, D;
  int64_t x_sb, x_sm, x_st;
  int64_t o_sb, o_sm, o_st;
  const void* cos;  // (P, R) contiguous
  const void* sin;
  int64_t P, R;
  const int64_t* pos;  // nullptr: position of row t is t; else pos[b * pos_sb + t]
  int64_t pos_sb;
  bool interleaved;
  bool conjugate;
  DType dtype;     // of x and out
  DType cs_dtype;  // of cos and sin: float32 or dtype
};

}  // namespace fastpt
