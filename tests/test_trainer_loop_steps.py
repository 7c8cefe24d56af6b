"""Trainer steps: a loss_fn's and composite losses' accumulated micro-batches give the update of
one large batch; non-finite steps, batches without labels, evaluation without data, the logged lr."""

import math
import os
import sys

import pytest
import torch

from fastpt.train import Trainer
from trainer_loop_util import _config, _weights

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from train_tiny import TinyLM, make_data  # noqa: E402
from trainer_ddp_checks import argmax_sampling, encoder_model, pad_collate  # noqa: E402


def _gradients_at_step(trainer):
    grads = {}
    trainer.optimizer.register_step_pre_hook(lambda *_: grads.update(
        {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    return grads


def _label_count(model, batch):
    return model(**batch)["loss"], (batch["labels"][:, 1:] != -100).sum()


# -- 1: a loss_fn's accumulation is token-weighted ---------------------------------------------

@pytest.mark.parametrize("bs, accum", [(2, 4), (1, 8)])
def test_loss_fn_accumulation_equals_one_large_batch(tmp_path, bs, accum):
    data = make_data()[:8]  # uneven label counts per example
    torch.manual_seed(0)
    big = Trainer(TinyLM(dropout=0.0), _config(tmp_path / "big"), data)
    big_grads = _gradients_at_step(big)
    big_loss = big.train_step([torch.utils.data.default_collate(data)])["loss"]
    torch.manual_seed(0)
    small = Trainer(TinyLM(dropout=0.0), _config(tmp_path / "small", batch_size=bs, grad_accum=accum), data,
                    loss_fn=_label_count)
    small_grads = _gradients_at_step(small)
    small_loss = small.train_step([torch.utils.data.default_collate(data[i:i + bs]) for i in range(0, 8, bs)])["loss"]
    assert small_loss == pytest.approx(big_loss, rel=1e-6)
    for name, g in big_grads.items():  # were off by up to 21%
        torch.testing.assert_close(small_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_loss_fn_count_is_checked(tmp_path):
    t = Trainer(TinyLM(), _config(tmp_path), make_data(), loss_fn=lambda m, b: (m(**b)["loss"], -3))
    with pytest.raises(ValueError, match="count.*-3"):
        t.train_step([torch.utils.data.default_collate(make_data()[:2])])


# -- 8: non-finite steps ----------------------------------------------------------------------------

def test_non_finite_step_is_refused_before_it_is_applied_or_saved(tmp_path):
    torch.manual_seed(0)
    t = Trainer(TinyLM(), _config(tmp_path, max_steps=6, batch_size=4, save_every=1, keep_last=2), make_data())
    train_step = t.train_step
    before = {}

    def poisoned(micro):
        if t.step == 3:  # as an overflow or a bad batch would, at step 4
            before["weights"] = _weights(t)
            with torch.no_grad():
                t.model.head.bias[0] = float("nan")
        return train_step(micro)
    t.train_step = poisoned
    with pytest.raises(FloatingPointError, match="step 4.*not finite"):  # trained on, NaN in every row
        t.train()
    assert t.step == 3
    others = [p for n, p in t.model.named_parameters() if n != "head.bias"]
    assert all(torch.isfinite(p).all() for p in others)  # the optimizer never stepped
    # The good checkpoints were pruned by NaN ones (step-5, step-6), which no longer resumed.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-2", "step-3"]
    fresh = Trainer(TinyLM(), _config(tmp_path / "fresh", max_steps=6, batch_size=4), make_data())
    fresh.load(str(tmp_path / "checkpoints"))
    assert fresh.step == 3 and torch.equal(_weights(fresh), before["weights"])


def test_step_without_any_label_token_is_refused(tmp_path):
    data = [dict(d, labels=torch.full_like(d["labels"], -100)) for d in make_data()[:4]]
    t = Trainer(TinyLM(), _config(tmp_path), data)
    with pytest.raises(ValueError, match="step 1.*no label token"):
        t.train_step([torch.utils.data.default_collate(data)])


# -- 9: micro-batches and eval batches without labels ----------------------------------------------

def _without_labels(data, rows):
    return [dict(d, labels=torch.full_like(d["labels"], -100)) if i in rows else d for i, d in enumerate(data)]


def test_micro_batch_without_labels_keeps_the_loss(tmp_path):
    data = _without_labels(make_data()[:8], {6, 7})  # the last micro-batch of 2 has none
    losses = []
    for bs in (8, 2):
        torch.manual_seed(0)
        t = Trainer(TinyLM(dropout=0.0), _config(tmp_path / str(bs), batch_size=bs, grad_accum=8 // bs), data)
        losses.append(t.train_step([torch.utils.data.default_collate(data[i:i + bs]) for i in range(0, 8, bs)])["loss"])
    assert math.isfinite(losses[1]) and losses[1] == pytest.approx(losses[0], rel=1e-6)  # was NaN


def test_eval_batch_without_labels_keeps_the_eval_loss(tmp_path):
    data = _without_labels(make_data()[:6], {5})  # batches of 5: the second has no label
    torch.manual_seed(0)
    t = Trainer(TinyLM(dropout=0.0), _config(tmp_path, batch_size=5), make_data(), eval_data=data)
    with torch.no_grad():
        reference = float(t.model.eval()(**torch.utils.data.default_collate(data[:5]))["loss"])
    assert t.evaluate() == pytest.approx(reference, rel=1e-6)  # was NaN


# -- 10: evaluation without data -------------------------------------------------------------------

class _Nothing(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def test_evaluation_without_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="evaluate.*needs eval_data"):  # was a TypeError inside torch
        Trainer(TinyLM(), _config(tmp_path), make_data()).evaluate()
    with pytest.raises(ValueError, match="eval_data is empty"):  # logged eval_loss NaN
        Trainer(TinyLM(), _config(tmp_path), make_data(), eval_data=[])
    with pytest.raises(ValueError, match="eval_data must be a map-style dataset.*generator"):
        Trainer(TinyLM(), _config(tmp_path), make_data(), eval_data=(d for d in make_data()))
    with pytest.raises(ValueError, match="eval_data yields no example"):
        Trainer(TinyLM(), _config(tmp_path), make_data(), eval_data=_Nothing()).evaluate()
    unlabelled = _without_labels(make_data()[:3], {0, 1, 2})
    with pytest.raises(ValueError, match="eval_data holds no label token"):
        Trainer(TinyLM(), _config(tmp_path), make_data(), eval_data=unlabelled).evaluate()


# -- 11: the logged learning rate ------------------------------------------------------------------

def test_logged_lr_is_the_one_applied(tmp_path):
    torch.manual_seed(0)
    t = Trainer(TinyLM(), _config(tmp_path, max_steps=6, batch_size=4, lr=1.0, warmup_steps=2,
                                  schedule="cosine", min_lr_ratio=0.1), make_data())
    applied = []
    t.optimizer.register_step_pre_hook(lambda opt, *_: applied.append(opt.param_groups[0]["lr"]))
    t.train()
    assert [r["lr"] for r in t.metrics.rows] == applied  # was shifted by a step (last row 0.1)
    assert applied[:2] == [0.5, 1.0]


# -- composite losses: each term weighted by its own count ------------------------------------

def _long_and_short():
    """A 102-token and a 6-token example (MLM masks drawn, 14 and 2 of them), with NSP labels."""
    g = torch.Generator().manual_seed(3)
    examples = []
    for length, picked, nsp in ((102, 14, 0), (6, 2, 1)):
        ids = torch.randint(4, 40, (length,), generator=g)
        labels = torch.full_like(ids, -100)
        at = torch.randperm(length, generator=g)[:picked]
        labels[at] = ids[at]
        ids[at] = 3
        examples.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "next_sentence_label": nsp})
    return examples


def _collate_with_nsp(examples):
    return {**pad_collate(examples), "next_sentence_label": torch.tensor([e["next_sentence_label"]
                                                                           for e in examples])}


@pytest.mark.parametrize("kind", ["electra", "mlm+nsp"])
def test_composite_loss_accumulation_equals_one_large_batch(tmp_path, monkeypatch, kind):
    # ELECTRA's discriminator loss is a mean over real tokens, NSP's over sequences: weighting each
    # micro-batch by its MLM label count (14 : 2) gave the short one too little weight (disc loss
    # 0.61648 vs 0.61397 in the audit) the loss of the step was 48.56 for 48.88 (ELECTRA), 4.3834 for 4.3896 (MLM + NSP).
    monkeypatch.setattr(torch, "multinomial", argmax_sampling)  # the same replacements both ways
    examples = _long_and_short()
    # Both models state their terms themselves (Electra.loss_terms, Encoder.loss_terms).
    collate = pad_collate if kind == "electra" else _collate_with_nsp

    def run(micro_batches, name):
        t = Trainer(encoder_model("electra" if kind == "electra" else "mlm"),
                    _config(tmp_path / name, label_shift=0), examples, collate_fn=collate,
                    eval_data=examples)
        grads = {}  # ELECTRA's unused heads have none
        t.optimizer.register_step_pre_hook(lambda *_: grads.update(
            {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}))
        t.config.batch_size = len(micro_batches[0])  # evaluate() in batches of the micro-batches' size
        eval_loss = t.evaluate()
        stats = t.train_step([collate(m) for m in micro_batches])
        return stats["loss"], eval_loss, grads

    loss_one, eval_one, grads_one = run([examples], "one")
    loss_split, eval_split, grads_split = run([examples[:1], examples[1:]], "split")
    assert loss_split == pytest.approx(loss_one, rel=1e-5)
    assert eval_split == pytest.approx(eval_one, rel=1e-5) and eval_one == pytest.approx(loss_one, rel=1e-5)
    scale = max(float(g.abs().max()) for g in grads_one.values())
    assert grads_split.keys() == grads_one.keys()
    worst = max(float((grads_split[k] - grads_one[k]).abs().max()) for k in grads_one) / scale
    assert worst < 1e-5, worst


def test_dataloader_workers_get_a_base_seed_per_rank(tmp_path):
    # The loader's generator seeds its workers: one per rank, or a dataset drawing random
    # numbers in workers draws the same on every rank. Rank 0 keeps the single-process seed.
    t = Trainer(TinyLM(dropout=0.0), _config(tmp_path, num_workers=0), make_data()[:8])
    seeds = {}
    t.world = 3  # as if under torchrun with 3 processes (the loader only reads rank and world)
    for rank in (0, 1, 2):
        t.rank = rank
        seeds[rank] = t._loader(t.train_data, epoch=3, train=True).generator.initial_seed()
    assert seeds[0] == t.config.seed * 1000 + 3
    assert len(set(seeds.values())) == 3
