"""Audit fixes in the pre-training objectives and data: whole-word masking on sentence pairs,
ELECTRA with nothing masked, NSP length leaks and memory, collators in DataLoader workers,
span-corruption lengths, World capacity, label and argument validation."""

import collections
import math
import random
import threading

import pytest
import torch

import fastpt.models.loss as loss_mod
from fastpt.data.datasets import read_documents
from fastpt.data.tokenizer import train_tokenizer
from fastpt.data.world import World
from fastpt.models import EncoderConfig
from fastpt.pretrain.autoencoder import StackedAutoencoder, greedy_pretrain
from fastpt.pretrain.clm import PrefixLMCollator
from fastpt.pretrain.electra import Electra
from fastpt.pretrain.mlm import IGNORE_INDEX, MLMCollator
from fastpt.pretrain.nsp import IS_NEXT, encode_nsp_pairs, make_nsp_pairs, split_sentences
from fastpt.pretrain.span_corruption import SpanCorruptionCollator, span_corruption_lengths

VOCAB = 100
SPECIAL = [0, 1, 2, 3]  # pad, cls, sep, mask


def _tolerance(p: float, n: int) -> float:
    """4 standard deviations of a proportion p estimated from n draws."""
    return 4 * math.sqrt(p * (1 - p) / n)


# -- whole-word masking on [CLS] A [SEP] B [SEP] -------------------------------------------

def test_whole_word_masking_selects_segment_b_words_independently_of_a():
    # The tokenizer numbers B's words from 0 again; word k of A and word k of B were one pick.
    n_words = 20
    ids = [1] + list(range(4, 4 + n_words)) + [2] + list(range(50, 50 + n_words)) + [2]
    word_ids = [None] + list(range(n_words)) + [None] + list(range(n_words)) + [None]
    types = [0] * (n_words + 2) + [1] * (n_words + 1)
    rows = 500
    examples = [{"input_ids": ids, "token_type_ids": types, "word_ids": word_ids}] * rows
    selected = MLMCollator(VOCAB, 3, 0, SPECIAL, whole_word=True, seed=0)(examples)["labels"] != IGNORE_INDEX
    a = selected[:, 1:1 + n_words]
    b = selected[:, 2 + n_words:2 + 2 * n_words]
    n_a = int(a.sum())
    assert n_a > 1000
    conditional = float((a & b).sum()) / n_a  # P(B's word k | A's word k); was 1.0
    assert abs(conditional - 0.15) < _tolerance(0.15, n_a)
    with pytest.raises(ValueError, match="token_type_ids of example 0"):
        MLMCollator(VOCAB, 3, 0, SPECIAL, whole_word=True)(
            [{"input_ids": [1, 5, 2], "token_type_ids": [0, 0], "word_ids": [None, 0, None]}])
    with pytest.raises(ValueError, match="word_ids of example 0"):
        MLMCollator(VOCAB, 3, 0, SPECIAL, whole_word=True)([{"input_ids": [1, 5, 6, 2], "word_ids": [None, 0]}])


# -- ELECTRA and MLM with nothing selected -------------------------------------------------

def _tiny_electra():
    torch.manual_seed(0)
    return Electra(EncoderConfig.from_name("bert-tiny", vocab_size=30, pad_token_id=0))


def test_electra_loss_is_finite_when_nothing_is_masked():
    model = _tiny_electra()
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    out = model(ids, ids != 0, torch.full_like(ids, IGNORE_INDEX))
    assert torch.isfinite(out.loss) and float(out.mlm_loss.detach()) == 0.0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert float(model.generator_head.dense.weight.grad.abs().sum()) == 0.0  # no MLM signal
    # the mean over the selected tokens is unchanged where there are some
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 2] = 6
    assert float(model(ids, ids != 0, labels).mlm_loss.detach()) > 0


