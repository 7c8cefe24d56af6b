"""Pre-training objectives: statistics of each collator over >= 100k tokens, exact span
corruption lengths and sentinel order, prefix-LM masks, NSP balance."""

import pytest
import torch

from fastpt.data.datasets import pack_documents
from fastpt.data.tokenizer import special_ids, train_tokenizer
from fastpt.data.world import World
from fastpt.models import Decoder, DecoderConfig
from fastpt.pretrain.clm import PrefixLMCollator, collate_packed, prefix_lm_mask
from fastpt.pretrain.mlm import IGNORE_INDEX, MLMCollator
from fastpt.pretrain.nsp import IS_NEXT, encode_nsp_pairs, make_nsp_pairs, split_sentences
from fastpt.pretrain.span_corruption import (SpanCorruptionCollator, noise_mask,
                                             span_corruption_lengths)
from fastpt.train import Trainer, TrainerConfig

VOCAB = 1000
SPECIAL = [0, 1, 2, 3, 4]  # pad, unk, cls, sep, mask


def _mlm_batch(n_rows=400, T=300, **kw):
    g = torch.Generator().manual_seed(7)
    examples = []
    for _ in range(n_rows):
        ids = torch.randint(5, VOCAB, (T,), generator=g)
        ids[0], ids[-1] = 2, 3  # [CLS] ... [SEP]
        examples.append({"input_ids": ids[: T - int(torch.randint(0, 50, (1,), generator=g))]})
    collator = MLMCollator(VOCAB, mask_id=4, pad_id=0, special_ids=SPECIAL, **kw)
    return examples, collator, collator(examples)


def test_mlm_rates_over_100k_tokens():
    examples, _, batch = _mlm_batch()
    original = torch.nn.utils.rnn.pad_sequence([e["input_ids"] for e in examples], batch_first=True)
    labels, ids = batch["labels"], batch["input_ids"]
    maskable = batch["attention_mask"] & (original > 4)
    n = int(maskable.sum())
    assert n >= 100_000
    selected = labels != IGNORE_INDEX
    assert not (selected & ~maskable).any()  # never a special or padding position
    assert abs(selected.sum() / n - 0.15) < 0.005
    k = int(selected.sum())
    as_mask = (ids == 4) & selected
    unchanged = (ids == original) & selected
    random_ = selected & ~as_mask & ~unchanged
    assert abs(as_mask.sum() / k - 0.8) < 0.01
    # a random draw can hit the original id (1/995): the 10/10 split is checked with that in mind
    assert abs(unchanged.sum() / k - 0.1) < 0.01 and abs(random_.sum() / k - 0.1) < 0.01
    assert (ids[random_] > 4).all()  # replacements are never special tokens
    assert torch.equal(labels[selected], original[selected])


def test_mlm_masks_are_dynamic_and_seeded():
    examples, collator, first = _mlm_batch(n_rows=8)
    second = collator(examples)
    assert not torch.equal(first["labels"], second["labels"])  # new mask each epoch
    again = MLMCollator(VOCAB, 4, 0, SPECIAL)(examples)
    assert torch.equal(first["labels"], again["labels"])  # same seed, same masks


