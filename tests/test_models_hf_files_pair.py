"""config.json and model.safetensors stay one pair: interrupted saves, configs asking for more than
the file holds (refused before allocating), and tied tensors that differ."""

from __future__ import annotations

import json
import os

import pytest
import torch

import fastpt.models.hf as hf
from fastpt.models import CheckpointError, Decoder, DecoderConfig, Seq2SeqConfig, from_pretrained
from models_hf_files_util import _as_transformers_writes, _bert, _edit_config, _llama, _t5


def _failing_for(suffix: str, real, error: OSError, target: int = 0):
    """``real``, raising ``error`` when its argument ``target`` (the path written) ends in
    ``suffix``: one file of a save fails, the others go through."""
    def call(*args):
        if str(args[target]).endswith(suffix):
            raise error
        return real(*args)
    return call


# ---------------------------------------------------------------- D7: the pair stays consistent

def test_failed_config_write_keeps_the_old_pair(tmp_path, monkeypatch):
    old = _llama(rope_theta=10000.0)
    old.save_pretrained(tmp_path)
    new = _llama(rope_theta=500000.0)
    with torch.no_grad():
        new.final_norm.weight.mul_(1.5)
    monkeypatch.setattr(hf, "atomic_write", _failing_for("config.json", hf.atomic_write,
                                                         OSError(28, "No space left on device (simulated)")))
    with pytest.raises(OSError, match="simulated"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(tmp_path)
    assert loaded.config.rope_theta == 10000.0
    assert torch.equal(loaded.final_norm.weight, old.final_norm.weight)


def test_failed_weights_rename_puts_the_old_config_back(tmp_path, monkeypatch):
    # The new config.json is renamed in, then the weights' rename fails: the old config goes
    # back beside the old weights (it was left in place, and the previous save no longer loaded).
    old = _llama(rope_theta=10000.0)
    old.save_pretrained(tmp_path)
    monkeypatch.setattr(os, "replace", _failing_for("model.safetensors", os.replace,
                                                    OSError(5, "I/O error (simulated)"), target=1))
    with pytest.raises(OSError, match="simulated"):
        _llama(rope_theta=500000.0).save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = from_pretrained(tmp_path)
    assert loaded.config.rope_theta == 10000.0
    assert torch.equal(loaded.final_norm.weight, old.final_norm.weight)


def test_weights_older_than_config_are_detected(tmp_path):
    # A kill between the two renames (nothing restores): the new config.json is in, the weights
    # are still the old ones.
    _llama(rope_theta=10000.0).save_pretrained(tmp_path)
    new_config = tmp_path / "new"
    _llama(rope_theta=500000.0).save_pretrained(new_config)
    os.replace(new_config / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="saved with another config") as e:
        from_pretrained(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(e.value)


def test_reformatted_config_and_transformers_files_still_load(tmp_path):
    model = _llama()
    model.save_pretrained(tmp_path)
    # Same values, other layout, a key fastpt does not read: the same model.
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}, indent=4))
    assert from_pretrained(tmp_path).config == model.config
    _edit_config(tmp_path, rope_theta=500000.0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with pytest.raises(CheckpointError, match="saved with another config.*accept_edited_config"):
        from_pretrained(tmp_path)
    assert from_pretrained(tmp_path, accept_edited_config=True).config.rope_theta == 500000.0
    _as_transformers_writes(tmp_path)  # no hash: nothing to compare with
    assert from_pretrained(tmp_path).config.rope_theta == 500000.0


# ---------------------------------------------------------------- D10: check before allocating

@pytest.mark.parametrize("field, value, expect", [
    ("vocab_size", 10**12, "mis-shaped tensor model.embed_tokens.weight: file has [64, 32], "
                           "model expects [1000000000000, 32]"),
    ("vocab_size", 10**6, "model expects [1000000, 32]"),
    ("intermediate_size", 10**10, "mis-shaped tensor model.layers.0.mlp.gate_proj.weight: file has [64, 32], "
                                  "model expects [10000000000, 32]"),
    ("num_hidden_layers", 10**6, "the config has 1000000 layers"),
    ("num_hidden_layers", 3, "missing tensors"),
    ("max_position_embeddings", 10**11, "rotary.cos_cached [100000000000, 4]"),
])
def test_config_larger_than_the_weights_fails_before_allocating(tmp_path, monkeypatch, field, value, expect):
    _llama().save_pretrained(tmp_path)
    _as_transformers_writes(tmp_path)  # no config hash: the shapes alone must tell
    _edit_config(tmp_path, **{field: value})
    built_on = []
    real = hf.model_for_config

    def spy(config, **kw):
        built_on.append(torch.get_default_device().type)
        return real(config, **kw)
    monkeypatch.setattr(hf, "model_for_config", spy)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    assert expect in str(e.value)
    assert str(tmp_path) in str(e.value)
    assert set(built_on) <= {"meta"}  # the real model is never built


def test_gpt2_positions_are_checked_against_the_file(tmp_path):
    Decoder(DecoderConfig(flavour="gpt2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                          max_position_embeddings=32)).save_pretrained(tmp_path)
    _as_transformers_writes(tmp_path)
    _edit_config(tmp_path, n_positions=10**11)
    with pytest.raises(CheckpointError, match=r"transformer\.wpe\.weight: file has \[32, 32\], "
                                              r"model expects \[100000000000, 32\]"):
        from_pretrained(tmp_path)


# ---------------------------------------------------------------- D11: tied tensors

def _untie_llama(path):
    _llama().save_pretrained(path)  # untied: its own lm_head.weight
    _as_transformers_writes(path)
    _edit_config(path, tie_word_embeddings=True)


def _bert_decoder_differs(path):
    _bert().save_pretrained(path)
    _as_transformers_writes(path, lambda t: t.update({"cls.predictions.decoder.weight": torch.randn(64, 32)}))


def _t5_embed_differs(path):
    _t5().save_pretrained(path)
    _as_transformers_writes(path, lambda t: t.update({"encoder.embed_tokens.weight": torch.randn(64, 32)}))


@pytest.mark.parametrize("make, alias, canonical", [
    (_untie_llama, "lm_head.weight", "model.embed_tokens.weight"),
    (_bert_decoder_differs, "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    (_t5_embed_differs, "encoder.embed_tokens.weight", "shared.weight"),
])
def test_tied_copy_that_differs_is_refused(tmp_path, make, alias, canonical):
    make(tmp_path)
    with pytest.raises(CheckpointError, match="tied tensors differ") as e:
        from_pretrained(tmp_path)
    assert f"{alias} (torch.float32, [64, 32]) differs from {canonical}" in str(e.value)
    assert str(tmp_path / "model.safetensors") in str(e.value)


def test_tied_copies_that_are_equal_load(tmp_path):
    model = _t5()
    model.save_pretrained(tmp_path)
    _as_transformers_writes(tmp_path, lambda t: t.update({"encoder.embed_tokens.weight": t["shared.weight"].clone(),
                                                          "decoder.embed_tokens.weight": t["shared.weight"].clone()}))
    assert torch.equal(from_pretrained(tmp_path).shared.weight, model.shared.weight)


@pytest.mark.parametrize("make, field", [(_llama, "tie_word_embeddings"), (_llama, "attention_bias"),
                                         (_t5, "tie_word_embeddings")])
def test_boolean_fields_must_be_booleans(tmp_path, make, field):
    make().save_pretrained(tmp_path)
    _edit_config(tmp_path, **{field: "false"})  # bool("false") is True
    with pytest.raises(CheckpointError, match=f"{field} must be true or false, got 'false'") as e:
        from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize("cls, field", [(DecoderConfig, "tie_word_embeddings"), (DecoderConfig, "mlp_bias"),
                                        (Seq2SeqConfig, "tie_word_embeddings")])
def test_config_classes_refuse_non_boolean_flags(cls, field):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field} must be true or false"):
        cls(**{field: "false"})