def test_mlm_selects_at_least_one_token_per_sequence():
    # Two maskable tokens: independent draws left 72% of these rows without a label, and a
    # batch without labels made ELECTRA's training NaN. Expected count n*p + (1-p)^n.
    rows, n, p = 4000, 2, 0.15
    batch = MLMCollator(VOCAB, 3, 0, SPECIAL, seed=0)([{"input_ids": [1, 5, 6, 2]}] * rows)
    selected = batch["labels"] != IGNORE_INDEX
    assert selected.any(1).all() and not selected[:, [0, 3]].any()
    per_row = selected.sum(1).float()
    expected = n * p + (1 - p) ** n
    assert abs(float(per_row.mean()) - expected) < 4 * float(per_row.std()) / math.sqrt(rows)
    # whole words too, and a row with nothing maskable stays without a label
    ww = MLMCollator(VOCAB, 3, 0, SPECIAL, whole_word=True, seed=0)(
        [{"input_ids": [1, 5, 6, 7, 2], "word_ids": [None, 0, 0, 1, None]}] * 200
        + [{"input_ids": [1, 2], "word_ids": [None, None]}])
    sel = ww["labels"] != IGNORE_INDEX
    assert sel[:200].any(1).all() and not sel[200].any()
    assert torch.equal(sel[:200, 1], sel[:200, 2])  # both pieces of word 0 or neither


