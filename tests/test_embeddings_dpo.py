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


def test_encode_pools_as_asked():
    """pooling picks the first token, the mean of the real tokens or the last real one, each
    row pooled over its own tokens only (batched with padding as one by one)."""
    from fastpt.finetune.heads import features
    world = World(0)
    tok = train_tokenizer(list(world.documents(500)), "wordpiece", vocab_size=300)
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig.from_name("bert-tiny", vocab_size=tok.get_vocab_size())).eval()
    texts = ["Ruza ate soup in Nafa.", "x"]
    for text, got in zip(texts, zip(*(encode(enc, tok, texts, pooling=how, normalize=False)
                                      for how in ("cls", "mean", "last")))):
        ids = torch.tensor([tok.encode(text).ids])
        h, _ = features(enc, ids, torch.ones_like(ids, dtype=torch.bool))
        for e, want in zip(got, (h[0, 0], h[0].mean(0), h[0, -1])):
            torch.testing.assert_close(e, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pooling must be one of"):
        encode(enc, tok, texts, pooling="max")


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


def test_dpo_trains_with_the_trainer_and_logs_its_rewards(tmp_path):
    """Trainer(DPO(...)) ran into the nested batch ("'dict' object has no attribute 'shape'"),
    and nothing logged the margins and rewards. The loss is a mean over pairs; the rewards go
    to metrics.jsonl beside it, and the chosen response wins more and more clearly."""
    import json
    from fastpt.train import Trainer, TrainerConfig
    torch.manual_seed(0)
    policy = Decoder(DecoderConfig.from_name("llama-tiny", vocab_size=50))
    ref = Decoder(DecoderConfig.from_name("llama-tiny", vocab_size=50))
    ref.load_state_dict(policy.state_dict())
    frozen = {k: v.clone() for k, v in ref.state_dict().items()}

    def side(ids):
        labels = ids.clone()
        labels[:3] = -100  # the prompt
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": labels}
    pairs = []
    for _ in range(4):
        prompt = torch.randint(0, 50, (3,))
        pairs.append({"chosen": side(torch.cat([prompt, torch.tensor([7, 8, 9])])),
                      "rejected": side(torch.cat([prompt, torch.tensor([30, 31, 32])]))})
    config = TrainerConfig(output_dir=str(tmp_path), max_steps=6, batch_size=2, lr=1e-2, warmup_steps=0,
                           log_every=1, save_every=0, progress=False)
    last = Trainer(DPO(policy, ref, beta=0.1), config, pairs).train()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 7)) and last["step"] == 6
    first = rows[0]  # before any update the policy is the reference: loss log 2, rewards 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["tokens"] == 2
    assert first["reward_margin"] == pytest.approx(0, abs=1e-6) and first["chosen_reward"] == pytest.approx(0, abs=1e-6)
    for r in rows:
        assert r["reward_margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"], abs=1e-5)
        assert 0 <= r["accuracy"] <= 1
    assert rows[-1]["reward_margin"] > 0.05 and rows[-1]["accuracy"] == 1.0 and rows[-1]["loss"] < math.log(2)
    assert all(torch.equal(v, frozen[k]) for k, v in ref.state_dict().items())  # the reference never trains
    with pytest.raises(ValueError, match="a DPO batch must be"):
        DPO.loss_terms({"input_ids": torch.zeros(2, 3)})


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
