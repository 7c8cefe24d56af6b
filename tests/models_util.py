"""Tiny random Hugging Face models for the model tests (no network: built from configs)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 97  # odd on purpose


def hf_llama(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, intermediate_size=88, bos_token_id=1, eos_token_id=2,
               max_position_embeddings=128)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **kw})).eval()


def hf_gpt2(**kw):
    cfg = dict(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64, bos_token_id=2,
               eos_token_id=2)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, **kw})).eval()


def hf_bert(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=72, max_position_embeddings=64)
    return transformers.BertForPreTraining(transformers.BertConfig(**{**cfg, **kw})).eval()


def hf_t5(**kw):
    cfg = dict(vocab_size=VOCAB, d_model=48, d_kv=12, d_ff=72, num_layers=2, num_decoder_layers=3,
               num_heads=4, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(**{**cfg, **kw})).eval()


def randomize_(model, std: float = 0.02) -> None:
    """Perturb every parameter (incl. norms and biases, which init to 1/0) so that a
    conversion mixing up two tensors cannot go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()
