"""Next-sentence prediction pairs (BERT): 50% IsNext (label 0), 50% NotNext (label 1).

Segment A is a run of sentences from a document; B is the sentence run that follows it
(IsNext) or one taken from a different document (NotNext). Labels follow HF's
``BertForPreTraining`` (0 = B continues A). RoBERTa drops this objective; so can you.
"""

from __future__ import annotations

import random

IS_NEXT, NOT_NEXT = 0, 1


def split_sentences(document: str) -> list[str]:
    """Sentences ending in '.', '!' or '?' (enough for the embedded corpus and plain prose)."""
    out, start = [], 0
    for i, ch in enumerate(document):
        if ch in ".!?\n" and (i + 1 == len(document) or document[i + 1] in " \n"):
            sentence = document[start:i + 1].strip()
            if sentence:
                out.append(sentence)
            start = i + 1
    tail = document[start:].strip()
    return out + [tail] if tail else out


def make_nsp_pairs(documents: list[list[str]], seed: int = 0) -> list[dict]:
    """Build ``{"a", "b", "next_sentence_label"}`` from documents given as sentence lists.

    Every split point of every document with at least two sentences gives one pair; NotNext
    pairs draw B from a different document, so at least two documents are needed.
    """
    docs = [d for d in documents if d]
    if len(docs) < 2:
        raise ValueError("NSP needs at least two non-empty documents")
    rng = random.Random(seed)
    pairs = []
    for di, sentences in enumerate(docs):
        for cut in range(1, len(sentences)):
            a = " ".join(sentences[:cut])
            if rng.random() < 0.5:
                b, label = " ".join(sentences[cut:]), IS_NEXT
            else:
                other = rng.randrange(len(docs) - 1)
                other += other >= di
                b, label = rng.choice(docs[other]), NOT_NEXT
            pairs.append({"a": a, "b": b, "next_sentence_label": label})
    return pairs


def encode_nsp_pairs(pairs: list[dict], tokenizer, max_length: int = 128) -> list[dict]:
    """Tokenize pairs as ``[CLS] A [SEP] B [SEP]`` with segment ids, truncated to max_length."""
    previous = tokenizer.truncation
    tokenizer.enable_truncation(max_length)  # longest-first over the pair, as BERT does
    try:
        enc = tokenizer.encode_batch([(p["a"], p["b"]) for p in pairs])
    finally:
        if previous is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(**previous)
    return [{"input_ids": e.ids, "token_type_ids": e.type_ids, "word_ids": e.word_ids,
             "next_sentence_label": p["next_sentence_label"]} for e, p in zip(enc, pairs)]
