"""Fine-tuning saves: one that fails half-way is never loaded mixed, save_merged leaves the model as
it was, save_adapter saves the model's own config and adapter, and nothing a loader refuses."""

import json

import pytest
import torch
from safetensors import safe_open

import fastpt.finetune.save as save_mod
from fastpt.finetune import FinetuneConfig, SequenceClassifier, load_merged, prepare, save_adapter, save_merged
from fastpt.models import Decoder
from finetune_files_util import _adapter, _backbone, _ids, _load


def _fail_writing(monkeypatch, name):
    """Make the atomic write of the file ``name`` fail, as a full disk would."""
    real = save_mod.atomic_write

    def write(path, fn):
        if str(path).endswith(name):
            raise OSError(28, "No space left on device (simulated)")
        return real(path, fn)
    monkeypatch.setattr(save_mod, "atomic_write", write)


# -- D6: an adapter's config and weights are one save ------------------------------------------

def test_adapter_save_that_fails_half_way_is_refused_not_loaded_mixed(tmp_path, monkeypatch):
    old = _adapter(tmp_path, seed=1, lora_alpha=16.0)
    _fail_writing(monkeypatch, save_mod.WEIGHTS_FILE)  # the first file: the old pair stays
    with pytest.raises(OSError, match=r"No space left on device \(simulated\)"):
        _adapter(tmp_path, seed=2, lora_alpha=64.0)
    torch.testing.assert_close(_load(tmp_path)(input_ids=_ids()).logits, old(input_ids=_ids()).logits)
    monkeypatch.undo()
    monkeypatch.setattr(save_mod, "atomic_write_json", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError, match="full"):  # the second file: new weights beside the old config
        _adapter(tmp_path, seed=2, lora_alpha=64.0)
    with pytest.raises(ValueError, match="adapter_config.json' is not the config saved with"):
        _load(tmp_path)


def test_adapter_config_edited_after_saving_is_refused_but_reformatting_is_not(tmp_path):
    model = _adapter(tmp_path)
    config = tmp_path / save_mod.CONFIG_FILE
    meta = json.loads(config.read_text())
    config.write_text(json.dumps(meta, indent=4))  # same content, other layout: still this adapter
    torch.testing.assert_close(_load(tmp_path)(input_ids=_ids()).logits, model(input_ids=_ids()).logits)
    meta["finetune"]["lora_alpha"] = 32.0  # shapes unchanged: only the digest can tell
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is not the config saved with"):
        _load(tmp_path)


def test_adapter_config_digest_is_in_the_weights_metadata_not_the_config(tmp_path):
    """adapter_config.json gains no key PEFT does not know; the weights say "pt" as PEFT's do."""
    _adapter(tmp_path)
    assert set(json.loads((tmp_path / save_mod.CONFIG_FILE).read_text())) == {"finetune", "base", "tensors"}
    with safe_open(str(tmp_path / save_mod.WEIGHTS_FILE), framework="pt") as f:
        assert set(f.metadata() or {}) == {"format", "fastpt_adapter_config_sha256"}


# -- D8: a merged save replaces the whole set of files -----------------------------------------

def test_merged_model_without_head_replaces_an_older_one_with_a_head(tmp_path):
    save_merged(SequenceClassifier(_backbone(), 3), str(tmp_path))
    save_merged(_backbone(), str(tmp_path))
    assert type(load_merged(str(tmp_path))) is Decoder


def test_merged_save_that_fails_half_way_is_refused(tmp_path, monkeypatch):
    save_merged(SequenceClassifier(_backbone(), 3), str(tmp_path))
    old_head = {n: (tmp_path / n).read_bytes() for n in ("head_config.json", "head.safetensors")}
    plain = _backbone()
    with torch.no_grad():
        plain.final_norm.weight.mul_(2)
    save_merged(plain, str(tmp_path))
    for name, data in old_head.items():  # as if the process died before removing the old head
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match="was saved with other model.safetensors"):
        load_merged(str(tmp_path))
    _fail_writing(monkeypatch, "head.safetensors")  # a new head model, its head never written
    with torch.no_grad():
        plain.final_norm.weight.mul_(2)
    with pytest.raises(OSError, match=r"No space left on device \(simulated\)"):
        save_merged(SequenceClassifier(plain, 3), str(tmp_path))
    with pytest.raises(ValueError, match="was saved with other"):
        load_merged(str(tmp_path))


# -- audit 4 F1: save_merged leaves the model it saves as it was -----------------------------

