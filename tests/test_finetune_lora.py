"""fastpt.finetune's LoRA: add_lora's checks, merge/unmerge/disable, several named adapters merged
and reloaded, an Int8Linear base, and the LoRA speed benchmark's quick run."""

import pytest
import torch

from fastpt.finetune import (FinetuneConfig, SequenceClassifier, add_lora, count_parameters, disable_adapter, merge,
                             merge_and_unload, prepare, set_adapter, unmerge)
from fastpt.finetune.lora import LoraLayer
from finetune_util import _backbone, _batch, _lora_layers, _train


def test_add_lora_checks_its_arguments_and_takes_one_module_name():
    model = _backbone("llama")
    with pytest.raises(ValueError, match="lora_alpha"):
        add_lora(model, alpha=-16)
    with pytest.raises(ValueError, match="lora_dropout"):
        add_lora(model, dropout=1.5)
    with pytest.raises(TypeError, match="rank r must be an int"):
        add_lora(model, r=2.0)
    with pytest.raises(ValueError, match=r"rank r=999 .* layer .*q_proj"):
        add_lora(model, r=999)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # refused before wrapping
    with pytest.raises(ValueError, match="target_modules is empty"):
        add_lora(model, target_modules=[])
    with pytest.raises(TypeError, match="target_modules must be None, 'all-linear', a module name or a list"):
        add_lora(model, target_modules=5)  # was "'int' object is not iterable"
    with pytest.raises(TypeError, match="adapter name must be a non-empty string"):
        add_lora(model, 5)  # was torch's "module name should be a string"
    one = add_lora(_backbone("llama"), target_modules="q_proj")  # as PEFT: one name, not letters
    assert one and all(path.endswith("q_proj") for path in one)


def test_lora_merge_unmerge_and_disable():
    model = _backbone("llama")
    ids = _batch()["input_ids"]
    base_out = model(input_ids=ids).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, r=4, target_modules="all-linear")
    for m in model.modules():
        if isinstance(m, LoraLayer):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    lora_out = model(input_ids=ids).logits
    assert not torch.allclose(lora_out, base_out)
    with disable_adapter(model):
        torch.testing.assert_close(model(input_ids=ids).logits, base_out)
    merge(model)
    torch.testing.assert_close(model(input_ids=ids).logits, lora_out, atol=1e-5, rtol=1e-5)
    unmerge(model)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            torch.testing.assert_close(p, weights[n.replace(".base_layer", "")], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(input_ids=ids).logits, lora_out, atol=1e-5, rtol=1e-5)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(input_ids=ids).logits, lora_out, atol=1e-5, rtol=1e-5)


def test_several_named_adapters():
    model = _backbone("gpt2")
    add_lora(model, "a", r=2, target_modules=["q_proj", "v_proj"])
    add_lora(model, "b", r=3, target_modules=["q_proj", "v_proj"])
    set_adapter(model, "b")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n for n in trainable)
    with pytest.raises(ValueError, match=r"no adapter named 'c'; adapters: \['a', 'b'\]"):
        set_adapter(model, "c")


def _assert_base_weights(model, expected, *names):
    """Each LoRA layer's base weight is the original plus the current deltas of ``names``, to
    float rounding (1e-6 relative to the largest of the weight and the deltas)."""
    for path, m in _lora_layers(model).items():
        deltas = [m.delta_weight(n) for n in names]
        want = expected[path + ".weight"] + sum(deltas)
        scale = max([1.0] + [float(t.abs().max()) for t in [want] + deltas])
        torch.testing.assert_close(m.base_layer.weight, want, rtol=0, atol=1e-6 * scale,
                                   msg=lambda text, path=path: f"{path}: {text}")


def _two_adapters():
    model = _backbone("llama")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, "a", r=2, target_modules="all-linear")
    add_lora(model, "b", r=3, target_modules="all-linear")
    for m in _lora_layers(model).values():
        for name in ("a", "b"):
            torch.nn.init.normal_(m.lora_B[name].weight, std=0.1)
    return model, weights


