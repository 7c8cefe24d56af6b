"""Next-sentence prediction pairs (BERT): 50% IsNext (label 0), 50% NotNext (label 1).

Segment A is a run of sentences from a document; B is the sentence run that follows it
(IsNext) or the run at the same place in a different document (NotNext), so that B alone
(its length, or the kind of sentence that ends a document) does not give the label away.
Labels follow HF's ``BertForPreTraining`` (0 = B continues A). RoBERTa drops this
objective; so can you.
"""

from __future__ import annotations

import bisect
import random

from fastpt.data.datasets import encode_as_text

IS_NEXT, NOT_NEXT = 0, 1


def split_sentences(document: str) -> list[str]:
    """Sentences ending in '.', '!' or '?' (enough for the embedded corpus and plain prose)."""
    if not isinstance(document, str):
        raise TypeError(f"document must be a str, got {type(document).__name__}")
    out, start = [], 0
    for i, ch in enumerate(document):
        if ch in ".!?\n" and (i + 1 == len(document) or document[i + 1] in " \n"):
            sentence = document[start:i + 1].strip()
            if sentence:
                out.append(sentence)
            start = i + 1
    tail = document[start:].strip()
    return out + [tail] if tail else out


def make_nsp_pairs(documents: list[list[str]], seed: int = 0, max_sentences: int = 8) -> list[dict]:
    """Build ``{"a", "b", "next_sentence_label"}`` from documents given as sentence lists.

    Every split point of every document with at least two sentences gives one pair: A is up to
    ``max_sentences`` sentences before it, and the IsNext B up to ``max_sentences`` after it.
    A NotNext B has as many sentences as the IsNext B would have had, at the same distance
    from the end of a random other document that has a sentence before them (the longest
    other document, clipped, where none is long enough). Given (B's size, its distance from
    the end), an IsNext B is such a run of a uniform document, and so is a NotNext B: B alone
    tells nothing about the label. At least two documents are needed.
    """
    if isinstance(max_sentences, bool) or not isinstance(max_sentences, int) or max_sentences < 1:
        raise ValueError(f"max_sentences must be a positive integer, got {max_sentences!r}")
    if isinstance(documents, (str, bytes)) or not hasattr(documents, "__iter__"):
        raise TypeError(f"documents must be a list of documents, got {type(documents).__name__}")
    documents = list(documents)
    for i, d in enumerate(documents):
        # A document given as one string was taken as a list of one-character sentences.
        if isinstance(d, (str, bytes)) or not isinstance(d, (list, tuple)) or not all(isinstance(x, str) for x in d):
            raise TypeError(f"document {i} must be a list of sentences (str; split_sentences gives one), "
                            f"got {type(d).__name__}{' ' + repr(d)[:60] if isinstance(d, str) else ''}")
    docs = [d for d in documents if d]
    if len(docs) < 2:
        raise ValueError("NSP needs at least two non-empty documents")
    # Documents by length, so "a random other document with at least k sentences" is a draw
    # from a suffix of this order.
    by_length = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    lengths = [len(docs[i]) for i in by_length]
    rank = {d: r for r, d in enumerate(by_length)}
    rng = random.Random(seed)
    pairs = []
    for di, sentences in enumerate(docs):
        for cut in range(1, len(sentences)):
            # Bounded segments: joining whole prefixes and suffixes held O(sentences^2)
            # characters per document (359 M for a 119 KB one); this holds O(sentences).
            a = " ".join(sentences[max(0, cut - max_sentences):cut])
            n_b = min(max_sentences, len(sentences) - cut)
            if rng.random() < 0.5:
                b, label = " ".join(sentences[cut:cut + n_b]), IS_NEXT
            else:
                # Other documents with >= len - cut + 1 sentences; this one is among them
                # (cut >= 1), hence the skip over its rank. Where it is the only one, the
                # longest other document (rank len - 2) is taken.
                to_end = len(sentences) - cut
                first = min(bisect.bisect_left(lengths, to_end + 1), len(docs) - 2)
                r = rng.randrange(first, len(docs) - 1)
                other = docs[by_length[r + (r >= rank[di])]]
                start = max(len(other) - to_end, 0)
                b, label = " ".join(other[start:start + n_b]), NOT_NEXT
            pairs.append({"a": a, "b": b, "next_sentence_label": label})
    return pairs


def encode_nsp_pairs(pairs: list[dict], tokenizer, max_length: int = 128) -> list[dict]:
    """Tokenize pairs as ``[CLS] A [SEP] B [SEP]`` with segment ids, truncated to max_length.

    ``word_ids`` are the tokenizer's: B's words are numbered from 0 again (``MLMCollator``
    keys whole words on the segment too)."""
    # tokenizers silently leaves a pair untruncated when max_length cannot hold its special
    # tokens; we also want at least one token of each segment.
    shortest = tokenizer.num_special_tokens_to_add(True) + 2
    if not isinstance(max_length, int) or max_length < shortest:
        raise ValueError(f"max_length must be at least {shortest} (the pair's special tokens and one "
                         f"token of each segment), got {max_length!r}")
    # Longest-first truncation over the pair, as BERT does; the sentences are plain text
    # (encode_as_text), and the tokenizer's own settings are restored.
    enc = encode_as_text(tokenizer, [(p["a"], p["b"]) for p in pairs], max_length=max_length)
    return [{"input_ids": e.ids, "token_type_ids": e.type_ids, "word_ids": e.word_ids,
             "next_sentence_label": p["next_sentence_label"]} for e, p in zip(enc, pairs)]
