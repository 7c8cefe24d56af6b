"""fastpt.data on awkward input: tokenizers that carry settings or meet special-token text,
malformed or huge CSV, bad ids and sizes. Each raises a clear error or gives the plain result."""

import re

import pytest
import torch
from tokenizers import Tokenizer

from fastpt.data.datasets import encode_padded, pack_documents, pad_batch, read_documents, tokenize_stream
from fastpt.data.digits import load_digits_split
from fastpt.data.tokenizer import special_ids, train_tokenizer
from fastpt.data.world import World
from fastpt.pretrain.nsp import encode_nsp_pairs
from fastpt.train.recipes import encoder_examples

# 50 documents of 40 CJK characters: 383 distinct characters, more than small vocabularies hold.
CJK = ["".join(chr(0x4E00 + (i * 7 + j) % 500) for j in range(40)) for i in range(50)]


@pytest.fixture(scope="module")
def docs():
    return list(World(seed=0).documents(300))


@pytest.fixture(scope="module")
def trained(docs):
    return {kind: train_tokenizer(docs, kind, vocab_size=600, n_sentinels=10)
            for kind in ("bpe", "wordpiece", "unigram")}


def _copy(tok):  # the module's tokenizers stay as trained
    return Tokenizer.from_str(tok.to_str())


# -- a tokenizer's stored truncation and padding -------------------------------------------

def test_tokenize_stream_ignores_stored_truncation_and_padding(trained, docs):
    tok = _copy(trained["bpe"])
    plain = [tok.encode(d, add_special_tokens=False).ids for d in docs[:8]]
    tok.enable_truncation(16)
    tok.enable_padding(pad_id=0, pad_token="<|endoftext|>")
    truncation, padding = tok.truncation, tok.padding
    assert list(tokenize_stream(docs[:8], tok, batch_size=3)) == plain  # whole documents
    assert (tok.truncation, tok.padding, tok.encode_special_tokens) == (truncation, padding, False)


def test_encode_padded_masks_only_the_padding(trained):
    tok = _copy(trained["wordpiece"])
    pad = special_ids(tok).pad
    texts = ["a short one", "a considerably longer sentence with many more words in it"]
    plain = [tok.encode(t).ids for t in texts]
    tok.enable_padding(pad_id=pad, pad_token="[PAD]", direction="left", length=40)
    tok.enable_truncation(5)
    ids, mask = encode_padded(tok, texts, pad)
    assert mask.sum(1).tolist() == [len(p) for p in plain]  # the padding is False
    assert [row[m].tolist() for row, m in zip(ids, mask)] == plain
    assert tok.truncation["max_length"] == 5 and tok.padding["length"] == 40  # restored


# -- special-token text inside a document --------------------------------------------------

@pytest.mark.parametrize("kind, text", [
    ("bpe", "Use <|endoftext|> to end a file."),
    ("unigram", "T5 uses <extra_id_0> and </s> and <pad> tokens."),
    ("wordpiece", "Type [MASK] or [SEP] or [CLS] here."),
])
def test_special_token_text_in_a_document_stays_text(trained, kind, text):
    tok = trained[kind]
    ids = special_ids(tok)
    tokens = next(tokenize_stream([text], tok))
    # Characters outside the vocabulary may be unknown, but none is a control token.
    assert not set(tokens) & (ids.all - {ids.unk}), [tok.id_to_token(i) for i in tokens]
    if kind == "bpe":
        assert tok.decode(tokens) == text  # byte-level BPE reads it back exactly
        block = next(pack_documents([tokens, [5] * 20], seq_len=12, eos_id=ids.eos))
        assert int((block["input_ids"] == ids.eos).sum()) == 0  # the first document has not ended
    assert tok.encode_special_tokens is False  # restored


def test_encoder_and_nsp_inputs_read_special_token_text_as_text(trained):
    tok = trained["wordpiece"]
    ids = special_ids(tok)
    [example] = encoder_examples(["Type [MASK] or [SEP] here."], tok, max_len=32)
    tokens = example["input_ids"]
    assert tokens[0] == ids.cls and tokens[-1] == ids.sep  # the post-processor still adds them
    assert tokens.count(ids.sep) == 1 and ids.mask not in tokens
    long = encoder_examples(["word " * 100], tok, max_len=16)[0]["input_ids"]
    assert len(long) == 16 and long[-1] == ids.sep  # still truncated to max_len
    pair = {"a": "Ruza ate [SEP] soup.", "b": "It was [MASK] good.", "next_sentence_label": 0}
    [enc] = encode_nsp_pairs([pair], tok, max_length=32)
    assert enc["input_ids"].count(ids.sep) == 2 and ids.mask not in enc["input_ids"]
    assert tok.truncation is None and tok.encode_special_tokens is False


