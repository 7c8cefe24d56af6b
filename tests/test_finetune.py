"""Fine-tuning strategies: what each trains, LoRA merge/unmerge and adapters, save/load,
heads, prompt masks, and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastpt.finetune import (STRATEGIES, FinetuneConfig, QuestionAnswering, SequenceClassifier,
                             TokenClassifier, add_lora, count_parameters, disable_adapter,
                             load_adapter, merge, merge_and_unload, prepare, prompt_masked_labels,
                             save_adapter, set_adapter, unmerge)
from fastpt.finetune.heads import features
from fastpt.finetune.lora import LoraLayer
from fastpt.models import Decoder, DecoderConfig, Encoder, EncoderConfig
from fastpt.train import enable_activation_checkpointing

V = 120


def _backbone(kind):
    torch.manual_seed(0)
    if kind == "bert":
        return Encoder(EncoderConfig.from_name("bert-tiny", vocab_size=V, dropout=0.0, attention_dropout=0.0))
    return Decoder(DecoderConfig.from_name(f"{kind}-tiny", vocab_size=V))


def _batch(B=4, T=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -3:] = False
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])[:B]}


def _train(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(steps):
        loss = model(**_batch()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


EXPECTED_TRAINABLE = {  # substrings of trainable parameter names (besides the head)
    "full": None, "partial": None, "probe": "", "lora": "lora_", "int8_lora": "lora_",
    "adapters": "adapter.", "prefix": "prefix_tuning", "prompt": "prompt.", "ia3": "ia3_l",
    "bitfit": "bias",
}


# Not applicable, and tested as errors below: prefix tuning of an encoder, BitFit on Llama.
CASES = [(k, s) for s in STRATEGIES for k in ("bert", "gpt2", "llama")
         if (k, s) not in {("bert", "prefix"), ("llama", "bitfit")}]


@pytest.mark.parametrize("kind,strategy", CASES)
def test_each_strategy_trains_only_its_parameters(kind, strategy):
    head = SequenceClassifier(_backbone(kind), 2, dropout=0.0)
    model = prepare(head, FinetuneConfig(strategy=strategy, freeze_layers=1, lora_r=4,
                                         num_virtual_tokens=3, prefix_length=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "classifier" in n}, "the task head must train"
    pattern = EXPECTED_TRAINABLE[strategy]
    if pattern is not None:
        others = {n for n in trainable if "classifier" not in n}
        assert all(pattern in n for n in others), sorted(others)
        assert bool(others) == (strategy != "probe")
    if strategy == "partial":  # embeddings and the first layer frozen, the rest trains
        assert not any(n.startswith(("backbone.embed", "backbone.layers.0.")) for n in trainable)
        assert all(n in trainable for n, _ in model.named_parameters() if ".layers.1." in n)
    _train(model)
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)


def test_strategy_errors_are_clear():
    with pytest.raises(ValueError, match="has none"):
        prepare(SequenceClassifier(_backbone("llama"), 2), FinetuneConfig(strategy="bitfit"))
    with pytest.raises(TypeError, match="prefix tuning"):
        prepare(SequenceClassifier(_backbone("bert"), 2), FinetuneConfig(strategy="prefix"))
    with pytest.raises(ValueError, match=r"not found; this model's linear layers are named .*q_proj"):
        prepare(SequenceClassifier(_backbone("llama"), 2), FinetuneConfig(strategy="lora", target_modules=["query"]))
    with pytest.raises(ValueError, match="rank r=999"):
        prepare(SequenceClassifier(_backbone("llama"), 2), FinetuneConfig(strategy="lora", lora_r=999))
    with pytest.raises(ValueError, match="unknown strategy"):
        FinetuneConfig(strategy="qlora")
    with pytest.raises(ValueError, match=r"token ids \[10000\] outside this model's vocabulary"):
        prepare(SequenceClassifier(_backbone("llama"), 2),
                FinetuneConfig(strategy="prompt", prompt_init_text=[1, 10000]))
    with pytest.raises(ValueError, match="freeze_layers=5"):
        prepare(SequenceClassifier(_backbone("bert"), 2), FinetuneConfig(strategy="partial", freeze_layers=5))


@pytest.mark.parametrize("field,value,error,match", [
    ("lora_alpha", -1.0, ValueError, "lora_alpha must be a finite number > 0"),
    ("lora_alpha", float("nan"), ValueError, "lora_alpha must be a finite number > 0"),
    ("lora_dropout", -0.5, ValueError, r"lora_dropout must be in \[0, 1\)"),
    ("lora_dropout", 1.0, ValueError, r"lora_dropout must be in \[0, 1\)"),
    ("lora_r", 2.0, TypeError, "lora_r must be an int"),
    ("lora_r", "8", TypeError, "lora_r must be an int"),
])
def test_lora_hyperparameters_are_checked_when_configured(field, value, error, match):
    with pytest.raises(error, match=match):
        FinetuneConfig(strategy="lora", **{field: value})


def test_add_lora_checks_its_arguments_and_takes_one_module_name():
    model = _backbone("llama")
    with pytest.raises(ValueError, match="lora_alpha"):
        add_lora(model, alpha=-16)
    with pytest.raises(ValueError, match="lora_dropout"):
        add_lora(model, dropout=1.5)
    with pytest.raises(TypeError, match="rank r must be an int"):
        add_lora(model, r=2.0)
    with pytest.raises(ValueError, match=r"rank r=999 .* layer .*q_proj"):
        add_lora(model, r=999)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # refused before wrapping
    with pytest.raises(ValueError, match="target_modules is empty"):
        add_lora(model, target_modules=[])
    with pytest.raises(TypeError, match="target_modules must be None, 'all-linear', a module name or a list"):
        add_lora(model, target_modules=5)  # was "'int' object is not iterable"
    with pytest.raises(TypeError, match="adapter name must be a non-empty string"):
        add_lora(model, 5)  # was torch's "module name should be a string"
    one = add_lora(_backbone("llama"), target_modules="q_proj")  # as PEFT: one name, not letters
    assert one and all(path.endswith("q_proj") for path in one)


def test_lora_merge_unmerge_and_disable():
    model = _backbone("llama")
    ids = _batch()["input_ids"]
    base_out = model(input_ids=ids).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, r=4, target_modules="all-linear")
    for m in model.modules():
        if isinstance(m, LoraLayer):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    lora_out = model(input_ids=ids).logits
    assert not torch.allclose(lora_out, base_out)
    with disable_adapter(model):
        torch.testing.assert_close(model(input_ids=ids).logits, base_out)
    merge(model)
    torch.testing.assert_close(model(input_ids=ids).logits, lora_out, atol=1e-5, rtol=1e-5)
    unmerge(model)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            torch.testing.assert_close(p, weights[n.replace(".base_layer", "")], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(input_ids=ids).logits, lora_out, atol=1e-5, rtol=1e-5)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(input_ids=ids).logits, lora_out, atol=1e-5, rtol=1e-5)


def test_several_named_adapters():
    model = _backbone("gpt2")
    add_lora(model, "a", r=2, target_modules=["q_proj", "v_proj"])
    add_lora(model, "b", r=3, target_modules=["q_proj", "v_proj"])
    set_adapter(model, "b")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n for n in trainable)
    with pytest.raises(ValueError, match=r"no adapter named 'c'; adapters: \['a', 'b'\]"):
        set_adapter(model, "c")


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _assert_base_weights(model, expected, *names):
    """Each LoRA layer's base weight is the original plus the current deltas of ``names``, to
    float rounding (1e-6 relative to the largest of the weight and the deltas)."""
    for path, m in _lora_layers(model).items():
        deltas = [m.delta_weight(n) for n in names]
        want = expected[path + ".weight"] + sum(deltas)
        scale = max([1.0] + [float(t.abs().max()) for t in [want] + deltas])
        torch.testing.assert_close(m.base_layer.weight, want, rtol=0, atol=1e-6 * scale,
                                   msg=lambda text, path=path: f"{path}: {text}")


def _two_adapters():
    model = _backbone("llama")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, "a", r=2, target_modules="all-linear")
    add_lora(model, "b", r=3, target_modules="all-linear")
    for m in _lora_layers(model).values():
        for name in ("a", "b"):
            torch.nn.init.normal_(m.lora_B[name].weight, std=0.1)
    return model, weights


def test_unmerge_restores_the_base_after_adapters_change_while_merged():
    """Two adapters merged one after the other (set_adapter in between, merge twice), then new
    factors loaded for both while merged: forward and merge follow them, and unmerge takes
    out what is in the weights, so the base weights come back (it subtracted the new deltas)."""
    model, weights = _two_adapters()
    ids = _batch()["input_ids"]
    set_adapter(model, "a")
    merge(model)
    set_adapter(model, "b")           # a stays merged, b runs on top of it
    _assert_base_weights(model, weights, "a")
    merge(model)
    merge(model)                      # twice: merged once
    _assert_base_weights(model, weights, "a", "b")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in state.items():        # the model's own (merged) state, new factors in it
        if ".lora_B.a." in k or ".lora_A.b." in k:
            torch.nn.init.normal_(v, std=0.2)
    model.load_state_dict(state)
    model(input_ids=ids)              # forward follows the loaded factors
    _assert_base_weights(model, weights, "a", "b")
    set_adapter(model, "a")
    merge(model)                      # already merged: still once
    _assert_base_weights(model, weights, "a", "b")
    unmerge(model)
    _assert_base_weights(model, weights)
    assert all(not m.merged and not m._merged_factors for m in _lora_layers(model).values())


def test_unmerge_restores_the_base_after_a_merged_adapter_is_reloaded_unseen():
    """New factors for a merged adapter, and no forward before unmerge."""
    model, weights = _two_adapters()
    merge(model)                      # b, the newest
    for m in _lora_layers(model).values():
        with torch.no_grad():
            m.lora_A["b"].weight.copy_(torch.randn_like(m.lora_A["b"].weight))
    unmerge(model)
    _assert_base_weights(model, weights)


def test_merge_and_unload_folds_the_current_factors_of_a_merged_adapter():
    """Factors changed while merged: merge_and_unload folds them, as forward runs them (it
    kept the delta merged before)."""
    import copy
    model = _backbone("llama")
    add_lora(model, r=4, target_modules="all-linear")
    for m in _lora_layers(model).values():
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    unmerged = copy.deepcopy(model)
    merge(model)
    new = {k: torch.randn_like(v) * 0.1 for k, v in model.state_dict().items() if "lora_" in k}
    model.load_state_dict(new, strict=False)
    unmerged.load_state_dict(new, strict=False)
    ids = _batch()["input_ids"]
    expected = unmerged(input_ids=ids).logits
    plain = merge_and_unload(model)
    assert not _lora_layers(plain)
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_another_merged_state_dict_loads_into_merged_lora_layers():
    """A merged model's state dict, loaded into another merged model: its weights come with
    their own factors (as before remembering the merged factors: a guard)."""
    target, _ = _two_adapters()
    torch.manual_seed(5)
    source, source_weights = _two_adapters()
    for m in _lora_layers(source).values():
        torch.nn.init.normal_(m.lora_A["b"].weight)
    merge(target)
    merge(source)
    target.load_state_dict(source.state_dict())
    ids = _batch()["input_ids"]
    torch.testing.assert_close(target(input_ids=ids).logits, source(input_ids=ids).logits)
    unmerge(target)
    _assert_base_weights(target, source_weights)


def test_int8_base_runs_the_active_adapter_on_top_of_a_merged_one():
    """Int8Linear base, adapter a merged and b active: forward is the dequantized weight with
    both deltas, as with an nn.Linear base and as merge_and_unload folds it (it dropped a)."""
    from fastpt.nn import Int8Linear
    torch.manual_seed(0)
    m = LoraLayer(Int8Linear.from_linear(torch.nn.Linear(32, 16)))
    for name in ("a", "b"):
        m.add_adapter(name, 4, 8.0, 0.0, False)
        torch.nn.init.normal_(m.lora_B[name].weight)
    x = torch.randn(3, 32)
    m.active = "a"
    m.merge("a")
    m.active = "b"
    w = m.base_layer.dequantized_weight() + m.delta_weight("a") + m.delta_weight("b")
    torch.testing.assert_close(m(x), torch.nn.functional.linear(x, w, m.base_layer.bias))


def test_int8_lora_holds_int8_weights_and_counts_logical_parameters():
    head = SequenceClassifier(_backbone("llama"), 2)
    total_fp = count_parameters(head)["total"]
    model = prepare(head, FinetuneConfig(strategy="int8_lora", target_modules="all-linear", lora_r=2))
    counts = count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert counts["total"] == total_fp + lora
    _train(model, steps=1)


def test_gradient_checkpointing_with_lora():
    def grads(checkpointed):
        torch.manual_seed(1)
        model = prepare(SequenceClassifier(_backbone("llama"), 2, dropout=0.0), FinetuneConfig(strategy="lora"))
        with torch.no_grad():  # B = 0 at init: the gradient of A would be 0 either way
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        if checkpointed:
            assert enable_activation_checkpointing(model) == len(model.backbone.layers)
        model(**_batch()).loss.backward()  # frozen inputs + checkpointing must still reach LoRA
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and any("lora_A" in n for n in plain)
    for n, g in checkpointed.items():
        assert g is not None and float(g.abs().max()) > 0, n
        torch.testing.assert_close(g, plain[n], msg=n)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("adapter_kind, per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_bottleneck_adapters_sit_where_their_kind_puts_them_and_start_near_identity(kind, adapter_kind, per_layer):
    """Houlsby: two adapters per layer (after attention and after the FFN); Pfeiffer: one,
    after the FFN. Their near-zero init leaves the model's output almost unchanged."""
    from fastpt.finetune.peft_modules import WithAdapter
    base = SequenceClassifier(_backbone(kind), 2, dropout=0.0).eval()
    expected = base(**_batch()).logits.detach()
    model = prepare(base, FinetuneConfig(strategy="adapters", adapter_kind=adapter_kind)).eval()
    for layer in model.backbone.layers:
        wrapped = [n for n, m in layer.named_modules() if isinstance(m, WithAdapter)]
        assert len(wrapped) == per_layer, wrapped
        if per_layer == 1:  # the FFN's, not the attention's
            assert not any("att" in n for n in wrapped), wrapped
    out = model(**_batch()).logits.detach()
    assert float((out - expected).abs().max()) < 1e-3 * float(expected.abs().max())


