"""Model configs: validation, JSON round-trip, presets."""

from __future__ import annotations

import pytest

from fastpt.models import DecoderConfig, EncoderConfig, Seq2SeqConfig, config_from_dict, from_name
from fastpt.models.config import CONFIG_CLASSES


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_presets_build_and_round_trip(cls):
    for name in cls.PRESETS:
        cfg = from_name(name)
        assert isinstance(cfg, cls)
        assert cls.from_json(cfg.to_json()) == cfg
        assert config_from_dict(cfg.to_dict()) == cfg


def test_family_defaults():
    gpt2 = DecoderConfig(flavour="gpt2", hidden_size=64, num_layers=1, num_heads=4)
    assert (gpt2.tie_word_embeddings, gpt2.hidden_act, gpt2.intermediate_size, gpt2.num_kv_heads) == \
        (True, "gelu_new", 256, 4)
    llama = from_name("llama-small")
    assert (llama.num_layers, llama.hidden_size, llama.num_heads, llama.num_kv_heads,
            llama.intermediate_size, llama.tie_word_embeddings) == (6, 512, 8, 2, 1408, False)
    assert from_name("llama-tiny", num_layers=3).num_layers == 3


# Each error must name the field that is wrong: a bare ValueError could come from another one.
@pytest.mark.parametrize("cls, bad, match", [
    (EncoderConfig, dict(hidden_size=50, num_heads=4), r"hidden_size \(50\) must be divisible by num_heads"),
    (EncoderConfig, dict(num_layers=0), "num_layers must be a positive int, got 0"),
    (EncoderConfig, dict(hidden_act="swish"), "hidden_act must be one of .*got 'swish'"),
    (EncoderConfig, dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (EncoderConfig, dict(pad_token_id=10 ** 6), "pad_token_id must be None or a token id"),
    (DecoderConfig, dict(flavour="mistral"), "flavour must be 'gpt2' or 'llama', got 'mistral'"),
    (DecoderConfig, dict(num_heads=8, num_kv_heads=3), r"num_heads \(8\) must be a multiple of num_kv_heads \(3\)"),
    (DecoderConfig, dict(flavour="gpt2", num_heads=8, num_kv_heads=2), "gpt2 has no grouped-query attention"),
    (DecoderConfig, dict(hidden_act="gelu"), "llama uses SwiGLU.*got 'gelu'"),
    (DecoderConfig, dict(norm_eps=-1.0), "norm_eps must be a positive finite number, got -1.0"),
    (DecoderConfig, dict(rope_theta=float("nan")), "rope_theta must be a positive finite number, got nan"),
    (Seq2SeqConfig, dict(feed_forward_proj="swiglu"), "feed_forward_proj must be .*got 'swiglu'"),
    (Seq2SeqConfig, dict(num_heads=0), "num_heads must be a positive int, got 0"),
    (Seq2SeqConfig, dict(eos_token_id=-1), "eos_token_id must be None or a token id .*got -1"),
])
def test_invalid_configs_raise(cls, bad, match):
    with pytest.raises(ValueError, match=match):
        cls(**bad)


def test_unknown_names_and_fields():
    with pytest.raises(ValueError, match="unknown model preset"):
        from_name("llama-huge")
    with pytest.raises(ValueError, match="unknown fields"):
        DecoderConfig.from_dict({"model_type": "decoder", "n_layer": 2})
    with pytest.raises(ValueError, match="cannot be built"):
        EncoderConfig.from_dict(DecoderConfig().to_dict())