def test_whole_word_masking_masks_all_pieces_of_a_word():
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(300):
        ids = torch.randint(5, VOCAB, (120,), generator=g)
        word_ids = [None] + [i // 3 for i in range(118)] + [None]  # 3 pieces per word
        ids[0], ids[-1] = 2, 3
        examples.append({"input_ids": ids, "word_ids": word_ids})
    batch = MLMCollator(VOCAB, 4, 0, SPECIAL, whole_word=True)(examples)
    selected = (batch["labels"] != IGNORE_INDEX)[:, 1:-1].reshape(300, -1)[:, :117].reshape(300, 39, 3)
    assert (selected.all(-1) | ~selected.any(-1)).all()  # all pieces or none
    assert abs(selected[..., 0].float().mean() - 0.15) < 0.01
    # the 80/10/10 replacement holds for whole words too (checked on ~5k selected pieces)
    original = torch.stack([e["input_ids"] for e in examples])
    picked = batch["labels"] != IGNORE_INDEX
    ids, k = batch["input_ids"], int(picked.sum())
    as_mask, unchanged = (ids == 4) & picked, (ids == original) & picked
    assert abs(as_mask.sum() / k - 0.8) < 0.03
    assert abs(unchanged.sum() / k - 0.1) < 0.02 and abs((picked & ~as_mask & ~unchanged).sum() / k - 0.1) < 0.02
    with pytest.raises(ValueError, match="word_ids"):
        MLMCollator(VOCAB, 4, 0, SPECIAL, whole_word=True)([{"input_ids": [2, 9, 3]}])


def test_whole_word_masking_renumbers_sparse_word_ids():
    """Word ids of a window cut from a longer text (or a hostile 10**9) are the same words
    numbered densely: before, a random draw per id up to the largest (a (B, 10**9) tensor)."""
    ids = [2] + list(range(5, 14)) + [3]
    sparse = [None, 10**9, 10**9, 10**9 + 7, 700, 700, 700, 10**9 + 7, 5, 5, None]
    dense = [None, 2, 2, 3, 1, 1, 1, 3, 0, 0, None]
    for seed in range(20):
        a = MLMCollator(VOCAB, 4, 0, SPECIAL, whole_word=True, mlm_probability=0.5, seed=seed)(
            [{"input_ids": ids, "word_ids": sparse}])
        b = MLMCollator(VOCAB, 4, 0, SPECIAL, whole_word=True, mlm_probability=0.5, seed=seed)(
            [{"input_ids": ids, "word_ids": dense}])
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_mlm_bad_arguments():
    with pytest.raises(ValueError, match="mlm_probability"):
        MLMCollator(VOCAB, 4, 0, SPECIAL, mlm_probability=0.0)
    with pytest.raises(ValueError, match="special ids"):
        MLMCollator(10, 40, 0, SPECIAL)
    with pytest.raises(ValueError, match="empty batch"):
        MLMCollator(VOCAB, 4, 0, SPECIAL)([])
    for bad in (-2, VOCAB):  # a negative id was masked and labelled silently
        with pytest.raises(ValueError, match="token ids must lie in"):
            MLMCollator(VOCAB, 4, 0, SPECIAL)([{"input_ids": [5, bad]}])


def test_mlm_refuses_ids_that_are_not_integers():
    collator = MLMCollator(VOCAB, 4, 0, SPECIAL)
    for bad in ([5.7, 30.2], torch.tensor([5.0, 6.0]), [True, False]):  # floats were truncated to [5, 30]
        with pytest.raises(TypeError, match=r"input_ids of example 1 must hold integer token ids"):
            collator([{"input_ids": [5, 6]}, {"input_ids": bad}])
    with pytest.raises(ValueError, match=r"token_type_ids of example 0 holds the negative id -1"):
        collator([{"input_ids": [5, 6], "token_type_ids": [0, -1]}])


def test_mlm_needs_token_type_ids_and_nsp_labels_on_every_example():
    collator = MLMCollator(VOCAB, 4, 0, SPECIAL)
    for types in ([0], [0, 1, 1]):  # were padded or kept silently
        with pytest.raises(ValueError, match=rf"token_type_ids of example 1 must give one segment id per "
                                             rf"token: {len(types)} ids for 2 tokens"):
            collator([{"input_ids": [5, 6], "token_type_ids": [0, 0]},
                      {"input_ids": [7, 8], "token_type_ids": types}])
    # only examples[0] was looked at: the key was dropped, or failed as a KeyError
    for key, value in (("token_type_ids", [0, 0]), ("next_sentence_label", 1)):
        with pytest.raises(ValueError, match=rf"example 1 has no '{key}' while example 0 has"):
            collator([{"input_ids": [5, 6], key: value}, {"input_ids": [7, 8]}])
        with pytest.raises(ValueError, match=rf"example 0 has no '{key}' while example 1 has"):
            collator([{"input_ids": [5, 6]}, {"input_ids": [7, 8], key: value}])
    batch = collator([{"input_ids": [5, 6, 7], "token_type_ids": [0, 1, 1], "next_sentence_label": 1},
                      {"input_ids": [8, 9], "token_type_ids": [0, 1], "next_sentence_label": 0}])
    assert batch["token_type_ids"].tolist() == [[0, 1, 1], [0, 1, 0]]
    assert batch["next_sentence_label"].tolist() == [1, 0]


def test_mlm_checks_pad_to_multiple_of_when_built():
    # -2 failed inside torch at the first batch, 2.5 as a torch.full TypeError
    with pytest.raises(ValueError, match=r"pad_to_multiple_of must be None or an int >= 1, got -2"):
        MLMCollator(VOCAB, 4, 0, SPECIAL, pad_to_multiple_of=-2)
    with pytest.raises(TypeError, match=r"pad_to_multiple_of must be None or an int >= 1, got 2\.5"):
        MLMCollator(VOCAB, 4, 0, SPECIAL, pad_to_multiple_of=2.5)
    batch = MLMCollator(VOCAB, 4, 0, SPECIAL, pad_to_multiple_of=8)([{"input_ids": [5, 6, 7]}])
    assert batch["input_ids"].shape == (1, 8)


def test_mlm_refuses_a_missing_mask_token_clearly():
    # was "TypeError: '<' not supported between instances of 'NoneType' and 'int'"
    with pytest.raises(ValueError, match=r"mask_id must be an int.*got None.*no mask token"):
        MLMCollator(VOCAB, None, 0, SPECIAL)
    with pytest.raises(ValueError, match=r"pad_id must be an int.*got None"):
        MLMCollator(VOCAB, 4, None, SPECIAL)
    # was "random_ expects 'from' to be less than 'to'" at the first batch
    with pytest.raises(ValueError, match="no id left to draw as a random replacement"):
        MLMCollator(5, 4, 0, SPECIAL)


def test_span_corruption_lengths_at_density_one_half_follow_t5():
    # T5's random_spans_helper trims one raw token at density 0.5 when the targets would be
    # one longer than the inputs: 767 -> 766 raw, 513 -> 512 targets.
    assert span_corruption_lengths(512, 0.5) == (766, 512)
    assert span_corruption_lengths(128, 0.5) == (190, 128)
    assert span_corruption_lengths(512, 0.3) == (639, 257)  # other densities: no trim
    collator = SpanCorruptionCollator(VOCAB, eos_id=1, inputs_length=512, noise_density=0.5)
    batch = collator([torch.randint(5, VOCAB - 200, (766,)) for _ in range(4)])
    assert batch["input_ids"].shape == (4, 512) and batch["labels"].shape == (4, 512)
    # Where the trim would also shorten the inputs (the span count rounds down: T5 then pads
    # both to length), the untrimmed lengths are kept, so inputs still fill inputs_length.
    assert span_corruption_lengths(11, 0.5) == (15, 12)
    assert SpanCorruptionCollator(VOCAB, 1, 11, noise_density=0.5)([list(range(5, 20))])["labels"].shape == (1, 12)
    for mean_span in (2.0, 3.0, 8.0):
        for inputs_length in range(30, 700):  # above 30, T5's helper needs none of noise_mask's clamps
            raw, targets = _t5_random_spans_helper(inputs_length, 0.5, mean_span)
            if _t5_lengths(raw, 0.5, mean_span) == (inputs_length, targets):  # T5 fills inputs_length
                assert span_corruption_lengths(inputs_length, 0.5, mean_span) == (raw, targets)


def _t5_lengths(raw: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    noise = int(round(raw * noise_density))
    spans = int(round(noise / mean_span))
    return raw - noise + spans + 1, noise + spans + 1


def _t5_random_spans_helper(inputs_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """A port of T5's random_spans_helper: (raw tokens, targets length)."""
    raw = inputs_length - 1
    while _t5_lengths(raw + 1, noise_density, mean_span)[0] <= inputs_length:
        raw += 1
    targets = _t5_lengths(raw, noise_density, mean_span)[1]
    if noise_density == 0.5 and targets > _t5_lengths(raw, noise_density, mean_span)[0]:
        raw, targets = raw - 1, targets - 1
    return raw, targets


def test_span_corruption_lengths_and_sentinels():
    assert span_corruption_lengths(512) == (568, 114)
    assert span_corruption_lengths(128) == (141, 29)
    collator = SpanCorruptionCollator(VOCAB, eos_id=1, inputs_length=512)
    runs = [torch.randint(5, VOCAB - 100, (568,)) for _ in range(200)]  # 113,600 raw tokens
    batch = collator(runs)
    assert batch["input_ids"].shape == (200, 512) and batch["labels"].shape == (200, 114)
    for run, inp, tgt in zip(runs, batch["input_ids"], batch["labels"]):
        sent_in = inp[inp >= VOCAB - 100]
        sent_tgt = tgt[tgt >= VOCAB - 100]
        k = len(sent_in)
        assert k == 28 and torch.equal(sent_in, torch.arange(VOCAB - 1, VOCAB - 1 - k, -1))
        assert torch.equal(sent_tgt, sent_in) and tgt[0] == VOCAB - 1
        assert inp[-1] == 1 and tgt[-1] == 1
        # Re-inserting each target span at its sentinel reconstructs the raw run exactly.
        spans = torch.tensor_split(tgt[:-1], (tgt[:-1] >= VOCAB - 100).nonzero().squeeze(1)[1:])
        rebuilt = torch.cat([spans[int(VOCAB - 1 - t)][1:] if t >= VOCAB - 100 else t.view(1)
                             for t in inp[:-1]])
        assert torch.equal(rebuilt, run)
    with pytest.raises(ValueError, match="568 tokens"):
        collator([torch.arange(10)])
    with pytest.raises(ValueError, match="empty batch"):
        collator([])


def test_span_corruption_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="no room for the sentinel ids"):  # ids would reach -18
        SpanCorruptionCollator(10, eos_id=1, inputs_length=512)
    with pytest.raises(ValueError, match="too short"):  # below 3: no room for a kept token, a sentinel and EOS
        SpanCorruptionCollator(VOCAB, eos_id=1, inputs_length=2)
    assert SpanCorruptionCollator(VOCAB, eos_id=1, inputs_length=10)([list(range(5, 15))])["input_ids"].shape == (1, 10)


def test_span_corruption_refuses_nan_and_fractional_lengths():
    nan = float("nan")  # was "cannot convert float NaN to integer"
    for make in (lambda: SpanCorruptionCollator(VOCAB, 1, 16, mean_span_length=nan),
                 lambda: span_corruption_lengths(16, 0.15, nan),
                 lambda: noise_mask(16, 0.15, nan, torch.Generator())):
        with pytest.raises(ValueError, match=r"mean_span_length must be a finite number >= 1, got nan"):
            make()
    with pytest.raises(ValueError, match=r"mean_span_length must be a finite number >= 1, got inf"):
        span_corruption_lengths(16, 0.15, float("inf"))
    for make in (lambda: SpanCorruptionCollator(VOCAB, 1, 16, noise_density=nan),
                 lambda: span_corruption_lengths(16, nan),
                 lambda: noise_mask(16, nan, 3.0, torch.Generator())):
        with pytest.raises(ValueError, match=r"noise_density must be in \(0, 1\), got nan"):
            make()
    with pytest.raises(TypeError, match=r"noise_density must be a number, got '0\.15'"):
        span_corruption_lengths(16, "0.15")
    with pytest.raises(TypeError, match=r"inputs_length must be an int, got 16\.5"):  # was a torch.zeros TypeError
        SpanCorruptionCollator(VOCAB, 1, 16.5)
    with pytest.raises(TypeError, match=r"length must be an int, got 16\.0"):
        noise_mask(16.0, 0.15, 3.0, torch.Generator())
    with pytest.raises(ValueError, match=r"length must be >= 0, got -1"):
        noise_mask(-1, 0.15, 3.0, torch.Generator())


def test_noise_mask_statistics():
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([noise_mask(568, 0.15, 3.0, g) for _ in range(300)])
    assert (masks.sum(1) == 85).all()  # round(568 * 0.15)
    assert not masks[:, 0].any()  # starts with non-noise
    starts = masks & ~torch.cat([torch.zeros(300, 1, dtype=torch.bool), masks[:, :-1]], 1)
    assert (starts.sum(1) == 28).all()
    assert abs(85 / 28 - masks.sum() / starts.sum()) < 1e-6  # mean span length ~3


def test_prefix_lm_mask_and_labels():
    mask = prefix_lm_mask(torch.tensor([2]), 4)[0, 0]
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    batch = PrefixLMCollator(pad_id=0)([{"input_ids": [5, 6, 7, 8], "split": 2},
                                        {"input_ids": [5, 6, 7], "split": 1}])
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 6, 7, -100]]
    assert batch["prefix_lengths"].tolist() == [2, 1]
    assert batch["attention_mask"].tolist() == [[True] * 4, [True] * 3 + [False]]
    with pytest.raises(ValueError, match="split"):
        PrefixLMCollator(0)([{"input_ids": [5, 6], "split": 2}])


