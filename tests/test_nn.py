"""fastpt.nn modules: drop-in behaviour and the use_fused A/B switch."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from fastpt import nn as fnn
from fastpt.ops import _onednn as fnn_onednn
from fastpt.nn import linear as fnn_linear
from fastpt.ops import reference


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
        fnn.RMSNorm(8, eps=-1e-6)  # (0 is accepted, as torch.nn.RMSNorm accepts it)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_tables_survive_a_dtype_round_trip(dtype):
    """.bfloat16()/.half() keep the cos/sin tables float32 (rope takes them with q of any
    dtype), so a later .float() finds them unrounded; .double() recomputes them in float64."""
    fresh = fnn.RotaryEmbedding(32, max_position_embeddings=64)
    rope = fnn.RotaryEmbedding(32, max_position_embeddings=64).to(dtype)
    for got, want in ((rope.cos_cached, fresh.cos_cached), (rope.sin_cached, fresh.sin_cached)):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    q, k = torch.randn(2, 4, 64, 32), torch.randn(2, 2, 64, 32)
    want = reference.rope(q.double(), k.double(), *reference.rope_tables(64, 32, dtype=torch.float64))
    bound = 2 * torch.finfo(dtype).eps * max(q.abs().max(), k.abs().max())  # inputs and output rounded
    for got, exact in zip(rope(q.to(dtype), k.to(dtype)), want):
        assert got.dtype == dtype and (got.double() - exact).abs().max() <= bound
    rope.float()
    assert torch.equal(rope(q, k)[0], fresh(q, k)[0])
    rope.double()
    assert rope.cos_cached.dtype == torch.float64
    torch.testing.assert_close(rope(q.double(), k.double()), want, rtol=0, atol=1e-12)
    with torch.device("meta"):                                   # recomputed on the meta device: no memory
        big = fnn.RotaryEmbedding(4, max_position_embeddings=10**11)
    assert big.double().cos_cached.is_meta and big.cos_cached.dtype == torch.float64


def test_rotary_embedding_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        fnn.RotaryEmbedding(7)
    with pytest.raises(ValueError, match="layout"):
        fnn.RotaryEmbedding(8, layout="neox")
    with pytest.raises(ValueError, match=r"\(\.\.\., T, D\)"):  # a 1-D q: rope's message, not an IndexError
        fnn.RotaryEmbedding(8)(torch.randn(8), torch.randn(1, 1, 3, 8))
    for base in (0.0, -1.0, float("nan"), float("inf"), "10000", True):  # 0 and < 0 gave NaN angles
        with pytest.raises(ValueError, match="base must be a finite number > 0"):
            fnn.RotaryEmbedding(8, base=base)
    for limit in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_position_embeddings must be an int >= 1"):
            fnn.RotaryEmbedding(8, max_position_embeddings=limit)
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match=r"position 1125899906842623 needs rotary tables of \d+ GiB"):
        fnn.RotaryEmbedding(8, max_position_embeddings=16)(q, q, torch.tensor([0, 2**50 - 1]))


def test_rotary_embedding_compiles_with_an_offset():
    """The offset gives the table size without reading a tensor (a data-dependent guard
    broke fullgraph compilation)."""
    rope = fnn.RotaryEmbedding(8, max_position_embeddings=16)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    compiled = torch.compile(lambda a, b: rope(a, b, offset=3), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k), rope(q, k, offset=3))


def test_linear_inference_under_autocast_reuses_the_cast_weight():
    """No grad + bf16 autocast, up to 4 rows (decoding): the same result as F.linear under
    autocast, from one bf16 copy of the weight kept across calls; remade when the weight
    changes; never made with grad."""
    lin = fnn.Linear(64, 48)
    x = torch.randn(3, 64)

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


needs_onednn = pytest.mark.skipif(not fnn_onednn.bf16_available(), reason="oneDNN without native bf16 on this CPU")


def _bf16_inference(f, *args):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return f(*args)


@needs_onednn
def test_linear_packed_bf16_inference_matches_autocast_and_follows_the_weight():
    """More than 4 rows: the oneDNN-packed weight (with a bf16 bias), kept across calls, gives
    what F.linear under autocast gives (within one bf16 rounding), is remade when the weight or
    the bias changes, and is never made with grad (training) or for few rows."""
    lin = fnn.Linear(96, 80)
    x = torch.randn(2, 9, 96)
    ref = lambda: _bf16_inference(torch.nn.functional.linear, x, lin.weight, lin.bias)  # noqa: E731
    got = _bf16_inference(lin, x)
    packed = lin._packed_weight[1]
    assert got.dtype == torch.bfloat16 and got.shape == (2, 9, 80)
    torch.testing.assert_close(got.float(), ref().float(), rtol=1e-2, atol=1e-2)
    _bf16_inference(lin, x[:, :5])
    assert lin._packed_weight[1] is packed                      # reused, also for another row count
    twin = copy.deepcopy(lin)                                    # the caches are not copied or pickled
    torch.save(lin, io.BytesIO())
    assert "_packed_weight" not in twin.__dict__ and torch.equal(_bf16_inference(twin, x), got)
    with torch.no_grad():
        lin.weight.mul_(-2)                                      # in place: the version bumps
    torch.testing.assert_close(_bf16_inference(lin, x).float(), ref().float(), rtol=1e-2, atol=1e-2)
    assert lin._packed_weight[1] is not packed
    packed = lin._packed_weight[1]
    with torch.no_grad():
        lin.bias.add_(3.0)
    torch.testing.assert_close(_bf16_inference(lin, x).float(), ref().float(), rtol=1e-2, atol=1e-2)
    assert lin._packed_weight[1] is not packed
    fresh = fnn.Linear(96, 80)
    _bf16_inference(fresh, x[0, :4])                             # 4 rows: the matrix-vector path
    assert "_packed_weight" not in fresh.__dict__
    with torch.autocast("cpu", dtype=torch.bfloat16):            # grad mode: autocast's own cast
        fresh(x).float().sum().backward()
    assert "_packed_weight" not in fresh.__dict__ and fresh.weight.grad is not None


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_new", "relu", "silu"])
@pytest.mark.parametrize("packed", [True, False], ids=["onednn", "two-steps"])
def test_linear_forward_activation_matches_float64(monkeypatch, activation, packed):
    """forward_activation(x, act) = act(x W^T + b): fused in the packed bf16 call, two steps
    elsewhere (no oneDNN, fp32, use_fused=False); bf16 within 2 bf16 roundings of float64."""
    if packed and not fnn_onednn.bf16_available():
        pytest.skip("oneDNN without native bf16 on this CPU")
    if not packed:
        monkeypatch.setattr(fnn_onednn, "bf16_available", lambda: False)
    lin = fnn.Linear(64, 40)
    x = torch.randn(3, 7, 64)
    act = (lambda y: y) if activation is None else fnn_linear.ACTIVATIONS[activation]
    want = act(torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double()))
    got = _bf16_inference(lin.forward_activation, x, activation)
    assert got.dtype == torch.bfloat16 and ("_packed_weight" in lin.__dict__) == (packed and activation != "silu")
    # inputs and weight rounded to bf16 (relative 2^-8 each), the output rounded once or twice
    bound = 4 * 2.0 ** -8 * (x.abs() @ lin.weight.abs().t() + lin.bias.abs()).double() + 2 * 2.0 ** -8 * want.abs()
    assert ((got.double() - want).abs() <= bound + 1e-6).all()
    for bad, match in ((x.double(), "same dtype"), (x.long(), "same dtype"),  # F.linear's errors,
                       (x[..., :63], "cannot be multiplied")):               # packed or not
        with pytest.raises(RuntimeError, match=match):
            _bf16_inference(lin.forward_activation, bad, activation)
    big = torch.randn(1024, 64)                                  # fp32 from 1024 rows: oneDNN, fused
    big_want = act(torch.nn.functional.linear(big.double(), lin.weight.double(), lin.bias.double()))
    with torch.no_grad():                                        # fp32: fastpt's product, then F.linear
        torch.testing.assert_close(lin.forward_activation(x, activation).double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lin.forward_activation(big, activation).double(), big_want, rtol=1e-5, atol=1e-5)
        lin.use_fused = False
        torch.testing.assert_close(lin.forward_activation(x, activation).double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        lin.forward_activation(x, "swish")


def test_linear_activation_keeps_hooks_and_wrappers():
    """The models' linear_activation fuses only into a plain fastpt Linear: a hooked layer or
    another module still runs its own forward (the hook sees the product, then the activation)."""
    from fastpt.models.common import linear_activation
    lin, seen = fnn.Linear(32, 24), []
    x = torch.randn(2, 6, 32)
    want = _bf16_inference(lin.forward_activation, x, "gelu")
    handle = lin.register_forward_hook(lambda m, args, out: seen.append(out))
    got = _bf16_inference(linear_activation, lin, x, "gelu")
    assert len(seen) == 1 and torch.equal(got, torch.nn.functional.gelu(seen[0]))
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    handle.remove()
    assert torch.equal(_bf16_inference(linear_activation, lin, x, "gelu"), want) and len(seen) == 1
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(out))
    try:                                                         # a global hook counts too
        _bf16_inference(linear_activation, lin, x, "gelu")
    finally:
        handle.remove()
    assert len(seen) == 2
    plain = torch.nn.Linear(32, 24)
    plain.load_state_dict(lin.state_dict())
    torch.testing.assert_close(_bf16_inference(linear_activation, plain, x, "relu"),
                               _bf16_inference(lambda: torch.relu(plain(x))))


def test_rms_norm_and_lora_argument_types():
    from fastpt.nn import LoRALinear, RMSNorm
    with pytest.raises(TypeError, match="floating-point input, got torch.int64"):
        RMSNorm(8)(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="r must be an int.*got True"):
        LoRALinear(torch.nn.Linear(8, 8), r=True)
