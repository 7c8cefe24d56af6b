"""Malformed or unsupported config.json fields raise CheckpointError naming the file and the field,
and the configs transformers writes are read as transformers reads them."""

from __future__ import annotations

import json

import pytest
import torch

from fastpt.models import CheckpointError, Decoder, DecoderConfig, Seq2Seq, Seq2SeqConfig, from_pretrained
from models_hf_files_util import _as_transformers_writes, _bert, _edit_config, _llama, _t5


# ---------------------------------------------------------------- D12: malformed files

def _write(path, data: bytes):
    (path / "config.json").write_bytes(data)


def _drop(path, field):
    cfg = json.loads((path / "config.json").read_text())
    del cfg[field]
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("make, edit, expect", [
    (_llama, lambda p: _drop(p, "vocab_size"), "no 'vocab_size' field"),
    (_llama, lambda p: _drop(p, "num_hidden_layers"), "no 'num_hidden_layers' field"),
    (_t5, lambda p: _drop(p, "d_kv"), "no 'd_kv' field"),
    (_llama, lambda p: _write(p, b"[1]"), "must be a JSON object, got list"),
    (_llama, lambda p: _edit_config(p, rope_parameters="x"), "rope_parameters must be a JSON object"),
    (_llama, lambda p: _write(p, b"\xff\xfe{}"), "not UTF-8"),
    (_llama, lambda p: _edit_config(p, hidden_size="32"), "hidden_size must be a positive int, got '32'"),
    (_llama, lambda p: _write(p, b'{"vocab_size": 1' + b"0" * 5000 + b"}"), "not valid JSON"),
])
def test_malformed_config_names_the_file_and_field(tmp_path, make, edit, expect):
    make().save_pretrained(tmp_path)
    edit(tmp_path)
    with pytest.raises(CheckpointError, match="config.json") as e:
        from_pretrained(tmp_path)
    assert expect in str(e.value)


def test_float8_tensor_is_named(tmp_path):
    _llama().save_pretrained(tmp_path)
    _as_transformers_writes(tmp_path, lambda t: t.update(
        {"model.norm.weight": t["model.norm.weight"].to(torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError, match=r"unsupported floating-point dtype .*"
                                              r"model\.norm\.weight \(torch\.float8_e4m3fn\)") as e:
        from_pretrained(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(e.value)


# ---------------------------------------------------------------- audit 3: configs transformers writes

@pytest.mark.parametrize("changes", [
    # transformers 5 writes rope_parameters; a legacy rope_scaling added to it wins there.
    dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "factor": 4.0}),
    dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
    dict(rope_parameters={"rope_type": "default", "type": "yarn", "rope_theta": 1e4}),
], ids=["scaling-beside-default-parameters", "default-with-factor", "legacy-type", "type-and-rope_type"])
def test_rope_scaling_in_config_json_is_refused(tmp_path, changes):
    _llama().save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match="RoPE scaling is not supported") as e:
        from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_default_rope_scaling_field_is_read_as_transformers_reads_it(tmp_path):
    _llama(rope_theta=10000.0).save_pretrained(tmp_path)
    _as_transformers_writes(tmp_path)
    # transformers 5: rope_scaling, when set, replaces rope_parameters (theta included).
    _edit_config(tmp_path, rope_scaling={"rope_type": "default", "rope_theta": 500.0})
    assert from_pretrained(tmp_path).config.rope_theta == 500.0


@pytest.mark.parametrize("flag", ["is_decoder", "add_cross_attention"])
def test_bert_decoder_configs_are_refused(tmp_path, flag):
    _bert().save_pretrained(tmp_path)
    _edit_config(tmp_path, **{flag: True})
    with pytest.raises(CheckpointError, match=f"BERT config with {flag}=true is not supported"):
        from_pretrained(tmp_path)


def test_eos_token_id_lists_are_kept_and_written_back(tmp_path):
    model = _llama(eos_token_id=[2, 7])
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == [2, 7]
    assert from_pretrained(tmp_path).config.eos_token_id == [2, 7]
    _as_transformers_writes(tmp_path)
    _edit_config(tmp_path, eos_token_id=[2, 7, 9])
    assert from_pretrained(tmp_path).config.eos_token_id == [2, 7, 9]


@pytest.mark.parametrize("cls", [DecoderConfig, Seq2SeqConfig])
def test_config_classes_take_eos_lists(cls):
    assert cls(vocab_size=64, eos_token_id=(1, 5)).eos_token_id == [1, 5]  # as JSON gives it back
    for bad in ([], [1, 64], [True], ["1"]):
        with pytest.raises(ValueError, match=f"{cls.__name__}.eos_token_id must"):
            cls(vocab_size=64, eos_token_id=bad)


def test_falsy_ids_and_sizes_are_not_replaced_by_defaults(tmp_path):
    model = Seq2Seq(Seq2SeqConfig(vocab_size=64, hidden_size=32, head_dim=8, intermediate_size=64, num_layers=1,
                                  num_heads=4, eos_token_id=0, pad_token_id=3, decoder_start_token_id=3))
    model.save_pretrained(tmp_path / "t5")
    assert from_pretrained(tmp_path / "t5").config.eos_token_id == 0  # was 1 (`eos or 1`)
    _llama().save_pretrained(tmp_path / "llama")
    _edit_config(tmp_path / "llama", num_key_value_heads=0)  # was read as "no GQA"
    with pytest.raises(CheckpointError, match="num_kv_heads must be a positive int, got 0"):
        from_pretrained(tmp_path / "llama")


def test_token_ids_outside_the_vocabulary_are_dropped_with_a_warning(tmp_path):
    _llama(eos_token_id=2).save_pretrained(tmp_path)
    _as_transformers_writes(tmp_path)
    # Old LLaMA conversions: pad_token_id -1; GPT2Config's default bos 50256 with a small vocab.
    _edit_config(tmp_path, pad_token_id=-1, bos_token_id=50256, eos_token_id=[2, 64])
    with pytest.warns(UserWarning, match=r"outside the vocabulary \[0, 64\) ignored \(set to None\): "
                                         r"bos_token_id 50256, eos_token_id 64, pad_token_id -1"):
        config = from_pretrained(tmp_path).config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (None, [2], None)


def test_t5_ids_fed_to_the_decoder_stay_strict(tmp_path):
    _t5().save_pretrained(tmp_path)
    _as_transformers_writes(tmp_path)
    _edit_config(tmp_path, pad_token_id=-1)  # shift_right feeds the pad id to the decoder
    with pytest.raises(CheckpointError, match="pad_token_id must be None or a token id"):
        from_pretrained(tmp_path)


def test_edited_config_error_names_the_argument_every_loader_accepts(tmp_path):
    _llama().save_pretrained(tmp_path)
    _edit_config(tmp_path, rms_norm_eps=1e-5)
    with pytest.raises(CheckpointError, match="pass accept_edited_config=True to from_pretrained"):
        Decoder.from_pretrained(tmp_path)
    assert from_pretrained(tmp_path, accept_edited_config=True).config.norm_eps == 1e-5
    assert Decoder.from_pretrained(tmp_path, accept_edited_config=True).config.norm_eps == 1e-5