@pytest.mark.parametrize("init_text", [[7, 8], []])
def test_prompt_tuning_starts_from_vocabulary_embeddings(init_text):
    """The soft prompt's rows are copies of token embeddings: the given ids, repeated to the
    prompt's length, or random vocabulary rows."""
    from fastpt.finetune.prompt_tuning import token_embedding
    config = FinetuneConfig(strategy="prompt", num_virtual_tokens=5, prompt_init_text=init_text)
    model = prepare(SequenceClassifier(_backbone("gpt2"), 2), config)
    vocab = token_embedding(model.model.backbone).weight.detach()
    prompt = next(p for n, p in model.named_parameters() if n.endswith("prompt.embeddings")).detach()
    assert prompt.shape == (5, vocab.shape[1])
    if init_text:
        torch.testing.assert_close(prompt, vocab[[7, 8, 7, 8, 7]], rtol=0, atol=0)
    else:
        for row in prompt:
            assert (vocab == row).all(1).any()


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


def test_prefix_tuning_generates_with_a_kv_cache():
    cfg = FinetuneConfig(strategy="prefix", prefix_length=3)
    model = prepare(_backbone("llama"), cfg).eval()
    torch.nn.init.normal_(model.prefix_tuning.mlp[2].weight, std=0.5)  # a prefix that matters
    ids = _batch()["input_ids"][:2, :6]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = model.new_cache(2, 6)
        model(input_ids=ids[:, :4], past_key_values=cache, use_cache=True)
        step = model(input_ids=ids[:, 4:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("strategy", ["lora", "int8_lora", "adapters", "prefix", "ia3", "prompt"])
def test_every_decoder_strategy_generates_as_it_scores(kind, strategy):
    """generate() with 8 or more new tokens decodes with stacked copies of q/k/v and gate/up;
    a layer a strategy wraps must be left to its own forward, and the tokens must be those
    of greedy decoding by full recomputation."""
    model = prepare(_backbone(kind), FinetuneConfig(strategy=strategy, prefix_length=3, lora_r=2)).eval()
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point():
            torch.nn.init.normal_(p, std=0.3)  # an adaptation that changes the tokens
    prompt, steps = [1, 5, 9], 10
    generated = model.generate([prompt], max_new_tokens=steps, eos_token_id=[])[0, len(prompt):].tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert generated == seq[len(prompt):]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prompt_tuned_decoder_steps_on_its_cache_as_it_scores_padded_rows(kind):
    """The cache holds the soft tokens after the first call; later calls feed new tokens with
    the real tokens' mask and positions. Left padding, sampling and beams as without a prompt."""
    model = prepare(_backbone(kind), FinetuneConfig(strategy="prompt", num_virtual_tokens=4)).eval()
    torch.nn.init.normal_(model.prompt.embeddings, std=0.5)
    ids = _batch()["input_ids"][:2, :6]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6], dtype=torch.bool)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        cache = model.new_cache(2, 6)
        assert cache.max_length == 6 + 4
        model(input_ids=ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache)
        positions = mask.long().cumsum(1)[:, 4:] - 1
        step = model(input_ids=ids[:, 4:], attention_mask=mask, position_ids=positions,
                     past_key_values=cache).logits
        unprompted = model.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(step, full[:, 4:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[1], unprompted[1], atol=1e-3)  # the prompt matters
    prompts = [[1, 5, 9, 4], [7, 11]]
    out = model.generate(prompts, max_new_tokens=5, eos_token_id=[])
    for row, prompt in enumerate(prompts):
        alone = model.generate([prompt], max_new_tokens=5, eos_token_id=[])[0]
        assert out[row, -5:].tolist() == alone[-5:].tolist()
        assert out[row, -5 - len(prompt):-5].tolist() == prompt  # real tokens only, no soft ones
    beams = model.generate(prompts, max_new_tokens=4, num_beams=3, eos_token_id=[])
    assert beams.shape == (2, 4 + 4)
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(prompts, max_new_tokens=4, do_sample=True, top_k=5, generator=g, eos_token_id=[])
    assert sampled.shape == (2, 8)


def test_prompt_tuned_gpt2_counts_the_soft_tokens_against_its_positions():
    model = prepare(_backbone("gpt2"), FinetuneConfig(strategy="prompt", num_virtual_tokens=4)).eval()
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"needs {limit + 1} positions"):
        model.generate([[1] * (limit - 4)], max_new_tokens=2)
    assert model.generate([[1] * (limit - 4)], max_new_tokens=1, eos_token_id=[]).shape == (1, limit - 3)


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


