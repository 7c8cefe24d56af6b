"""fastpt.data: the embedded world, tokenizer training, file readers, packing."""

import json

import pytest
import torch

from fastpt.data.datasets import (PackedDataset, document_attention_mask, pack_documents,
                                  read_documents, tokenize_stream)
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


def test_corpus_is_large_and_fast_enough(world):
    import time
    start = time.perf_counter()
    words = sum(len(d.split()) for d in world.documents(60000))
    assert words > 1_000_000  # ~1.3 M words, ~2 M word pieces
    assert time.perf_counter() - start < 60


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
