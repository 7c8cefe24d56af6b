"""fastpt.nn.LoRALinear: PEFT init and state dict, training, merge/unmerge as the factors change,
an Int8Linear base, torch.compile, autocast, bad arguments and quantize_."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpt import ops
from fastpt.nn import Int8Linear, LoRALinear


# ---------------------------------------------------------------- LoRALinear

def test_peft_compatible_init_and_state_dict():
    lin = nn.Linear(64, 32)
    layer = LoRALinear(lin, r=8, lora_alpha=16)
    assert layer.scaling == 2.0
    assert LoRALinear(nn.Linear(64, 32), r=16, lora_alpha=8, use_rslora=True).scaling == 8 / 4
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.shape == (8, 64) and layer.lora_B.weight.shape == (32, 8)
    assert (layer.lora_B.weight == 0).all()
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)): sqrt(6 / ((1 + 5) * fan_in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.8 * bound
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), lin(x))  # B = 0: the base at init


def test_training_step_updates_only_lora():
    lin = nn.Linear(32, 16)
    w0 = lin.weight.detach().clone()
    layer = LoRALinear(lin, r=4, lora_dropout=0.1)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = layer(torch.randn(8, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(lin.weight, w0) and lin.weight.grad is None
    assert layer.lora_B.weight.abs().sum() > 0


def test_merge_unmerge_restores_weight():
    lin = nn.Linear(128, 64)
    layer = LoRALinear(lin, r=8, lora_alpha=16)
    nn.init.normal_(layer.lora_B.weight)
    w0 = lin.weight.detach().clone()
    layer.eval()
    x = torch.randn(10, 128)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.weight, w0 + layer.delta_weight(), rtol=0, atol=1e-6)
    layer.unmerge()
    assert (lin.weight - w0).abs().max() <= 1e-6
    torch.testing.assert_close(layer(x), before)


def test_merge_onto_dequantized_copy_for_int8_base():
    base = Int8Linear.from_linear(nn.Linear(64, 32))
    packed = base.weight_packed.clone()
    layer = LoRALinear(base, r=4).eval()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 64) * 0.1  # no outliers: merged (float) and int8 paths differ by quantization only
    before = layer(x)
    layer.merge()
    merged = layer(x)
    expect = F.linear(x, base.dequantized_weight() + layer.delta_weight(), base.bias)
    torch.testing.assert_close(merged, expect)
    torch.testing.assert_close(merged, before, rtol=0.05, atol=0.05)
    layer.unmerge()
    assert torch.equal(base.weight_packed, packed)
    torch.testing.assert_close(layer(x), before)


def test_merged_int8_base_follows_the_factors():
    """Int8Linear base, merged: the float32 merged copy is remade when the factors change
    (load_state_dict, an optimizer step, reset_lora_parameters), so forward always equals the
    dequantized base plus the current delta; kept while nothing changes."""
    torch.manual_seed(0)
    base = Int8Linear.from_linear(nn.Linear(64, 32))
    layer = LoRALinear(base, r=4, lora_alpha=8).eval()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 64)
    merged = lambda: F.linear(x, base.dequantized_weight() + layer.delta_weight(), base.bias)  # noqa: E731
    layer.merge()
    torch.testing.assert_close(layer(x), merged())
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["lora_B.weight"].normal_()                              # another adapter
    layer.load_state_dict(state)
    torch.testing.assert_close(layer(x), merged())
    layer.lora_A.weight.grad = torch.randn_like(layer.lora_A.weight)
    torch.optim.SGD([layer.lora_A.weight], lr=1.0).step()
    torch.testing.assert_close(layer(x), merged())
    layer.reset_lora_parameters()                                # B = 0: the base alone
    torch.testing.assert_close(layer(x), F.linear(x, base.dequantized_weight(), base.bias))
    kept = layer._merged_weight[1]
    layer(x)
    assert layer._merged_weight[1] is kept


def _merged_linear_layer(seed=0):
    """A merged nn.Linear-base layer, its base weight before merging, and an input."""
    torch.manual_seed(seed)
    lin = nn.Linear(48, 24)
    w0 = lin.weight.detach().clone()
    layer = LoRALinear(lin, r=4, lora_alpha=8).eval()
    nn.init.normal_(layer.lora_B.weight)
    layer.merge()
    return layer, w0, torch.randn(5, 48)


def _restored(weight, w0, *deltas):
    """The base weight back to float rounding: 1e-6 relative to the largest of |W0| and the
    deltas that went in and out."""
    scale = max([1.0] + [float(t.abs().max()) for t in (w0,) + deltas])
    torch.testing.assert_close(weight, w0, rtol=0, atol=1e-6 * scale)


def _new_factors(layer, how):
    """Changes the factors of a merged layer in one of the ways the factors change."""
    a, b = torch.rand_like(layer.lora_A.weight) - 0.5, torch.randn_like(layer.lora_B.weight)
    if how in ("load_state_dict", "assign"):  # the layer's own (merged) state, new factors in it
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["lora_A.weight"], state["lora_B.weight"] = a, b
        layer.load_state_dict(state, assign=how == "assign")
    elif how == "adapter_only":
        layer.load_state_dict({"lora_A.weight": a, "lora_B.weight": b}, strict=False)
    elif how == "copy":
        with torch.no_grad():
            layer.lora_B.weight.copy_(b)
    elif how == "optimizer":
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.grad = torch.randn_like(p)
        torch.optim.SGD([layer.lora_A.weight, layer.lora_B.weight], lr=0.1).step()
    elif how == "reset":
        layer.reset_lora_parameters()
    elif how == "scaling":
        layer.scaling = 0.5


CHANGES = ["load_state_dict", "assign", "adapter_only", "copy", "optimizer", "reset", "scaling"]


@pytest.mark.parametrize("how", CHANGES)
def test_unmerge_restores_the_weight_after_the_factors_change_while_merged(how):
    """nn.Linear base: new factors while merged (loaded, copied in, stepped, reset, or a new
    scaling) reach forward, and unmerge() takes out the delta that is in the weight, not
    that of the new factors: the base weight comes back. (It subtracted the new delta.)"""
    layer, w0, x = _merged_linear_layer()
    lin = layer.base_layer
    old = layer.delta_weight()
    _new_factors(layer, how)
    new = layer.delta_weight()
    assert (new - old).abs().max() > 0.1
    expect = F.linear(x, w0 + new, lin.bias)
    torch.testing.assert_close(layer(x), expect, rtol=1e-5, atol=1e-5)  # forward follows them
    _restored(lin.weight, w0 + new, old, new)
    layer.unmerge()
    _restored(lin.weight, w0, old, new)
    torch.testing.assert_close(layer(x), expect, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_the_weight_without_a_forward_in_between():
    layer, w0, _ = _merged_linear_layer()
    _new_factors(layer, "load_state_dict")
    layer.unmerge()
    _restored(layer.base_layer.weight, w0)


def test_merge_twice_merges_once_with_the_current_factors():
    """merge() on a merged layer leaves the update in the weight once: that of the current
    factors, where they changed since (it used to keep the old delta, which unmerge() then
    took out as the new one)."""
    layer, w0, x = _merged_linear_layer()
    merged_once = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, merged_once)
    _new_factors(layer, "copy")
    layer.merge()
    layer.merge()
    _restored(layer.base_layer.weight, w0 + layer.delta_weight(), layer.delta_weight())
    layer.unmerge()
    layer.unmerge()
    _restored(layer.base_layer.weight, w0)


def test_another_merged_state_dict_loads_into_a_merged_layer():
    """A state dict taken while merged holds the merged weight: loaded into a merged layer,
    its weight comes with its own factors (the old code got this right: a guard that
    remembering the merged factors did not break it)."""
    layer, _, x = _merged_linear_layer(seed=0)
    other, other_w0, _ = _merged_linear_layer(seed=1)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other(x))
    layer.unmerge()
    _restored(layer.base_layer.weight, other_w0)


def test_merged_linear_base_follows_a_move():
    """.to() gives the factors new storage and the same values: the weight is left alone."""
    layer, w0, x = _merged_linear_layer()
    layer.double()
    merged = layer.base_layer.weight.detach().clone()
    layer(x.double())
    assert torch.equal(layer.base_layer.weight, merged)
    layer.float()
    layer.unmerge()
    _restored(layer.base_layer.weight, w0)


def test_compile_fullgraph_merged_linear_base():
    layer, _, x = _merged_linear_layer()
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_compile_fullgraph_merged_int8_base():
    layer = LoRALinear(Int8Linear.from_linear(nn.Linear(64, 32)), r=4).eval()
    nn.init.normal_(layer.lora_B.weight)
    layer.merge()
    x = torch.randn(3, 64)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_compile_fullgraph():
    layer = LoRALinear(nn.Linear(40, 24), r=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 40, requires_grad=True)
    f = torch.compile(lambda x: layer(x).sum(), fullgraph=True)
    out = f(x)
    grads = torch.autograd.grad(out, (x, layer.lora_A.weight, layer.lora_B.weight))
    ref_out = layer(x).sum()
    ref_grads = torch.autograd.grad(ref_out, (x, layer.lora_A.weight, layer.lora_B.weight))
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("base", ["linear", "int8"])
def test_bf16_autocast_runs_like_eager_lora(base):
    """Under autocast the frozen float32 weight meets bf16 activations: the layer runs in
    autocast's dtype as nn.Linear does, and the LoRA factors get float32 gradients."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = LoRALinear(linear if base == "linear" else Int8Linear.from_linear(linear), r=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(5, 64, requires_grad=True)
    factors = (layer.lora_A.weight, layer.lora_B.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        eager = linear(x) + layer.scaling * layer.lora_B(layer.lora_A(x))
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().square().sum(), (x, *factors))
    eager_grads = torch.autograd.grad(eager.float().square().sum(), (x, *factors))
    tol = 0.05 if base == "int8" else 0.02  # int8 rounding on top of bf16's
    torch.testing.assert_close(out.float(), eager.float(), rtol=tol, atol=tol)
    for g, e in zip(grads, eager_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=tol, atol=tol * e.abs().max().item())