def test_lora_speed_benchmark_quick():
    """The F7 speed benchmark's quick run: every step timed, the bounds from the frozen step
    computed from the same medians, and an int8 base under 30% of the fp32 bytes."""
    from fastpt.benchmarks.finetune import lora_speed
    out = lora_speed(quick=True)
    step = out["step_s"]
    assert set(step) == {"full", "lora_fastpt", "lora_eager", "frozen"}
    assert all(t > 0 for t in step.values()) and all(m > 0 for m in out["peak_mib"].values())
    assert out["bound_full_vs_frozen"] == pytest.approx(step["full"] / step["frozen"])
    assert out["bound_eager_lora_vs_frozen"] == pytest.approx(step["lora_eager"] / step["frozen"])
    assert 0 < out["int8_frozen_bytes_vs_fp32"] <= 0.30


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


# -- audit 5: prepare once, with a FinetuneConfig ----------------------------------------------

@pytest.mark.parametrize("first, second", [("ia3", "ia3"), ("lora", "ia3"), ("adapters", "adapters"),
                                           ("prefix", "prefix"), ("prompt", "prompt"), ("full", "lora")])
def test_prepare_refuses_an_already_prepared_model(first, second):
    model = prepare(SequenceClassifier(_backbone("gpt2"), 2), FinetuneConfig(strategy=first, lora_r=2))
    with pytest.raises(ValueError, match=f"the model was already prepared with strategy '{first}'; "
                                         "prepare a fresh model"):  # stacked, or an AttributeError
        prepare(model, FinetuneConfig(strategy=second, lora_r=2))


