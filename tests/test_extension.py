"""The compiled core: build info, loading errors, CPU kernel builds, CUDA in a CPU build."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import fastpt
from fastpt import _loader


def test_build_info_reports_versions_and_features():
    info = fastpt.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["cuda"] in (True, False)
    assert info["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16")
    assert set(info["cpu_features"]) >= {"avx2", "avx512", "avx512_vnni", "amx_tile", "amx_int8"}
    # Same answer as torch's own detection, which uses the same CPU/OS checks.
    assert info["cpu_features"]["avx512"] == (torch.backends.cpu.get_cpu_capability() == "AVX512")
    assert info["cpu_capability"] == fastpt._C.detected_cpu_capability()


def test_ops_are_registered():
    for name in ("rms_norm", "rms_norm_backward", "swiglu", "swiglu_backward", "rope", "rope_backward", "rope_"):
        assert hasattr(torch.ops.fastpt, name), name


def test_set_cpu_capability_rejects_unknown_names():
    with pytest.raises(ValueError, match="DEFAULT, AVX2, AVX512 or AVX512_BF16"):
        fastpt._C.set_cpu_capability("SSE9")


def test_a_bad_cpu_capability_in_the_environment_is_named():
    """The variable is read at the first op call; its error there named no variable."""
    code = ("import torch, fastpt\n"
            "try:\n    fastpt.ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)\n"
            "except ValueError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir(), env={**os.environ, "FASTPT_CPU_CAPABILITY": "avx2"})
    assert "environment variable FASTPT_CPU_CAPABILITY: CPU capability must be DEFAULT" in out.stdout, out


def test_cpu_capability_switch_changes_the_build_in_use(cpu_capability):
    assert fastpt._C.cpu_capability() == cpu_capability


def test_one_openmp_runtime():
    """The extension uses torch's bundled libgomp; a second OpenMP runtime would fight
    torch's thread pool for the 2 cores. Checked in a fresh process that runs fastpt's ops
    (other tests import scikit-learn, which brings its own libgomp)."""
    code = ("import torch, fastpt; fastpt.ops.rms_norm(torch.randn(64, 64), torch.ones(64), 1e-6);"
            "libs = {l.split()[-1] for l in open('/proc/self/maps') if 'gomp' in l or 'libiomp' in l};"
            "print(len(libs), sorted(libs))")
    # cwd: not the repository root, whose fastpt/ source folder has no compiled _C
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 "), out.stdout


def test_import_error_on_torch_mismatch(monkeypatch):
    monkeypatch.setattr(_loader, "_built_against", lambda: "0.0.1")
    with pytest.raises(ImportError, match=r"built against torch 0\.0\.1.*Rebuild fastpt: pip install"):
        _loader.load_extension()


def test_import_error_when_library_fails_to_load(monkeypatch):
    def broken(name):
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(_loader.importlib, "import_module", broken)
    with pytest.raises(ImportError, match="failed to load.*undefined symbol.*Rebuild fastpt"):
        _loader.load_extension()


def test_import_from_the_source_folder_says_so():
    """python -m fastpt in the repository root imports the source fastpt/, which has no _C;
    the message said to rebuild, which does not help."""
    root = Path(__file__).resolve().parents[1]
    if any((root / "fastpt").glob("_C*.so")):
        pytest.skip("this checkout has a compiled _C in its source folder (an in-place build)")
    out = subprocess.run([sys.executable, "-m", "fastpt", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=root)
    assert out.returncode != 0
    assert f"fastpt was imported from its source folder {root}" in out.stderr, out.stderr
    assert "torchrun --no-python fastpt" in out.stderr


@pytest.mark.skipif(fastpt.build_info()["cuda"], reason="this build has CUDA kernels")
def test_cuda_tensors_in_a_cpu_build_get_a_clear_error():
    # A CPU-only torch cannot make CUDA tensors, so call the CUDA kernel slot directly.
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(NotImplementedError, match="no CUDA kernels.*Rebuild"):
        torch.ops.fastpt.rms_norm.default.redispatch(keyset, torch.ones(2, 4), torch.ones(4), 1e-6)


def test_stream_threshold_is_validated():
    before = fastpt._C.stream_min_bytes()
    with pytest.raises(ValueError, match=">= 0"):
        fastpt._C.set_stream_min_bytes(-1)
    assert fastpt._C.stream_min_bytes() == before  # the refused value was not stored
    try:
        fastpt._C.set_stream_min_bytes(12345)
        assert fastpt._C.stream_min_bytes() == 12345
    finally:
        fastpt._C.set_stream_min_bytes(before)
