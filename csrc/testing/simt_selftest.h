// SIMT emulator self-tests: what the test files (simt_selftest*.cpp) share: the result line
// (expect), the block size of the reductions, a launch helper, and the entry points of the
// static shared memory and WMMA tests that main (simt_selftest.cpp) calls.
#pragma once

#include "common/cuda_compat.h"

#include <string>

namespace simt_selftest {

// Prints "SELFTEST <name> ok|FAIL[: detail]" and counts the test.
void expect(const std::string& name, bool ok, const std::string& detail = "");

constexpr int kN = 128;  // threads of the shared memory reductions

template <typename... P, typename... A>
cudaError_t launch(void (*k)(P...), dim3 grid, dim3 block, size_t smem, A... args) {
  return FASTPT_SIMT_LAUNCH(k, grid, block, smem, nullptr, args...);
}

inline bool has(const std::string& s, const char* sub) { return s.find(sub) != std::string::npos; }

// simt_selftest_static_smem.cpp
void test_static_smem();
// simt_selftest_wmma.cpp
void test_wmma_operands();
void test_wmma_products();

}  // namespace simt_selftest
