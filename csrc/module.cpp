// fastpt._C as a Python module: what is not a tensor op (build facts, CPU features, the
// CPU kernel build in use). Importing it also runs the TORCH_LIBRARY registrations of the
// other translation units linked into the same shared object.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <stdexcept>
#include <string>

#include "common/cpu_dispatch.h"
#include "common/cpu_features.h"
#include "ops/int8/int8_path.h"

namespace py = pybind11;
using fastpt::cpu::Capability;

namespace {

std::map<std::string, bool> cpu_features_dict() {
  const auto& f = fastpt::cpu::cpu_features();
  return {{"avx2", f.avx2},         {"avx512", f.avx512},       {"avx512_vnni", f.avx512_vnni},
          {"avx512_bf16", f.avx512_bf16}, {"amx_tile", f.amx_tile}, {"amx_int8", f.amx_int8},
          {"amx_bf16", f.amx_bf16}, {"intel", f.intel}};
}

py::dict build_info() {
  py::dict d;
  d["version"] = FASTPT_VERSION;
  d["torch_version"] = FASTPT_TORCH_VERSION;
  d["cuda"] = bool(FASTPT_WITH_CUDA);
  d["cpu_kernel_builds"] = std::vector<std::string>{"DEFAULT", "AVX2", "AVX512", "AVX512_BF16"};
  d["compiler"] = __VERSION__;
  return d;
}

// std::invalid_argument (unknown name, or more than this CPU can run) -> ValueError
void set_cpu_capability(const std::string& name) {
  fastpt::cpu::set_capability(fastpt::cpu::parse_capability(name));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpt compiled core";
  m.def("build_info", &build_info, "How this extension was built.");
  m.def("cpu_features", &cpu_features_dict, "CPU features detected at run time (cpuid + OS support).");
  m.def("cpu_capability", [] { return std::string(fastpt::cpu::capability_name(fastpt::cpu::capability())); },
        "The CPU kernel build in use: DEFAULT, AVX2, AVX512 or AVX512_BF16.");
  m.def("detected_cpu_capability",
        [] { return std::string(fastpt::cpu::capability_name(fastpt::cpu::detected_capability())); },
        "The best CPU kernel build this machine can run.");
  m.def("set_cpu_capability", &set_cpu_capability, py::arg("name"),
        "Use another CPU kernel build (at most the detected one); for tests and A/B timing.");
  m.def("own_gemm_active", &fastpt::cpu::own_gemm_active,
        "Whether fp32 products run on fastpt's AVX-512 kernels instead of MKL (non-Intel CPU, AVX512 build).");
  m.def("stream_min_bytes", &fastpt::cpu::stream_min_bytes,
        "Outputs of at least this many bytes are written with non-temporal stores.");
  m.def("set_stream_min_bytes", &fastpt::cpu::set_stream_min_bytes, py::arg("bytes"),
        "Change that threshold (0: always stream); for tests and A/B timing.");
  m.def("int8_matmul_path", [] { return std::string(fastpt::cpu::int8_path_name(fastpt::cpu::int8_path())); },
        "The CPU int8 GEMM path the next int8 matmul uses: amx, vnni, avx2 or scalar.");
  m.def("int8_matmul_paths", &fastpt::cpu::int8_paths_available,
        "The CPU int8 GEMM paths this machine can run, fastest first.");
  m.def("set_int8_matmul_path", &fastpt::cpu::set_int8_path, py::arg("name"),
        "Cap the int8 GEMM path (auto, amx, vnni, avx2, scalar); for tests and A/B timing.");
}
