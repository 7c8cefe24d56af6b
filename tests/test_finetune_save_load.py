"""Saving and loading fine-tuned models: adapters into a fresh base, damaged adapter files, and
merged checkpoints that load without adapter code."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastpt.finetune import FinetuneConfig, SequenceClassifier, load_adapter, prepare, save_adapter
from fastpt.models import Decoder, DecoderConfig
from finetune_util import V, _backbone, _batch, _train


@pytest.mark.parametrize("strategy", ["lora", "adapters", "prompt", "ia3", "prefix"])
def test_adapter_save_then_load_into_a_fresh_base(tmp_path, strategy):
    cfg = FinetuneConfig(strategy=strategy, lora_r=2, num_virtual_tokens=2, prefix_length=2)
    model = prepare(SequenceClassifier(_backbone("gpt2"), 2), cfg)
    _train(model, steps=2)
    model.eval()
    expected = model(**_batch()).logits
    names = save_adapter(model, str(tmp_path), cfg)
    assert any("classifier" in n for n in names)  # the new head is saved automatically
    fresh = load_adapter(SequenceClassifier(_backbone("gpt2"), 2), str(tmp_path)).eval()
    torch.testing.assert_close(fresh(**_batch()).logits, expected)
    with pytest.raises(ValueError, match="was trained on Decoder"):
        load_adapter(SequenceClassifier(_backbone("llama"), 2), str(tmp_path))
    for size in (dict(hidden_size=96), dict(num_layers=3)):  # the same architecture, another size
        other = Decoder(DecoderConfig.from_name("gpt2-tiny", vocab_size=V, **size))
        with pytest.raises(ValueError, match=f"was trained on Decoder with config .*'{next(iter(size))}'"):
            load_adapter(SequenceClassifier(other, 2), str(tmp_path))


def test_prefix_saved_after_dropping_its_mlp_loads(tmp_path):
    cfg = FinetuneConfig(strategy="prefix", prefix_length=2)
    model = prepare(SequenceClassifier(_backbone("gpt2"), 2), cfg)
    _train(model, steps=2)
    model.eval()
    expected = model(**_batch()).logits
    model.backbone.prefix_tuning.freeze()  # the reparameterisation MLP dropped after training
    assert "backbone.prefix_tuning.prefix" in save_adapter(model, str(tmp_path), cfg)
    fresh = load_adapter(SequenceClassifier(_backbone("gpt2"), 2), str(tmp_path)).eval()
    torch.testing.assert_close(fresh(**_batch()).logits, expected)


def _damaged_adapter(tmp_path, damage):
    cfg = FinetuneConfig(strategy="lora", lora_r=2)
    save_adapter(prepare(SequenceClassifier(_backbone("gpt2"), 2), cfg), str(tmp_path), cfg)
    weights, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    tensors, meta = load_file(str(weights)), json.loads(config.read_text())
    first = sorted(tensors)[0]
    if damage == "absent tensor":
        del tensors[first]
    elif damage == "int tensor":
        tensors[first] = tensors[first].to(torch.int32)
    elif damage == "nan tensor":
        tensors[first] = torch.full_like(tensors[first], float("nan"))
    elif damage == "config without base":
        del meta["base"]
    elif damage == "bad setting":
        meta["finetune"]["lora_r"] = "two"
    save_file(tensors, str(weights))
    config.write_text(json.dumps(meta))
    return str(tmp_path)


@pytest.mark.parametrize("damage, match", [
    ("absent tensor", r"absent \['backbone"), ("int tensor", "not a floating-point tensor"),
    ("nan tensor", "NaN or infinite"), ("config without base", "needs the objects 'finetune' and 'base'"),
    ("bad setting", "invalid fine-tuning settings")])
def test_load_adapter_refuses_damaged_files(tmp_path, damage, match):
    """A LoRA factor missing from the file would leave its init in the model: an error, as is
    any other damage, each naming what is wrong."""
    with pytest.raises(ValueError, match=match):
        load_adapter(SequenceClassifier(_backbone("gpt2"), 2), _damaged_adapter(tmp_path, damage))


@pytest.mark.parametrize("strategy", ["full", "lora", "int8_lora", "ia3", "bitfit"])
def test_merged_checkpoint_loads_without_adapter_code(tmp_path, strategy):
    from fastpt.finetune import load_merged, save_merged
    from fastpt.finetune.lora import LoraLayer
    from fastpt.finetune.peft_modules import IA3Linear
    model = prepare(SequenceClassifier(_backbone("gpt2"), 2, dropout=0.0),
                    FinetuneConfig(strategy=strategy, lora_r=2))
    _train(model, steps=2)
    model.eval()
    expected = model(**_batch()).logits
    save_merged(model, str(tmp_path))
    loaded = load_merged(str(tmp_path)).eval()
    assert not any(isinstance(m, (LoraLayer, IA3Linear)) for m in loaded.modules())
    tol = 5e-2 if strategy == "int8_lora" else 1e-5  # int8: merged onto the dequantized weight
    torch.testing.assert_close(loaded(**_batch()).logits, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("damage, match", [("truncate", "no readable task head"),
                                           ("no num_labels", "does not describe a SequenceClassifier"),
                                           ("head shape", "mis-shaped")])
def test_load_merged_refuses_a_damaged_head(tmp_path, damage, match):
    from fastpt.finetune import load_merged, save_merged
    save_merged(SequenceClassifier(_backbone("gpt2"), 2), str(tmp_path))
    head, meta_file = tmp_path / "head.safetensors", tmp_path / "head_config.json"
    if damage == "truncate":
        head.write_bytes(head.read_bytes()[:50])
    elif damage == "no num_labels":
        meta = json.loads(meta_file.read_text())
        del meta["num_labels"]
        meta_file.write_text(json.dumps(meta))
    else:
        save_file({n: torch.zeros(3, *t.shape[1:]) for n, t in load_file(str(head)).items()}, str(head))
    with pytest.raises(ValueError, match=match):
        load_merged(str(tmp_path))


def test_merged_checkpoint_refuses_unmergeable_strategies(tmp_path):
    from fastpt.finetune import save_merged
    for strategy in ("adapters", "prefix", "prompt"):
        model = prepare(SequenceClassifier(_backbone("gpt2"), 2), FinetuneConfig(strategy=strategy))
        with pytest.raises(ValueError, match="save_adapter"):
            save_merged(model, str(tmp_path / strategy))
