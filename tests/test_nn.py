"""fastpt.nn modules: drop-in behaviour and the use_fused A/B switch."""

from __future__ import annotations

import pytest
import torch

from fastpt import nn as fnn


@pytest.mark.parametrize("shape, eps, affine", [(64, 1e-6, True), ((4, 16), None, True), (32, 1e-5, False)])
def test_rms_norm_matches_torch_rms_norm(shape, eps, affine):
    ours, theirs = fnn.RMSNorm(shape, eps=eps, elementwise_affine=affine), torch.nn.RMSNorm(shape, eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            theirs.weight.normal_()
        ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, *((shape,) if isinstance(shape, int) else shape), requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), theirs(x2)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    if affine:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-5)


def test_rms_norm_fused_and_eager_agree():
    fused, eager = fnn.RMSNorm(48), fnn.RMSNorm(48, use_fused=False)
    x = torch.randn(4, 48)
    torch.testing.assert_close(fused(x), eager(x))


def test_rms_norm_bad_input():
    with pytest.raises(ValueError, match="eps"):
        fnn.RMSNorm(8, eps=0.0)
    with pytest.raises(ValueError, match="got input of shape"):
        fnn.RMSNorm(8)(torch.randn(2, 7))


def test_swiglu_mlp_fused_and_eager_agree():
    mlp = fnn.SwiGLU(32, 88)
    x = torch.randn(2, 5, 32)
    y = mlp(x)
    mlp.use_fused = False
    torch.testing.assert_close(y, mlp(x))
    assert set(mlp.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}


def test_rotary_embedding_offset_and_cache_growth():
    rope = fnn.RotaryEmbedding(32, max_position_embeddings=4)
    q, k = torch.randn(1, 4, 10, 32), torch.randn(1, 2, 10, 32)
    full = rope(q, k)  # grows the cache from 4 to >= 10 positions
    assert rope.cos_cached.shape[0] >= 10
    step = rope(q[:, :, 7:], k[:, :, 7:], offset=7)
    torch.testing.assert_close(step[0], full[0][:, :, 7:])
    rope.use_fused = False
    torch.testing.assert_close(rope(q, k), full)


def test_rotary_embedding_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        fnn.RotaryEmbedding(7)
    with pytest.raises(ValueError, match="layout"):
        fnn.RotaryEmbedding(8, layout="neox")


def test_linear_inference_under_autocast_reuses_the_cast_weight():
    """No grad + bf16 autocast: the same result as F.linear under autocast, from one bf16 copy
    of the weight kept across calls; remade when the weight changes; never made with grad."""
    lin = fnn.Linear(64, 48)
    x = torch.randn(5, 64)

    def f_linear():  # a fresh autocast region: autocast caches its casts of leaves inside one
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.nn.functional.linear(x, lin.weight, lin.bias)

    def ours():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return lin(x)

    got = ours()
    copy = lin._autocast_weight[1]
    assert got.dtype == torch.bfloat16 and torch.equal(got, f_linear())
    ours()
    assert lin._autocast_weight[1] is copy                        # reused across calls
    with torch.no_grad():
        lin.weight.mul_(2)                                         # in place: the version bumps
    assert torch.equal(ours(), f_linear())
    assert lin._autocast_weight[1] is not copy
    del lin._autocast_weight
    with torch.autocast("cpu", dtype=torch.bfloat16):             # grad mode: autocast's own cast
        lin(x).float().sum().backward()
    assert "_autocast_weight" not in lin.__dict__ and lin.weight.grad is not None
