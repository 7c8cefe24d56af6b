"""Text sources (plain text, JSONL, CSV, any iterable), streaming, and sequence packing.

Every reader is a generator: a corpus larger than memory streams through, one document at a
time. Packing concatenates tokenized documents into fixed-length blocks (no padding wasted)
and keeps the boundaries: each block carries ``position_ids`` that restart at 0 for every
document and ``document_ids``, from which ``document_attention_mask`` builds the block mask
that keeps attention inside a document.
"""

from __future__ import annotations

import csv
import json
import numbers
import os
import threading
from typing import Iterable, Iterator

import torch
from tokenizers import Tokenizer

from fastpt._checks import check_int

FORMATS = ("text", "jsonl", "csv")
# The csv module refuses fields over 131072 characters by default, and a document is one
# field: this cap (2 GiB - 1, a C long on every platform) admits any document that fits memory.
CSV_FIELD_LIMIT = 2**31 - 1


def _format_of(path: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(ext, "text")


def read_documents(path: str, fmt: str | None = None, field: str = "text") -> Iterator[str]:
    """Stream documents from a file.

    ``text``: documents separated by blank lines. ``jsonl``: one JSON object per line, the
    document in ``field``. ``csv``: a header row, the document in column ``field``. The format
    follows the extension unless ``fmt`` is given. Raises ``FileNotFoundError``, or
    ``ValueError`` naming the line of a malformed record (or the file, if not UTF-8).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such corpus file: {path!r}")
    fmt = _format_of(path, fmt)
    # utf-8-sig: a leading byte-order mark (Excel's CSV export) would otherwise become part of
    # the first header name or the first document.
    with open(path, encoding="utf-8-sig", newline="" if fmt == "csv" else None) as f:
        try:
            if fmt == "text":
                yield from _paragraphs(f)
            elif fmt == "jsonl":
                yield from _jsonl_field(f, path, field)
            else:
                yield from _csv_field(f, path, field)
        except UnicodeDecodeError as e:  # its own message names no file
            raise ValueError(f"{path}: not valid UTF-8 ({e.reason})") from None


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _jsonl_field(lines, path, field) -> Iterator[str]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{path}:{n}: expected an object with a string field {field!r}")
        yield record[field]


def _csv_field(f, path, field) -> Iterator[str]:
    # strict: a stray quote raises instead of opening a quoted field that swallows every
    # following row into one document.
    reader = csv.DictReader(f, strict=True)
    # The limit is the csv module's global; it is only ever raised here, never lowered.
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    try:
        if reader.fieldnames is None or field not in reader.fieldnames:
            raise ValueError(f"{path}: CSV header {reader.fieldnames} has no column {field!r}")
        for row in reader:
            if row[field] is None:
                raise ValueError(f"{path}:{reader.line_num}: row has no value for column {field!r}")
            yield row[field]
    except csv.Error as e:  # its own message names neither the file nor the line
        # line_num is the last line of the last good record: the bad one starts on the next.
        raise ValueError(f"{path}:{reader.line_num + 1}: malformed CSV record ({e})") from None


def encode_as_text(tokenizer, texts: list, *, add_special_tokens: bool = True,
                   max_length: int | None = None) -> list:
    """``tokenizer.encode_batch(texts)`` with ``texts`` read as plain text, whatever settings
    the tokenizer carries (``save_tokenizer`` keeps them, and HF ``tokenizer.json`` files often
    have them): no stored truncation or padding, which would cut or pad documents silently
    (truncation to ``max_length`` if given), and a special token's text inside a document
    (``"[MASK]"``, ``"<|endoftext|>"``) encoded as text, not as the control id. Special tokens
    that the post-processor adds (``add_special_tokens``) are still added.

    The tokenizer itself is never changed: the batch is encoded by a private tokenizer that
    shares its model, normalizer, pre-tokenizer and post-processor and holds its own added
    tokens and these settings (``_plain_text_tokenizer``), so threads may call this, and use
    the tokenizer directly, at the same time (but for a rare fallback, see below). A stand-in that is not a ``tokenizers.Tokenizer``
    is called as it is."""
    if not isinstance(tokenizer, Tokenizer):  # a stand-in has none of these settings
        if add_special_tokens:
            return tokenizer.encode_batch(texts)
        return tokenizer.encode_batch(texts, add_special_tokens=False)
    private = _plain_text_tokenizer(tokenizer, max_length)
    if private is not None:
        return private.encode_batch(texts, add_special_tokens=add_special_tokens)
    with _SETTINGS_LOCK:  # the rare tokenizer that cannot be shadowed (see below)
        return _encode_with_settings_swapped(tokenizer, texts, add_special_tokens, max_length)


def _plain_text_tokenizer(tokenizer: Tokenizer, max_length: int | None) -> Tokenizer | None:
    """A new Tokenizer that encodes as ``tokenizer`` does, without its truncation (or with
    ``max_length``), without padding, and with ``encode_special_tokens`` on; None where its
    added tokens cannot be given the same ids.

    Made for every call and never shared, so no other thread can change its settings. It is
    cheap whatever the vocabulary, nothing being serialized or copied (~10 us with a few
    added tokens, ~75 us with T5's 100 sentinels, against ~1 ms to encode 32 documents): the
    model, normalizer, pre-tokenizer and post-processor are the tokenizer's own objects
    (the setters keep a reference, so later changes to them reach it too); only the added
    tokens are added anew, in id order, as ``Tokenizer.from_str`` adds them when it loads
    a ``tokenizer.json``. The tokenizers library takes settings only as the tokenizer's
    state, never per call, hence the private tokenizer. Where the ids come out different (a
    tokenizer whose model was replaced after tokens were added: its own save/load round trip
    would renumber them too), None."""
    private = Tokenizer(tokenizer.model)
    private.normalizer = tokenizer.normalizer
    private.pre_tokenizer = tokenizer.pre_tokenizer
    private.post_processor = tokenizer.post_processor
    added = tokenizer.get_added_tokens_decoder()
    if added:
        # The AddedToken objects themselves, so each keeps its flags (special, normalized,
        # lstrip, ...); only the ids are the private tokenizer's to give, hence the check.
        private.add_tokens([added[i] for i in sorted(added)])
        if not all(private.token_to_id(t.content) == i for i, t in added.items()):
            return None
    if max_length is not None:
        private.enable_truncation(max_length)
    private.encode_special_tokens = True
    return private


# Serializes the fallback, which changes the shared tokenizer's settings for one call: two
# such calls at once would see each other's settings. (Direct users of that tokenizer on
# other threads still could; no tokenizer that fastpt trains or loads takes this path.)
_SETTINGS_LOCK = threading.Lock()


def _encode_with_settings_swapped(tokenizer: Tokenizer, texts: list, add_special_tokens: bool,
                                  max_length: int | None) -> list:
    truncation, padding = tokenizer.truncation, tokenizer.padding
    special_as_text = tokenizer.encode_special_tokens
    tokenizer.no_padding()
    if max_length is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_length)
    tokenizer.encode_special_tokens = True
    try:
        return tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.encode_special_tokens = special_as_text
        if truncation is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(**truncation)
        if padding is not None:
            tokenizer.enable_padding(**padding)


def tokenize_stream(documents: Iterable[str], tokenizer, batch_size: int = 256) -> Iterator[list[int]]:
    """Token ids per document, without special tokens (special-token text in a document is
    encoded as text, and the tokenizer's stored truncation and padding are not applied: see
    ``encode_as_text``), tokenized in batches (Rust threads)."""
    batch: list[str] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == batch_size:
            yield from (e.ids for e in encode_as_text(tokenizer, batch, add_special_tokens=False))
            batch = []
    if batch:
        yield from (e.ids for e in encode_as_text(tokenizer, batch, add_special_tokens=False))


def pack_documents(token_lists: Iterable[list[int]], seq_len: int, eos_id: int,
                   drop_last: bool = True) -> Iterator[dict]:
    """Concatenate documents (each followed by ``eos_id``) into blocks of ``seq_len`` tokens.

    Yields ``{"input_ids", "position_ids", "document_ids"}`` (int64 tensors of length
    ``seq_len``). A document longer than the rest of a block continues in the next block as
    that block's document 0 with positions restarting at 0 (attention never crosses blocks,
    and learned position tables stay within ``seq_len``). Raises TypeError for a ``seq_len``
    that is not an int or ids that are not integers, ValueError for negative ids.
    """
    check_int("seq_len", seq_len)  # a float length failed later as "slice indices must be integers"
    if seq_len < 2:  # a token and the EOS that follows it
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    # None (a tokenizer without EOS) failed later inside torch.tensor, a float was packed as is.
    if not isinstance(eos_id, int) or isinstance(eos_id, bool) or eos_id < 0:
        raise ValueError(f"eos_id must be a non-negative integer token id, got {eos_id!r}")
    ids: list[int] = []
    pos: list[int] = []
    doc: list[int] = []
    for n, tokens in enumerate(token_lists):
        tokens = _id_tensor(tokens, f"document {n} of token_lists").tolist() + [eos_id]
        doc_index = doc[-1] + 1 if doc else 0
        offset, piece_start = 0, 0
        while offset < len(tokens):
            take = min(seq_len - len(ids), len(tokens) - offset)
            ids += tokens[offset:offset + take]
            pos += range(offset - piece_start, offset - piece_start + take)
            doc += [doc_index] * take
            offset += take
            if len(ids) == seq_len:
                yield _block(ids, pos, doc)
                ids, pos, doc, doc_index, piece_start = [], [], [], 0, offset
    if ids and not drop_last:
        yield _block(ids, pos, doc)


def _block(ids, pos, doc) -> dict:
    return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos),
            "document_ids": torch.tensor(doc)}


def check_pad_to_multiple_of(pad_to_multiple_of) -> None:
    """None or an int >= 1 (a negative or fractional one failed inside torch at the first batch)."""
    if pad_to_multiple_of is None:
        return
    if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, numbers.Integral):
        raise TypeError(f"pad_to_multiple_of must be None or an int >= 1, got {pad_to_multiple_of!r}")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be None or an int >= 1, got {pad_to_multiple_of!r}")


def _id_tensor(seq, what: str, pad_id: int | None = None) -> torch.Tensor:
    """``seq`` (a list, tensor or array of token ids) as a 1-D integer tensor, or a clear error
    naming ``what``: torch would truncate float ids silently, and a negative id would be packed
    or padded as it is. Only ``pad_id`` may be negative (the -100 of padded labels)."""
    try:
        t = torch.as_tensor(seq)
    except (TypeError, ValueError, RuntimeError) as e:  # None, strings, ragged lists, overflow
        raise TypeError(f"{what} must be a sequence of integer token ids: {e}") from None
    if t.dim() != 1:
        raise ValueError(f"{what} must be a 1-D sequence of token ids, got shape {tuple(t.shape)}")
    if not t.numel():  # [] comes out as float32, with no id to be wrong
        return t.long()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer token ids, got {t.dtype} values")
    bad = (t < 0) & (t != pad_id) if pad_id is not None else t < 0
    if bool(bad.any()):
        raise ValueError(f"{what} holds the negative id {int(t[bad][0])}: token ids must lie in [0, vocab_size)")
    return t


def pad_batch(seqs: list, pad_id: int, pad_to_multiple_of: int | None = None, *,
              name: str = "input_ids") -> tuple:
    """Right-pad a list of 1-D id sequences to (B, T) ids and a (B, T) bool attention mask.

    Raises TypeError for ids that are not integers (floats, bools) and ValueError for negative
    ids other than ``pad_id`` itself (labels padded with -100 may hold it), naming ``name`` and
    the example."""
    if not seqs:
        raise ValueError("cannot collate an empty batch")
    check_int("pad_id", pad_id)
    check_pad_to_multiple_of(pad_to_multiple_of)
    tensors = [_id_tensor(s, f"{name} of example {i}", pad_id) for i, s in enumerate(seqs)]
    T = max(len(t) for t in tensors)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, t in enumerate(tensors):
        ids[i, :len(t)] = t
        mask[i, :len(t)] = True
    return ids, mask


def encode_padded(tokenizer, texts: list[str], pad_id: int) -> tuple:
    """Tokenize ``texts`` (with the tokenizer's special tokens, as plain text: see
    ``encode_as_text``) into right-padded (B, T) ids and a (B, T) bool attention mask, False
    on the padding."""
    return pad_batch([e.ids for e in encode_as_text(tokenizer, texts)], pad_id)


def document_attention_mask(document_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool mask, True where query i may attend to key j."""
    if document_ids.dim() == 1:
        document_ids = document_ids.unsqueeze(0)
    same = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    if causal:
        T = document_ids.shape[-1]
        same &= torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return same.unsqueeze(1)


class PackedDataset(torch.utils.data.IterableDataset):
    """Packed causal-LM blocks from a restartable document source (re-read every epoch).

    ``documents`` is a zero-argument callable returning an iterable of strings (e.g.
    ``lambda: read_documents(path)``), so each epoch streams the corpus again. Under
    ``torch.distributed`` and DataLoader workers, blocks are dealt round-robin so every
    rank/worker sees a disjoint share (shares differ by up to one block, so ranks can finish
    an epoch at different steps: the Trainer saves and restores each rank's own data position).
    """

    def __init__(self, documents, tokenizer, seq_len: int, eos_id: int):
        if not callable(documents):
            raise TypeError("documents must be a callable returning an iterable of strings")
        self.documents, self.tokenizer, self.seq_len, self.eos_id = documents, tokenizer, seq_len, eos_id

    def __iter__(self):
        share, n_shares = _share()
        blocks = pack_documents(tokenize_stream(self.documents(), self.tokenizer),
                                self.seq_len, self.eos_id)
        for i, block in enumerate(blocks):
            if i % n_shares == share:
                yield block


def _share() -> tuple[int, int]:
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = torch.utils.data.get_worker_info()
    if info is None:
        return rank, world
    return rank * info.num_workers + info.id, world * info.num_workers


def reseed_in_worker(collator, seed: int) -> None:
    """Reseed ``collator.generator`` from the DataLoader worker's seed, inside a worker.

    For a collator used in a plain DataLoader: each worker gets a copy of the collator with the
    main process's generator state, and the main process's generator never advances; without
    this, every worker and every epoch would draw the same masks. ``worker_info.seed`` differs
    per worker and per epoch (new workers each epoch) and follows the loader's own generator,
    so runs stay reproducible. It is mixed with the collator's ``seed`` so that two seeds still
    give two mask streams. A persistent worker keeps its seed, and its generator simply goes on
    drawing. In the main process (``num_workers=0``) nothing changes. Under the ``Trainer``,
    :func:`seed_collator` sets the generator for every batch instead, and this leaves it alone.
    """
    info = torch.utils.data.get_worker_info()
    if info is None or getattr(collator, "_worker_seed", None) == info.seed:
        return
    collator._worker_seed = info.seed
    collator.generator.manual_seed((info.seed * 1_000_003 + seed) % (1 << 64))


def seed_collator(collator, seed: int) -> None:
    """Restart ``collator.generator`` from ``seed`` for the next batch.

    The ``Trainer`` calls this before collating each batch, with a seed made from (its seed, the
    collator's seed, rank, epoch, batch index): a batch's masks then depend neither on the
    DataLoader worker that collates it nor on what was collated before, ranks draw different
    masks, and a resumed run draws the ones the uninterrupted run drew. No generator state needs
    saving. Inside a worker, ``reseed_in_worker`` then leaves the generator as set here.
    """
    info = torch.utils.data.get_worker_info()
    if info is not None:
        collator._worker_seed = info.seed  # reseed_in_worker's mark that this worker's generator is set
    collator.generator.manual_seed(seed)