def test_unmerge_restores_the_base_after_adapters_change_while_merged():
    """Two adapters merged one after the other (set_adapter in between, merge twice), then new
    factors loaded for both while merged: forward and merge follow them, and unmerge takes
    out what is in the weights, so the base weights come back (it subtracted the new deltas)."""
    model, weights = _two_adapters()
    ids = _batch()["input_ids"]
    set_adapter(model, "a")
    merge(model)
    set_adapter(model, "b")           # a stays merged, b runs on top of it
    _assert_base_weights(model, weights, "a")
    merge(model)
    merge(model)                      # twice: merged once
    _assert_base_weights(model, weights, "a", "b")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in state.items():        # the model's own (merged) state, new factors in it
        if ".lora_B.a." in k or ".lora_A.b." in k:
            torch.nn.init.normal_(v, std=0.2)
    model.load_state_dict(state)
    model(input_ids=ids)              # forward follows the loaded factors
    _assert_base_weights(model, weights, "a", "b")
    set_adapter(model, "a")
    merge(model)                      # already merged: still once
    _assert_base_weights(model, weights, "a", "b")
    unmerge(model)
    _assert_base_weights(model, weights)
    assert all(not m.merged and not m._merged_factors for m in _lora_layers(model).values())


def test_unmerge_restores_the_base_after_a_merged_adapter_is_reloaded_unseen():
    """New factors for a merged adapter, and no forward before unmerge."""
    model, weights = _two_adapters()
    merge(model)                      # b, the newest
    for m in _lora_layers(model).values():
        with torch.no_grad():
            m.lora_A["b"].weight.copy_(torch.randn_like(m.lora_A["b"].weight))
    unmerge(model)
    _assert_base_weights(model, weights)


def test_merge_and_unload_folds_the_current_factors_of_a_merged_adapter():
    """Factors changed while merged: merge_and_unload folds them, as forward runs them (it
    kept the delta merged before)."""
    import copy
    model = _backbone("llama")
    add_lora(model, r=4, target_modules="all-linear")
    for m in _lora_layers(model).values():
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    unmerged = copy.deepcopy(model)
    merge(model)
    new = {k: torch.randn_like(v) * 0.1 for k, v in model.state_dict().items() if "lora_" in k}
    model.load_state_dict(new, strict=False)
    unmerged.load_state_dict(new, strict=False)
    ids = _batch()["input_ids"]
    expected = unmerged(input_ids=ids).logits
    plain = merge_and_unload(model)
    assert not _lora_layers(plain)
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_another_merged_state_dict_loads_into_merged_lora_layers():
    """A merged model's state dict, loaded into another merged model: its weights come with
    their own factors (as before remembering the merged factors: a guard)."""
    target, _ = _two_adapters()
    torch.manual_seed(5)
    source, source_weights = _two_adapters()
    for m in _lora_layers(source).values():
        torch.nn.init.normal_(m.lora_A["b"].weight)
    merge(target)
    merge(source)
    target.load_state_dict(source.state_dict())
    ids = _batch()["input_ids"]
    torch.testing.assert_close(target(input_ids=ids).logits, source(input_ids=ids).logits)
    unmerge(target)
    _assert_base_weights(target, source_weights)


def test_int8_base_runs_the_active_adapter_on_top_of_a_merged_one():
    """Int8Linear base, adapter a merged and b active: forward is the dequantized weight with
    both deltas, as with an nn.Linear base and as merge_and_unload folds it (it dropped a)."""
    from fastpt.nn import Int8Linear
    torch.manual_seed(0)
    m = LoraLayer(Int8Linear.from_linear(torch.nn.Linear(32, 16)))
    for name in ("a", "b"):
        m.add_adapter(name, 4, 8.0, 0.0, False)
        torch.nn.init.normal_(m.lora_B[name].weight)
    x = torch.randn(3, 32)
    m.active = "a"
    m.merge("a")
    m.active = "b"
    w = m.base_layer.dequantized_weight() + m.delta_weight("a") + m.delta_weight("b")
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, w, m.base_layer.bias))


def test_int8_lora_holds_int8_weights_and_counts_logical_parameters():
    head = SequenceClassifier(_backbone("llama"), 2)
    total_fp = count_parameters(head)["total"]
    model = prepare(head, FinetuneConfig(strategy="int8_lora", target_modules="all-linear", lora_r=2))
    counts = count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert counts["total"] == total_fp + lora
    _train(model, steps=1)


def test_lora_speed_benchmark_quick():
    """The F7 speed benchmark's quick run: every step timed, the bounds from the frozen step
    computed from the same medians, and an int8 base under 30% of the fp32 bytes."""
    from fastpt.benchmarks.finetune import lora_speed
    out = lora_speed(quick=True)
    step = out["step_s"]
    assert set(step) == {"full", "lora_fastpt", "lora_eager", "frozen"}
    assert all(t > 0 for t in step.values()) and all(m > 0 for m in out["peak_mib"].values())
    assert out["bound_full_vs_frozen"] == pytest.approx(step["full"] / step["frozen"])
    assert out["bound_eager_lora_vs_frozen"] == pytest.approx(step["lora_eager"] / step["frozen"])
    assert 0 < out["int8_frozen_bytes_vs_fp32"] <= 0.30
