"""Fine-tuning strategies: what each one trains (with activation checkpointing too), where
adapters and soft prompts start, and a model prepared only once."""

import pytest
import torch

from fastpt.finetune import (STRATEGIES, FinetuneConfig, SequenceClassifier, load_adapter, merge_and_unload, prepare,
                             save_adapter)
from fastpt.finetune.lora import LoraLayer
from fastpt.train import enable_activation_checkpointing
from finetune_util import _backbone, _batch, _lora_layers, _train

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
