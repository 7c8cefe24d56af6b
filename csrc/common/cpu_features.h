// What this CPU (and its OS) can execute; filled once by cpuid.
#pragma once

namespace fastpt::cpu {

struct CpuFeatures {
  bool avx2;         // with FMA and F16C
  bool avx512;       // F + BW + VL + DQ
  bool avx512_vnni;
  bool avx512_bf16;
  bool amx_tile;
  bool amx_int8;
  bool amx_bf16;
  bool intel;  // vendor GenuineIntel: where MKL runs its AVX-512 / AMX kernels (elsewhere AVX2 ones)
};

const CpuFeatures& cpu_features();

}  // namespace fastpt::cpu
