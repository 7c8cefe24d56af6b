"""fastpt.data: the embedded world, tokenizer training, file readers, packing."""

import json
import threading

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from fastpt.data import datasets
from fastpt.data.datasets import (PackedDataset, document_attention_mask, encode_as_text,
                                  pack_documents, read_documents, tokenize_stream)
from fastpt.data.tokenizer import (KINDS, load_tokenizer, save_tokenizer, special_ids,
                                   train_tokenizer)
from fastpt.data.world import ICL_TASKS, NEGATIVE, POSITIVE, TAGS, World


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def docs(world):
    return list(world.documents(3000))


def test_world_is_deterministic_and_consistent(world):
    assert World(seed=0).corpus_text(50) == world.corpus_text(50)
    assert World(seed=1).corpus_text(50) != world.corpus_text(50)
    text = world.corpus_text(2000)
    bio = next(d for d in text.split("\n\n") if "lives in" in d and "works as" in d)
    name = bio.split(" ")[0]
    person = next(p for p in world.people if p.name == name)
    assert f"{name} lives in {person.city}." in bio and f"works as a {person.job}." in bio


def test_corpus_is_large(world):
    # No wall-clock bound here: timings belong in the benchmarks, not in a unit test.
    words = sum(len(d.split()) for d in world.documents(60000))
    assert words > 1_000_000  # ~1.3 M words, ~2 M word pieces


def test_sentiment_labels_follow_the_adjectives(world):
    data = world.sentiment(400)
    assert 150 < sum(d["label"] for d in data) < 250
    for d in data:
        adjectives = set(d["text"].replace(".", "").split()) & (set(POSITIVE) | set(NEGATIVE))
        assert adjectives <= set(POSITIVE if d["label"] else NEGATIVE) and adjectives


def test_tagging_qa_and_text_to_text(world):
    for ex in world.tagging(200):
        assert len(ex["words"]) == len(ex["tags"]) and set(ex["tags"]) <= set(TAGS)
    for ex in world.qa(200):
        s = ex["answer_start"]
        assert ex["context"][s:s + len(ex["answer"])] == ex["answer"]
        name = ex["question"].rstrip("?").split()[-1]
        sentence = ex["context"][:s].rsplit(".", 1)[-1]
        assert name in sentence  # the span is the asked person's fact, not the friend's
    for ex in world.text_to_text(50):
        assert ex["target"].startswith("name: ") and ex["target"].split(" | ")[0][6:] in ex["source"]


def test_icl_tasks_answer_from_world_knowledge(world):
    cities = {p.name: p.city for p in world.people}
    for task in ICL_TASKS:
        items = world.icl(task, 20)
        assert all(it["target"] in it["choices"] for it in items)
    assert all(cities[it["input"]] == it["target"] for it in world.icl("city_of", 20))
    with pytest.raises(ValueError, match="unknown ICL task"):
        world.icl("capital_of", 3)


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_training_and_round_trip(kind, docs, tmp_path):
    tok = train_tokenizer(docs, kind, vocab_size=800)
    ids = special_ids(tok)
    assert ids.pad in ids.all
    if kind == "wordpiece":
        assert {ids.cls, ids.sep, ids.mask} <= ids.all
        enc = tok.encode("Ruza ate soup.", "It was good.")
        assert enc.ids[0] == ids.cls and enc.type_ids[-1] == 1
    if kind == "unigram":
        top = tok.get_vocab_size() - 1
        assert tok.token_to_id("<extra_id_0>") == top and tok.token_to_id("<extra_id_1>") == top - 1
    save_tokenizer(tok, str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.encode(docs[0]).ids == tok.encode(docs[0]).ids


def test_bad_tokenizer_inputs(tmp_path, docs):
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer(docs, "sentencepiece")
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))


