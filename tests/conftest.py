"""Shared fixtures. Tests import the installed fastpt (tests/ is not a package, so the
repository root is not put on sys.path and the source folder, which has no _C, is not
imported by mistake)."""

from __future__ import annotations

import pytest
import torch

import fastpt

CAPABILITIES = ["DEFAULT", "AVX2", "AVX512", "AVX512_BF16"]
_ORDER = {name: i for i, name in enumerate(CAPABILITIES)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=CAPABILITIES)
def cpu_capability(request):
    """Runs a test once per CPU kernel build (DEFAULT / AVX2 / AVX512 / AVX512_BF16) this CPU can run."""
    best = fastpt._C.detected_cpu_capability()
    if _ORDER[request.param] > _ORDER[best]:
        pytest.skip(f"this CPU cannot run the {request.param} kernels (best: {best})")
    previous = fastpt._C.cpu_capability()
    fastpt._C.set_cpu_capability(request.param)
    yield request.param
    fastpt._C.set_cpu_capability(previous)
