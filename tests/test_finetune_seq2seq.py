"""Text-to-text fine-tuning of a Seq2Seq (T5): what each strategy trains in both stacks, the
masks prompt and prefix tuning extend, generation with a KV cache, adapter save/load, and the
clear errors for what does not apply (probe with no head, task heads, BitFit on T5)."""

import re

import pytest
import torch

from fastpt.finetune import (FinetuneConfig, QuestionAnswering, SequenceClassifier, TokenClassifier,
                             load_adapter, load_merged, prepare, save_adapter, save_merged)
from fastpt.finetune.peft_modules import WithAdapter
from fastpt.models import Decoder, DecoderConfig, Seq2Seq, Seq2SeqConfig

V = 120


def _t5(**overrides):
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig.from_name("t5-tiny", vocab_size=V, dropout=0.0, **overrides))


def _batch(B=3, T=7, Tdec=5):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False
    labels = torch.randint(2, V, (B, Tdec), generator=g)
    labels[1, -1] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train(model, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        loss = model(**_batch()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _config(strategy, **kw):
    return FinetuneConfig(**{"strategy": strategy, "freeze_layers": 1, "lora_r": 2, "num_virtual_tokens": 3,
                             "prefix_length": 2, **kw})


# Trainable names (all of them match) and how many tensors, per strategy; t5-tiny has 2
# encoder and 2 decoder layers.
EXPECTED = {
    "lora": (r"lora_", 2 * 2 * 6),                      # q_proj, v_proj of 4 self-, 2 cross-attentions
    "int8_lora": (r"lora_", 2 * 2 * 6),
    "adapters": (r"\.adapter\.", 4 * 2 * 4),            # attn and mlp of 4 layers, 4 tensors each
    "ia3": (r"ia3_l", 4 * 3 + 2 * 2),                   # k, v, wo of 4 layers; k, v of 2 cross
    "prefix": (r"^prefix_tuning\.", 5),                 # embedding and the 2-layer MLP
    "prompt": (r"^prompt\.embeddings$", 1),
}


@pytest.mark.parametrize("strategy", ["full", "partial", *EXPECTED])
def test_each_strategy_trains_only_its_parameters(strategy):
    model = prepare(_t5(), _config(strategy))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if strategy in EXPECTED:
        pattern, count = EXPECTED[strategy]
        assert all(re.search(pattern, n) for n in trainable), sorted(trainable)
        assert len(trainable) == count, sorted(trainable)
    if strategy == "partial":  # the first layer of each stack and every embedding frozen
        frozen = ("shared.", "encoder.relative_bias.", "decoder.relative_bias.",
                  "encoder.layers.0.", "decoder.layers.0.")
        assert not any(n.startswith(frozen) for n in trainable)
        assert trainable == {n for n, _ in model.named_parameters() if not n.startswith(frozen)}
        assert any(n.startswith("decoder.layers.1.cross_attn.") for n in trainable)
    _train(model)
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
    changed = {n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    if strategy in ("adapters", "ia3", "lora"):  # both stacks train
        assert {n.split(".")[0] for n in changed} == {"encoder", "decoder"}


def test_adapters_sit_in_both_stacks_after_self_attention_and_the_ffn():
    houlsby = prepare(_t5(), _config("adapters"))
    for stack in (houlsby.encoder, houlsby.decoder):
        for layer in stack.layers:
            assert isinstance(layer.attn, WithAdapter) and isinstance(layer.mlp, WithAdapter)
            assert not isinstance(layer.cross_attn, WithAdapter)
    pfeiffer = prepare(_t5(), _config("adapters", adapter_kind="pfeiffer"))
    for layer in [*pfeiffer.encoder.layers, *pfeiffer.decoder.layers]:
        assert isinstance(layer.mlp, WithAdapter) and not isinstance(layer.attn, WithAdapter)


def test_partial_freezes_the_first_k_layers_of_each_stack_of_different_depths():
    model = prepare(_t5(num_layers=3, num_decoder_layers=2), _config("partial", freeze_layers=2))
    trainable = {n.split(".")[0] + "." + n.split(".")[2] for n, p in model.named_parameters()
                 if p.requires_grad and ".layers." in n}
    assert trainable == {"encoder.2"}
    with pytest.raises(ValueError, match=r"freeze_layers=3 but the model has 2 layers in decoder\.layers"):
        prepare(_t5(num_layers=3, num_decoder_layers=2), _config("partial", freeze_layers=3))


def test_ia3_starts_as_the_base_model():
    base, batch = _t5().eval(), _batch()
    expected = base(**batch).logits
    model = prepare(base, _config("ia3"))
    torch.testing.assert_close(model(**batch).logits, expected)


def test_prompt_tuning_prepends_to_the_encoder_input_and_extends_its_mask():
    model = prepare(_t5(), _config("prompt")).eval()
    batch = _batch()
    out = model(**batch)
    B, Tdec = batch["labels"].shape
    assert out.logits.shape == (B, Tdec, V)  # the decoder's logits, not cut
    base, n = model.model, 3
    embeds = torch.cat([model.prompt.embeddings.expand(B, -1, -1), base.shared(batch["input_ids"])], 1)
    mask = torch.cat([torch.ones(B, n, dtype=torch.bool), batch["attention_mask"]], 1)
    want = base(inputs_embeds=embeds, attention_mask=mask, labels=batch["labels"])
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    assert out.encoder_last_hidden_state.shape[1] == n + batch["input_ids"].shape[1]
    memory = model.encode(batch["input_ids"], batch["attention_mask"])[0]
    torch.testing.assert_close(memory, out.encoder_last_hidden_state, rtol=0, atol=0)
    again = model(attention_mask=batch["attention_mask"], labels=batch["labels"], encoder_outputs=memory)
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)
    unprompted = base.encode(batch["input_ids"], batch["attention_mask"])[0]
    with pytest.raises(ValueError, match="must come from this prompt-tuned model's encode"):
        model(attention_mask=batch["attention_mask"], labels=batch["labels"], encoder_outputs=unprompted)


def _perturbed(model):
    """The strategy's new parameters set to values that change the outputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    return model


@pytest.mark.parametrize("projection", [True, False])
def test_prefix_masks_extended_padding_changes_nothing(projection):
    """Padded rows give the logits of the unpadded input: the prefix keys are attended and
    the padding stays masked in encoder self-, decoder self- and cross-attention."""
    model = _perturbed(prepare(_t5(), _config("prefix", prefix_projection=projection))).eval()
    assert model.prefix_tuning.L == 2 + 2 + 2  # encoder self, decoder self, decoder cross
    ids, labels = _batch()["input_ids"][:1, :5], _batch()["labels"][:1, :4]
    with torch.no_grad():
        alone = model(input_ids=ids, labels=labels).logits
        padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
        padded_labels = torch.cat([labels, torch.full((1, 2), -100)], 1)
        mask = torch.tensor([[True] * 5 + [False] * 3])
        dec_mask = torch.tensor([[True] * 4 + [False] * 2])
        padded = model(input_ids=padded_ids, attention_mask=mask, labels=padded_labels,
                       decoder_attention_mask=dec_mask).logits
        unprefixed = _t5().eval()(input_ids=ids, labels=labels).logits
    torch.testing.assert_close(padded[:, :4], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone, unprefixed, atol=1e-3)  # the prefixes matter


def test_prefix_of_every_attention_gets_a_gradient():
    model = prepare(_t5(), _config("prefix", prefix_projection=False))
    model(**_batch()).loss.backward()
    p = model.prefix_tuning
    per_site = p.prefix.grad.view(p.length, p.L, 2, p.Hkv, p.D).abs().sum((0, 2, 3, 4))
    assert per_site.shape == (6,) and (per_site > 0).all(), per_site  # cross-attention's too


@pytest.mark.parametrize("strategy", ["prefix", "ia3", "adapters", "lora", "prompt"])
def test_every_strategy_generates_as_it_scores(strategy):
    """generate() (encoder once, cached cross keys/values, one decoder step per token) gives
    the tokens of greedy decoding by full recomputation, prompts of two lengths padded."""
    model = _perturbed(prepare(_t5(), _config(strategy))).eval()
    prompts, steps = [[5, 9, 17, 3], [7, 11]], 8  # 8+: decode copies
    generated = model.generate(prompts, max_new_tokens=steps, eos_token_id=[])
    for row, prompt in enumerate(prompts):
        dec = [model.config.decoder_start_token_id]
        with torch.no_grad():
            for _ in range(steps):
                logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec])).logits
                dec.append(int(logits[0, -1].argmax()))
        assert generated[row].tolist() == dec


@pytest.mark.parametrize("strategy,kind", [("lora", "houlsby"), ("adapters", "houlsby"),
                                           ("adapters", "pfeiffer"), ("ia3", "houlsby"),
                                           ("prompt", "houlsby"), ("prefix", "houlsby"),
                                           ("partial", "houlsby")])
def test_adapter_save_then_load_into_a_fresh_base(tmp_path, strategy, kind):
    cfg = _config(strategy, adapter_kind=kind)
    model = prepare(_t5(), cfg)
    _train(model, steps=2)
    model.eval()
    expected = model(**_batch())
    names = save_adapter(model, str(tmp_path))
    assert names == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    fresh = load_adapter(_t5(), str(tmp_path)).eval()
    got = fresh(**_batch())
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="was trained on Seq2Seq"):
        load_adapter(Decoder(DecoderConfig.from_name("llama-tiny", vocab_size=V)), str(tmp_path))


def test_prefix_saved_after_dropping_its_mlp_loads(tmp_path):
    model = prepare(_t5(), _config("prefix"))
    _train(model, steps=2)
    model.eval()
    expected = model(**_batch()).logits
    model.prefix_tuning.freeze()
    assert "prefix_tuning.prefix" in save_adapter(model, str(tmp_path))
    fresh = load_adapter(_t5(), str(tmp_path)).eval()
    torch.testing.assert_close(fresh(**_batch()).logits, expected, atol=1e-6, rtol=1e-6)


def test_ia3_merged_checkpoint_loads_as_a_plain_seq2seq(tmp_path):
    model = prepare(_t5(), _config("ia3"))
    _train(model, steps=2)
    model.eval()
    expected = model(**_batch()).logits
    save_merged(model, str(tmp_path))
    loaded = load_merged(str(tmp_path)).eval()
    assert type(loaded) is Seq2Seq
    torch.testing.assert_close(loaded(**_batch()).logits, expected, atol=1e-5, rtol=1e-5)


def test_what_does_not_apply_is_refused_clearly():
    with pytest.raises(ValueError, match="'probe' trains a task head only, and this bare Seq2Seq has none"):
        prepare(_t5(), FinetuneConfig(strategy="probe"))
    with pytest.raises(ValueError, match="bare Decoder has none"):
        prepare(Decoder(DecoderConfig.from_name("gpt2-tiny", vocab_size=V)), FinetuneConfig(strategy="probe"))
    for build in (lambda b: SequenceClassifier(b, 2), lambda b: TokenClassifier(b, 3), QuestionAnswering):
        with pytest.raises(TypeError, match="task heads need a fastpt Encoder or Decoder backbone, got "
                                            "Seq2Seq: fine-tune a Seq2Seq text-to-text"):
            build(_t5())
    with pytest.raises(ValueError, match="BitFit trains biases, and this Seq2Seq has none"):
        prepare(_t5(), FinetuneConfig(strategy="bitfit"))
