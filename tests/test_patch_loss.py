"""fastpt.patch's losses: the fused cross-entropy and the patched loss_function against HF's, with
peft, a head that is not plain, a user's own loss and shift_labels."""

from __future__ import annotations

import copy

import pytest
import torch

from models_util import hf_llama, randomize_
from patch_util import B, FAMILIES, T, VOCAB, _padded_batch, _peft_llama, with_linears
from tolerances import _max_err, assert_close
import fastpt


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_fused_cross_entropy_loss_and_gradients(name):
    build, expected = FAMILIES[name]
    model = build()
    randomize_(model)
    reference = copy.deepcopy(model).train()
    ref64 = copy.deepcopy(model).double().train()
    expected = with_linears(model, expected)
    report = fastpt.patch(model, fused_cross_entropy=True)
    assert report.patched == {**{k: n for k, n in expected.items() if k != "loss"}, "cross_entropy": 1}
    ids, mask = _padded_batch(left=True)
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for m in (model.train(), reference, ref64):
        m.zero_grad()
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (out, grads), (eager, eager_grads), (ref, ref_grads) = results
    assert out.logits is None and eager.logits is not None
    assert_close(out.loss.detach(), ref.loss.detach(), torch.float32, "fwd", eager=eager.loss.detach(), what="loss")
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], torch.float32, "bwd", eager=eager_grads[n], what=f"grad {n}")
    model.eval()  # evaluation keeps HF's forward: logits are there
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


def test_fused_cross_entropy_keeps_hf_where_the_head_is_not_plain_and_honours_return_dict():
    # The fused loss reads lm_head.weight: a hook or a subclass forward changing the head's
    # output was bypassed (another loss, no warning), and return_dict=False crashed.
    build, _ = FAMILIES["llama"]
    ids, mask = _padded_batch(left=True)
    labels = ids.masked_fill(mask == 0, -100)

    class Halved(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0.5

    for change in ("hook", "subclass"):
        model = build()
        randomize_(model)
        if change == "hook":
            model.lm_head.register_forward_hook(lambda mod, i, o: o * 2)
        else:
            model.lm_head.__class__ = Halved
        reference = copy.deepcopy(model).train()
        fastpt.patch(model, fused_cross_entropy=True)
        got = model.train()(input_ids=ids, attention_mask=mask, labels=labels)
        want = reference(input_ids=ids, attention_mask=mask, labels=labels)
        assert got.logits is not None  # HF's own forward ran
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    model = build()
    randomize_(model)
    fastpt.patch(model, fused_cross_entropy=True)
    out = model.train()(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0


def test_peft_lora_with_fused_cross_entropy():
    model = _peft_llama()
    reference = copy.deepcopy(model)
    assert fastpt.patch(model, fused_cross_entropy=True).patched["cross_entropy"] == 1
    ids, mask = _padded_batch(left=True)
    labels = ids.masked_fill(mask == 0, -100)
    losses, grads = [], []
    for m in (model.train(), reference.train()):
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    # the unpatched fp32 model as the reference, with the fp32 bounds of tests/tolerances.py
    assert_close(losses[0], losses[1].double(), torch.float32, "fwd", what="loss")
    assert grads[0].keys() == grads[1].keys() and all("lora_" in n for n in grads[0])
    for n in grads[0]:
        assert_close(grads[0][n], grads[1][n].double(), torch.float32, "bwd", what=f"grad {n}")


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("num_items", [None, 13])
def test_patched_loss_matches_hf_and_keeps_logits(name, num_items):
    """fastpt.patch(model) gives a causal LM fastpt's loss_function: same loss and gradients
    as HF's ForCausalLMLoss (mean, or sum / num_items_in_batch as the Trainer passes), and the
    logits are still returned."""
    model = FAMILIES[name][0]()
    randomize_(model)
    reference = copy.deepcopy(model).train()
    ref64 = copy.deepcopy(model).double().train()
    fastpt.patch(model)
    assert model.loss_function is fastpt.patch.modules.causal_lm_loss
    ids, mask = _padded_batch(left=True)
    labels = ids.masked_fill(mask == 0, -100)
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    results = []
    for m in (model.train(), reference, ref64):
        m.zero_grad()
        out = m(input_ids=ids, attention_mask=mask, labels=labels, **kw)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (out, grads), (eager, eager_grads), (ref, ref_grads) = results
    assert out.logits is not None
    assert_close(out.logits.detach(), ref.logits.detach(), torch.float32, "fwd", eager=eager.logits.detach(),
                 what="logits")
    assert_close(out.loss.detach(), ref.loss.detach(), torch.float32, "fwd", eager=eager.loss.detach(), what="loss")
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], torch.float32, "bwd", eager=eager_grads[n], what=f"grad {n}")


def test_patched_loss_respects_a_user_loss_and_unpatch():
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = hf_llama()
    fastpt.patch(model)
    mine = lambda logits, labels, vocab_size, **kw: logits.sum() * 0  # noqa: E731
    model.loss_function = mine
    assert model.loss_function is mine  # the user's choice wins over fastpt's
    del model._loss_function
    assert model.loss_function is fastpt.patch.modules.causal_lm_loss
    fastpt.unpatch(model)
    assert model.loss_function is ForCausalLMLoss


def test_patch_then_fused_cross_entropy_switches_the_loss():
    model = hf_llama()
    original = type(model)
    assert fastpt.patch(model).patched["loss"] == 1
    report = fastpt.patch(model, fused_cross_entropy=True)
    assert report.patched["cross_entropy"] == 1 and "loss" not in report.patched
    assert type(model)._fastpt_kind == "cross_entropy" and type(model).__mro__[1] is original
    fastpt.unpatch(model)
    assert type(model) is original


def test_fused_cross_entropy_leaves_a_user_loss_and_shift_labels_to_hf():
    model = hf_llama()
    randomize_(model)
    reference = copy.deepcopy(model).train()
    fastpt.patch(model, fused_cross_entropy=True)
    model.train()
    ids, _ = _padded_batch(left=True)
    shifted = torch.randint(3, VOCAB, (B, T))  # labels the caller already shifted
    losses = [m(input_ids=ids, labels=ids, shift_labels=shifted).loss for m in (model, reference)]
    assert _max_err(*losses) < 1e-5
    mine = lambda logits, labels, vocab_size, **kw: logits.sum() * 0 + 42.0  # noqa: E731
    model.loss_function = mine
    assert model(input_ids=ids, labels=ids).loss.item() == 42.0
