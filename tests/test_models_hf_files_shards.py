"""Sharded checkpoints, dtypes and values a dtype cannot hold, config numbers beyond 64 bits, and
saves that refuse to write what could not be loaded back."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastpt.models import CheckpointError, Decoder, DecoderConfig, from_pretrained
from models_hf_files_util import _as_transformers_writes, _edit_config, _llama, _t5


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
