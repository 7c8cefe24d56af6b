// The fastpt operator library: every op's schema, declared once. Kernels register per
// device in csrc/ops/<op>/<op>_{cpu,cuda}.cpp; Python adds fake kernels and autograd in
// fastpt/ops/<op>.py. Each backward is an op of its own so torch.compile can trace it.
#include <torch/library.h>

// name, schema: the single list of ops (the CUDA stubs below iterate over it too).
#define FASTPT_OPS(X)                                                                          \
  X("rms_norm", "rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)")            \
  X("rms_norm_backward",                                                                       \
    "rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)") \
  X("swiglu", "swiglu(Tensor gate, Tensor up) -> Tensor")                                      \
  X("swiglu_backward", "swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)") \
  X("rope",                                                                                    \
    "rope(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, bool interleaved) "   \
    "-> (Tensor, Tensor)")                                                                     \
  X("rope_backward",                                                                           \
    "rope_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin, Tensor? position_ids, " \
    "bool interleaved) -> (Tensor, Tensor)")                                                   \
  X("rope_",                                                                                   \
    "rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? position_ids, "         \
    "bool interleaved) -> ()")                                                                    \
  X("attention",                                                                               \
    "attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? attn_bias, "    \
    "bool causal, float scale, float dropout_p, Tensor? dropout_seed) -> (Tensor, Tensor)")   \
  X("attention_backward",                                                                      \
    "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, " \
    "Tensor? key_padding_mask, Tensor? attn_bias, bool causal, float scale, float dropout_p, " \
    "Tensor? dropout_seed, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)")

TORCH_LIBRARY(fastpt, m) {
#define FASTPT_DEF(name, schema) m.def(schema);
  FASTPT_OPS(FASTPT_DEF)
#undef FASTPT_DEF
}

#if !FASTPT_WITH_CUDA
// A CUDA tensor reaching a CPU-only build: say what is missing and how to get it, instead of
// the dispatcher's generic "could not run ... with arguments from the 'CUDA' backend".
namespace {
void cuda_not_built(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      false, op.schema().name(), " got CUDA tensors, but this fastpt build has no CUDA kernels. ",
      "Rebuild it with a CUDA build of torch and nvcc on the PATH: ",
      "pip install --no-build-isolation --force-reinstall . (set FASTPT_CUDA=1 to require CUDA).");
}
}  // namespace

TORCH_LIBRARY_IMPL(fastpt, CUDA, m) {
#define FASTPT_CUDA_STUB(name, schema) \
  m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cuda_not_built>());
  FASTPT_OPS(FASTPT_CUDA_STUB)
#undef FASTPT_CUDA_STUB
}
#endif
