"""Every CUDA kernel of fastpt, run on the CPU through the SIMT emulator (csrc/testing/).

The CUDA kernel files (csrc/**/*_kernels.cu) are compiled as C++ by the host compiler with
-DFASTPT_SIMT_EMULATOR together with csrc/testing/run_kernels*.cpp (main in run_kernels.cpp,
one run_kernels_<op>.cpp per op), which launches every launcher on small shapes (odd sizes,
several blocks, unaligned pointers, fp32/bf16/fp16/fp64, forward and backward) and checks
the results against float64 references with the project's tolerance rule; the DEFAULT build
of the CPU kernels (csrc/ops/*/<op>_kernel.cpp, against torch's headers and libtorch_cpu) runs
on the same inputs, and the emulated kernel may have at most 2x its error (or 2x the error of
the formula evaluated in the compute type). The emulator's own tests are
csrc/testing/simt_selftest*.cpp.

The binaries are built once per source state (cached by a hash of the sources and flags in
the temp folder). A missing compiler or a failed build is a test failure, never a skip.
Also here: every kernel file compiles with nvcc for sm_75, the oldest arch fastpt supports
(skipped without nvcc, like .ci/check-cuda-kernels, which compiles for sm_80 and sm_90).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++20", "-O1", "-pthread", "-DFASTPT_SIMT_EMULATOR", "-DFASTPT_SIMT_CPU_KERNELS",
         "-I", str(CSRC)]
# The CPU kernels as CMake builds their DEFAULT variant (no emulator: real c10 types).
CPU_FLAGS = ["-std=c++20", "-O2", "-fopenmp", "-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT",
             "-I", str(CSRC), *(f for d in cpp_extension.include_paths() for f in ("-isystem", d))]
TORCH_LIBS = cpp_extension.library_paths()
RUN_TIMEOUT = 300
SELFTEST_TIMEOUT = 60


def _kernel_files() -> list[Path]:
    return sorted(CSRC.rglob("*.cu"))


def _cpu_kernel_files() -> list[Path]:
    return sorted(CSRC.glob("ops/*/*_kernel.cpp")) + [CSRC / "common" / "cpu_features.cpp"]


def _program_sources(name: str) -> list[Path]:
    """One test program's own sources: <name>.cpp (its main) and <name>_*.cpp."""
    return sorted((CSRC / "testing").glob(f"{name}*.cpp"))


def _program_objects(name: str) -> list[str]:
    return [f"{src.stem}.o" for src in _program_sources(name)]


def _sources_hash() -> str:
    h = hashlib.sha256(" ".join([CXX, *FLAGS, *CPU_FLAGS, torch.__version__]).encode())
    files = sorted({*CSRC.rglob("*.h"), *CSRC.rglob("*.cu"), *(CSRC / "testing").glob("*.cpp"),
                    *_cpu_kernel_files()})
    for f in files:
        h.update(str(f.relative_to(CSRC)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _compile(jobs: list[tuple[Path, Path, list[str]]]) -> None:
    """Compiles (source, object, flags) triples, two at a time."""
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, Path]] = []
    errors = []
    while pending or running:
        while pending and len(running) < max(2, os.cpu_count() or 1):
            src, obj, flags = pending.pop(0)
            cmd = [CXX, *flags, "-x", "c++", "-c", str(src), "-o", str(obj)]
            running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True), src))
        proc, src = running.pop(0)
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            errors.append(f"{src}:\n{out[-4000:]}")
    assert not errors, "emulator build failed:\n" + "\n".join(errors)


