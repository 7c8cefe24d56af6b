"""Fine-tuning files: a save that fails half-way is never loaded mixed, an adapter file changes
only what its strategy trains, sizes are checked before anything is allocated, and bad
settings or result files raise errors that name the file and field."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastpt.finetune.save as save_mod
from fastpt.commands.finetune import load_finetuned
from fastpt.finetune import (FinetuneConfig, SequenceClassifier, TokenClassifier, load_adapter, load_merged,
                             prepare, save_adapter, save_merged)
from fastpt.models import Decoder, DecoderConfig

V = 120
HUGE = 10 ** 11  # tokens or labels: terabytes, were they allocated


def _backbone():
    torch.manual_seed(0)
    return Decoder(DecoderConfig.from_name("gpt2-tiny", vocab_size=V))


def _ids():
    return torch.randint(5, V, (2, 7), generator=torch.Generator().manual_seed(1))


def _adapter(path, seed=0, **settings):
    """A prepared classifier with trained-looking (random) tensors, saved to ``path``."""
    cfg = FinetuneConfig(**{"strategy": "lora", "lora_r": 2, **settings})
    model = prepare(SequenceClassifier(_backbone(), 2), cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(model, str(path), cfg)
    return model.eval()


def _edit(path, tensors=None, finetune=None):
    """Change the saved tensors or settings, rewriting the weights without the config digest
    (as an older fastpt wrote them): each check below must also hold without it."""
    weights, config = path / save_mod.WEIGHTS_FILE, path / save_mod.CONFIG_FILE
    t, meta = load_file(str(weights)), json.loads(config.read_text())
    t.update(tensors or {})
    meta["finetune"].update(finetune or {})
    save_file(t, str(weights))
    config.write_text(json.dumps(meta))


def _load(path):
    return load_adapter(SequenceClassifier(_backbone(), 2), str(path)).eval()


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


# -- D9: an adapter file changes only what the strategy trains ---------------------------------

def test_adapter_file_cannot_overwrite_frozen_base_weights(tmp_path):
    model = _adapter(tmp_path)
    frozen = next(n for n, p in model.named_parameters() if n.startswith("backbone.") and not p.requires_grad)
    _edit(tmp_path, tensors={frozen: torch.full_like(dict(model.named_parameters())[frozen], 9.0)})
    (tmp_path / save_mod.CONFIG_FILE).write_text(json.dumps({  # listed too: still not the file's to set
        **json.loads((tmp_path / save_mod.CONFIG_FILE).read_text()),
        "tensors": sorted(load_file(str(tmp_path / save_mod.WEIGHTS_FILE)))}))
    with pytest.raises(ValueError, match=rf"not trained by the strategy\) \['{frozen}'\]"):
        _load(tmp_path)


def test_adapter_tensors_must_be_the_ones_its_config_lists(tmp_path):
    _adapter(tmp_path)
    config = tmp_path / save_mod.CONFIG_FILE
    meta = json.loads(config.read_text())
    meta["tensors"] = meta["tensors"][1:]
    config.write_text(json.dumps(meta))
    save_file(load_file(str(tmp_path / save_mod.WEIGHTS_FILE)), str(tmp_path / save_mod.WEIGHTS_FILE))
    with pytest.raises(ValueError, match="does not hold the tensors that .* lists: absent \\[\\], not listed"):
        _load(tmp_path)


# -- D10: sizes are checked before they are allocated ------------------------------------------

@pytest.mark.parametrize("strategy, field", [("prompt", "num_virtual_tokens"), ("prefix", "prefix_length")])
def test_adapter_sizes_are_checked_against_the_file_before_allocating(tmp_path, strategy, field):
    _adapter(tmp_path, strategy=strategy, num_virtual_tokens=2, prefix_length=2)
    _edit(tmp_path, finetune={field: HUGE})
    with pytest.raises(ValueError, match=rf"finetune.{field} is {HUGE}, but the saved tensors hold \[2\]"):
        _load(tmp_path)


def test_prompt_init_text_outside_the_vocabulary_is_refused(tmp_path):
    _adapter(tmp_path, strategy="prompt", num_virtual_tokens=2)
    _edit(tmp_path, finetune={"prompt_init_text": [3, 10 ** 6]})
    with pytest.raises(ValueError, match=f"prompt_init_text has token ids >= the vocabulary size {V}"):
        _load(tmp_path)


def test_merged_head_sizes_are_checked_before_allocating(tmp_path):
    save_merged(SequenceClassifier(_backbone(), 3), str(tmp_path))
    meta_file = tmp_path / "head_config.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "num_labels": HUGE}))
    with pytest.raises(ValueError, match=rf"mis-shaped \[\('classifier.bias', \(3,\), \({HUGE},\)\)"):
        load_merged(str(tmp_path))


# -- D11: FinetuneConfig types -----------------------------------------------------------------

@pytest.mark.parametrize("settings, match", [
    ({"use_rslora": "false"}, "use_rslora must be true or false, got str"),
    ({"prefix_projection": 1}, "prefix_projection must be true or false, got int"),
    ({"target_modules": 5}, "target_modules must be None, 'all-linear', a module name or a list"),
    ({"target_modules": ["q_proj", 5]}, "target_modules must be"),
    ({"prompt_init_text": "hello"}, "prompt_init_text must be a list of token ids"),
    ({"prompt_init_text": [1, -2]}, "prompt_init_text must be a list of token ids"),
    ({"prompt_init_text": [True]}, "prompt_init_text must be a list of token ids"),
    ({"int8_threshold": "6"}, "int8_threshold must be a number")])
def test_finetune_config_checks_types(settings, match):
    with pytest.raises(TypeError, match=match):
        FinetuneConfig(**settings)


def test_finetune_config_accepts_every_documented_form():
    for target in (None, "all-linear", "q_proj", ["q_proj", "v_proj"], ("q_proj",)):
        assert FinetuneConfig(target_modules=target).target_modules == target
    cfg = FinetuneConfig(use_rslora=True, prefix_projection=False, prompt_init_text=[0, 5], int8_threshold=6)
    assert (cfg.use_rslora, cfg.prefix_projection, cfg.prompt_init_text, cfg.int8_threshold) == (True, False, [0, 5], 6)


def test_adapter_with_a_string_bool_setting_is_refused_naming_the_file(tmp_path):
    _adapter(tmp_path)
    _edit(tmp_path, finetune={"use_rslora": "false"})  # would have loaded with rsLoRA's scaling
    with pytest.raises(ValueError, match="adapter_config.json' has invalid fine-tuning settings: "
                                         "FinetuneConfig.use_rslora"):
        _load(tmp_path)


# -- D12: result files and dtypes --------------------------------------------------------------

def test_adapter_float8_tensor_is_refused_with_its_name(tmp_path):
    model = _adapter(tmp_path)
    name = next(n for n, p in model.named_parameters() if "lora_A" in n)
    _edit(tmp_path, tensors={name: load_file(str(tmp_path / save_mod.WEIGHTS_FILE))[name].to(torch.float8_e4m3fn)})
    with pytest.raises(ValueError, match=rf"tensor '{name}' .* is torch.float8_e4m3fn, not a floating-point"):
        _load(tmp_path)


GOOD_INFO = {"base": "/nowhere", "saved_as": "adapter", "labels": ["neg", "pos"], "pooling": "last",
             "max_length": 128}


@pytest.mark.parametrize("text, match", [
    (None, "not a fastpt finetune result \\(no finetune.json\\)"),
    ("{'saved_as': 1", "finetune.json: not readable JSON"),
    ("[]", "finetune.json: expected a JSON object, got list"),
    ("{}", "finetune.json: 'saved_as' must be 'merged' or 'adapter', got missing"),
    (json.dumps({**GOOD_INFO, "saved_as": "zip"}), "'saved_as' must be 'merged' or 'adapter', got 'zip'"),
    (json.dumps({**GOOD_INFO, "labels": []}), "'labels' must be a non-empty list of distinct labels"),
    (json.dumps({**GOOD_INFO, "labels": [["a"]]}), "'labels' must be a non-empty list"),
    (json.dumps({**GOOD_INFO, "max_length": "128"}), "'max_length' must be an integer >= 1, got '128'"),
    (json.dumps({**GOOD_INFO, "pooling": "max"}), "'pooling' must be one of"),
    (json.dumps({k: v for k, v in GOOD_INFO.items() if k != "base"}), "'base' must be the base model's folder")])
def test_load_finetuned_names_the_file_and_field(tmp_path, text, match):
    if text is not None:
        (tmp_path / "finetune.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_finetuned(str(tmp_path))


def test_load_finetuned_refuses_labels_that_do_not_fit_the_merged_model(tmp_path):
    save_merged(SequenceClassifier(_backbone(), 3), str(tmp_path))
    (tmp_path / "finetune.json").write_text(json.dumps({**GOOD_INFO, "saved_as": "merged"}))
    with pytest.raises(ValueError, match="'labels' has 2 labels, but the model .* num_labels 3"):
        load_finetuned(str(tmp_path))


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


# -- audit 5: an adapter loads only into the head it was saved from --------------------------

def _head_adapter(path, head, strategy="lora"):
    """``head`` prepared with ``strategy``, its trainable tensors moved off their init, saved."""
    model = prepare(head, FinetuneConfig(strategy=strategy, lora_r=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(model, str(path))
    return model.eval()


@pytest.mark.parametrize("saved, fresh, strategy, match", [
    (dict(pooling="mean"), dict(), "lora", "pooling 'mean', not this model's 'last'"),
    (dict(layer=1), dict(), "probe", "layer 1, not this model's -1"),
    (dict(layer="mix"), dict(layer=0), "probe", "layer 'mix', not this model's 0"),
    (dict(), "token", "lora", "class 'SequenceClassifier', not this model's 'TokenClassifier'")])
def test_adapter_refuses_a_head_of_another_class_pooling_or_layer(tmp_path, saved, fresh, strategy, match):
    _head_adapter(tmp_path, SequenceClassifier(_backbone(), 2, **saved), strategy)
    head = TokenClassifier(_backbone(), 3) if fresh == "token" else SequenceClassifier(_backbone(), 2, **fresh)
    with pytest.raises(ValueError, match=match):  # loaded silently before, giving other logits
        load_adapter(head, str(tmp_path))


def test_adapter_saved_before_the_head_was_recorded_still_loads(tmp_path):
    model = _head_adapter(tmp_path, SequenceClassifier(_backbone(), 2, pooling="mean"))
    config = tmp_path / save_mod.CONFIG_FILE
    meta = json.loads(config.read_text())
    assert meta["base"]["head"] == {"class": "SequenceClassifier", "pooling": "mean", "layer": -1}
    del meta["base"]["head"]
    config.write_text(json.dumps(meta))
    _edit(tmp_path)  # the weights without the digest, as that older fastpt wrote them
    loaded = load_adapter(SequenceClassifier(_backbone(), 2, pooling="mean"), str(tmp_path)).eval()
    torch.testing.assert_close(loaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits)


@pytest.mark.parametrize("make", [lambda b: SequenceClassifier(b, 2, pooling="mean", layer=1),
                                  lambda b: TokenClassifier(b, 3, layer="mix")])
def test_merged_head_keeps_its_class_pooling_layer_and_labels(tmp_path, make):
    model = make(_backbone()).eval()
    with torch.no_grad():
        if model.mix is not None:
            model.mix.weights.normal_()  # a mix other than the uniform init
    save_merged(model, str(tmp_path))
    loaded = load_merged(str(tmp_path)).eval()
    assert (type(loaded), loaded.num_labels, getattr(loaded, "pooling", None), loaded.layer) == \
        (type(model), model.num_labels, getattr(model, "pooling", None), model.layer)
    torch.testing.assert_close(loaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits)


# -- audit 5: JSON nested too deep, a head class that is not a name --------------------------

@pytest.mark.parametrize("name", [save_mod.CONFIG_FILE, save_mod.HEAD_CONFIG])
def test_json_nested_too_deep_is_refused_naming_the_file(tmp_path, name):
    if name == save_mod.CONFIG_FILE:
        _adapter(tmp_path)
    else:
        save_merged(SequenceClassifier(_backbone(), 2), str(tmp_path))
    (tmp_path / name).write_text("[" * 100000 + "]" * 100000)  # was a bare RecursionError
    with pytest.raises(ValueError, match=rf"{name}': not valid JSON: maximum recursion depth"):
        _load(tmp_path) if name == save_mod.CONFIG_FILE else load_merged(str(tmp_path))


def test_merged_head_class_must_be_a_name(tmp_path):
    save_merged(SequenceClassifier(_backbone(), 2), str(tmp_path))
    meta_file = tmp_path / save_mod.HEAD_CONFIG
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "class": ["x"]}))
    with pytest.raises(ValueError, match=r"head_config.json: 'class' must be the head's class name, one of "
                                         r"\['QuestionAnswering', .*got \['x'\]"):
        load_merged(str(tmp_path))  # was TypeError: unhashable type: 'list'


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
