"""Ready-made pre-training runs on the embedded world corpus (used by the CLI, the demo and
the learning-outcome experiments): tokenizer -> dataset -> objective -> model -> Trainer."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastpt.data.datasets import encode_as_text, pack_documents, tokenize_stream
from fastpt.data.tokenizer import save_tokenizer, special_ids, train_tokenizer
from fastpt.data.world import World
from fastpt.models import Decoder, DecoderConfig, Encoder, EncoderConfig
from fastpt._checks import check_int
from fastpt.pretrain.clm import collate_packed
from fastpt.pretrain.mlm import MLMCollator
from fastpt.train import Trainer, TrainerConfig, seed_everything

OBJECTIVES = ("mlm", "electra", "clm")
# Tokens per example: an encoder needs [CLS], a token to mask and [SEP]; a decoder one input
# and one target token.
MIN_SEQ_LEN = {"encoder": (3, "[CLS], a token and [SEP]"), "decoder": (2, "an input and a target token")}
# The smallest tokenizers train_tokenizer builds (wordpiece for encoders, byte-level BPE for
# decoders): the commands and the demo refuse less before anything is written.
MIN_VOCAB = {"encoder": (64, "wordpiece"), "decoder": (257, "byte-level BPE: 256 bytes and <|endoftext|>")}


@dataclass
class PretrainResult:
    model: torch.nn.Module
    tokenizer: object
    metrics: list
    output_dir: str


def encoder_examples(docs, tokenizer, max_len: int) -> list[dict]:
    """``[CLS] doc [SEP]`` per document, truncated to ``max_len``, with word ids (for
    whole-word masking). The documents are plain text (``encode_as_text``): a literal
    ``[MASK]`` in one is not the mask token."""
    encodings = encode_as_text(tokenizer, list(docs), max_length=max_len)
    return [{"input_ids": e.ids, "word_ids": e.word_ids} for e in encodings]


def _documents_and_tokenizer(output_dir, docs, tokenizer, world, n_docs, seed, kind, vocab_size):
    """The training documents (the world corpus unless ``docs`` is given) and a tokenizer
    (trained on them unless given), saved into ``output_dir``."""
    if docs is None:
        docs = (world or World(seed)).documents(n_docs, seed=seed)
    docs = list(docs)
    if not docs:
        raise ValueError("no training documents")
    tok = tokenizer if tokenizer is not None else train_tokenizer(docs, kind, vocab_size=vocab_size)
    save_tokenizer(tok, output_dir)
    return docs, tok


def _check_continued(model, tokenizer, cls, objective_ok: bool, seq_len: int) -> None:
    """A model to continue from must be of ``cls``, come with its tokenizer, and fit seq_len."""
    if model is None:
        return
    if not isinstance(model, cls):
        raise ValueError(f"expected a {cls.__name__} to continue from, got {type(model).__name__}")
    if not objective_ok:
        raise ValueError("continuing from a model needs objective 'mlm' (ELECTRA adds a generator)")
    if tokenizer is None:
        raise ValueError("continuing from a model needs its tokenizer")
    if model.config.vocab_size < tokenizer.get_vocab_size():
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model "
                         f"{model.config.vocab_size}")
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} > the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")


def _check_special_token(tokenizer, field: str, message: str) -> None:
    """Refuse a given tokenizer that lacks the special token an objective needs (``field`` of
    ``special_ids``) before anything is written to output_dir; the ones trained here have it."""
    if tokenizer is not None and getattr(special_ids(tokenizer), field) is None:
        raise ValueError(message)


def _trainer_config(output_dir: str, max_steps, label_shift: int, overrides: dict, **options) -> TrainerConfig:
    """The run's TrainerConfig, built (and so checked) before a tokenizer is trained and
    written to output_dir. ``label_shift`` is the objective's: 1 for the decoder, which shifts
    its labels, 0 for MLM, which does not (1 would leave a token of each sequence uncounted)."""
    if "label_shift" in overrides:
        raise ValueError(f"label_shift is set by the objective (here {label_shift}), got label_shift="
                         f"{overrides['label_shift']!r}")
    if isinstance(max_steps, int):  # else TrainerConfig names max_steps
        overrides.setdefault("warmup_steps", max_steps // 10)
    return TrainerConfig(output_dir=output_dir, max_steps=max_steps, label_shift=label_shift,
                         **options, **overrides)


def pretrain_encoder(output_dir: str, *, objective: str = "mlm", preset: str = "bert-tiny",
                     n_docs: int = 20000, vocab_size: int = 2000, seq_len: int = 64,
                     max_steps: int = 300, batch_size: int = 32, lr: float = 1e-3,
                     seed: int = 0, world: World | None = None, docs=None, tokenizer=None,
                     model: Encoder | None = None, resume_from: str | None = None,
                     progress: bool = True, **trainer_overrides) -> PretrainResult:
    """MLM (or ELECTRA) pre-training of a BERT-style encoder on ``docs`` (default: the
    world corpus), with a WordPiece tokenizer trained on them unless one is given. With
    ``model`` (and its ``tokenizer``), MLM continues from its weights and ``preset`` is unused."""
    if objective not in ("mlm", "electra"):
        raise ValueError(f"encoder objective must be 'mlm' or 'electra', got {objective!r}")
    # [CLS], a token to mask, [SEP]. With seq_len 0 or 1 the documents went untruncated (the
    # tokenizer ignores a max_length its special tokens do not fit in); -3 failed inside it.
    check_int("seq_len", seq_len, minimum=3)
    _check_continued(model, tokenizer, Encoder, objective == "mlm", seq_len)
    _check_special_token(tokenizer, "mask", "the tokenizer has no mask token ([MASK]) to hide the "
                         "selected tokens; MLM and ELECTRA pre-training need one (a wordpiece tokenizer)")
    cfg = _trainer_config(output_dir, max_steps, 0, trainer_overrides, batch_size=batch_size, lr=lr, seed=seed,
                          progress=progress)
    docs, tok = _documents_and_tokenizer(output_dir, docs, tokenizer, world, n_docs, seed,
                                         "wordpiece", vocab_size)
    ids = special_ids(tok)
    seed_everything(seed)  # the initial weights are a function of the seed
    if model is None:
        config = EncoderConfig.from_name(preset, vocab_size=tok.get_vocab_size(),
                                         max_position_embeddings=max(seq_len, 64), pad_token_id=ids.pad)
        if objective == "electra":
            from fastpt.pretrain.electra import Electra
            model = Electra(config)
        else:
            model = Encoder(config)
    collator = MLMCollator(tok.get_vocab_size(), ids.mask, ids.pad, ids.all, seed=seed)
    examples = encoder_examples(docs, tok, seq_len)
    trainer = Trainer(model, cfg, examples, collate_fn=collator)
    trainer.train(resume_from)
    encoder = model.discriminator if objective == "electra" else model
    return PretrainResult(encoder, tok, trainer.metrics.rows, output_dir)


def pretrain_decoder(output_dir: str, *, preset: str = "llama-tiny", n_docs: int = 20000,
                     vocab_size: int = 2000, seq_len: int = 128, max_steps: int = 300,
                     batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
                     world: World | None = None, docs=None, tokenizer=None,
                     model: Decoder | None = None, resume_from: str | None = None,
                     progress: bool = True, **trainer_overrides) -> PretrainResult:
    """Causal-LM pre-training of a decoder on packed blocks of ``docs`` (default: the world
    corpus; attention kept inside each document), with a byte-level BPE tokenizer trained on
    them unless one is given. With ``model`` (and its ``tokenizer``), training continues
    from its weights and ``preset`` is unused."""
    check_int("seq_len", seq_len, minimum=2)  # a token and the EOS after it (pack_documents checks it too late)
    _check_continued(model, tokenizer, Decoder, True, seq_len)
    _check_special_token(tokenizer, "eos", "the tokenizer has no EOS token (</s> or <|endoftext|>) to end "
                         "each packed document; decoder pre-training needs one (a bpe or unigram tokenizer)")
    cfg = _trainer_config(output_dir, max_steps, 1, trainer_overrides, batch_size=batch_size, lr=lr, seed=seed,
                          progress=progress)
    docs, tok = _documents_and_tokenizer(output_dir, docs, tokenizer, world, n_docs, seed,
                                         "bpe", vocab_size)
    eos = special_ids(tok).eos
    blocks = list(pack_documents(tokenize_stream(docs, tok), seq_len, eos))
    if not blocks:
        raise ValueError(f"the documents hold fewer than seq_len={seq_len} tokens")
    seed_everything(seed)
    if model is None:
        model = Decoder(DecoderConfig.from_name(preset, vocab_size=tok.get_vocab_size(),
                                                max_position_embeddings=max(seq_len, 128),
                                                bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    trainer = Trainer(model, cfg, blocks, collate_fn=collate_packed)
    trainer.train(resume_from)
    return PretrainResult(model, tok, trainer.metrics.rows, output_dir)


def save_pretrained_with_tokenizer(result: PretrainResult, path: str) -> None:
    """HF layout: config.json + model.safetensors + tokenizer.json in one folder."""
    os.makedirs(path, exist_ok=True)
    result.model.save_pretrained(path)
    save_tokenizer(result.tokenizer, path)
