// Softmax cross-entropy of rows of logits, with the gradient written over the logits:
// the non-GEMM half of fastpt.models.loss.linear_cross_entropy, in one kernel.
// Argument struct shared by the CPU kernel file and the glue.
#pragma once
#include <cstdint>

#include "common/portable.h"

namespace fastpt {

struct SoftmaxXentArgs {
  void* logits;            // (rows, cols), row stride ld, unit column stride; overwritten
  int64_t rows, cols, ld;  //   with the gradient when write_grad
  const int64_t* labels;   // (rows): a column in [0, cols) or ignore_index
  int64_t ignore_index;
  double grad_scale;       // d(loss)/d(row loss): 1 / (number of labelled rows) for a mean
  bool write_grad;         // logits <- (softmax - one_hot(label)) * grad_scale; 0 in ignored rows
  void* loss;              // (rows) float (double for kFloat64): logsumexp - logit[label]; 0 if ignored
  DType dtype;
};

}  // namespace fastpt
