"""Bad input to the training loop, its checkpoints, recipes and pre-training objectives: a
clear exception naming the argument (not a crash deep inside torch, nor a run that trains on
a wrong value), and no checkpoint lost or made unloadable."""

import json
import math
import os
import sys

import pytest
import torch

from fastpt.models import EncoderConfig
from fastpt.pretrain.autoencoder import StackedAutoencoder, digits_experiment, error_rate, fine_tune
from fastpt.pretrain.clm import PrefixLMCollator, collate_packed
from fastpt.pretrain.electra import Electra
from fastpt.pretrain.mlm import MLMCollator
from fastpt.pretrain.nsp import make_nsp_pairs, split_sentences
from fastpt.pretrain.span_corruption import SpanCorruptionCollator
from fastpt.train import CheckpointError, Trainer, TrainerConfig, load_checkpoint, save_checkpoint
from fastpt.train import checkpoint as ckpt
from fastpt.train.experiments import fine_tune_accuracy, sentiment_transfer
from fastpt.train.recipes import pretrain_decoder, pretrain_encoder

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from train_tiny import TinyLM, make_data  # noqa: E402


def _config(out, **overrides):
    cfg = dict(output_dir=str(out), max_steps=1, batch_size=8, lr=1e-2, label_shift=1, progress=False,
               log_every=1)
    cfg.update(overrides)
    return TrainerConfig(**cfg)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


# -- TrainerConfig and the Trainer's arguments ---------------------------------------------------

def test_config_refuses_values_that_train_wrong_or_fail_late():
    with pytest.raises(ValueError, match="warmup_steps"):  # the lr never reached its peak
        TrainerConfig(max_steps=10, warmup_steps=11)
    TrainerConfig(max_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="seed"):  # was "Overflow when unpacking long long" at batch 1
        TrainerConfig(seed=2**70)
    with pytest.raises(ValueError, match="output_dir"):  # was FileNotFoundError: ''
        TrainerConfig(output_dir="")
    with pytest.raises(ValueError, match="weight_decay"):  # AdamW scaled the weights by -99 a step
        TrainerConfig(lr=1.0, weight_decay=100.0)
    for bad in (None, ["lr"]):
        with pytest.raises(TypeError, match="from_dict needs a dict"):
            TrainerConfig.from_dict(bad)


@pytest.mark.parametrize("steady", [False, True])
def test_steady_alloc_is_an_opt_in_the_trainer_applies(tmp_path, monkeypatch, steady):
    from fastpt.cli import build_parser
    from fastpt.train import trainer
    calls = []
    monkeypatch.setattr(trainer, "use_steady_allocator", lambda: calls.append(1) or True)
    Trainer(TinyLM(), _config(tmp_path, steady_alloc=steady), make_data()).train()
    assert calls == ([1] if steady else [])  # never applied unless asked for
    with pytest.raises(ValueError, match="steady_alloc must be true or false"):
        TrainerConfig(steady_alloc="yes")
    for command in ("pretrain", "finetune"):
        args = build_parser().parse_args([command, "--steady-alloc"])
        assert args.steady_alloc is True


def test_trainer_refuses_arguments_of_the_wrong_kind(tmp_path):
    cfg, data = _config(tmp_path), make_data()
    with pytest.raises(TypeError, match="config must be a TrainerConfig"):  # was an AttributeError
        Trainer(TinyLM(), {"lr": 1e-3}, data)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Trainer(lambda **batch: None, cfg, data)
    for bad in (None, (d for d in data)):  # were "object of type ... has no len()" at the first step
        with pytest.raises(TypeError, match="train_data must be"):
            Trainer(TinyLM(), cfg, bad)
    for name in ("collate_fn", "loss_fn", "loss_terms"):  # were "'int' object is not callable" later
        with pytest.raises(TypeError, match=f"{name} must be callable"):
            Trainer(TinyLM(), cfg, data, **{name: 5})