def test_prepare_refuses_a_prepared_model_under_a_new_head_or_in_load_adapter(tmp_path):
    lm = prepare(_backbone("gpt2"), FinetuneConfig(strategy="ia3"))
    with pytest.raises(ValueError, match="already prepared with strategy 'ia3'"):
        prepare(SequenceClassifier(lm, 2), FinetuneConfig(strategy="ia3"))
    model = prepare(SequenceClassifier(_backbone("gpt2"), 2), FinetuneConfig(strategy="lora", lora_r=2))
    save_adapter(model, str(tmp_path))
    with pytest.raises(ValueError, match="already prepared with strategy 'lora'"):
        load_adapter(model, str(tmp_path))  # would have put LoRA inside LoRA
    load_adapter(SequenceClassifier(_backbone("gpt2"), 2), str(tmp_path))  # a fresh one loads


@pytest.mark.parametrize("strategy", ["lora", "int8_lora"])
def test_a_merged_and_unloaded_lora_model_may_be_prepared_again(strategy):
    model = prepare(SequenceClassifier(_backbone("gpt2"), 2, dropout=0.0), FinetuneConfig(strategy=strategy, lora_r=2))
    _train(model, steps=1)
    merged = merge_and_unload(model)
    again = prepare(merged, FinetuneConfig(strategy="lora", lora_r=2))  # a second round of LoRA
    assert _lora_layers(again) and all(not isinstance(m.base_layer, LoraLayer) for m in _lora_layers(again).values())


def test_prepare_needs_a_finetune_config():
    with pytest.raises(TypeError, match="prepare's config must be a FinetuneConfig, got dict"):
        prepare(SequenceClassifier(_backbone("gpt2"), 2), {"strategy": "lora"})  # was an AttributeError


def test_sizes_beyond_the_model_and_fields_changed_later_are_refused():
    for strategy, field in (("prompt", "num_virtual_tokens"), ("prefix", "prefix_length")):
        with pytest.raises(ValueError, match=f"FinetuneConfig.{field}=10000000 exceeds this model's "
                                             "max_position_embeddings"):
            prepare(SequenceClassifier(_backbone("gpt2"), 2), FinetuneConfig(strategy=strategy, **{field: 10**7}))
    with pytest.raises(ValueError, match="adapter_reduction=1000 exceeds this model's hidden_size"):
        prepare(SequenceClassifier(_backbone("gpt2"), 2), FinetuneConfig(strategy="adapters", adapter_reduction=1000))
    config = FinetuneConfig(strategy="prompt")
    config.num_virtual_tokens = -3
    with pytest.raises(ValueError, match="num_virtual_tokens must be >= 1, got -3"):
        prepare(SequenceClassifier(_backbone("gpt2"), 2), config)