# -- CSV -------------------------------------------------------------------------------------

def test_csv_stray_quote_names_the_file_and_line(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("text\nfirst doc\n\"oops, a stray quote\n" + "".join(f"doc {i}\n" for i in range(50)))
    with pytest.raises(ValueError, match=r"q\.csv:3: malformed CSV record \(unexpected end of data\)"):
        list(read_documents(str(path)))
    path.write_text('text\nfirst\n"quoted"then text\n')
    with pytest.raises(ValueError, match=r"q\.csv:3: malformed CSV record"):
        list(read_documents(str(path)))


def test_csv_reads_a_document_longer_than_the_csv_default_limit(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("id,text\n1,short\n2,\"" + "y" * 200_000 + "\"\n")
    assert [len(d) for d in read_documents(str(path))] == [5, 200_000]


# -- ids and sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("eos_id", [None, 3.5, -1, True])
def test_pack_documents_checks_eos_id(eos_id):
    with pytest.raises(ValueError, match=re.escape(f"eos_id must be a non-negative integer token id, got {eos_id!r}")):
        list(pack_documents([[5, 6, 7]], seq_len=2, eos_id=eos_id))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"seq_len": 2.5}, TypeError, r"seq_len must be an int, got 2\.5"),  # was "slice indices must be integers"
    ({"token_lists": [[-5, 3, 4]]}, ValueError, r"document 0 of token_lists holds the negative id -5"),
    ({"token_lists": [[5, 6], [3.5, 4]]}, TypeError, r"document 1 of token_lists must hold integer token ids"),
])
def test_pack_documents_checks_seq_len_and_ids(kwargs, error, match):
    args = {"token_lists": [[5, 6, 7]], "seq_len": 2, "eos_id": 0, **kwargs}
    with pytest.raises(error, match=match):
        list(pack_documents(**args))


def test_pad_batch_refuses_ids_torch_would_truncate_or_pad_silently():
    with pytest.raises(TypeError, match=r"input_ids of example 1 must hold integer token ids, got torch\.float"):
        pad_batch([[5, 6], [5.7, 30.2]], 0)  # was padded as [5, 30]
    with pytest.raises(TypeError, match=r"input_ids of example 0 must hold integer token ids, got torch\.bool"):
        pad_batch([[True, False]], 0)
    with pytest.raises(ValueError, match=r"labels of example 0 holds the negative id -5"):
        pad_batch([[-5, -100]], -100, name="labels")
    with pytest.raises(ValueError, match=r"pad_to_multiple_of must be None or an int >= 1, got -2"):
        pad_batch([[5, 6]], 0, -2)
    with pytest.raises(TypeError, match=r"pad_to_multiple_of must be None or an int >= 1, got 2\.5"):
        pad_batch([[5, 6]], 0, 2.5)
    # labels padded with the ignore index may hold it already
    ids, mask = pad_batch([[7, -100], [8]], -100, 4, name="labels")
    assert ids.tolist() == [[7, -100, -100, -100], [8, -100, -100, -100]]
    assert mask.sum(1).tolist() == [2, 1]


def test_tokenizer_refuses_a_vocab_size_the_trainer_cannot_allocate(docs):
    # 10**9 made the Rust trainer fail to allocate ~70 GB and abort the whole process
    with pytest.raises(ValueError, match=r"vocab_size=1000000000 is too large \(at most 1048576"):
        train_tokenizer(docs, "wordpiece", vocab_size=10**9)
    with pytest.raises(TypeError, match=r"vocab_size must be an int, got '600'"):
        train_tokenizer(docs, "wordpiece", vocab_size="600")


