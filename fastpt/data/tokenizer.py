"""Tokenizer training with the `tokenizers` library, saved as Hugging Face ``tokenizer.json``.

Three recipes, one per model family (as in the seed lectures and the HF reference models):

- ``"wordpiece"``: BERT-style, lower-cased, ``[PAD] [UNK] [CLS] [SEP] [MASK]``, with a
  ``[CLS] A [SEP] B [SEP]`` post-processor (segment ids 0/1).
- ``"bpe"``: GPT-2-style byte-level BPE, ``<|endoftext|>`` as EOS and padding.
- ``"unigram"``: T5-style SentencePiece-Unigram with ``<pad> </s> <unk>`` at ids 0, 1, 2
  and ``n_sentinels`` sentinels ``<extra_id_0>`` ... at the top of the vocabulary
  (``<extra_id_0>`` has the highest id, as T5's span corruption expects).

``special_ids(tok)`` returns the ids the collators need (pad, mask, cls, sep, eos, bos, and
the set of all special ids, which masking and random replacement must never touch).
Padding is left to the collators, which pad each batch to its own longest sequence.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Iterable

from fastpt._atomic import atomic_write
from fastpt._checks import check_int
from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

KINDS = ("wordpiece", "bpe", "unigram")
# Far above any vocabulary fastpt trains. The trainers allocate per entry up front: a size of
# 10**9 made the Rust library fail to allocate ~70 GB and abort the whole process.
MAX_VOCAB_SIZE = 2**20


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int | None
    cls: int | None
    sep: int | None
    mask: int | None
    bos: int | None
    eos: int | None
    all: frozenset


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int = 4000,
                    n_sentinels: int = 100, min_frequency: int = 2) -> Tokenizer:
    """Train a tokenizer of ``kind`` (one of ``KINDS``) on an iterable of strings.

    The vocabulary has at most ``vocab_size`` tokens (fewer when the corpus runs out of pieces
    to merge), so a model sized from ``vocab_size`` takes every id. It must hold every
    character: byte-level BPE needs at least 257 (256 bytes and ``<|endoftext|>``), and where
    the corpus has more distinct characters than ``vocab_size`` (less ``n_sentinels`` for
    unigram) can hold, a ``ValueError`` names ``vocab_size`` and the character count (the
    tokenizers library would otherwise exceed the size silently, or raise a bare Exception).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
    check_int("vocab_size", vocab_size)
    if vocab_size < 64:
        raise ValueError(f"vocab_size={vocab_size} is too small (need at least 64)")
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too large (at most {MAX_VOCAB_SIZE}; the trainer "
                         f"allocates memory for every entry up front)")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, numbers.Integral):
        raise TypeError(f"min_frequency must be an int >= 0, got {min_frequency!r}")
    if min_frequency < 0:  # reached the trainer as an OverflowError
        raise ValueError(f"min_frequency must be an int >= 0, got {min_frequency!r}")
    # Below this, the BPE trainer returned its byte alphabet and EOS: 257 tokens, whatever was asked.
    if kind == "bpe" and vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE (need at least 257: "
                         f"256 bytes and <|endoftext|>)")
    if not isinstance(n_sentinels, int) or n_sentinels < 0:
        raise ValueError(f"n_sentinels must be a non-negative integer, got {n_sentinels!r}")
    # The sentinels come out of the unigram vocabulary: what is left must still be a vocabulary
    # (a negative size reached the trainer as an OverflowError).
    if kind == "unigram" and vocab_size - n_sentinels < 64:
        raise ValueError(f"vocab_size={vocab_size} leaves {vocab_size - n_sentinels} pieces after "
                         f"n_sentinels={n_sentinels} sentinels (need at least 64)")
    if isinstance(texts, str):  # iterating it would train on its characters, one per document
        raise TypeError("texts must be an iterable of strings, got a single string (wrap it in a list)")
    try:
        items = iter(texts)
    except TypeError:
        raise TypeError(f"texts must be an iterable of strings, got {type(texts).__name__}") from None
    chars: set = set()  # the corpus's distinct characters, for the messages below

    def counted():
        # Checked as the trainer consumes them, so a generator still streams.
        for n, text in enumerate(items):
            if not isinstance(text, str):
                raise TypeError(f"texts must be an iterable of strings, got {type(text).__name__} "
                                f"at item {n}")
            chars.update(text)
            yield text
    asked = f"vocab_size={vocab_size}" + (f" with n_sentinels={n_sentinels}" if kind == "unigram" else "")
    try:
        if kind == "wordpiece":
            tok = _train_wordpiece(counted(), vocab_size, min_frequency)
        elif kind == "bpe":
            tok = _train_bpe(counted(), vocab_size, min_frequency)
        else:
            tok = _train_unigram(counted(), vocab_size, n_sentinels)
    except Exception as e:
        if type(e) is not Exception:  # the corpus's own errors (a reader's ValueError) as they are
            raise
        # tokenizers' bare Exception ("The vocabulary is not large enough to contain all chars")
        raise ValueError(f"cannot train a {kind} tokenizer with {asked} on a corpus of "
                         f"{len(chars)} distinct characters: {e}") from None
    if not chars:  # else a tokenizer of the special tokens alone came back
        raise ValueError(f"cannot train a {kind} tokenizer: the corpus is empty (no documents, or only "
                         f"empty ones)")
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"{asked} is too small for this corpus: its {len(chars)} distinct characters "
                         f"make a {kind} vocabulary of {tok.get_vocab_size()} tokens; ask for at least that")
    return tok


def _train_wordpiece(texts, vocab_size, min_frequency) -> Tokenizer:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
        show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def _train_bpe(texts, vocab_size, min_frequency) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def _train_unigram(texts, vocab_size, n_sentinels) -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    # The trainer puts <pad> </s> <unk> into the model's pieces with the best score, so the text
    # "</s>" would be segmented into the EOS piece even with encode_special_tokens. With "<" a
    # pre-token of its own no piece can start with it: text never becomes those ids. (After
    # Metaspace, which would otherwise prepend its "▁" to every split.)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(),
                                                 pre_tokenizers.Split(Regex("<"), "isolated")])
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=vocab_size - n_sentinels, special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>", show_progress=False))
    # Sentinels go on top, in reverse so that <extra_id_0> gets the highest id (T5's layout).
    tok.add_special_tokens([f"<extra_id_{k}>" for k in reversed(range(n_sentinels))])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return tok


def special_ids(tok: Tokenizer) -> SpecialIds:
    """The special-token ids of a tokenizer trained by ``train_tokenizer`` (or any HF one)."""
    def get(*names):
        for name in names:
            i = tok.token_to_id(name)
            if i is not None:
                return i
        return None
    pad = get("[PAD]", "<pad>", "<|endoftext|>")
    if pad is None:
        raise ValueError("tokenizer has no padding token ([PAD], <pad> or <|endoftext|>)")
    all_special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return SpecialIds(pad=pad, unk=get("[UNK]", "<unk>"), cls=get("[CLS]"), sep=get("[SEP]"),
                      mask=get("[MASK]"), bos=get("<|endoftext|>"), eos=get("</s>", "<|endoftext|>"),
                      all=frozenset(all_special))


def save_tokenizer(tok: Tokenizer, path: str) -> None:
    """Write ``tokenizer.json`` atomically into the folder ``path`` (created if missing)."""
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, "tokenizer.json"), tok.save)


def load_tokenizer(path: str) -> Tokenizer:
    """Read ``tokenizer.json`` from a folder (or the file itself), with a clear error."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {path!r}")
    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{file!r} is not a valid tokenizer.json: {e}") from e
