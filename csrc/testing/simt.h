// SIMT emulator: runs CUDA kernels (*_kernels.cu) on the CPU, compiled by the host compiler
// with -DFASTPT_SIMT_EMULATOR (C++20). Included only through common/cuda_compat.h. See
// csrc/testing/README.md for what is and is not emulated.
//
// Execution model. Launches are serialized (a process-wide lock) and the blocks of a launch run
// one after another on the launching OS thread, so one copy of each `__shared__` variable (a
// `static`) serves every block in turn; it is filled with a poison pattern before each block, as
// dynamic shared memory is. The threads of a block are fibers (ucontext) on that OS thread,
// switched only at __syncthreads, warp primitives and WMMA calls; between two such points a
// thread runs alone. The order in which ready threads are resumed is configurable (forward,
// reverse, seeded shuffle: set_order() or FASTPT_SIMT_ORDER=forward|reverse|shuffle), so a
// missing barrier reads data that is not written yet (the poison) and shows up as a wrong
// result, deterministically. Warps that call the same warp primitives move in lockstep under
// those orders, so a race between warps (common in WMMA kernels, where every call is
// warp-collective) needs the warp-serial schedule (set_warp_serial(true) or
// FASTPT_SIMT_WARP_SERIAL=1): one warp at a time runs up to its next __syncthreads, the first
// warp in the resume order first.
//
// Errors (a thread exits while others wait at a barrier, a warp primitive called by a partial
// warp, a non-full mask, divergent barriers, lanes of a warp in different primitives, WMMA
// operands that break CUDA's rules, a bad launch configuration) end the launch and come back as
// its cudaError_t, also pending for cudaGetLastError as on CUDA; last_error_message() says what
// happened.
//
// The pieces, in the order they build on each other: simt_cuda_builtins.h (keywords, types,
// __half, math, atomics), simt_settings.h (settings, errors), simt_static_smem.h (static shared
// memory), simt_block.h (fibers, barriers, scheduler), simt_launch.h (launches and their
// errors), simt_warp_primitives.h (__syncthreads, shuffles, votes), simt_wmma.h (nvcuda::wmma).
#pragma once

#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "testing/simt_static_smem.h"

// The system headers above come before the keyword macros of simt_cuda_builtins.h (an empty
// `__noinline__` would change their `__attribute__((__noinline__))`).
#include "testing/simt_cuda_builtins.h"
#include "testing/simt_settings.h"
#include "testing/simt_block.h"
#include "testing/simt_launch.h"
#include "testing/simt_warp_primitives.h"
#include "testing/simt_wmma.h"
