"""Tiny fastpt models, and edits of their saved config.json and model.safetensors, that the tests of
Hugging Face folders share."""

from __future__ import annotations

import json

from safetensors.torch import load_file, save_file

from fastpt.models import Decoder, DecoderConfig, Encoder, EncoderConfig, Seq2Seq, Seq2SeqConfig


def _llama(**kw):
    return Decoder(DecoderConfig(**{**dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                           num_kv_heads=2, intermediate_size=64,
                                           max_position_embeddings=32), **kw}))


def _bert():
    return Encoder(EncoderConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                 intermediate_size=64, max_position_embeddings=32))


def _t5():
    return Seq2Seq(Seq2SeqConfig(vocab_size=64, hidden_size=32, head_dim=8, intermediate_size=64,
                                 num_layers=1, num_heads=4))


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _as_transformers_writes(path, edit=lambda t: None):
    """Rewrite model.safetensors with metadata {"format": "pt"} only (no fastpt config hash,
    as transformers writes it), after ``edit(tensors)``."""
    file = str(path / "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
