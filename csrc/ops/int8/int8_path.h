// Which CPU int8 GEMM path runs: the best one the running CPU and OS support within the
// selected kernel build (cpu_dispatch.h), optionally capped by FASTPT_INT8_PATH or
// set_int8_path (for tests and A/B timing). AMX also needs the Linux permission
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), requested once on first use.
#pragma once

#include <string>
#include <vector>

#include "ops/int8/int8.h"

namespace fastpt::cpu {

Int8Path int8_path();                 // the path the next int8 GEMM uses
const char* int8_path_name(Int8Path path);  // "amx", "vnni", "avx2", "scalar"
std::vector<std::string> int8_paths_available();  // on this machine, fastest first
// "auto" (the default) or a path name; std::invalid_argument if this machine lacks it.
void set_int8_path(const std::string& name);

}  // namespace fastpt::cpu
