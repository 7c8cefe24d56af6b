"""Shared fixtures. Tests import the installed fastpt (tests/ is not a package, so the
repository root is not put on sys.path and the source folder, which has no _C, is not
imported by mistake)."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

import fastpt

CAPABILITIES = ["DEFAULT", "AVX2", "AVX512", "AVX512_BF16"]
_ORDER = {name: i for i, name in enumerate(CAPABILITIES)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=[f"{cap}-{store}" for cap, store in itertools.product(CAPABILITIES, ("store", "stream"))])
def cpu_capability(request):
    """Runs a test once per CPU kernel build (DEFAULT / AVX2 / AVX512 / AVX512_BF16) this CPU
    can run, each with ordinary stores and with non-temporal stores forced on (kernels use
    them only for outputs of 32 MiB and more, which the tests' shapes are not)."""
    cap, store = request.param.split("-")
    best = fastpt._C.detected_cpu_capability()
    if _ORDER[cap] > _ORDER[best]:
        pytest.skip(f"this CPU cannot run the {cap} kernels (best: {best})")
    previous_cap, previous_bytes = fastpt._C.cpu_capability(), fastpt._C.stream_min_bytes()
    fastpt._C.set_cpu_capability(cap)
    fastpt._C.set_stream_min_bytes(0 if store == "stream" else 1 << 62)
    yield cap
    fastpt._C.set_cpu_capability(previous_cap)
    fastpt._C.set_stream_min_bytes(previous_bytes)


@pytest.fixture
def _quiet_fake_tensor_log():
    # FakeTensorMode logs every TypeError and every error of a C++ composite op with a traceback.
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)