def test_prefix_lm_random_split_is_uniform():
    """Without a given split, the prefix length is uniform over [1, len - 1]."""
    batch = PrefixLMCollator(pad_id=0, seed=3)([{"input_ids": list(range(5, 16))}] * 20_000)  # len 11
    counts = torch.bincount(batch["prefix_lengths"], minlength=11)
    assert counts[0] == 0 and counts.sum() == 20_000
    assert ((counts[1:] / 20_000 - 0.1).abs() < 0.01).all(), counts.tolist()  # ~5 sigma
    lengths = batch["prefix_lengths"]
    assert torch.equal((batch["labels"] == IGNORE_INDEX).sum(1), lengths)  # the prefix is never scored


def test_causal_packed_batch():
    blocks = [{"input_ids": torch.arange(6), "position_ids": torch.arange(6),
               "document_ids": torch.zeros(6, dtype=torch.long)} for _ in range(3)]
    batch = collate_packed(blocks)
    assert batch["labels"].shape == (3, 6) and torch.equal(batch["labels"], batch["input_ids"])


def test_packed_labels_stay_inside_documents(tmp_path):
    # One block: 5 6 7 EOS | 8 9 10 11 (the second document goes on in a block dropped here).
    blocks = list(pack_documents([[5, 6, 7], [8, 9, 10, 11, 12]], seq_len=8, eos_id=1))
    batch = collate_packed(blocks)
    # The models shift labels by one: the -100 stops document A's EOS from predicting 8.
    assert batch["labels"].tolist() == [[5, 6, 7, 1, IGNORE_INDEX, 9, 10, 11]]
    model = Decoder(DecoderConfig.from_name("llama-tiny", vocab_size=16)).double().eval()
    with torch.no_grad():
        alone = [model(torch.tensor([d]), labels=torch.tensor([d])).loss for d in ([5, 6, 7, 1], [8, 9, 10, 11])]
        # Three targets each: the packed mean is the mean of the documents run alone.
        torch.testing.assert_close(model(**batch).loss, (alone[0] + alone[1]) / 2)
    cfg = TrainerConfig(output_dir=str(tmp_path), max_steps=1, batch_size=1, label_shift=1,
                        log_every=1, progress=False)
    trainer = Trainer(model.float().train(), cfg, blocks, collate_fn=collate_packed)
    trainer.train()
    assert trainer.metrics.rows[0]["tokens"] == 6  # the Trainer counts the same targets


