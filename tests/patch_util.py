"""The model families, padded batches and forward/backward runs the fastpt.patch tests share."""

from __future__ import annotations

import pytest
import torch

from models_util import hf_bert, hf_gpt2, hf_llama, hf_t5, randomize_, transformers
from fastpt.ops.gemm import own_kernel_active

B, T, VOCAB = 2, 11, 97


def hf_mistral(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, intermediate_size=88, max_position_embeddings=128, sliding_window=None)
    return transformers.MistralForCausalLM(transformers.MistralConfig(**{**cfg, **kw})).eval()


def hf_qwen2(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=88, max_position_embeddings=128)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**cfg, **kw})).eval()


FAMILIES = {  # builder, expected patched kinds (per model); "loss": the causal LM's loss_function
    "llama": (hf_llama, {"rms_norm": 5, "swiglu": 2, "rope": 2, "attention": 2, "loss": 1}),
    "mistral": (hf_mistral, {"rms_norm": 5, "swiglu": 2, "rope": 2, "attention": 2, "loss": 1}),
    "mistral_window": (lambda: hf_mistral(sliding_window=4), {"rms_norm": 5, "swiglu": 2, "rope": 2,
                                                               "attention": 2, "loss": 1}),
    "qwen2": (hf_qwen2, {"rms_norm": 5, "swiglu": 2, "rope": 2, "attention": 2, "loss": 1}),
    "gpt2": (hf_gpt2, {"attention": 2, "loss": 1}),
    "bert": (hf_bert, {"attention": 2}),
    "t5": (hf_t5, {"rms_norm": 2 * 2 + 1 + 3 * 3 + 1, "attention": 2 + 3 * 2}),
}


def with_linears(model, expected: dict) -> dict:
    """``expected`` plus the nn.Linear layers patch swaps where fastpt's GEMM is the faster one."""
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    return {**expected, "linear": linears} if own_kernel_active() and linears else dict(expected)


def _padded_batch(left: bool):
    ids = torch.randint(3, VOCAB, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    if left:
        mask[0, :3] = 0
    else:
        mask[1, 7:] = 0
    return ids, mask


def _run(model, name, ids, mask):
    """(output logits, valid-position mask) for one family."""
    if name == "t5":
        dec = torch.arange(3, 3 + B * 5).view(B, 5) % VOCAB  # fixed, so every run sees the same
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, torch.ones(B, 5, dtype=bool)
    out = model(input_ids=ids, attention_mask=mask)
    logits = out.prediction_logits if name == "bert" else out.logits
    return logits, mask.bool()


def _logits_and_grads(model, name, ids, mask, weights_seed=1):
    model.zero_grad()
    logits, valid = _run(model, name, ids, mask)
    picked = logits[valid]
    g = torch.Generator().manual_seed(weights_seed)
    w = torch.randn(picked.shape, generator=g, dtype=torch.float64).to(picked.dtype)
    (picked * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return picked.detach(), grads


def _peft_llama():
    """A tiny random Llama wrapped by peft's LoRA on every linear layer, B non-zero."""
    peft = pytest.importorskip("peft")
    base = hf_llama()
    randomize_(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model