class _LossAs(TinyLM):
    """TinyLM whose output's loss is ``make(loss)``, or whose output has no "loss" key."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, input_ids, labels=None):
        out = super().forward(input_ids, labels)
        if self.make is None:
            return {"logits": out["logits"]}
        return {**out, "loss": self.make(out["loss"])}


@pytest.mark.parametrize("make, error, match", [
    (None, ValueError, "returned no loss"),  # was KeyError: 'loss'
    (lambda loss: loss.repeat(3), ValueError, r"one number .* shape \(3,\)"),  # was a backward error
    (lambda loss: 1.5, TypeError, "floating-point tensor"),  # was "'float' object has no attribute"
    (lambda loss: torch.tensor(3), TypeError, "torch.int64"),
    (lambda loss: loss.detach(), ValueError, "does not depend on any trainable parameter"),
])
def test_a_loss_that_is_not_one_differentiable_number_is_refused(tmp_path, make, error, match):
    model = _LossAs(make)
    t = Trainer(model, _config(tmp_path), make_data())
    before = _weights(model)
    with pytest.raises(error, match=match):
        t.train()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_loss_fn_results_and_batches_of_the_wrong_kind_are_refused(tmp_path):
    t = Trainer(TinyLM(), _config(tmp_path / "a"), make_data(), loss_fn=lambda m, b: m(**b)["loss"])
    with pytest.raises(TypeError, match=r"loss_fn must return \(mean_loss, count\)"):  # was "iteration over a 0-d tensor"
        t.train()
    as_list = Trainer(TinyLM(), _config(tmp_path / "b"), make_data(),
                      collate_fn=lambda ex: [torch.stack([e["input_ids"] for e in ex])])
    with pytest.raises(TypeError, match="a batch must be a dict"):  # was a TypeError printing the model
        as_list.train()


# -- resuming -------------------------------------------------------------------------------------

def _trained(out, **overrides):
    torch.manual_seed(0)
    t = Trainer(TinyLM(), _config(out, **overrides), make_data())
    t.train()
    return out / "checkpoints"


def test_resume_with_another_seed_is_refused(tmp_path):
    root = _trained(tmp_path / "run", max_steps=2, batch_size=4)
    t = Trainer(TinyLM(), _config(tmp_path / "again", max_steps=4, batch_size=4, seed=7), make_data())
    # Its data position counts batches of the order seed 0 shuffled: under seed 7 it would
    # skip some examples and repeat others.
    with pytest.raises(CheckpointError, match="seed=0 \\(now 7\\)"):
        t.load(str(root))


def test_resume_applies_the_configs_lr_schedule_and_optimizer_settings(tmp_path):
    root = _trained(tmp_path / "run", max_steps=3, batch_size=4, schedule="cosine", weight_decay=0.01)
    # Training on past a finished run (a raised max_steps): the first step applied the lr of
    # the old schedule's end (0.0), not the new schedule's at step 3 of 6.
    t = Trainer(TinyLM(), _config(tmp_path / "on", max_steps=6, batch_size=4, schedule="cosine"), make_data())
    t.load(str(root))
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert t.train_step([next(t._micro_batches())])["lr"] == pytest.approx(0.005)
    # A lower lr, weight decay and betas for the resumed run were ignored: the saved ones won.
    t = Trainer(TinyLM(), _config(tmp_path / "low", max_steps=3, batch_size=4, schedule="constant", lr=1e-3,
                                  weight_decay=0.1, betas=(0.8, 0.9)), make_data())
    t.load(str(root))
    decay, no_decay = t.optimizer.param_groups
    assert t.scheduler.base_lrs == [1e-3, 1e-3] and decay["lr"] == no_decay["lr"] == 1e-3
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert tuple(decay["betas"]) == (0.8, 0.9) and t.scheduler.get_last_lr() == [1e-3, 1e-3]


# -- writing checkpoints --------------------------------------------------------------------------

def _save(root, step, data=None, **kwargs):
    model = TinyLM()
    return save_checkpoint(str(root), step, model.state_dict(), {"state": {}, "param_groups": []}, None,
                           data if data is not None else {"epoch": 0, "batches_in_epoch": 0}, **kwargs)


def test_save_checkpoint_never_publishes_what_load_would_refuse(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1, keep_last=1)
    for step in (True, -1, 1.5):  # were saved as step-True, step--1, step-1.5, then pruned step-1
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            _save(root, step, keep_last=1)
    with pytest.raises(ValueError, match="keep_last must be an int >= 0"):
        _save(root, 2, keep_last=True)
    # A data position load_checkpoint refuses became `latest`, and keep_last=1 removed step-1.
    with pytest.raises(CheckpointError, match="field 'data'"):
        _save(root, 2, data={"epoch": 0}, keep_last=1)
    assert sorted(os.listdir(root)) == ["latest", "step-1"]
    assert load_checkpoint(str(root))["step"] == 1


def test_a_failed_save_leaves_no_temporary_folder(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    with pytest.raises(TypeError, match=r"save_checkpoint: extra\['x'\] cannot be written as JSON .*"
                                        "not JSON serializable"):  # the entry named, before any file is written
        _save(root, 2, extra={"ok": 1, "x": object()})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(root, 3)
    # This process's temporary folders are never swept (they may be saves in progress).
    assert sorted(os.listdir(root)) == ["latest", "step-1"]
    assert json.loads((root / "latest").read_text())["path"] == "step-1"


# -- recipes and experiments ----------------------------------------------------------------------

DOCS = ["the cat sat on the mat . it was happy ."] * 40


@pytest.mark.parametrize("recipe, kwargs, error, match", [
    (pretrain_encoder, dict(seq_len=0), ValueError, "seq_len"),  # trained on untruncated documents
    (pretrain_encoder, dict(seq_len=True), TypeError, "seq_len"),
    (pretrain_encoder, dict(label_shift=1), ValueError, "label_shift"),  # miscounted MLM's labels
    (pretrain_encoder, dict(max_steps=0), ValueError, "max_steps"),  # after writing tokenizer.json
    (pretrain_decoder, dict(seq_len=2.5), TypeError, "seq_len"),  # after writing tokenizer.json
    (pretrain_decoder, dict(label_shift=0), ValueError, "label_shift"),  # "got multiple values"
    (pretrain_decoder, dict(warmup_steps=5, max_steps=2), ValueError, "warmup_steps"),
])
def test_recipes_check_their_arguments_before_writing_anything(tmp_path, recipe, kwargs, error, match):
    out = tmp_path / "run"
    with pytest.raises(error, match=match):
        recipe(str(out), docs=DOCS, **{"max_steps": 1, "batch_size": 2, "vocab_size": 300, "progress": False,
                                       **kwargs})
    assert not out.exists()


def test_experiments_check_their_arguments_before_training(tmp_path):
    # Before minutes of pre-training: an empty set failed only after it.
    for name in ("n_labels", "n_test"):
        with pytest.raises(ValueError, match=name):
            sentiment_transfer(str(tmp_path), **{name: 0})
    reviews = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    # Checked before the encoder and tokenizer are used (None here).
    for kwargs, error, match in ((dict(train=[]), ValueError, "train must be a non-empty list"),
                                 (dict(test=[{"text": "x", "label": 2}]), ValueError, r"test\[0\]\['label'\]"),
                                 (dict(train=[{"text": "x", "label": True}]), ValueError, "label"),
                                 (dict(batch_size=True), TypeError, "batch_size"),
                                 (dict(batch_size=0), ValueError, "batch_size"),
                                 (dict(freeze_embeddings="no"), TypeError, "freeze_embeddings"),
                                 (dict(lr=math.nan), ValueError, "lr")):
        args = {"train": reviews, "test": reviews, **kwargs}
        with pytest.raises(error, match=match):
            fine_tune_accuracy(None, None, **args)


# -- pre-training objectives ------------------------------------------------------------------------

def test_mlm_collator_refuses_options_and_ids_of_the_wrong_kind():
    for kwargs, error, match in ((dict(vocab_size=100.0), TypeError, "vocab_size"),  # failed in torch.zeros
                                 (dict(special_ids=[2, 3.5]), ValueError, "special_ids"),  # 3.5 was cut to 3
                                 (dict(special_ids=[True]), ValueError, "special_ids"),  # stood for id 1
                                 (dict(special_ids=2), TypeError, "special_ids"),
                                 (dict(whole_word="no"), TypeError, "whole_word"),  # "no" switched it on
                                 (dict(seed=1.5), TypeError, "seed"),
                                 (dict(mlm_probability="0.1"), TypeError, "mlm_probability")):
        args = {"vocab_size": 100, "mask_id": 1, "pad_id": 0, "special_ids": [2], **kwargs}
        with pytest.raises(error, match=match):
            MLMCollator(args.pop("vocab_size"), args.pop("mask_id"), args.pop("pad_id"), args.pop("special_ids"),
                        **args)
    collator = MLMCollator(100, 1, 0, [2], whole_word=True)
    with pytest.raises(TypeError, match="word_ids of example 0"):  # 0.5 and 0.7 were cut to one word 0
        collator([{"input_ids": [5, 6], "word_ids": [0.5, 0.7]}])
    collator = MLMCollator(100, 1, 0, [2])
    for label in (2, 0.7, True, "1"):  # were batched as they were: 2, a float or a bool tensor
        with pytest.raises(ValueError, match="next_sentence_label of example 0"):
            collator([{"input_ids": [5, 6], "next_sentence_label": label}])
    batch = collator([{"input_ids": [5, 6], "next_sentence_label": torch.tensor(1)},
                      {"input_ids": [5, 7], "next_sentence_label": -100}])
    assert batch["next_sentence_label"].tolist() == [1, -100]


def test_causal_and_prefix_batches_refuse_float_ids_and_malformed_blocks():
    ids = torch.tensor([1, 2, 3])
    for blocks, error, match in (([{"input_ids": ids.float()}], TypeError, "integer"),  # float labels before
                                 ([{"input_ids": ids[None]}], ValueError, "1-D"),  # a (B, 1, T) batch
                                 ([{"ids": ids}], ValueError, "'input_ids'"),  # KeyError
                                 ([{"input_ids": ids, "document_ids": ids}, {"input_ids": ids}], ValueError,
                                  "same ones"),
                                 ([{"input_ids": ids, "document_ids": ids[:2]}], ValueError, "2 entries for 3")):
        with pytest.raises(error, match=match):
            collate_packed(blocks)
    for split in (2.5, True):  # a prefix length of 2.5 or True was used as it was
        with pytest.raises(TypeError, match="split of example 0"):
            PrefixLMCollator(0)([{"input_ids": [1, 2, 3, 4], "split": split}])
    with pytest.raises(TypeError, match="seed"):
        PrefixLMCollator(0, seed=0.5)


def test_span_corruption_refuses_a_float_vocabulary_and_float_runs():
    with pytest.raises(TypeError, match="vocab_size"):  # made float sentinels: float input_ids
        SpanCorruptionCollator(100.0, 1, inputs_length=20)
    collator = SpanCorruptionCollator(100, 1, inputs_length=20)
    run = torch.arange(2, 2 + collator.raw_length)
    for bad in (run.float() + 0.7, [float(x) + 0.7 for x in run], torch.ones(collator.raw_length, dtype=torch.bool)):
        with pytest.raises(TypeError, match="run 0 must hold integer token ids"):  # were cut to ints
            collator([bad])


def test_nsp_needs_documents_given_as_sentence_lists():
    with pytest.raises(TypeError, match="document 0 must be a list of sentences"):  # one-letter sentences
        make_nsp_pairs(["One. Two. Three.", "Four. Five."])
    with pytest.raises(ValueError, match="max_sentences"):
        make_nsp_pairs([["a.", "b."], ["c.", "d."]], max_sentences=True)
    with pytest.raises(TypeError, match="document must be a str"):
        split_sentences(["a. b."])


def test_electra_checks_its_generator_scale_and_labels():
    config = EncoderConfig.from_name("bert-tiny", vocab_size=100, max_position_embeddings=32, pad_token_id=0)
    for scale in (True, 2.0):  # True built a generator as wide as the discriminator
        with pytest.raises(TypeError, match="generator_scale"):
            Electra(config, generator_scale=scale)
    with pytest.raises(ValueError, match="generator_scale=2 gives a generator"):
        Electra(config.replace(hidden_size=120, num_heads=15, intermediate_size=240), generator_scale=2)
    torch.manual_seed(0)
    model = Electra(config)
    ids, mask = torch.randint(5, 100, (2, 8)), torch.ones(2, 8, dtype=torch.bool)
    labels = torch.full((2, 8), -100)
    labels[:, 2] = ids[:, 2]
    for bad, error in ((labels[:, :4], ValueError), (torch.where(labels >= 0, 500, labels), ValueError),
                       (labels.float(), TypeError)):  # IndexErrors and cross_entropy's messages before
        with pytest.raises(error, match="labels"):
            model(ids, mask, bad)


def test_autoencoder_checks_sizes_layers_and_targets():
    for sizes in ([4, True], [4, 2.5]):  # True made a 1-unit layer
        with pytest.raises(TypeError, match=r"sizes\[1\]"):
            StackedAutoencoder(sizes)
    ae = StackedAutoencoder([4, 3, 2])
    with pytest.raises(ValueError, match="depth"):  # a slice bound: 9 gave the top code
        ae.encode(torch.zeros(2, 4), depth=9)
    with pytest.raises(ValueError, match="layer"):
        ae.reconstruction_loss(torch.zeros(2, 2), -1)
    net, x = ae.classifier(3), torch.zeros(4, 4)
    before = _weights(net)
    for xs, y, error, match in ((x, torch.zeros(4), TypeError, "integer class ids"),
                                (x, torch.tensor([0, 1, 2, 5]), ValueError, r"\[0, 3\)"),
                                (torch.full((4, 4), math.nan), torch.tensor([0, 1, 2, 1]), ValueError, "NaN"),
                                (x[:0], torch.zeros(0, dtype=torch.long), ValueError, "non-empty")):
        with pytest.raises(error, match=match):  # NaN x and an empty x trained every weight to NaN
            fine_tune(net, xs, y, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(net)))
    with pytest.raises(ValueError, match=r"\(4,\)"):  # a (1,) y was broadcast: error rate 0
        error_rate(net, x, torch.tensor([0]))
    with pytest.raises(ValueError, match="seeds"):  # was a ZeroDivisionError
        digits_experiment(seeds=[])


def test_loss_terms_must_be_weight_count_pairs_with_a_weight_of_zero_or_more(tmp_path):
    def labels(b):
        return (b["labels"][:, 1:] != -100).sum()
    for i, (terms, match) in enumerate(((lambda b: {"loss": 1.0}, r"\(weight, count\) pair"),  # not subscriptable
                                        (lambda b: {"loss": (1.0, labels(b), 3)}, r"\(weight, count\) pair"),
                                        (lambda b: {"loss": (-1.0, labels(b))}, "weight"),  # trained upwards
                                        (lambda b: {"loss": (True, labels(b))}, "weight"),
                                        (lambda b: {"loss": ("a", labels(b))}, "weight"))):
        model = TinyLM()
        before = _weights(model)
        with pytest.raises(ValueError, match=match):
            Trainer(model, _config(tmp_path / str(i)), make_data(), loss_terms=terms).train()
        assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))
    with pytest.raises(ValueError, match="loss_terms needs the batch field 'next_sentence_label'"):
        Trainer(TinyLM(), _config(tmp_path / "missing"), make_data(),
                loss_terms=lambda b: {"loss": (1.0, b["next_sentence_label"].sum())}).train()


def test_lr_schedule_and_world_size_refuse_values_of_the_wrong_kind(tmp_path, monkeypatch):
    from fastpt.train.schedules import lr_lambda
    for args, match in ((("cosine", 0, 10, 2.0), "min_ratio"),  # decayed up to 2 x lr
                        (("cosine", 2.5, 10), "warmup_steps"), (("cosine", True, 10), "warmup_steps"),
                        (("linear", 0, 0), "total_steps")):
        with pytest.raises(ValueError, match=match):
            lr_lambda(*args)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):  # was "invalid literal for int()"
        Trainer(TinyLM(), _config(tmp_path), make_data())