def test_collate_packed_refuses_blocks_of_different_lengths():
    blocks = list(pack_documents([[5, 6, 7, 8, 9]], seq_len=4, eos_id=1, drop_last=False))
    assert [len(b["input_ids"]) for b in blocks] == [4, 2]
    with pytest.raises(ValueError, match=r"same length.*drop_last=True.*\[2, 4\]"):
        collate_packed(blocks)


def test_nsp_balance_and_encoding():
    world = World(0)
    docs = [split_sentences(d) for d in world.documents(5000)]
    pairs = make_nsp_pairs(docs, seed=0)
    assert len(pairs) > 7000
    frac_next = sum(p["next_sentence_label"] == IS_NEXT for p in pairs) / len(pairs)
    assert abs(frac_next - 0.5) < 0.02
    tok = train_tokenizer((" ".join(d) for d in docs), "wordpiece", vocab_size=600)
    enc = encode_nsp_pairs(pairs[:50], tok, max_length=32)
    ids = special_ids(tok)
    for e in enc:
        assert len(e["input_ids"]) <= 32 and e["input_ids"][0] == ids.cls
        assert e["input_ids"].count(ids.sep) == 2 and e["token_type_ids"][-1] == 1
    assert tok.truncation is None  # the tokenizer's own settings are restored
    with pytest.raises(ValueError, match="two non-empty documents"):
        make_nsp_pairs([["only one."]])
