"""fastpt.patch's attention: output_attentions gives HF's eager weights, a mask shorter than the
cache is padded as HF pads it, and integer 4-D masks are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from models_util import hf_llama, randomize_, transformers
from patch_util import B, FAMILIES, T, VOCAB, _padded_batch
from tolerances import _max_err
import fastpt


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "t5"])
def test_output_attentions_returns_the_eager_weights(name):
    """A model loaded with attn_implementation="eager" to get attention weights keeps getting
    them after patch(): those calls run the eager formula, weights and logits as HF's eager."""
    model = FAMILIES[name][0](attn_implementation="eager")
    randomize_(model, std=0.3)
    reference = copy.deepcopy(model)
    fastpt.patch(model)
    ids, mask = _padded_batch(left=name not in ("bert", "t5"))
    kw = dict(input_ids=ids, attention_mask=mask, output_attentions=True)
    if name == "t5":
        kw["decoder_input_ids"] = torch.arange(3, 3 + B * 5).view(B, 5) % VOCAB
    key = "encoder_attentions" if name == "t5" else "attentions"
    with torch.no_grad():
        ours, ref = model(**kw), reference(**kw)
    assert len(getattr(ours, key)) == len(getattr(ref, key)) == 2
    # Left padding leaves the pad queries of a causal model no key: fastpt's rows are 0 there
    # (README, "Masks"), HF's uniform; the real queries' rows must agree.
    real_queries = mask.bool()[:, None, :, None] if name in ("llama", "gpt2") else True
    for a, b in zip(getattr(ours, key), getattr(ref, key)):
        assert a.shape == b.shape and _max_err(a * real_queries, b * real_queries) < 1e-4
    logits, real = ("logits", torch.ones(B, 5, dtype=torch.bool)) if name == "t5" else \
        ("prediction_logits" if name == "bert" else "logits", mask.bool())
    assert _max_err(getattr(ours, logits)[real], getattr(ref, logits)[real]) < 1e-4


def test_mask_shorter_than_the_cache_is_padded_as_hf_pads_it():
    """HF pads an attention_mask shorter than cache + new tokens with False (masked)."""
    model = hf_llama()
    randomize_(model, std=0.3)
    reference = copy.deepcopy(model)
    fastpt.patch(model)
    ids = torch.randint(3, VOCAB, (B, 8))
    logits = []
    for m in (model, reference):
        cache = transformers.DynamicCache(config=m.config)
        with torch.no_grad():
            m(input_ids=ids[:, :6], past_key_values=cache, use_cache=True)
            logits.append(m(input_ids=ids[:, 6:], attention_mask=torch.ones(B, 2, dtype=torch.long),
                            past_key_values=cache, use_cache=True).logits)
    assert _max_err(*logits) < 1e-4


def test_integer_4d_mask_is_refused():
    model = hf_llama()
    fastpt.patch(model)
    mask = torch.ones(B, 1, T, T, dtype=torch.long).tril()
    with pytest.raises(TypeError, match="4-D attention_mask must be bool.*got torch.int64"):
        model(input_ids=torch.randint(3, VOCAB, (B, T)), attention_mask=mask)
