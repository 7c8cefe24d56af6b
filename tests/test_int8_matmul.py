"""fastpt.ops.int8_matmul on every CPU path: exact int32 sums, the dequantizing epilogue, path
selection, bad input, opcheck and compile."""

from __future__ import annotations

import pytest
import torch

import fastpt
from fastpt import ops
from fastpt.ops import reference_finetune as ref
from int8_util import rand_int8

PATHS = fastpt._C.int8_matmul_paths()
SHAPES = [(1, 1, 1), (7, 13, 5), (33, 70, 65), (97, 130, 300), (64, 64, 128), (5, 200, 1025)]


@pytest.fixture(params=["amx", "vnni", "avx2", "scalar"])
def int8_path(request):
    """Runs a test on each int8 GEMM path this machine has."""
    if request.param not in PATHS:
        pytest.skip(f"this machine has no {request.param} int8 path (has: {PATHS})")
    fastpt._C.set_int8_matmul_path(request.param)
    assert fastpt._C.int8_matmul_path() == request.param
    yield request.param
    fastpt._C.set_int8_matmul_path("auto")


# ---------------------------------------------------------------- int8_matmul

@pytest.mark.parametrize("m, k, n", SHAPES)
def test_exact_int32_sums_every_path(int8_path, m, k, n):
    a, b = rand_int8(m, k), rand_int8(n, k)
    assert torch.equal(ops.int8_matmul(a, b), ref.int8_matmul(a, b))


def test_extreme_values_do_not_overflow(int8_path):
    k = 4096  # 4096 * 128 * 128 = 2^26 per sum: far from int32's limit, and exact
    a = torch.full((40, k), -128, dtype=torch.int8)
    b = torch.cat([torch.full((20, k), -128, dtype=torch.int8), torch.full((20, k), 127, dtype=torch.int8)])
    out = ops.int8_matmul(a, b)
    assert torch.equal(out, ref.int8_matmul(a, b))
    assert out[0, 0] == 128 * 128 * k and out[0, 30] == -128 * 127 * k


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_dequant_epilogue(cpu_capability, out_dtype, bias):
    m, k, n = 37, 100, 70
    a, b = rand_int8(m, k), rand_int8(n, k)
    sa, sb = torch.rand(m) / 100, torch.rand(n) / 100
    bias_t = torch.randn(n) if bias else None
    out = ops.int8_matmul(a, b, sa, sb, out_dtype, bias_t)
    expect = ref.int8_matmul(a, b, sa, sb, torch.float64, bias_t)
    assert out.dtype == out_dtype and out.shape == (m, n)
    # float32 epilogue: a few ulps; then one rounding to out_dtype
    rtol = 4 * torch.finfo(torch.float32).eps + torch.finfo(out_dtype).eps
    assert ((out.double() - expect).abs() <= rtol * expect.abs() + 1e-6).all()


def test_paths_agree_and_are_reported():
    assert PATHS[-1] == "scalar" and fastpt._C.int8_matmul_path() == PATHS[0]
    a, b = rand_int8(50, 300), rand_int8(40, 300)
    results = []
    for path in PATHS:
        fastpt._C.set_int8_matmul_path(path)
        results.append(ops.int8_matmul(a, b))
    fastpt._C.set_int8_matmul_path("auto")
    assert all(torch.equal(r, results[0]) for r in results)


def test_kernel_build_caps_the_path(cpu_capability):
    expected = {"DEFAULT": "scalar", "AVX2": "avx2"}.get(cpu_capability, PATHS[0])
    assert fastpt._C.int8_matmul_path() == expected


def test_bad_path_name():
    with pytest.raises(ValueError, match="int8 path must be"):
        fastpt._C.set_int8_matmul_path("sse")


@pytest.mark.parametrize(
    "a, b, kwargs, error, match",
    [
        (torch.ones(4, 8), torch.ones(3, 8, dtype=torch.int8), {}, TypeError, "a must be int8"),
        (rand_int8(4, 8), torch.ones(3, 8), {}, TypeError, "b must be int8"),
        (rand_int8(4, 8), rand_int8(3, 7), {}, ValueError, "same inner dim"),
        (rand_int8(4, 8, 2), rand_int8(3, 8), {}, ValueError, "a must be 2-D"),
        (rand_int8(4, 8), rand_int8(3, 8), {"scale_a": torch.ones(4)}, ValueError, "scale_b is required"),
        (rand_int8(4, 8), rand_int8(3, 8), {"scale_a": torch.ones(4), "scale_b": torch.ones(2)},
         ValueError, "scale_b must have shape"),
        (rand_int8(4, 8), rand_int8(3, 8), {"scale_a": torch.ones(4, dtype=torch.float64),
                                            "scale_b": torch.ones(3)}, TypeError, "scale_a must be float32"),
        (rand_int8(4, 8), rand_int8(3, 8), {"scale_a": torch.ones(4), "scale_b": torch.ones(3),
                                            "out_dtype": torch.int32}, ValueError, "exact integer sums"),
    ],
)
def test_int8_matmul_bad_input(a, b, kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.int8_matmul(a, b, **kwargs)


def test_int8_matmul_opcheck_and_compile():
    a, b = rand_int8(33, 70), rand_int8(20, 70)
    sa, sb = torch.rand(33), torch.rand(20)
    torch.library.opcheck(torch.ops.fastpt.int8_matmul.default, (a, b, None, None, None, None))
    torch.library.opcheck(torch.ops.fastpt.int8_matmul.default, (a, b, sa, sb, torch.bfloat16, torch.randn(20)))
    f = torch.compile(lambda a, b: ops.int8_matmul(a, b, sa, sb), fullgraph=True)
    torch.testing.assert_close(f(a, b), ops.int8_matmul(a, b, sa, sb))
