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