def test_tokenizer_refuses_an_empty_or_malformed_corpus(docs):
    for empty in ([], iter([]), ["", ""]):  # gave a tokenizer of the special tokens alone
        with pytest.raises(ValueError, match=r"wordpiece tokenizer: the corpus is empty"):
            train_tokenizer(empty, "wordpiece", 200)
    with pytest.raises(TypeError, match=r"texts must be an iterable of strings, got int at item 3"):
        train_tokenizer((d if i != 3 else 7 for i, d in enumerate(docs)), "wordpiece", 600)
    with pytest.raises(TypeError, match=r"texts must be an iterable of strings, got a single string"):
        train_tokenizer(docs[0], "wordpiece", 200)
    with pytest.raises(TypeError, match=r"texts must be an iterable of strings, got int$"):
        train_tokenizer(5, "wordpiece", 200)


def test_tokenizer_checks_min_frequency(docs):
    with pytest.raises(ValueError, match=r"min_frequency must be an int >= 0, got -1"):  # was an OverflowError
        train_tokenizer(docs, "wordpiece", 600, min_frequency=-1)
    with pytest.raises(TypeError, match=r"min_frequency must be an int >= 0, got 1\.5"):
        train_tokenizer(docs, "bpe", 600, min_frequency=1.5)


def test_bpe_vocab_size_below_the_byte_alphabet_raises(docs):
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small for byte-level BPE \(need at least 257"):
        train_tokenizer(docs, "bpe", vocab_size=100)
    assert train_tokenizer(docs[:50], "bpe", vocab_size=257).get_vocab_size() == 257


def test_tokenizer_vocabulary_too_small_for_the_characters_raises():
    with pytest.raises(ValueError, match=r"vocab_size=400 with n_sentinels=100 on a corpus of 383 distinct "
                                         r"characters: The vocabulary is not large enough"):
        train_tokenizer(CJK, "unigram", vocab_size=400, n_sentinels=100)
    # WordPiece keeps every character whatever the size: it exceeded vocab_size silently.
    with pytest.raises(ValueError, match=r"vocab_size=300 is too small for this corpus: its 383 distinct "
                                         r"characters make a wordpiece vocabulary of \d+ tokens"):
        train_tokenizer(CJK, "wordpiece", vocab_size=300)
    assert train_tokenizer(CJK, "wordpiece", vocab_size=1000).get_vocab_size() <= 1000


def test_tokenizer_training_passes_the_corpus_errors_through():
    def corpus():
        yield "first document"
        raise ValueError("corpus.csv:3: malformed CSV record")
    with pytest.raises(ValueError, match=r"^corpus\.csv:3"):
        train_tokenizer(corpus(), "unigram", vocab_size=200, n_sentinels=0)


@pytest.mark.parametrize("n_labeled, counts", [(10, [1] * 10), (15, [2] * 5 + [1] * 5),
                                               (99, [10] * 9 + [9]), (105, [11] * 5 + [10] * 5)])
def test_digits_give_exactly_n_labeled(n_labeled, counts):
    data = load_digits_split(n_labeled=n_labeled)
    assert torch.bincount(data["y_labeled"], minlength=10).tolist() == counts


@pytest.mark.parametrize("kwargs, match", [
    ({"n_test": -5}, r"n_test must be an integer in \[0, 1787\].*got -5"),
    ({"n_test": 5000}, r"n_test must be an integer in \[0, 1787\].*got 5000"),
    ({"n_labeled": 1200}, r"n_labeled=1200 needs 120 labelled images of digit \d, but the training part"),
    ({"n_labeled": 9}, r"n_labeled must be an integer in \[10, 1200\]"),
])
def test_digits_check_their_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits_split(**kwargs)


def test_world_documents_docstring_gives_their_length():
    stated = int(re.search(r"~(\d+) words", World.documents.__doc__).group(1))
    docs = list(World(seed=0).documents(2000))
    mean = sum(len(d.split()) for d in docs) / len(docs)
    assert abs(mean - stated) < 0.1 * stated, mean


@pytest.mark.parametrize("call, error, match", [
    (lambda w: w.documents(2.5), TypeError, r"n_docs must be an int, got 2\.5"),  # was "'float' object cannot be
    (lambda w: w.documents(-1), ValueError, r"n_docs must be an int >= 0, got -1"),  # interpreted as an integer"
    (lambda w: w.sentiment(True), TypeError, r"n must be an int, got True"),
    (lambda w: w.icl("job_of", -2), ValueError, r"n must be an int >= 0, got -2"),  # was an empty list
    (lambda w: World(n_people=300.0), TypeError, r"n_people must be an int, got 300\.0"),
])
def test_world_counts_are_checked_when_called(call, error, match):
    with pytest.raises(error, match=match):
        call(World(seed=0))
