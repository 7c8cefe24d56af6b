"""ELECTRA and the ready-made pre-training runs on the embedded corpus (tiny sizes)."""

import math

import pytest
import torch

from fastpt.data.tokenizer import train_tokenizer
from fastpt.data.world import World
from fastpt.models import EncoderConfig
from fastpt.pretrain.electra import DISC_WEIGHT, Electra
from fastpt.pretrain.mlm import MLMCollator
from fastpt.train.recipes import pretrain_decoder, pretrain_encoder


def _electra_batch(vocab=200):
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": [2, *torch.randint(5, vocab, (20,), generator=g).tolist(), 3]}
                for _ in range(8)]
    return MLMCollator(vocab, mask_id=4, pad_id=0, special_ids=[0, 1, 2, 3, 4])(examples)


def _electra():
    torch.manual_seed(0)
    config = EncoderConfig.from_name("bert-tiny", vocab_size=200, dropout=0.0, attention_dropout=0.0)
    return Electra(config, generator_scale=4)


def test_electra_shares_embeddings_and_combines_losses():
    model = _electra()
    assert model.generator.embeddings.shared[0] is model.discriminator.embeddings
    assert model.generator.config.hidden_size == 16
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("generator.embeddings.shared") for n in names)  # stored once
    out = model(**_electra_batch())
    torch.testing.assert_close(out.loss, out.mlm_loss + DISC_WEIGHT * out.disc_loss)
    selected = _electra_batch()["labels"] != -100
    assert not (out.is_replaced & ~selected).any()  # only masked positions can be replaced


def test_electra_sampling_passes_no_gradient_to_the_generator():
    model = _electra()
    out = model(**_electra_batch())
    out.disc_loss.backward()
    gen_only = [p for n, p in model.generator.named_parameters() if "embeddings" not in n]
    gen_only += list(model.generator_head.parameters())
    assert all(p.grad is None or not p.grad.any() for p in gen_only)
    assert model.disc_head[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="generator_scale"):
        Electra(EncoderConfig.from_name("bert-tiny"), generator_scale=3)


def test_tiny_encoder_mlm_loss_decreases(tmp_path):
    result = pretrain_encoder(str(tmp_path), max_steps=60, n_docs=2000, vocab_size=600,
                              batch_size=16, seq_len=48, lr=2e-3, progress=False, log_every=5)
    losses = [r["loss"] for r in result.metrics]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "metrics.csv").exists()


def test_tiny_decoder_and_electra_runs(tmp_path):
    dec = pretrain_decoder(str(tmp_path / "dec"), max_steps=20, n_docs=1000, vocab_size=500,
                           seq_len=64, batch_size=8, progress=False, log_every=5)
    losses = [r["loss"] for r in dec.metrics]
    assert losses[-1] < losses[0], losses
    el = pretrain_encoder(str(tmp_path / "el"), objective="electra", max_steps=10, n_docs=500,
                          vocab_size=400, batch_size=8, seq_len=32, progress=False)
    # generator MLM + 50 x discriminator BCE: below what a model that learnt nothing scores,
    # a uniform guess over the vocabulary and a coin flip per token (log 400 + 50 log 2 = 40.6)
    assert el.model is not None and 0 < el.metrics[-1]["loss"] < math.log(400) + 50 * math.log(2) - 5
    with pytest.raises(ValueError, match="objective"):
        pretrain_encoder(str(tmp_path / "x"), objective="clm")


def test_decoder_pretraining_needs_a_tokenizer_with_eos(tmp_path):
    docs = list(World(seed=0).documents(100))
    wordpiece = train_tokenizer(docs, "wordpiece", vocab_size=300)  # [PAD] [UNK] [CLS] [SEP] [MASK]
    with pytest.raises(ValueError, match=r"the tokenizer has no EOS token \(</s> or <\|endoftext\|>\)"):
        pretrain_decoder(str(tmp_path), docs=docs, tokenizer=wordpiece, max_steps=1, progress=False)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_encoder_pretraining_needs_a_tokenizer_with_a_mask_token(tmp_path):
    docs = list(World(seed=0).documents(100))
    bpe = train_tokenizer(docs, "bpe", vocab_size=300)  # <|endoftext|> only
    for objective in ("mlm", "electra"):  # was a TypeError after tokenizer.json was written
        with pytest.raises(ValueError, match=r"the tokenizer has no mask token \(\[MASK\]\)"):
            pretrain_encoder(str(tmp_path), objective=objective, docs=docs, tokenizer=bpe,
                             max_steps=1, progress=False)
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.slow
def test_pretraining_beats_scratch_on_unseen_adjectives(tmp_path):
    """Learning outcome (README records the numbers): >= 10 points with 200 labels."""
    from fastpt.train.experiments import sentiment_transfer
    result = sentiment_transfer(str(tmp_path), progress=False)
    print(result)
    assert result["frozen_embeddings"]["gain_points"] >= 10
