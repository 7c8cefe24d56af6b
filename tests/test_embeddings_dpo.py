"""Sentence embeddings (triplet, in-batch negatives, encode) and DPO against their formulas."""

import math

import pytest
import torch

from fastpt.data.tokenizer import train_tokenizer
from fastpt.data.world import World
from fastpt.finetune import DPO, dpo_loss, encode, in_batch_negatives_loss, sequence_logprobs, triplet_loss
from fastpt.models import Decoder, DecoderConfig, Encoder, EncoderConfig


def test_triplet_loss_formula():
    a, p, n = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    assert float(triplet_loss(a, p, n, margin=1.0)) == pytest.approx(5 - 1 + 1)
    assert float(triplet_loss(a, n, p, margin=1.0)) == 0.0
    with pytest.raises(ValueError, match="margin"):
        triplet_loss(a, p, n, margin=-1)


def test_in_batch_negatives_formula():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    sims = torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]])
    expected = torch.nn.functional.cross_entropy(20 * sims, torch.tensor([0, 1]))
    torch.testing.assert_close(in_batch_negatives_loss(a, p), expected)


def test_encode_gives_normalized_embeddings():
    world = World(0)
    tok = train_tokenizer(list(world.documents(500)), "wordpiece", vocab_size=300)
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig.from_name("bert-tiny", vocab_size=tok.get_vocab_size()))
    e = encode(enc, tok, ["Ruza ate soup.", "Nine lives in Nafa.", "x"], normalize=True)
    assert e.shape == (3, 64)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="no texts"):
        encode(enc, tok, [])
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        encode(enc, tok, "Ruza ate soup.")
    for batch_size in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            encode(enc, tok, ["x"], batch_size=batch_size)
    with pytest.raises(TypeError, match="normalize must be True or False"):
        encode(enc, tok, ["x"], normalize="no")
    with pytest.raises(ValueError, match=r"texts\[1\] has \d+ tokens, more than the model's 128 positions"):
        encode(enc, tok, ["x", "Ruza ate soup. " * 100])


def test_dpo_loss_equals_its_formula():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -2.5])
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    z = (pc - pr) - (rc - rr)
    expected = -torch.log(torch.sigmoid(0.1 * z)).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * (pc - rc))
    torch.testing.assert_close(out.reward_margin, (0.1 * z).mean())
    assert float(out.accuracy) == 0.5
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0)
    with pytest.raises(ValueError, match="same B pairs"):
        dpo_loss(pc, pr[:1], rc, rr)
    with pytest.raises(ValueError, match="empty batch"):
        dpo_loss(*(torch.zeros(0),) * 4)


def test_dpo_module_sums_response_tokens_only():
    torch.manual_seed(0)
    policy = Decoder(DecoderConfig.from_name("llama-tiny", vocab_size=50))
    ref = Decoder(DecoderConfig.from_name("llama-tiny", vocab_size=50))
    ref.load_state_dict(policy.state_dict())
    ids = torch.randint(0, 50, (2, 6))
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    mask = torch.ones_like(ids, dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    logp = sequence_logprobs(policy, **batch)
    full = torch.log_softmax(policy(input_ids=ids).logits[:, :-1].float(), -1)
    direct = full.gather(-1, ids[:, 1:, None]).squeeze(-1)[:, 2:].sum(-1)
    torch.testing.assert_close(logp, direct)
    out = DPO(policy, ref)(chosen=batch, rejected=batch)
    assert float(out.loss.detach()) == pytest.approx(math.log(2), abs=1e-6)  # identical policy and reference
    out.loss.backward()
    assert all(p.grad is None for p in ref.parameters())
    with pytest.raises(ValueError, match="reference"):
        DPO(policy)(chosen=batch, rejected=batch)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        DPO(policy, ref, beta=-1)  # at construction, not at the first forward


# Bad input: each named, where torch broadcast it, misaligned it or gave NaN.

@pytest.mark.parametrize("args, kw, error, match", [
    ((torch.zeros(3, 2), torch.zeros(1, 2), torch.zeros(3, 2)), {}, ValueError,
     r"positive must be \(B, d\) = \(3, 2\) like anchor .*got \(1, 2\)"),   # broadcast before
    ((torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, 2)), {}, ValueError,
     r"negative must be \(B, d\) = \(3, 2\)"),
    ((torch.zeros(0, 2),) * 3, {}, ValueError,
     r"anchor must be \(B, d\) embeddings with B >= 1, got shape \(0, 2\)"),   # NaN before
    ((torch.zeros(2, 3, 4),) * 3, {}, ValueError, r"anchor must be \(B, d\) embeddings .*got shape \(2, 3, 4\)"),
    ((torch.zeros(2, 2),) * 3, {"margin": float("nan")}, ValueError,
     "margin must be a finite number >= 0, got nan"),
    (([[0.0, 1.0]], torch.zeros(1, 2), torch.zeros(1, 2)), {}, TypeError,
     "anchor must be a .* tensor of embeddings, got list")])
