"""The chunked linear cross-entropy and the models' return_logits=False training path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastpt.models.loss as loss_mod
from models_util import max_err
from fastpt.models import Decoder, Encoder, Seq2Seq, from_name


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_linear_cross_entropy_float64(chunk_rows, fused, monkeypatch):
    V = 50
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", chunk_rows * V)
    x = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (23,))
    labels[[3, 10]] = -100
    got = loss_mod.linear_cross_entropy(x, w, labels, fused=fused)
    ref = F.cross_entropy(x @ w.T, labels)
    assert abs(got.item() - ref.item()) < 1e-12
    for a, b in zip(torch.autograd.grad(3 * got, (x, w)), torch.autograd.grad(3 * ref, (x, w))):
        assert max_err(a, b) < 1e-12
    if chunk_rows == 7:  # several chunks, the last one partial
        assert torch.autograd.gradcheck(lambda x, w: loss_mod.linear_cross_entropy(x, w, labels, fused=fused),
                                        (x, w))


@pytest.mark.parametrize("fused", [True, False])
def test_linear_cross_entropy_bf16_autocast(fused):
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(100, 32, requires_grad=True)
    labels = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_mod.linear_cross_entropy(x, w, labels, fused=fused)
        ref = F.cross_entropy(F.linear(x, w).float(), labels)
    assert abs(got.item() - ref.item()) < 1e-2 * abs(ref.item())
    ga, gb = torch.autograd.grad(got, (x, w)), torch.autograd.grad(ref, (x, w))
    for a, b in zip(ga, gb):
        assert a.dtype == torch.float32 and max_err(a, b) < 2e-2 * b.abs().max().item()


MODELS = {"bert": lambda: Encoder(from_name("bert-tiny", dropout=0.0, attention_dropout=0.0)),
          "gpt2": lambda: Decoder(from_name("gpt2-tiny")),
          "llama": lambda: Decoder(from_name("llama-tiny")),
          "t5": lambda: Seq2Seq(from_name("t5-tiny", dropout=0.0))}


@pytest.mark.parametrize("name", MODELS)
def test_return_logits_false_same_loss_and_grads(name):
    model = MODELS[name]()
    ids = torch.randint(3, 1000, (2, 9))
    labels = ids.clone()
    labels[:, ::3] = -100
    batch = dict(input_ids=ids, labels=labels)
    if name == "t5":
        batch["labels"] = labels[:, :5]
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(**batch, return_logits=return_logits)
        assert (out.logits is None) != return_logits
        out.loss.backward()
        results.append((out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}))
    (la, ga), (lb, gb) = results
    assert abs(la - lb) < 1e-5
    assert ga.keys() == gb.keys()
    for n in ga:
        assert max_err(ga[n], gb[n]) < 1e-5, n


def test_fused_and_eager_paths_agree_float32():
    """The in-place kernel path and the eager path give the same loss and gradients (fp32,
    ignored rows, several chunks)."""
    x = torch.randn(40, 24, requires_grad=True)
    w = torch.randn(300, 24, requires_grad=True)
    labels = torch.randint(0, 300, (40,))
    labels[::4] = -100
    results = []
    for fused in (True, False):
        loss = loss_mod.linear_cross_entropy(x, w, labels, fused=fused)
        results.append((loss.detach(), torch.autograd.grad(2 * loss, (x, w))))
    (la, ga), (lb, gb) = results
    assert abs(la.item() - lb.item()) < 1e-5
    for a, b in zip(ga, gb):
        assert max_err(a, b) < 1e-5


@pytest.mark.parametrize("fused", [True, False])
def test_no_label_token_gives_nan_like_f_cross_entropy_and_zero_gradients(fused):
    # The chunked loss gave 0.0 where the logits path and HF's loss give NaN (0 / 0).
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    labels = torch.full((6,), -100)
    loss = loss_mod.linear_cross_entropy(x, w, labels, fused=fused)
    assert torch.isnan(loss) and torch.isnan(torch.nn.functional.cross_entropy(x @ w.t(), labels))
    (loss * 0).backward()  # as the Trainer weights a micro-batch by its 0 label tokens
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))
    with pytest.raises(TypeError, match="needs a floating-point weight, got torch.int8"):
        loss_mod.linear_cross_entropy(x, w.detach().to(torch.int8), torch.zeros(6, dtype=torch.long))