@pytest.fixture(scope="session")
def emulator_bins() -> dict[str, Path]:
    assert shutil.which(CXX), f"{CXX} not found: the emulated CUDA tests need a host C++ compiler"
    out = Path(tempfile.gettempdir()) / f"fastpt-simt-{os.getuid()}" / _sources_hash()
    bins = {"run_kernels": out / "run_kernels", "selftest": out / "simt_selftest", "obj": out / "obj"}
    if bins["run_kernels"].exists() and bins["selftest"].exists() and bins["obj"].is_dir():
        return bins
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="build-", dir=out.parent))
    kernels = _kernel_files()
    assert kernels, "no CUDA kernel files under csrc/"
    programs = ("run_kernels", "simt_selftest")
    assert all(_program_sources(name) for name in programs), "csrc/testing/ lacks a test program"
    jobs = [(src, build / f"{src.stem}.o", FLAGS) for name in programs for src in _program_sources(name)]
    jobs += [(k, build / f"{k.stem}.o", FLAGS) for k in kernels]
    jobs += [(c, build / f"cpu_{c.stem}.o", CPU_FLAGS) for c in _cpu_kernel_files()]
    _compile(jobs)
    kernel_objs = [str(build / f"{k.stem}.o") for k in kernels]
    kernel_objs += [str(build / f"cpu_{c.stem}.o") for c in _cpu_kernel_files()]
    torch_link = [f for d in TORCH_LIBS for f in (f"-L{d}", f"-Wl,-rpath,{d}")]
    torch_link += ["-ltorch_cpu", "-lc10"]
    for name in programs:
        objs = [str(build / obj) for obj in _program_objects(name)]
        extra = ["-fopenmp", *kernel_objs, *torch_link] if name == "run_kernels" else []
        res = subprocess.run([CXX, "-pthread", *objs, *extra, "-o", str(build / name)],
                             capture_output=True, text=True)
        assert res.returncode == 0, f"link of {name} failed:\n{res.stdout}{res.stderr}"
    out.mkdir(parents=True, exist_ok=True)
    # Objects first (the mutation test links against them), binaries last: a folder with
    # both binaries is complete. os.replace is atomic: concurrent sessions never see half a file.
    (out / "obj").mkdir(exist_ok=True)
    for obj in build.glob("*.o"):
        os.replace(obj, out / "obj" / obj.name)
    for name in ("run_kernels", "simt_selftest"):
        os.replace(build / name, out / name)
    shutil.rmtree(build, ignore_errors=True)
    return bins