def _steps(model, n):
    """n SGD steps on one batch (eval mode: no dropout, so two runs can be compared bit for bit)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    labels = torch.tensor([0, 1])
    for _ in range(n):
        opt.zero_grad()
        model(_ids(), labels=labels).loss.backward()
        opt.step()


def _trained(strategy):
    model = prepare(SequenceClassifier(_backbone(), 2), FinetuneConfig(strategy=strategy, lora_r=2)).eval()
    _steps(model, 1)  # the LoRA B factors leave zero: the fold has something to fold
    return model


@pytest.mark.parametrize("strategy, merged", [("lora", False), ("lora", True), ("int8_lora", False),
                                              ("ia3", False)])
def test_save_merged_leaves_the_model_training_as_without_it(tmp_path, strategy, merged):
    from fastpt.finetune import merge
    saved, untouched = _trained(strategy), _trained(strategy)
    if merged:  # merged by the caller: it stays merged, with the very same weights
        merge(saved)
        merge(untouched)
    expected = saved(_ids()).logits
    modules = [type(m) for m in saved.modules()]
    trainable = [n for n, p in saved.named_parameters() if p.requires_grad]
    save_merged(saved, str(tmp_path))
    assert [type(m) for m in saved.modules()] == modules
    assert [n for n, p in saved.named_parameters() if p.requires_grad] == trainable
    after, before = saved.state_dict(), untouched.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)
    tol = 5e-2 if strategy == "int8_lora" else 1e-5  # int8: merged onto the dequantized weight
    torch.testing.assert_close(load_merged(str(tmp_path)).eval()(_ids()).logits, expected, atol=tol, rtol=tol)
    _steps(saved, 3)
    _steps(untouched, 3)
    after, before = saved.state_dict(), untouched.state_dict()
    changed = [n for n in before if not torch.equal(after[n], before[n])]
    assert not changed, f"training after save_merged differs from training without it: {changed}"


# -- audit 4 F2: save_adapter saves the config the model was prepared with -------------------

def test_save_adapter_refuses_a_config_other_than_the_models(tmp_path):
    prepared_with = FinetuneConfig(strategy="lora", lora_r=4, lora_alpha=32.0, use_rslora=True)
    model = prepare(SequenceClassifier(_backbone(), 2), prepared_with)
    with pytest.raises(ValueError, match=r"lora_alpha is 16.0, prepared with 32.0; use_rslora is False"):
        save_adapter(model, str(tmp_path), FinetuneConfig(strategy="lora", lora_r=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    expected = model.eval()(_ids()).logits
    save_adapter(model, str(tmp_path))  # no config: the one the model was prepared with
    torch.testing.assert_close(_load(tmp_path)(_ids()).logits, expected)


def test_save_adapter_checks_a_config_against_lora_layers_added_by_hand(tmp_path):
    from fastpt.finetune import add_lora
    model = SequenceClassifier(_backbone(), 2)
    add_lora(model.backbone, r=4, alpha=32.0, use_rslora=True)  # nothing recorded on the model
    with pytest.raises(ValueError, match=r"scaling .* config gives 4.0, the layer has 16.0"):
        save_adapter(model, str(tmp_path), FinetuneConfig(strategy="lora", lora_r=4))
    with pytest.raises(ValueError, match="pass config="):
        save_adapter(model, str(tmp_path))
    save_adapter(model, str(tmp_path), FinetuneConfig(strategy="lora", lora_r=4, lora_alpha=32.0, use_rslora=True))


def test_save_adapter_saves_the_active_or_the_named_one_of_several_adapters(tmp_path):
    """save_adapter wrote the active adapter's factors under its own name ("b"), which
    load_adapter (which builds PEFT's "default") refused as unknown tensors, with the settings
    of the adapter prepare added."""
    from fastpt.finetune import add_lora, set_adapter
    model = prepare(SequenceClassifier(_backbone(), 2), FinetuneConfig(strategy="lora", lora_r=2))
    add_lora(model.backbone, "b", r=4, alpha=8.0, use_rslora=True, target_modules="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    out_b = model.eval()(_ids()).logits
    names = save_adapter(model, str(tmp_path / "b"))  # the active adapter: "b"
    assert any(".lora_A.default." in n for n in names) and not any(".lora_A.b." in n for n in names)
    meta = json.loads((tmp_path / "b" / save_mod.CONFIG_FILE).read_text())
    assert meta["adapter_name"] == "b"
    assert (meta["finetune"]["lora_r"], meta["finetune"]["use_rslora"]) == (4, True)
    assert meta["finetune"]["lora_alpha"] == pytest.approx(8.0)
    torch.testing.assert_close(_load(tmp_path / "b")(_ids()).logits, out_b)
    set_adapter(model.backbone, "default")
    out_default = model(_ids()).logits
    assert not torch.allclose(out_default, out_b)
    save_adapter(model, str(tmp_path / "default"))
    torch.testing.assert_close(_load(tmp_path / "default")(_ids()).logits, out_default)
    save_adapter(model, str(tmp_path / "b_by_name"), adapter_name="b")  # not the active one
    torch.testing.assert_close(_load(tmp_path / "b_by_name")(_ids()).logits, out_b)
    with pytest.raises(ValueError, match=r"no LoRA adapter named 'c'; the model's adapters: \['b', 'default'\]"):
        save_adapter(model, str(tmp_path / "c"), adapter_name="c")
    probe = prepare(SequenceClassifier(_backbone(), 2), FinetuneConfig(strategy="probe"))
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        save_adapter(probe, str(tmp_path / "probe"), adapter_name="default")


# -- audit 5: the savers never write what their loaders refuse -------------------------------

def test_save_adapter_refuses_a_nan_tensor_before_writing(tmp_path):
    model = prepare(SequenceClassifier(_backbone(), 2), FinetuneConfig(strategy="lora", lora_r=2))
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="tensor 'classifier.weight' of the model to save has NaN or infinite"):
        save_adapter(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tensor", ["classifier.bias", "backbone.final_norm.weight"])
def test_save_merged_refuses_a_nan_tensor_before_writing(tmp_path, tensor):
    model = SequenceClassifier(_backbone(), 2)
    with torch.no_grad():
        dict(model.named_parameters())[tensor][0] = float("inf")
    with pytest.raises(ValueError, match=rf"tensor '{tensor}' of the model to save has NaN or infinite"):
        save_merged(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_save_adapter_config_must_be_a_finetune_config(tmp_path):
    model = prepare(SequenceClassifier(_backbone(), 2), FinetuneConfig(strategy="lora", lora_r=2))
    with pytest.raises(TypeError, match="save_adapter's config must be a FinetuneConfig, got dict"):
        save_adapter(model, str(tmp_path), {"strategy": "lora"})  # was an AttributeError