@pytest.mark.parametrize("r", [0, 17, 2.5])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="r must be an int in"):
        LoRALinear(nn.Linear(16, 32), r=r)
    if isinstance(r, int):
        x, w = torch.randn(2, 16), torch.randn(32, 16)
        r = max(r, 0)
        with pytest.raises(ValueError, match="rank r must be in"):
            ops.lora_linear(x, w, torch.randn(r, 16), torch.randn(32, r), 1.0)


def test_bad_base_layer():
    with pytest.raises(TypeError, match="base_layer must be"):
        LoRALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="lora_dropout must be"):
        LoRALinear(nn.Linear(4, 4), r=2, lora_dropout=1.5)
    for alpha in (float("nan"), float("inf"), "8"):  # a NaN scaling gave NaN outputs
        with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
            LoRALinear(nn.Linear(4, 4), r=2, lora_alpha=alpha)
    # an fp32 weight with bf16 factors: no input dtype could run it (x must match both)
    with pytest.raises(TypeError, match="dtype torch.bfloat16 differs from the base layer's weight dtype"):
        LoRALinear(nn.Linear(20, 12), r=4, dtype=torch.bfloat16)
    int8 = LoRALinear(Int8Linear.from_linear(nn.Linear(20, 12)), r=4, dtype=torch.bfloat16)
    assert int8(torch.randn(2, 20, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("base", ["linear", "int8"])
def test_compile_dynamic_fullgraph(base):
    """With dynamic=True the float scaling is traced as a symbolic float, and the finite
    check on it failed to compile ("torch.* op returned non-Tensor")."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = LoRALinear(linear if base == "linear" else Int8Linear.from_linear(linear), r=4)
    nn.init.normal_(layer.lora_B.weight)
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    for batch in (2, 3, 5):
        x = torch.randn(batch, 3, 64)
        torch.testing.assert_close(compiled(x), layer(x))


def test_quantize_keeps_lora_factors_and_quantizes_the_base():
    import fastpt

    model = nn.Sequential(LoRALinear(nn.Linear(32, 16), r=4), nn.Linear(16, 8))
    fastpt.quantize_(model)
    lora = model[0]
    assert isinstance(lora.base_layer, Int8Linear) and isinstance(model[1], Int8Linear)
    assert type(lora.lora_A) is nn.Linear and type(lora.lora_B) is nn.Linear
    x = torch.randn(5, 32, requires_grad=True)
    model(x).sum().backward()
    assert lora.lora_A.weight.grad is not None and x.grad is not None


def test_quantize_leaves_every_lora_factor_float_and_refuses_merged_layers():
    # fastpt.finetune's LoRA layers hold their factors in ModuleDicts of nn.Linear: those were
    # quantized too. A merged update would be quantized into the base and added again.
    import fastpt
    from fastpt.finetune import FinetuneConfig, prepare
    from fastpt.models import Decoder, DecoderConfig
    torch.manual_seed(0)
    model = prepare(Decoder(DecoderConfig.from_name("llama-tiny", vocab_size=64)),
                    FinetuneConfig(strategy="lora", lora_r=4, target_modules="all-linear"))
    fastpt.quantize_(model)
    quantized = [n for n, m in model.named_modules() if isinstance(m, fastpt.nn.Int8Linear)]
    assert quantized and not [n for n in quantized if "lora_" in n]
    assert all(".base_layer" in n or n == "lm_head" for n in quantized), quantized
    ids = torch.randint(0, 64, (2, 5))
    assert torch.isfinite(model(ids).logits).all()

    layer = fastpt.nn.LoRALinear(torch.nn.Linear(16, 8), r=2)
    layer.merge()
    with pytest.raises(ValueError, match="merged LoRA update.*unmerge"):
        fastpt.quantize_(torch.nn.Sequential(layer))
    lora_layers = [m for m in prepare(Decoder(DecoderConfig.from_name("llama-tiny", vocab_size=64)),
                                      FinetuneConfig(strategy="lora", lora_r=4)).modules() if hasattr(m, "lora_A")]
    lora_layers[0].merge(lora_layers[0].active)
    with pytest.raises(ValueError, match="merged LoRA update"):
        fastpt.quantize_(torch.nn.Sequential(lora_layers[0]))