def _run(binary: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # a hang in the emulator is a failure, not a stall
        pytest.fail(f"{binary.name} {' '.join(args)} did not finish in {timeout} s:\n{e.stdout}")
    if res.returncode < 0:  # fiber stacks have guard pages: an overflow is a SIGSEGV
        pytest.fail(f"{binary.name} {' '.join(args)} died of signal {-res.returncode} (out-of-bounds "
                    f"access or fiber stack overflow in a kernel?):\n{res.stdout[-4000:]}")
    return res


KERNEL_LINE = re.compile(r"^KERNEL (\S+) launches (\d+) checks (\d+) failures (\d+)$", re.M)


def _kernel_op(cu: Path) -> str:
    return cu.stem.removesuffix("_kernels")


def _uncovered_kernel_files(counters, kernel_files: list[Path]) -> tuple[list[Path], list[str]]:
    """Kernel files without an emulated counter of their own, and counters of no kernel file.

    A counter belongs to the one kernel file whose op (<op>_kernels.cu) is the longest prefix
    of its name followed by "_": attention_wmma_fwd is attention_wmma_kernels.cu's, not
    attention_kernels.cu's, so one file's tests never stand in for another's.
    """
    ops = {_kernel_op(cu): cu for cu in kernel_files}
    owned: dict[Path, list[str]] = {cu: [] for cu in kernel_files}
    orphans = []
    for name in counters:
        matches = [op for op in ops if name.startswith(op + "_")]
        if matches:
            owned[ops[max(matches, key=len)]].append(name)
        else:
            orphans.append(name)
    return [cu for cu, names in owned.items() if not names], orphans


# warp-serial: one warp at a time between barriers, the only schedule that shows races between
# warps that call the same warp primitives (every WMMA call is one) in lockstep.
@pytest.mark.parametrize("order", ["forward", "shuffle", "warp-serial"])
def test_every_cuda_kernel_emulated(emulator_bins, order, capsys):
    res = _run(emulator_bins["run_kernels"], *([f"--{order}"] if order != "forward" else []),
               timeout=RUN_TIMEOUT)
    tail = res.stdout[-6000:] + res.stderr[-2000:]
    assert res.returncode == 0, f"emulated CUDA kernels failed ({order} order):\n{tail}"
    counts = {m[0]: tuple(map(int, m[1:])) for m in KERNEL_LINE.findall(res.stdout)}
    m = re.search(r"^(\d+) kernels emulated$", res.stdout, re.M)
    assert m and int(m.group(1)) == len(counts) and counts, f"no kernel counts in the output:\n{tail}"
    cpu = re.search(r"^(\d+) checks \((\d+) also against the CPU kernel\), 0 failures$", res.stdout, re.M)
    assert cpu and int(cpu.group(2)) > 0, f"the CPU kernels were not compared:\n{tail}"
    for name, (launches, checks, failures) in counts.items():
        assert launches > 0 and checks > launches and failures == 0, (name, launches, checks, failures)
    # Every CUDA kernel file has emulated launches of its own: <op>_kernels.cu -> a launcher
    # named <op>_* and owned by no file with a longer op (see _uncovered_kernel_files), and
    # every launcher belongs to a kernel file.
    uncovered, orphans = _uncovered_kernel_files(counts, _kernel_files())
    assert not uncovered, "no emulated test in csrc/testing/run_kernels_*.cpp for " + \
        ", ".join(str(cu.relative_to(ROOT)) for cu in uncovered)
    assert not orphans, f"emulated launchers named after no csrc/**/<op>_kernels.cu: {orphans}"
    with capsys.disabled():
        print(f"\n[{order} order] {len(counts)} kernels emulated: " +
              ", ".join(f"{k} ({c[0]} launches, {c[1]} checks)" for k, c in sorted(counts.items())) +
              f"; {cpu.group(2)} of {cpu.group(1)} checks also against the CPU kernel")


# The real kernel files, and a pair whose ops overlap even if the real ones stop doing so.
@pytest.mark.parametrize("files", [_kernel_files(), [Path("x/a_kernels.cu"), Path("x/a_b_kernels.cu")]],
                         ids=["csrc", "overlapping"])
def test_coverage_check_is_per_file(files):
    """The check above fails when one kernel file's launchers are all gone, even where another
    file's op starts with its op (attention_wmma_* against attention_kernels.cu). No build."""
    counters = [f"{_kernel_op(cu)}_{suffix}" for cu in files for suffix in ("fwd", "bwd")]
    assert _uncovered_kernel_files(counters, files) == ([], [])
    for cu in files:
        own = {f"{_kernel_op(cu)}_fwd", f"{_kernel_op(cu)}_bwd"}
        uncovered, _ = _uncovered_kernel_files([c for c in counters if c not in own], files)
        assert uncovered == [cu], (cu, uncovered)
    assert _uncovered_kernel_files([*counters, "nothing_fwd"], files)[1] == ["nothing_fwd"]


def test_emulator_selftests(emulator_bins):
    res = _run(emulator_bins["selftest"], timeout=SELFTEST_TIMEOUT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"SIMT emulator self-tests failed:\n{out}"
    results = dict(re.findall(r"^SELFTEST (\S+) (ok|FAIL)", res.stdout, re.M))
    required = {
        "race_caught_forward", "race_caught_shuffle", "correct_reduction_forward",
        "warp_primitives_exact", "warp_sum_exact", "early_exit_at_barrier_is_error",
        "partial_warp_block_is_error", "exited_lane_shuffle_is_error",
        "divergent_barriers_is_error", "wmma_f16", "wmma_bf16", "wmma_s8",
        "inter_warp_race_caught_warp_serial",
        "static_smem_poisoned_each_block", "static_smem_min_race_caught", "static_smem_counted_in_limit",
        "device_function_static_smem_counted_in_limit", "concurrent_launches_serialized",
        "mixed_warp_primitives_is_error", "shuffle_sizes_differ_is_error", "same_shuffle_at_two_calls_ok",
        "syncwarp_at_two_calls_ok", "wmma_at_two_calls_is_error", "syncthreads_at_two_calls_is_error",
        "shfl_xor_width_ptx", "shfl_offsets_modulo_32", "wmma_operands_ok",
        "wmma_misaligned_pointer_is_error", "wmma_bad_ldm_is_error", "wmma_lanes_different_pointers_is_error",
    }
    missing = required - results.keys()
    assert not missing, f"self-tests not run: {sorted(missing)}\n{out}"
    assert all(v == "ok" for v in results.values()), out


# A real kernel with a barrier removed must fail under the emulator.
#  - block_sum (used by the RMSNorm kernels in block mode, n > 1024) without the barrier between
#    the per-warp partial writes and their reads;
#  - the WMMA attention forward without the barrier between the warps' S tiles and the softmax
#    rows that read two warps' tiles (the backward fails too: it uses the forward's lse), and
#    the dK dV kernel without the one between the warps' Pd^T, dS^T tiles and the products that
#    read them: warps move in lockstep through WMMA calls, so only the warp-serial schedule
#    catches these.
# name: (file to mutate, kernel file to rebuild, text, replacement, run_kernels args, kernels that must fail)
MUTATIONS = {
    "rms_norm": ("common/cuda_compat.h", "ops/rms_norm/rms_norm_kernels.cu",
                 "  if (lane == 0) scratch[warp] = v;\n  __syncthreads();\n",
                 "  if (lane == 0) scratch[warp] = v;\n", ["--only", "rms_norm"], ["rms_norm_fwd", "rms_norm_bwd"]),
    "attention_wmma_fwd": ("ops/attention/attention_wmma_kernels.cu", "ops/attention/attention_wmma_kernels.cu",
                           "    __syncthreads();  // a softmax row reads two warps' S tiles\n", "",
                           ["--only", "attention_wmma", "--warp-serial"], ["attention_wmma_fwd"]),
    "attention_wmma_bwd": ("ops/attention/attention_wmma_kernels.cu", "ops/attention/attention_wmma_kernels.cu",
                           "      __syncthreads();  // dV, dK tiles read every warp's Pd^T, dS^T\n", "",
                           ["--only", "attention_wmma", "--warp-serial"], ["attention_wmma_bwd"]),
}


@pytest.mark.parametrize("op", sorted(MUTATIONS))
def test_missing_barrier_in_a_real_kernel_is_caught(emulator_bins, tmp_path, op):
    mutation_file, kernel_file, mutation_from, mutation_to, run_args, must_fail = MUTATIONS[op]
    src = (CSRC / mutation_file).read_text()
    assert mutation_from in src, \
        f"mutation target not found in csrc/{mutation_file}: update MUTATIONS in this test"
    mutated = tmp_path / "csrc"
    shutil.copytree(CSRC, mutated)
    (mutated / mutation_file).write_text(src.replace(mutation_from, mutation_to, 1))
    obj_dir = emulator_bins["obj"]
    kernel_obj = tmp_path / (Path(kernel_file).stem + ".o")
    flags = [f if f != str(CSRC) else str(mutated) for f in FLAGS]
    _compile([(mutated / kernel_file, kernel_obj, flags)])
    own = _program_objects("run_kernels")
    skip = {*own, *_program_objects("simt_selftest"), kernel_obj.name}
    objs = [str(obj_dir / obj) for obj in own] + [str(kernel_obj)]
    objs += [str(o) for o in sorted(obj_dir.glob("*.o")) if o.name not in skip]
    torch_link = [f for d in TORCH_LIBS for f in (f"-L{d}", f"-Wl,-rpath,{d}")]
    exe = tmp_path / "run_kernels_mutated"
    res = subprocess.run([CXX, "-pthread", "-fopenmp", *objs, *torch_link, "-ltorch_cpu", "-lc10",
                          "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = _run(exe, *run_args, timeout=RUN_TIMEOUT)
    counts = {m[0]: tuple(map(int, m[1:])) for m in KERNEL_LINE.findall(res.stdout)}
    assert res.returncode == 1 and counts, res.stdout[-3000:]
    assert all(counts[k][2] > 0 for k in must_fail), counts


# bf16 WMMA does not exist before sm_80: the bf16 attention kernels compile to empty bodies
# there (the launcher sends bf16 to the SIMT kernels), else a T4 build (TORCH_CUDA_ARCH_LIST=7.5)
# fails. About 15 s on 2 cores.
def test_cuda_kernels_compile_for_sm75(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on the PATH")
    flags = ["-gencode", "arch=compute_75,code=sm_75", "-std=c++17", "-O3", "-Werror", "all-warnings",
             "-Xcompiler", "-Wall,-Werror", "-I", str(CSRC), "-c"]
    procs = [(cu, subprocess.Popen([nvcc, *flags, str(cu), "-o", str(tmp_path / f"{cu.stem}.o")],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for cu in _kernel_files()]
    failed = []
    for cu, proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failed.append(f"{cu.relative_to(ROOT)}:\n{out[-3000:]}")
    assert not failed, "nvcc for sm_75 failed:\n" + "\n".join(failed)
