"""fastpt.patch on tiny random transformers models: patched vs unpatched logits and gradients, the
ops a patched forward calls, generation, unpatch, peft, torch.compile, unknown architectures."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from models_util import hf_llama, randomize_, transformers
from patch_util import B, FAMILIES, T, VOCAB, _logits_and_grads, _padded_batch, _peft_llama, with_linears
from tolerances import assert_close
import fastpt


def _compare(patched, reference, name, ids, mask):
    ref64 = copy.deepcopy(reference).double()
    out, grads = _logits_and_grads(patched, name, ids, mask)
    eager, eager_grads = _logits_and_grads(reference, name, ids, mask)
    ref, ref_grads = _logits_and_grads(ref64, name, ids, mask)
    assert_close(out, ref, torch.float32, "fwd", eager=eager, what=f"{name} logits")
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert_close(grads[n], ref_grads[n], torch.float32, "bwd", eager=eager_grads[n], what=f"{name} grad {n}")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_patched_matches_unpatched(name):
    build, expected = FAMILIES[name]
    model = build()
    randomize_(model)
    reference = copy.deepcopy(model)
    expected = with_linears(model, expected)
    report = fastpt.patch(model)
    assert report.patched == expected, str(report)
    assert not report.not_patched
    ids, mask = _padded_batch(left=name not in ("bert", "t5"))
    _compare(model, reference, name, ids, mask)


def test_attention_runs_through_fastpt(monkeypatch):
    model = hf_llama()
    fastpt.patch(model)
    calls = []
    import fastpt.patch.attention as pa
    original = pa.attention
    monkeypatch.setattr(pa, "attention", lambda *a, **k: calls.append(k) or original(*a, **k))
    ids, mask = _padded_batch(left=True)
    model(input_ids=ids, attention_mask=mask)
    assert len(calls) == 2
    assert calls[0]["causal"] and calls[0]["key_padding_mask"].shape == (B, T)


# The fastpt op each patched kind calls, as (module holding the name, name).
_SPIED_OPS = {"rms_norm": ("modules", "rms_norm"), "swiglu": ("modules", "swiglu"), "rope": ("modules", "rope"),
              "loss": ("modules", "cross_entropy"), "attention": ("attention", "attention")}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fastpt_ops_run_after_patch_and_not_after_unpatch(name, monkeypatch):
    """Each patched module calls its fastpt op once per forward, so the calls match the
    report's counts (rms_norm, swiglu, rope, attention; loss: one cross_entropy), and after
    unpatch none is called."""
    import fastpt.patch.attention as pa
    import fastpt.patch.modules as pm
    calls = Counter()
    for kind, (where, fn) in _SPIED_OPS.items():
        holder = pa if where == "attention" else pm
        op = getattr(holder, fn)
        monkeypatch.setattr(holder, fn, lambda *a, _kind=kind, _op=op, **k: calls.update([_kind]) or _op(*a, **k))
    model = FAMILIES[name][0]()
    report = fastpt.patch(model)
    ids, mask = _padded_batch(left=name not in ("bert", "t5"))
    kw = {"labels": ids} if "loss" in report.patched else {}
    if name == "t5":
        kw["decoder_input_ids"] = ids[:, :5]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **kw)
    assert dict(calls) == {k: n for k, n in report.patched.items() if k != "linear"}
    assert fastpt.unpatch(model) == sum(report.patched.values())
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **kw)
    assert not calls


def test_generation_with_kv_cache_matches():
    model = hf_llama()
    randomize_(model, std=0.5)
    reference = copy.deepcopy(model)
    ids, mask = _padded_batch(left=True)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = reference.generate(ids, **kw)
    fastpt.patch(model)
    assert torch.equal(model.generate(ids, **kw), expected)


def test_idempotent_and_unpatch_restores():
    model = hf_llama()
    randomize_(model)
    ids, mask = _padded_batch(left=True)
    classes = [type(m) for m in model.modules()]
    attn = model.config._attn_implementation
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    first = fastpt.patch(model)
    patched_classes = [type(m) for m in model.modules()]
    assert patched_classes != classes and model.config._attn_implementation == "fastpt"
    second = fastpt.patch(model)
    assert second == first and [type(m) for m in model.modules()] == patched_classes
    assert fastpt.unpatch(model) == sum(first.patched.values())  # as the report counts
    assert [type(m) for m in model.modules()] == classes
    assert model.config._attn_implementation == attn
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    assert fastpt.unpatch(model) == 0


def test_state_dict_unchanged_by_patch():
    model = hf_llama()
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    fastpt.patch(model)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys


def test_peft_lora_wrapped_model():
    model = _peft_llama()
    reference = copy.deepcopy(model)
    expected = with_linears(model, FAMILIES["llama"][1])
    report = fastpt.patch(model)
    assert report.patched == expected
    ids, mask = _padded_batch(left=True)
    _compare(model, reference, "llama", ids, mask)
    assert fastpt.unpatch(model) == sum(report.patched.values())
    assert model.base_model.model.config._attn_implementation == reference.base_model.model.config._attn_implementation


def test_torch_compile_gives_same_logits():
    model = hf_llama()
    randomize_(model)
    fastpt.patch(model)
    ids = torch.randint(3, VOCAB, (B, T))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=False)(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_torch_compile_training_step_with_the_patched_loss():
    model = hf_llama()
    randomize_(model)
    reference = copy.deepcopy(model).train()
    fastpt.patch(model)
    ids = torch.randint(3, VOCAB, (B, T))
    labels = ids.masked_fill(torch.arange(T) < 3, -100)
    out = torch.compile(model.train(), fullgraph=False)(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = reference(input_ids=ids, labels=labels)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def _tiny_gpt_neox():
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.GPTNeoXForCausalLM(cfg).eval()


def test_unknown_architecture_raises_and_changes_nothing():
    model = _tiny_gpt_neox()
    classes = [type(m) for m in model.modules()]
    attn = model.config._attn_implementation
    with pytest.raises(fastpt.patch.PatchError, match=r"model type 'gpt_neox' is not one of .*GPTNeoX") as err:
        fastpt.patch(model)
    assert err.value.report.not_patched["GPTNeoXAttention"] == "unknown to fastpt"
    assert [type(m) for m in model.modules()] == classes and model.config._attn_implementation == attn


def test_unknown_architecture_non_strict_warns_and_lists():
    model = _tiny_gpt_neox()
    with pytest.warns(UserWarning, match="partial patch"):
        report = fastpt.patch(model, strict=False)
    assert "not patched GPTNeoXAttention: unknown to fastpt" in str(report)
    assert model.config._attn_implementation != "fastpt"  # as the report says: not patched
    assert "LayerNorm" in report.kept


def test_rejects_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastpt.patch("llama")


def test_patched_norms_of_another_dtype_give_hf_dtypes():
    # HF keeps some norms in fp32 inside bf16 models; the patched norm cast the weight to x's
    # dtype, and the next layer then failed on a dtype mismatch.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from fastpt.patch import modules as patched
    norm = LlamaRMSNorm(8, eps=1e-6)
    reference = copy.deepcopy(norm)
    patched.swap(norm, "rms_norm", patched.rms_norm_forward)  # as fastpt.patch swaps it
    x = torch.randn(2, 3, 8).bfloat16()
    got = norm(x)
    assert got.dtype == reference(x).dtype == torch.float32 and torch.equal(got, reference(x))
    same = norm.to(torch.bfloat16)(x)  # one dtype: fastpt's kernel, within bf16 rounding of HF's
    torch.testing.assert_close(same, reference.to(torch.bfloat16)(x), rtol=1.6e-2, atol=1e-2)