def test_readers_stream_text_jsonl_csv(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    assert list(read_documents(str(tmp_path / "a.txt"))) == ["first doc\nline two", "second doc"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"}) + "\n")
    assert list(read_documents(str(tmp_path / "b.jsonl"))) == ["x", "y"]
    (tmp_path / "c.csv").write_text('id,body\n1,"hello, world"\n2,bye\n')
    assert list(read_documents(str(tmp_path / "c.csv"), field="body")) == ["hello, world", "bye"]


def test_readers_name_the_bad_record(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2"):
        list(read_documents(str(tmp_path / "b.jsonl")))
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: not valid JSON"):
        list(read_documents(str(tmp_path / "c.jsonl")))
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no column 'text'"):
        list(read_documents(str(tmp_path / "d.csv")))
    with pytest.raises(FileNotFoundError):
        list(read_documents(str(tmp_path / "none.txt")))


def test_packing_respects_document_boundaries():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    blocks = list(pack_documents(docs, seq_len=5, eos_id=0, drop_last=False))
    flat = torch.cat([b["input_ids"] for b in blocks]).tolist()
    assert flat == [1, 2, 3, 0, 4, 5, 6, 7, 8, 9, 10, 0, 11, 0]
    assert blocks[0]["position_ids"].tolist() == [0, 1, 2, 3, 0]
    assert blocks[0]["document_ids"].tolist() == [0, 0, 0, 0, 1]
    # The long document continues in block 1 as its document 0, positions restarting.
    assert blocks[1]["position_ids"].tolist() == [0, 1, 2, 3, 4]
    assert blocks[1]["document_ids"].tolist() == [0, 0, 0, 0, 0]
    assert blocks[2]["document_ids"].tolist() == [0, 0, 1, 1]
    mask = document_attention_mask(blocks[0]["document_ids"])
    assert mask.shape == (1, 1, 5, 5)
    assert not mask[0, 0, 4, :4].any() and mask[0, 0, 4, 4]  # new document sees only itself
    assert mask[0, 0, 3, :4].all() and not mask[0, 0, 2, 3]  # causal inside a document


def test_packed_dataset_streams_every_epoch(docs):
    tok = train_tokenizer(docs[:500], "bpe", vocab_size=500)
    eos = special_ids(tok).eos
    ds = PackedDataset(lambda: docs[:200], tok, seq_len=64, eos_id=eos)
    first, second = list(ds), list(ds)
    assert len(first) > 10 and all(b["input_ids"].shape == (64,) for b in first)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))
    n_tokens = sum(len(t) + 1 for t in tokenize_stream(docs[:200], tok))
    assert len(first) == n_tokens // 64
    with pytest.raises(TypeError, match="callable"):
        PackedDataset(docs, tok, 64, eos)


# -- encode_as_text from several threads on one tokenizer ---------------------------------------

def _renumbered_tokenizer() -> Tokenizer:
    """Added tokens at ids 100, 101 over a model replaced by one of 50 ids: no tokenizer made
    anew gives them those ids, so encode_as_text takes its fallback (the settings swapped on
    the shared tokenizer, under a lock)."""
    vocab = {f"w{i}": i for i in range(100)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<S>"])
    tok.add_tokens(["zz"])
    tok.model = models.WordLevel({f"w{i}": i for i in range(50)}, unk_token="w0")
    tok.post_processor = processors.TemplateProcessing(single="$A <S>", special_tokens=[("<S>", 100)])
    return tok


def _thread_case(kind, docs):
    if kind == "renumbered":
        tok = _renumbered_tokenizer()
        texts = [" ".join(f"w{(i * 7 + j) % 60}" for j in range(5 + i)) + " <S> zz w3" for i in range(6)]
        return tok, texts, 0
    tok = train_tokenizer(docs[:300], kind, vocab_size=600, n_sentinels=10)
    special = "[MASK] [SEP]" if kind == "wordpiece" else "<extra_id_0> </s>"
    texts = [f"{d} {special} {d}" for d in docs[:6]]
    return tok, texts, special_ids(tok).pad


def _hammer(tok, texts, settings, direct, rounds, start=None):
    """Every (add_special_tokens, max_length) in ``settings`` on a thread of its own, ``rounds``
    times, and (``direct``) a thread using the tokenizer's own stored settings: each result
    against the one-thread result. Returns the mismatches and exceptions."""
    key = lambda encodings: [(e.ids, e.type_ids, e.attention_mask) for e in encodings]
    expected = {s: key(encode_as_text(tok, texts, add_special_tokens=s[0], max_length=s[1]))
                for s in settings}
    expected_direct = key(tok.encode_batch(texts))
    failures = []
    barrier = threading.Barrier(len(settings) + direct)

    def work(s):
        try:
            barrier.wait()
            for _ in range(rounds):
                if s is None:
                    got, want = key(tok.encode_batch(texts)), expected_direct
                else:
                    got = key(encode_as_text(tok, texts, add_special_tokens=s[0], max_length=s[1]))
                    want = expected[s]
                if got != want:
                    failures.append(f"{s}: another thread's settings")
                    return
        except Exception as e:  # tokenizers: "Already borrowed" while another thread encodes
            failures.append(f"{s}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(s,)) for s in list(settings) + [None] * direct]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures, expected


SETTINGS = [(True, None), (False, None), (True, 8), (False, 5), (True, 13)]


@pytest.mark.parametrize("kind", ["wordpiece", "unigram", "renumbered"])
def test_encode_as_text_is_thread_safe(kind, docs):
    """Threads encoding through one tokenizer with different settings each get their own
    result, and (but on the rare fallback) a thread using the tokenizer directly meanwhile
    sees its stored truncation and padding, which are there unchanged afterwards."""
    tok, texts, pad = _thread_case(kind, docs)
    tok.enable_truncation(7)
    tok.enable_padding(pad_id=pad, length=40)
    stored = (tok.truncation, tok.padding, tok.encode_special_tokens)
    failures, expected = _hammer(tok, texts, SETTINGS, direct=int(kind != "renumbered"), rounds=100)
    assert not failures, failures[:5]
    assert (tok.truncation, tok.padding, tok.encode_special_tokens) == stored
    assert len(set(map(str, expected.values()))) == len(SETTINGS)  # the settings do differ
    assert max(len(ids) for ids, _, _ in expected[(True, None)]) > 13


def test_encode_as_text_threads_never_share_settings(docs, monkeypatch):
    """Deterministic: two calls with different settings, each held inside the tokenizer's
    encode_batch until the other has got there too. The old code set the shared tokenizer's
    settings around that call, so both encoded with whichever were set last; encode_as_text
    now encodes through a tokenizer of its own and never reaches the shared one's."""
    tok, texts, _ = _thread_case("wordpiece", docs)
    settings = [(True, None), (False, 4)]
    expected = {s: [e.ids for e in encode_as_text(tok, texts, add_special_tokens=s[0], max_length=s[1])]
                for s in settings}
    assert expected[settings[0]] != expected[settings[1]]
    real, both_inside = tok.encode_batch, threading.Barrier(2)

    def held_encode_batch(*args, **kwargs):
        try:
            both_inside.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        return real(*args, **kwargs)
    monkeypatch.setattr(tok, "encode_batch", held_encode_batch, raising=False)
    got, errors = {}, []

    def work(s):
        try:
            got[s] = [e.ids for e in encode_as_text(tok, texts, add_special_tokens=s[0], max_length=s[1])]
        except Exception as e:
            errors.append(f"{s}: {type(e).__name__}: {e}")
    threads = [threading.Thread(target=work, args=(s,)) for s in settings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == expected, errors
    assert tok.truncation is None and tok.padding is None and tok.encode_special_tokens is False


def test_encode_as_text_private_tokenizer_follows_the_shared_one(docs):
    """The private tokenizer is made anew each call from the shared one's parts: tokens
    added, and components replaced or changed, in between calls are all seen."""
    tok = train_tokenizer(docs[:300], "bpe", vocab_size=600)
    text = "Ruza ate soup. qqqq"
    before = encode_as_text(tok, [text], add_special_tokens=False)[0].ids
    tok.add_tokens(["qqqq"])
    after = encode_as_text(tok, [text], add_special_tokens=False)[0].ids
    assert after[-1] == tok.token_to_id("qqqq") and after != before
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert encode_as_text(tok, [text], add_special_tokens=False)[0].ids == \
        tok.encode(text, add_special_tokens=False).ids != after
    assert datasets._plain_text_tokenizer(tok, None) is not None
    assert datasets._plain_text_tokenizer(_renumbered_tokenizer(), None) is None  # the fallback
