"""Loading fine-tuning files: an adapter file changes only what its strategy trains and loads only
into its own head, sizes are checked before allocating, bad settings and files are named."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpt.finetune.save as save_mod
from fastpt.commands.finetune import load_finetuned
from fastpt.finetune import (FinetuneConfig, SequenceClassifier, TokenClassifier, load_adapter, load_merged,
                             prepare, save_adapter, save_merged)
from finetune_files_util import V, _adapter, _backbone, _ids, _load

HUGE = 10 ** 11  # tokens or labels: terabytes, were they allocated


def _edit(path, tensors=None, finetune=None):
    """Change the saved tensors or settings, rewriting the weights without the config digest
    (as an older fastpt wrote them): each check below must also hold without it."""
    weights, config = path / save_mod.WEIGHTS_FILE, path / save_mod.CONFIG_FILE
    t, meta = load_file(str(weights)), json.loads(config.read_text())
    t.update(tensors or {})
    meta["finetune"].update(finetune or {})
    save_file(t, str(weights))
    config.write_text(json.dumps(meta))


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
