"""config.json + model.safetensors folders that do not fit, or only half fit, together:
interrupted saves, configs asking for more than the file holds, tied tensors that differ,
and malformed config fields. Each must raise CheckpointError naming the file and the
field or tensor, before allocating what the config asks for."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpt.models.hf as hf
from fastpt.models import (CheckpointError, Decoder, DecoderConfig, Encoder, EncoderConfig, Seq2Seq,
                           Seq2SeqConfig, from_pretrained)


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


# ---------------------------------------------------------------- audit 3: sharded checkpoints, dtype

_FIRST, _SECOND = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _shard(path, weight_map_edit=lambda m: None, shard_edit=lambda shards: None):
    """Split model.safetensors into two shards (embeddings and final norm in the first) +
    model.safetensors.index.json, as transformers writes large models; ``weight_map_edit`` /
    ``shard_edit`` spoil the index / the shards."""
    tensors = load_file(str(path / "model.safetensors"))
    os.remove(path / "model.safetensors")
    first = {n for n in tensors if n in ("model.embed_tokens.weight", "model.norm.weight")}
    shards = {_FIRST: {n: t for n, t in tensors.items() if n in first},
              _SECOND: {n: t for n, t in tensors.items() if n not in first}}
    weight_map = {n: file for file, part in shards.items() for n in part}
    weight_map_edit(weight_map)
    shard_edit(shards)
    for file, part in shards.items():
        save_file(part, str(path / file), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_checkpoint_loads(tmp_path):
    model = _llama()
    model.save_pretrained(tmp_path)
    _shard(tmp_path)
    loaded = Decoder.from_pretrained(tmp_path)
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd)


def model_norm_weight(shard):
    return {"model.norm.weight": shard["model.norm.weight"]}


def _remove(path, name):
    _shard(path)
    os.remove(path / name)


def _write_index(path, text):
    _shard(path)
    (path / "model.safetensors.index.json").write_text(text)


@pytest.mark.parametrize("spoil, expect", [
    (lambda p: _remove(p, _SECOND), f"shard files not found (1): {_SECOND}"),
    (lambda p: _shard(p, shard_edit=lambda s: s[_FIRST].pop("model.norm.weight")),
     f"listed in the index but not in their shard (1): model.norm.weight (listed in {_FIRST}, absent)"),
    (lambda p: _shard(p, shard_edit=lambda s: s[_SECOND].update(model_norm_weight(s[_FIRST]))),
     f"tensors in more than one shard (1): model.norm.weight ({_FIRST}, {_SECOND})"),
    (lambda p: _shard(p, weight_map_edit=lambda m: m.pop("model.norm.weight")),
     f"tensors in a shard but not in the index (1): model.norm.weight ({_FIRST})"),
    (lambda p: _write_index(p, "{"), "not valid JSON"),
    (lambda p: _write_index(p, '{"metadata": {}}'), 'non-empty "weight_map"'),
    (lambda p: _shard(p, weight_map_edit=lambda m: m.update({"model.norm.weight": "../model.safetensors"})),
     "shard names must be file names in its folder, got ['../model.safetensors']"),
    (lambda p: _shard(p, weight_map_edit=lambda m: m.update({"model.norm.weight": ""})),  # was "not found (1): "
     "shard names must be file names in its folder, got ['']"),
], ids=["missing-shard", "listed-but-absent", "duplicate", "unlisted", "bad-json", "no-weight-map", "outside",
        "empty-name"])
def test_sharded_checkpoint_errors(tmp_path, spoil, expect):
    _llama().save_pretrained(tmp_path)
    spoil(tmp_path)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    assert expect in str(e.value)
    assert str(tmp_path / "model.safetensors.index.json") in str(e.value)


def test_dtype_by_name_and_bad_dtypes(tmp_path):
    _llama().save_pretrained(tmp_path)
    assert from_pretrained(tmp_path, dtype="bfloat16").embed_tokens.weight.dtype == torch.bfloat16
    assert from_pretrained(tmp_path, dtype="torch.float64").embed_tokens.weight.dtype == torch.float64
    for bad in ("bf17", torch.int8, "int8", 16):
        # checked before anything is read: the folder need not exist
        with pytest.raises(TypeError, match="dtype must be None or one of float16, bfloat16, float32, float64"):
            from_pretrained(tmp_path / "absent", dtype=bad)


# ---------------------------------------------------------------- audit 4: overflow, NaN saves

@pytest.mark.parametrize("file_dtype, value, dtype, largest", [
    (torch.float32, 1e5, torch.float16, "float16"),      # fine in the file, inf in the model
    (torch.float64, 1e300, None, "float32"),             # a float64 file into the float32 model
], ids=["fp32-file-fp16-model", "fp64-file-fp32-model"])
def test_values_the_model_dtype_cannot_hold_are_refused(tmp_path, file_dtype, value, dtype, largest):
    _llama().save_pretrained(tmp_path)
    _as_transformers_writes(tmp_path, lambda t: t.update(
        {"model.norm.weight": torch.full((32,), value, dtype=file_dtype)}))
    with pytest.raises(CheckpointError, match="values too large for the model's dtype") as e:
        from_pretrained(tmp_path, dtype=dtype)  # was: loaded, with inf weights
    assert f"model.norm.weight (max |value| {value:.3g} > " in str(e.value)
    assert f"the largest {largest}" in str(e.value) and str(tmp_path / "model.safetensors") in str(e.value)
    if dtype is None:  # the file's dtype holds them
        assert from_pretrained(tmp_path, dtype=torch.float64).final_norm.weight[0].item() == value


def test_values_that_fit_the_model_dtype_load_in_it(tmp_path):
    model = _llama()
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.float16)
    assert loaded.final_norm.weight.dtype == torch.float16
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight.half())


def test_saving_non_finite_weights_leaves_the_checkpoint_as_it_was(tmp_path):
    _llama().save_pretrained(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    diverged = _llama()
    with torch.no_grad():
        diverged.final_norm.weight[3] = float("nan")
    # was: written over the good pair, which from_pretrained then refused (NaN values)
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 tensors .*: final_norm\.weight"):
        diverged.save_pretrained(tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    from_pretrained(tmp_path)


def test_saving_a_meta_model_is_refused_before_writing(tmp_path):
    with torch.device("meta"):
        model = _llama()
    with pytest.raises(ValueError, match=r"no data \(meta device\): embed_tokens\.weight"):
        model.save_pretrained(tmp_path / "out")  # was: NotImplementedError naming no tensor
    assert not (tmp_path / "out").exists()


def _t5_config(path, **changes):
    _t5().save_pretrained(path)
    _as_transformers_writes(path)
    _edit_config(path, **changes)


def _llama_config(path, **changes):
    _llama().save_pretrained(path)
    _as_transformers_writes(path)
    _edit_config(path, **changes)


@pytest.mark.parametrize("make, changes, expect", [
    (_llama_config, dict(vocab_size=10**30), "vocab_size is out of range: 1000000000000000000000000000000"),
    (_llama_config, dict(max_position_embeddings=2**63), "max_position_embeddings is out of range"),
    (_llama_config, dict(rms_norm_eps=10**400), "rms_norm_eps is out of range"),
    (_llama_config, dict(rope_parameters={"rope_type": "default", "rope_theta": 10**400}),
     "rope_parameters.rope_theta is out of range"),
    # each size fits 64 bits, their product does not
    (_llama_config, dict(vocab_size=2**40, hidden_size=2**40, num_attention_heads=2**35,
                         num_key_value_heads=2**35, head_dim=32), "has tensors too large to exist"),
    (_t5_config, dict(d_kv=2**62), "has tensors too large to exist"),
], ids=["int-size", "int64-max", "float-field", "nested", "product", "t5-product"])
def test_config_numbers_beyond_64_bits_name_the_file(tmp_path, make, changes, expect):
    # was: TypeError "Overflow when unpacking long long", RuntimeError "Storage size calculation
    # overflowed" or OverflowError "int too large to convert to float", naming no file or field
    make(tmp_path, **changes)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    assert expect in str(e.value) and str(tmp_path / "config.json") in str(e.value)


def test_llama_residual_dropout_survives_save_and_transformers(tmp_path):
    """HF's Llama has no residual dropout: config.json dropped it, and a reloaded model trained
    without the dropout it was configured with (0.1 -> 0.0, silently)."""
    from fastpt.models.hf import from_hf, to_hf
    model = _llama(dropout=0.1)
    model.save_pretrained(tmp_path)
    assert from_pretrained(tmp_path).config == model.config
    assert from_hf(to_hf(model)).config.dropout == 0.1
    _edit_config(tmp_path, fastpt_residual_dropout=1.5)  # a value DecoderConfig refuses is named
    with pytest.raises((CheckpointError, ValueError), match="dropout"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_gpt2_without_biases_has_no_hf_layout(tmp_path, flag):
    # was a bare KeyError('layers.0.attn.q_proj.bias') from save_pretrained and to_hf
    from fastpt.models.hf import to_hf
    model = Decoder(DecoderConfig(flavour="gpt2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                  max_position_embeddings=32, **{flag: False}))
    for save in (lambda: model.save_pretrained(tmp_path), lambda: to_hf(model)):
        with pytest.raises(ValueError, match=f"gpt2 Decoder with {flag}=False has no Hugging Face layout"):
            save()
    assert not (tmp_path / "config.json").exists()
