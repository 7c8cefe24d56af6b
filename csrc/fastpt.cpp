// The fastpt operator library: every op's schema, declared once. Kernels register per
// device in csrc/ops/<op>/<op>_{cpu,cuda}.cpp; Python adds fake kernels and autograd in
// fastpt/ops/<op>.py. Each backward is an op of its own so torch.compile can trace it.
#include <ATen/core/grad_mode.h>
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
    "bool interleaved) -> ()")                                                               \
  X("value_iteration_sparse",                                                                  \
    "value_iteration_sparse(Tensor indptr, Tensor indices, Tensor values, Tensor reward, "     \
    "Tensor v, float gamma, int sweeps=1, bool gauss_seidel=False, bool return_q=False, "      \
    "float tol=0., bool span=False, int first_state=0) -> (Tensor, Tensor, Tensor, Tensor)")  \
  X("value_iteration_dense",                                                                   \
    "value_iteration_dense(Tensor p, Tensor reward, Tensor v, float gamma, int sweeps=1, "     \
    "bool gauss_seidel=False, bool return_q=False, float tol=0., bool span=False, "            \
    "int first_state=0) -> (Tensor, Tensor, Tensor, Tensor)")                                  \
  X("quantize_rowwise", "quantize_rowwise(Tensor x, Tensor? skip_cols) -> (Tensor, Tensor)")   \
  X("outlier_columns", "outlier_columns(Tensor x, float threshold) -> Tensor")                 \
  X("pack_int8_weight", "pack_int8_weight(Tensor weight) -> (Tensor, Tensor)")                 \
  X("unpack_int8_weight", "unpack_int8_weight(Tensor packed, int n, int k) -> Tensor")         \
  X("int8_matmul",                                                                             \
    "int8_matmul(Tensor a, Tensor b, Tensor? scale_a, Tensor? scale_b, ScalarType? out_dtype, " \
    "Tensor? bias) -> Tensor")                                                                 \
  X("int8_linear",                                                                             \
    "int8_linear(Tensor x, Tensor weight_packed, Tensor weight_colsum, Tensor weight_scale, "  \
    "int out_features, Tensor? bias, float threshold) -> Tensor")                              \
  X("gemm", "gemm(Tensor a, Tensor b, bool trans_a, bool trans_b) -> Tensor")                  \
  X("gemm_into_",                                                                              \
    "gemm_into_(Tensor(a!) c, Tensor a, Tensor b, bool trans_a, bool trans_b, bool accumulate) -> ()") \
  X("softmax_cross_entropy_",                                                                  \
    "softmax_cross_entropy_(Tensor(a!) logits, Tensor labels, float grad_scale, int ignore_index, " \
    "bool write_grad) -> Tensor")                                                              \
  X("hash_dropout", "hash_dropout(Tensor x, float p, Tensor? seed) -> Tensor")                 \
  X("lora_linear",                                                                             \
    "lora_linear(Tensor x, Tensor? weight, Tensor? base_out, Tensor lora_a, Tensor lora_b, "   \
    "float scale, Tensor? bias, float dropout_p, Tensor? seed) -> Tensor")           \
  X("lora_linear_backward",                                                                    \
    "lora_linear_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor lora_a, "          \
    "Tensor lora_b, float scale, float dropout_p, Tensor? seed, bool need_grad_x) " \
    "-> (Tensor, Tensor, Tensor)")                                                             \
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

// The in-place ops have no derivative. Without an Autograd kernel a direct call
// (torch.ops.fastpt.rope_) on tensors that require grad left them a wrong gradient, silently
// (the identity, through the op). This kernel refuses such a call as the Python wrappers do
// (and autograd's own not-implemented fallback cannot: these ops return nothing to attach a
// grad_fn to), then runs the op below autograd.
namespace {
void inplace_without_derivative(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    for (const c10::IValue& arg : torch::jit::last(*stack, op.schema().arguments().size())) {
      TORCH_CHECK(!(arg.isTensor() && arg.toTensor().defined() && arg.toTensor().requires_grad()),
                  op.schema().name(), " works in place and has no autograd, and got a tensor that "
                  "requires grad: call it under torch.no_grad(), or use the differentiable op");
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}
}  // namespace

TORCH_LIBRARY_IMPL(fastpt, Autograd, m) {
  for (const char* name : {"rope_", "gemm_into_", "softmax_cross_entropy_"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&inplace_without_derivative>());
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
