"""fastpt.nn.RMSNorm as a drop-in for torch.nn.RMSNorm and HF's LlamaRMSNorm / T5LayerNorm:
same constructor arguments, same state-dict keys, same outputs; RMSNorm.from_module."""

from __future__ import annotations

import pytest
import torch

from fastpt import nn as fnn
from tolerances import assert_close


def _check_same_output(ours, theirs, n):
    """ours(x) against RMSNorm's formula in float64 with *their* eps and weight (not fastpt's
    own eager path, whose mistakes ours would share), their fp32 output as the eager yardstick."""
    x = torch.randn(3, 7, n)
    eps = theirs.eps if isinstance(theirs, torch.nn.RMSNorm) else theirs.variance_epsilon
    x64 = x.double()
    ref64 = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps) * theirs.weight.detach().double()
    with torch.no_grad():
        assert_close(ours(x), ref64, torch.float32, eager=theirs(x), what=type(theirs).__name__)


def _randomized(module):
    with torch.no_grad():
        module.weight.normal_()
    return module


def test_loads_torch_rms_norm_state_dict():
    theirs = _randomized(torch.nn.RMSNorm(40, eps=1e-5))
    ours = fnn.RMSNorm(40, eps=1e-5)
    ours.load_state_dict(theirs.state_dict())
    _check_same_output(ours, theirs, 40)


def test_loads_hf_llama_rms_norm_state_dict():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    theirs = _randomized(llama.LlamaRMSNorm(40, eps=1e-5))
    ours = fnn.RMSNorm(hidden_size=40, eps=1e-5)
    ours.load_state_dict(theirs.state_dict())
    assert ours.variance_epsilon == theirs.variance_epsilon
    _check_same_output(ours, theirs, 40)


@pytest.mark.parametrize("kind", ["torch", "llama", "t5"])
def test_from_module(kind):
    if kind == "torch":
        theirs = torch.nn.RMSNorm(24, eps=1e-4)
    else:
        pytest.importorskip("transformers")
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from transformers.models.t5.modeling_t5 import T5LayerNorm
        theirs = (LlamaRMSNorm if kind == "llama" else T5LayerNorm)(24, eps=1e-4)
    theirs = _randomized(theirs)
    ours = fnn.RMSNorm.from_module(theirs)
    assert ours.eps == 1e-4 and ours.normalized_shape == (24,)
    assert ours.weight.data_ptr() != theirs.weight.data_ptr()  # a copy, not an alias
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    _check_same_output(ours, theirs, 24)


def test_from_module_without_affine():
    ours = fnn.RMSNorm.from_module(torch.nn.RMSNorm((2, 8), elementwise_affine=False))
    assert ours.weight is None and ours.eps is None and ours.normalized_shape == (2, 8)
    x = torch.randn(3, 2, 8)
    torch.testing.assert_close(ours(x), torch.nn.functional.rms_norm(x, (2, 8)))


def test_variance_epsilon_is_settable():
    norm = fnn.RMSNorm(8)
    norm.variance_epsilon = 1e-3
    assert norm.eps == 1e-3


def test_bad_arguments():
    with pytest.raises(TypeError, match="exactly one"):
        fnn.RMSNorm()
    with pytest.raises(TypeError, match="exactly one"):
        fnn.RMSNorm(8, hidden_size=8)
    with pytest.raises(TypeError, match="cannot convert Linear"):
        fnn.RMSNorm.from_module(torch.nn.Linear(4, 4))


def test_default_eps_is_torch_s_for_low_precision_inputs():
    # torch computes bf16 / fp16 in float32, with float32's eps; finfo(bf16).eps (7.8e-3)
    # swamped the mean square of small inputs: 0.0073 where torch gives 0.902.
    x = (torch.randn(4, 8) * 1e-3).bfloat16()
    ours, theirs = fnn.RMSNorm(8, dtype=torch.bfloat16), torch.nn.RMSNorm(8, dtype=torch.bfloat16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1.6e-2, atol=1e-2)
    mixed = fnn.RMSNorm(8)(x)  # an fp32 weight: torch's style keeps x's dtype
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed, torch.nn.RMSNorm(8)(x), rtol=1.6e-2, atol=1e-2)


def test_a_weight_of_another_dtype_gives_llama_s_promoted_result():
    LlamaRMSNorm = pytest.importorskip("transformers.models.llama.modeling_llama").LlamaRMSNorm
    hf = _randomized(LlamaRMSNorm(8, eps=1e-6))
    ours = fnn.RMSNorm.from_module(hf)
    x = torch.randn(2, 3, 8).bfloat16()
    got, want = ours(x), hf(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eps_zero_is_accepted_as_torch_accepts_it(dtype):
    # fastpt's kernel requires eps > 0, so eps 0 runs the PyTorch formula: nonzero rows as
    # torch's, an all-zero row NaN (0 * rsqrt(0)) as torch's, and no crash.
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        torch.ops.fastpt.rms_norm(torch.ones(2, 5), torch.ones(5), 0.0)
    theirs = _randomized(torch.nn.RMSNorm(5, eps=0.0, dtype=dtype))
    ours = fnn.RMSNorm(5, eps=0.0, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    assert ours.eps == 0.0 and fnn.RMSNorm.from_module(theirs).eps == 0.0
    x = torch.randn(4, 5, dtype=dtype)
    x[2] = 0
    x.requires_grad_(True)
    got, want = ours(x), theirs(x)
    nonzero = torch.tensor([True, True, False, True])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[nonzero], want[nonzero], **tol)
    assert got[2].isnan().all() and want[2].isnan().all()
    grad = torch.randn(4, 5, dtype=dtype)
    (g_ours,), (g_theirs,) = (torch.autograd.grad(y, x, grad) for y in (got, want))
    torch.testing.assert_close(g_ours[nonzero], g_theirs[nonzero], **tol)


@pytest.mark.parametrize("eps, error, message", [(-1e-6, ValueError, "eps must be a finite number >= 0"),
                                                 (float("nan"), ValueError, "got nan"),
                                                 (float("inf"), ValueError, "got inf"),
                                                 ("1e-6", TypeError, "eps must be a number or None, got str")])
def test_bad_eps_is_named(eps, error, message):
    with pytest.raises(error, match=message):
        fnn.RMSNorm(8, eps=eps)