def test_triplet_loss_refuses_inputs_it_would_broadcast_or_turn_to_nan(args, kw, error, match):
    with pytest.raises(error, match=match):
        triplet_loss(*args, **kw)


@pytest.mark.parametrize("anchor, positive, kw, match", [
    (torch.ones(3, 2), torch.ones(2, 2), {}, r"positive must have a row for each of anchor's 3 rows .*got 2"),
    (torch.ones(2, 2), torch.ones(2, 3), {}, r"positive must have anchor's embedding size d = 2, got shape \(2, 3\)"),
    (torch.ones(2), torch.ones(2), {}, r"anchor must be \(B, d\) embeddings with B >= 1, got shape \(2,\)"),
    (torch.ones(0, 2), torch.ones(0, 2), {}, r"anchor must be \(B, d\) embeddings with B >= 1, got shape \(0, 2\)"),
    (torch.ones(2, 2), torch.ones(2, 2), {"scale": float("nan")}, "scale must be a finite number > 0, got nan"),
    (torch.ones(2, 2), torch.ones(2, 2), {"scale": 0}, "scale must be a finite number > 0, got 0")])
def test_in_batch_negatives_refuses_mismatched_or_empty_inputs(anchor, positive, kw, match):
    with pytest.raises(ValueError, match=match):
        in_batch_negatives_loss(anchor, positive, **kw)


def test_in_batch_negatives_takes_extra_negatives():
    a, p = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    sims = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(p, dim=-1).T
    expected = torch.nn.functional.cross_entropy(20 * sims, torch.tensor([0, 1]))
    torch.testing.assert_close(in_batch_negatives_loss(a, p), expected)


def _dpo_batch():
    torch.manual_seed(0)
    policy = Decoder(DecoderConfig.from_name("llama-tiny", vocab_size=50))
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    return policy, ids, labels


@pytest.mark.parametrize("edit, error, match", [
    (lambda l: l[:, :4], ValueError, r"labels must be \(B, T\) = \(2, 6\) like input_ids, got \(2, 4\)"),
    (lambda l: l[:1], ValueError, r"labels must be \(B, T\) = \(2, 6\) like input_ids, got \(1, 6\)"),
    (lambda l: l.index_fill(1, torch.tensor([4]), -5), ValueError,
     r"labels must lie in \[0, vocab_size=50\) or be -100 \(ignored\), got -5"),   # was clamped to 0
    (lambda l: l.index_fill(1, torch.tensor([4]), 50), ValueError, r"labels must lie in \[0, vocab_size=50\)"),
    (lambda l: l.float(), TypeError, "labels must hold integer token ids, got torch.float32"),
    (lambda l: l.tolist(), TypeError, "labels must be a tensor of token ids, got list"),
    (lambda l: l.index_fill(0, torch.tensor([1]), -100), ValueError, "labels row 1 scores no token"),
    (lambda l: torch.cat([l[:, :1], torch.full((2, 5), -100)], 1), ValueError,  # the first is never scored
     "labels row 0 scores no token")])
def test_sequence_logprobs_checks_labels_against_input_ids_and_vocabulary(edit, error, match):
    policy, ids, labels = _dpo_batch()
    with pytest.raises(error, match=match):
        sequence_logprobs(policy, ids, torch.ones_like(ids, dtype=torch.bool), edit(labels))


@pytest.mark.parametrize("which", range(4))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_dpo_loss_refuses_non_finite_log_probs_naming_the_input(which, value):
    inputs = [torch.tensor([-3.0, -5.0]) for _ in range(4)]
    inputs[which][1] = value
    name = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")[which]
    with pytest.raises(ValueError, match=rf"{name}\[1\] = {value}: log-probs must be finite"):
        dpo_loss(*inputs)


def test_dpo_loss_needs_tensors_and_takes_tiny_positive_log_probs():
    good = torch.tensor([-3.0, -5.0])
    with pytest.raises(TypeError, match="ref_chosen must be a tensor of \\(B,\\) summed log-probs, got list"):
        dpo_loss(good, good, [-3.0, -5.0], good)  # was AttributeError: 'list' object has no attribute 'shape'
    rounding = torch.tensor([1e-7, -2.0])  # a sum of log-probs near 0 may round above it
    assert torch.isfinite(dpo_loss(rounding, good, good, good).loss)
