"""Task heads: shapes and losses, prompt-masked labels, features from a lower layer or a mix of
layers, and (audit 4) a task head that trains only what it runs."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastpt.finetune import (FinetuneConfig, QuestionAnswering, SequenceClassifier, TokenClassifier, load_adapter,
                             prepare, prompt_masked_labels, save_adapter)
from fastpt.finetune.heads import features
from fastpt.finetune.lora import LoraLayer
from finetune_util import V, _backbone, _batch, _train


def test_heads_shapes_and_losses():
    batch = _batch()
    enc = _backbone("bert")
    F = torch.nn.functional
    tok = TokenClassifier(enc, 5).eval()
    token_labels = torch.full((4, 9), -100).index_fill(1, torch.tensor([2]), 1)
    out = tok(batch["input_ids"], batch["attention_mask"], labels=token_labels)
    assert out.logits.shape == (4, 9, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.flatten(0, 1), token_labels.flatten()))
    qa = QuestionAnswering(_backbone("llama"))
    start, end = torch.tensor([1, 2, 3, 4]), torch.tensor([2, 3, 4, 5])
    out = qa(batch["input_ids"], batch["attention_mask"], start_positions=start, end_positions=end)
    assert out.logits.shape == (4, 9, 2)
    torch.testing.assert_close(out.loss, (F.cross_entropy(out.logits[..., 0], start)
                                          + F.cross_entropy(out.logits[..., 1], end)) / 2)
    assert (out.logits[0, -3:] < -1e30).all()  # padding is never an answer
    reg = SequenceClassifier(_backbone("bert"), 1, pooling="mean", dropout=0.0)
    targets = torch.rand(4)
    out = reg(batch["input_ids"], batch["attention_mask"], labels=targets)
    assert out.logits.shape == (4, 1)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), targets))  # regression: MSE
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassifier(enc, 2, pooling="max")


def test_prompt_masked_labels_keep_the_real_eos_when_pad_is_eos():
    eos = 7
    b = prompt_masked_labels([[1, 2, 3], [4]], [[5], [6, 8]], pad_id=eos, eos_id=eos)
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 7], [4, 6, 8, 7, 7]]
    assert b["labels"].tolist() == [[-100, -100, -100, 5, 7], [-100, 6, 8, 7, -100]]
    assert b["attention_mask"].tolist() == [[True] * 5, [True] * 4 + [False]]


def test_layer_mix_features_train_in_a_probe():
    head = SequenceClassifier(_backbone("bert"), 2, layer="mix", dropout=0.0)
    model = prepare(head, FinetuneConfig(strategy="probe"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"mix.weights", "mix.gamma"} <= trainable
    assert not any(n.startswith("backbone.") for n in trainable)
    _train(model, steps=2)
    assert not torch.equal(model.mix.weights.detach(), torch.zeros(3))
    with pytest.raises(ValueError, match="layer must be"):
        SequenceClassifier(_backbone("bert"), 2, layer="last")


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("layer", [0, 1, -2])
def test_features_of_a_lower_layer_run_only_the_layers_below(kind, layer):
    backbone = _backbone(kind)
    assert backbone.config.num_layers == 2
    head = SequenceClassifier(backbone, 2, layer=layer, dropout=0.0).eval()
    batch = _batch()
    calls = []
    hooks = [m.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, m in enumerate(backbone.layers)]
    head(batch["input_ids"], batch["attention_mask"])
    for h in hooks:
        h.remove()
    assert calls == list(range(layer % 3))
    # The features equal that layer's hidden state in a run of the whole backbone.
    with torch.no_grad():
        want = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True).hidden_states[layer]
        got = features(backbone, batch["input_ids"], batch["attention_mask"], layer=layer)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["full", "lora", "bitfit", "ia3"])
def test_layers_above_the_features_layer_stay_frozen(strategy):
    head = SequenceClassifier(_backbone("gpt2"), 2, layer=1, dropout=0.0)
    model = prepare(head, FinetuneConfig(strategy=strategy, lora_r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not {n for n in trainable if n.startswith(("backbone.layers.1.", "backbone.final_norm."))}
    assert {n for n in trainable if n.startswith("backbone.layers.0.")}
    assert "backbone.embed_tokens.weight" in trainable or strategy != "full"  # tied to the unused LM head
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model)
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"


def test_a_features_layer_outside_the_model_is_refused():
    for layer in (3, -4, 1.0, True):
        with pytest.raises(ValueError, match=r"layer must be 'mix' or an int in \[-3, 2\]"):
            SequenceClassifier(_backbone("bert"), 2, layer=layer)
    decoder = _backbone("llama")
    ids = _batch()["input_ids"]
    with pytest.raises(ValueError, match=r"num_layers must be an int in \[0, 2\]"):
        decoder(input_ids=ids, num_layers=3)
    with pytest.raises(ValueError, match="num_layers=1 runs part of the model"):
        decoder(input_ids=ids, labels=ids, num_layers=1)
    with pytest.raises(ValueError, match="num_layers=1 runs part of the model"):
        decoder(input_ids=ids, use_cache=True, num_layers=1)
    assert decoder(input_ids=ids, num_layers=1).logits is None


# -- audit 4 F3: a task head trains only what it runs ----------------------------------------

@pytest.mark.parametrize("head", ["sequence", "token"])
@pytest.mark.parametrize("strategy", ["bitfit", "lora", "partial"])
def test_task_head_on_an_encoder_trains_nothing_it_never_uses(head, strategy, capsys):
    from fastpt.finetune import print_trainable_parameters
    if head == "sequence":  # [CLS] through BERT's pooler
        model, labels = SequenceClassifier(_backbone("bert"), 2), torch.tensor([0, 1, 1, 0])
    else:  # no pooler
        model, labels = TokenClassifier(_backbone("bert"), 3), torch.zeros(4, 9, dtype=torch.long)
    model = prepare(model, FinetuneConfig(strategy=strategy, lora_r=2, target_modules="all-linear"))
    model(**{**_batch(), "labels": labels}).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert [n for n, p in trainable.items() if p.grad is None] == []
    assert not any(n.startswith(("backbone.mlm_head", "backbone.nsp_head")) for n in trainable)
    if strategy == "lora":  # all-linear wraps the pooler when the head reads it, as PEFT does
        assert isinstance(model.backbone.pooler, LoraLayer) == (head == "sequence")
    assert print_trainable_parameters(model) is None  # prints, as PEFT's, and returns nothing
    assert f"trainable params: {sum(p.numel() for p in trainable.values()):,} " in capsys.readouterr().out


def test_lora_targets_only_in_unused_modules_are_refused():
    with pytest.raises(ValueError, match="never uses"):
        prepare(SequenceClassifier(_backbone("bert"), 2),
                FinetuneConfig(strategy="lora", lora_r=2, target_modules=["nsp_head"]))


def test_all_linear_adapter_saved_before_the_pooler_was_targeted_still_loads(tmp_path):
    """"all-linear" now wraps the pooler a cls-pooled head reads; an adapter saved before holds
    no pooler LoRA: it loads with the pooler's factors at init (B = 0), its outputs unchanged."""
    cfg = FinetuneConfig(strategy="lora", lora_r=2, target_modules="all-linear")
    model = prepare(SequenceClassifier(_backbone("bert"), 2), cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".pooler." not in name:
                p.normal_()  # as trained; the pooler's B stays 0, as it was absent
    save_adapter(model, str(tmp_path))
    weights, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    tensors, meta = load_file(str(weights)), json.loads(config.read_text())
    tensors = {n: t for n, t in tensors.items() if ".pooler.lora_" not in n}
    assert len(tensors) < len(meta["tensors"])  # the pooler's factors were there
    meta["tensors"] = sorted(tensors)
    save_file(tensors, str(weights))  # as an older fastpt wrote it: no config digest
    config.write_text(json.dumps(meta))
    fresh = load_adapter(SequenceClassifier(_backbone("bert"), 2), str(tmp_path)).eval()
    torch.testing.assert_close(fresh(**_batch()).logits, model(**_batch()).logits)
    del tensors["backbone.layers.0.attn.q_proj.lora_A.default.weight"]  # any other: refused
    save_file(tensors, str(weights))
    meta["tensors"] = sorted(tensors)
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="absent"):
        load_adapter(SequenceClassifier(_backbone("bert"), 2), str(tmp_path))


def test_adapter_saved_with_the_unused_heads_trained_still_loads(tmp_path):
    """fastpt used to train (and save) BitFit's biases of BERT's MLM and NSP heads under a task
    head: they never changed its output, so such a file loads, without them."""
    cfg = FinetuneConfig(strategy="bitfit")
    model = prepare(SequenceClassifier(_backbone("bert"), 2), cfg).eval()
    save_adapter(model, str(tmp_path))
    weights, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    tensors, meta = load_file(str(weights)), json.loads(config.read_text())
    tensors["backbone.mlm_head.bias"] = torch.randn(V)
    meta["tensors"] = sorted(tensors)
    save_file(tensors, str(weights))  # as an older fastpt wrote it: no config digest
    config.write_text(json.dumps(meta))
    fresh = load_adapter(SequenceClassifier(_backbone("bert"), 2), str(tmp_path)).eval()
    torch.testing.assert_close(fresh(**_batch()).logits, model(**_batch()).logits)
