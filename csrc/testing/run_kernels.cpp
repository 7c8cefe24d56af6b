// Runs every CUDA launcher of fastpt under the SIMT emulator (testing/simt.h) on small shapes
// (odd sizes, several blocks, unaligned pointers, fp32/bf16/fp16/fp64, forward and backward)
// and compares with float64 references using the project's tolerance rule (tests/tolerances.py):
//   fp32/fp64: error <= max(rtol * max|ref|, 2 x the error of the same formula computed in the
//              compute type) (rtol 1e-5 fwd / 1e-4 bwd for fp32, 1e-12 / 1e-10 for fp64);
//   bf16/fp16: error <= 2 x that "eager" error + eps(dtype) * max|ref|.
// The "eager" result is the op's formula evaluated in the compute type (float, double for
// fp64) from the same rounded inputs and rounded once to the storage type; when the CPU
// kernels are linked in (-DFASTPT_SIMT_CPU_KERNELS, their DEFAULT build), the CPU kernel runs
// on the same inputs too and the baseline error is the larger of the two ("2x the CPU
// kernel's error").
// This file holds main; the checks shared by the ops are in run_kernels.h, each op's launches in
// run_kernels_<op>.cpp.
// Built and run by tests/test_cuda_emulated.py:
//   g++ -std=c++20 -O1 -pthread -DFASTPT_SIMT_EMULATOR -I csrc csrc/testing/run_kernels*.cpp
//       csrc/ops/*/<op>_kernels.cu (as C++)
//   [+ -DFASTPT_SIMT_CPU_KERNELS and csrc/ops/*/<op>_kernel.cpp, common/cpu_features.cpp built
//    with -DCPU_CAPABILITY=DEFAULT against torch's headers, linked with libtorch_cpu]
// Output: one "KERNEL <name> launches <L> checks <C> failures <F>" line per launcher, then
// "<N> kernels emulated"; exit status 1 on any failure.
#include "testing/run_kernels.h"

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  using namespace run_kernels;
  // --only <op>: run one op's launchers (rms_norm, swiglu, attention, attention_wmma, rope,
  // value_iteration, int8)
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--only" && i + 1 < argc) only = argv[++i];
    else if (a == "-v") verbose = true;
    else if (a == "--reverse") fastpt_simt::set_order(fastpt_simt::Order::kReverse);
    else if (a == "--shuffle") fastpt_simt::set_order(fastpt_simt::Order::kShuffle, 12345);
    else if (a == "--warp-serial") fastpt_simt::set_warp_serial(true);
  }
  if (only.empty() || only == "rms_norm") run_rms_norm();
  if (only.empty() || only == "swiglu") run_swiglu();
  if (only.empty() || only == "attention") run_attention();
  if (only.empty() || only == "attention" || only == "attention_wmma") run_attention_wmma();
  if (only.empty() || only == "rope") run_rope();
  if (only.empty() || only == "value_iteration") run_value_iteration();
  if (only.empty() || only == "int8") run_int8();
  int failures = 0, checks = 0;
  for (auto& [k, s] : stats) {
    std::printf("KERNEL %s launches %d checks %d failures %d\n", k.c_str(), s.launches, s.checks, s.failures);
    failures += s.failures;
    checks += s.checks;
  }
  std::printf("%d checks (%d also against the CPU kernel%s), %d failures\n%zu kernels emulated\n",
              checks, cpu_comparisons, kWithCpu ? "" : ": not linked", failures, stats.size());
  return failures != 0;
}
