"""Generation from fine-tuned decoders: prefix tuning with a KV cache, every decoder strategy
generating as it scores, and prompt-tuned decoders' caches and positions."""

import pytest
import torch

from fastpt.finetune import FinetuneConfig, prepare
from finetune_util import _backbone, _batch


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