def test_electra_trains_without_nan_on_short_sequences(tmp_path):
    from fastpt.train import Trainer, TrainerConfig
    model = _tiny_electra()
    collator = MLMCollator(30, 3, 0, SPECIAL, seed=0)
    config = TrainerConfig(output_dir=str(tmp_path), max_steps=4, batch_size=2, progress=False, lr=1e-3)
    row = Trainer(model, config, [{"input_ids": [1, 5, 6, 2]}] * 8, collate_fn=collator).train()
    assert math.isfinite(row["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- NSP -----------------------------------------------------------------------------------

def _held_out_accuracy(pairs, feature) -> tuple[float, int]:
    """Accuracy of 'majority label per feature value' fitted on one half, tested on the other."""
    order = list(range(len(pairs)))
    random.Random(1).shuffle(order)
    fit, test = order[:len(order) // 2], order[len(order) // 2:]
    counts = collections.defaultdict(lambda: [0, 0])
    for i in fit:
        counts[feature(pairs[i])][pairs[i]["next_sentence_label"]] += 1
    guess = {k: int(v[1] > v[0]) for k, v in counts.items()}
    hits = sum(guess.get(feature(pairs[i]), 0) == pairs[i]["next_sentence_label"] for i in test)
    return hits / len(test), len(test)


def test_nsp_segment_b_alone_does_not_give_the_label_away():
    docs = [split_sentences(d) for d in World(0).documents(2000)]
    pairs = make_nsp_pairs(docs, seed=0)
    features = {"B sentences": lambda p: len(split_sentences(p["b"])),
                "B words": lambda p: len(p["b"].split()),
                "A and B sentences": lambda p: (len(split_sentences(p["a"])), len(split_sentences(p["b"])))}
    for name, feature in features.items():  # "B is one sentence => NotNext" scored 75%
        acc, n = _held_out_accuracy(pairs, feature)
        assert abs(acc - 0.5) < _tolerance(0.5, n), (name, acc)
    frac_next = sum(p["next_sentence_label"] == IS_NEXT for p in pairs) / len(pairs)
    assert abs(frac_next - 0.5) < _tolerance(0.5, len(pairs))


def test_nsp_memory_is_linear_in_the_document():
    doc = [f"Sentence number {i} is here." for i in range(2000)]
    pairs = make_nsp_pairs([doc, ["Another document.", "With two sentences."]], seed=0, max_sentences=8)
    assert len(pairs) == 2000
    longest = max(len(s) for s in doc)
    # was 89 M characters (every prefix joined whole); each segment now holds <= 8 sentences
    assert sum(len(p["a"]) + len(p["b"]) for p in pairs) <= len(pairs) * 2 * 8 * (longest + 1)
    assert all(len(split_sentences(p["a"])) <= 8 and len(split_sentences(p["b"])) <= 8 for p in pairs)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_sentences"):
            make_nsp_pairs([doc, doc], max_sentences=bad)


def test_encode_nsp_pairs_refuses_a_max_length_that_cannot_truncate():
    docs = list(World(0).documents(100))
    tok = train_tokenizer(docs, "wordpiece", vocab_size=200)
    pair = {"a": docs[0], "b": docs[1], "next_sentence_label": 0}
    for bad in (4, 2, 0):  # [CLS] [SEP] [SEP] + one token of each segment = 5
        with pytest.raises(ValueError, match="max_length"):
            encode_nsp_pairs([pair], tok, max_length=bad)
    enc = encode_nsp_pairs([pair], tok, max_length=5)[0]
    assert len(enc["input_ids"]) == 5 and enc["token_type_ids"] == [0, 0, 0, 1, 1]
    assert tok.truncation is None


# -- linear_cross_entropy labels -------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
def test_linear_cross_entropy_rejects_labels_outside_the_vocabulary(fused, monkeypatch):
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 33 * 3)  # 3 rows per chunk: rows are global
    x, w = torch.randn(10, 16), torch.randn(33, 16)
    for bad in (-5, -1, 33, 1000):  # -5 was read as class 0 by the eager path
        labels = torch.randint(0, 33, (10,))
        labels[7] = bad
        with pytest.raises(ValueError, match=rf"label {bad} in row 7 is outside \[0, 33\)"):
            loss_mod.linear_cross_entropy(x, w, labels, fused=fused)
    labels = torch.randint(0, 33, (10,))
    labels[[2, 7]] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(x @ w.T, labels)
    assert torch.allclose(loss_mod.linear_cross_entropy(x, w, labels, fused=fused), ref, atol=1e-5)
    with pytest.raises(ValueError, match="labels must have shape"):
        loss_mod.linear_cross_entropy(x, w, labels[:9], fused=fused)


# -- collators in DataLoader workers ---------------------------------------------------------

def _mlm():
    return MLMCollator(VOCAB, 3, 0, SPECIAL, seed=0), [{"input_ids": list(range(4, 100))}] * 8, "labels"


def _span():
    c = SpanCorruptionCollator(VOCAB, eos_id=1, inputs_length=40, seed=0)
    return c, [list(range(5, 5 + c.raw_length))] * 8, "labels"


def _prefix():
    return PrefixLMCollator(0, seed=0), [{"input_ids": list(range(4, 100))}] * 8, "prefix_lengths"


def _draws(make, num_workers: int) -> list[torch.Tensor]:
    collator, data, key = make()
    out = []
    for epoch in range(2):  # a new loader per epoch, seeded per epoch, as Trainer does
        loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=num_workers, collate_fn=collator,
                                             generator=torch.Generator().manual_seed(epoch))
        out += [batch[key] for batch in loader]
    return out


@pytest.mark.parametrize("make", [_mlm, _span, _prefix])
def test_collators_draw_new_masks_in_each_worker_and_epoch(make):
    draws = _draws(make, num_workers=2)
    assert len(draws) == 8
    assert len({tuple(d.flatten().tolist()) for d in draws}) == 8  # were 2 distinct
    assert all(torch.equal(a, b) for a, b in zip(draws, _draws(make, num_workers=2)))  # reproducible
    # in the main process the collator's own generator goes on as before
    collator, data, key = make()
    expected = [collator(data[:2])[key] for _ in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(_draws(make, num_workers=0), expected))


# -- span corruption lengths -----------------------------------------------------------------

def test_span_corruption_accepts_every_feasible_length():
    assert span_corruption_lengths(512) == (568, 114)
    assert span_corruption_lengths(128) == (141, 29)
    for k in range(3, 40):  # 3..9 were refused
        c = SpanCorruptionCollator(1000, 1, inputs_length=k)
        batch = c([list(range(5, 5 + c.raw_length))] * 2)
        assert batch["input_ids"].shape == (2, k) and batch["labels"].shape == (2, c.targets_length)
    c = SpanCorruptionCollator(1000, 1, inputs_length=64, mean_span_length=100)  # one span
    assert c([list(range(5, 5 + c.raw_length))])["input_ids"].shape == (1, 64)
    for k in (2, 1, 0):
        with pytest.raises(ValueError, match="inputs_length"):
            SpanCorruptionCollator(1000, 1, inputs_length=k)


def test_span_corruption_names_a_density_no_length_can_build():
    # 0.8 noise in spans of 3 makes more spans than non-noise tokens to separate them: was
    # "inputs_length 200 is too short ... (its inputs would come out at 171 tokens)"
    for build in (lambda: span_corruption_lengths(200, 0.8),
                  lambda: SpanCorruptionCollator(1000, 1, 200, noise_density=0.8)):
        with pytest.raises(ValueError, match=r"noise_density 0\.8 with mean_span_length 3\.0 .* more noise "
                                             r"spans \(\d+\) than non-noise tokens \(\d+\).*no inputs_length"):
            build()


# -- span corruption ids ---------------------------------------------------------------------

def _span_collator(**kw):
    return SpanCorruptionCollator(**{"vocab_size": 100, "eos_id": 1, "inputs_length": 20, **kw})


def test_span_corruption_checks_eos_and_sentinel_room():
    with pytest.raises(ValueError, match="eos_id must be an int.*got None"):  # was "Could not infer dtype"
        _span_collator(eos_id=None)
    with pytest.raises(ValueError, match=r"eos_id 100 must lie in \[0, vocab_size=100\)"):
        _span_collator(eos_id=100)
    assert _span_collator().lowest_sentinel == 99  # inputs of 20 tokens use one span
    # eos_id 99 = <extra_id_0> gave labels [99, 5, 5, 5, 99]
    with pytest.raises(ValueError, match=r"eos_id=99 collides with the sentinel ids .* \(1, "):
        _span_collator(eos_id=99)
    with pytest.raises(ValueError, match="pad_id=99 collides with the sentinel ids"):
        _span_collator(pad_id=99)
    with pytest.raises(ValueError, match=r"eos_id=1 collides with the sentinel ids .* \(28, .*ids 1\.\.28"):
        _span_collator(vocab_size=29, inputs_length=512)
    # 512 inputs in a vocabulary of 30: the 28 sentinels take ids 2..29, every real token, so
    # any real run is refused (it was corrupted silently)
    collator = _span_collator(vocab_size=30, inputs_length=512)
    assert collator.lowest_sentinel == 2
    with pytest.raises(ValueError, match=r"run token ids must lie in \[0, 2\)"):
        collator([[5] * collator.raw_length])


def test_span_corruption_refuses_run_tokens_that_are_sentinels_or_outside_the_vocabulary():
    collator = _span_collator()
    run = [5] * collator.raw_length
    for bad in (99, 500, -7):  # 99 = <extra_id_0> came out as [5, 5, 5, 99, 5, ..., 99, 1]
        with pytest.raises(ValueError, match=r"run token ids must lie in \[0, 99\)"):
            collator([run, run[:3] + [bad] + run[4:]])
    assert collator([run[:3] + [98] + run[4:]])["input_ids"].shape == (1, 20)


# -- World -----------------------------------------------------------------------------------

def _error_within(seconds: float, fn) -> BaseException | None:
    """The exception ``fn()`` raises, run in a daemon thread so that a hang fails the test
    (after ``seconds``) instead of hanging the suite."""
    result = []

    def target():
        try:
            fn()
            result.append(None)
        except BaseException as e:  # handed to the test
            result.append(e)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"still running after {seconds} s"
    return result[0]


def test_world_validates_counts_instead_of_hanging():
    for n, message in ((20000, "n_restaurants=20000"),  # looped forever
                       (14161, "n_restaurants=14161 is more than the")):  # people took some names
        error = _error_within(30, lambda: World(0, n_restaurants=n))
        assert isinstance(error, ValueError) and message in str(error), error
    for k in (1, 7):  # documents() failed later with "Sample larger than population"
        with pytest.raises(ValueError, match="n_people"):
            World(0, n_people=k)
    assert len(list(World(0, n_people=8, n_cities=1, n_restaurants=1).documents(100))) == 100


@pytest.mark.parametrize("name", ["n_people", "n_cities", "n_restaurants"])
def test_world_counts_must_be_ints(name):
    for bad in ("3", 30.0, True):  # "3" was a bare "'<' not supported" TypeError
        with pytest.raises(TypeError, match=rf"{name} must be an int, got {bad!r}"):
            World(0, **{name: bad})


# -- smaller argument checks -----------------------------------------------------------------

def test_small_argument_checks(tmp_path):
    docs = list(World(0).documents(50))
    with pytest.raises(ValueError, match="n_sentinels"):  # was an OverflowError
        train_tokenizer(docs, "unigram", vocab_size=64)
    with pytest.raises(ValueError, match="n_sentinels"):
        train_tokenizer(docs, "unigram", vocab_size=100, n_sentinels=-1)
    with pytest.raises(ValueError, match="non-empty"):  # was a ZeroDivisionError
        greedy_pretrain(StackedAutoencoder([8, 4]), torch.zeros(0, 8), epochs=1)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello\n\xff\xfe bad\n")
    with pytest.raises(ValueError, match="bad.txt: not valid UTF-8"):
        list(read_documents(str(bad)))
    bom = tmp_path / "bom.csv"
    bom.write_text('text,label\n"a, b",1\nc,0\n', encoding="utf-8-sig")
    assert list(read_documents(str(bom))) == ["a, b", "c"]
