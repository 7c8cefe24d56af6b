"""fastpt.nn.Attention: fused vs eager path, KV cache decoding, cross-attention, RoPE."""

from __future__ import annotations

import re

import pytest
import torch

from fastpt.nn import Attention, KVCache, RotaryEmbedding


def _pair(**kwargs):
    fused = Attention(**kwargs)
    eager = Attention(**kwargs, use_fused=False)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


@pytest.mark.parametrize("fused_qkv", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_matches_eager_with_gradients(fused_qkv, causal):
    rotary = RotaryEmbedding(16, max_position_embeddings=32)
    fused, eager = _pair(hidden_size=64, num_heads=4, num_kv_heads=2, causal=causal, fused_qkv=fused_qkv,
                         rotary=rotary, bias=True)
    x = torch.randn(2, 11, 64)
    mask = torch.rand(2, 11) > 0.2
    outs = []
    for m in (fused, eager):
        xi = x.clone().requires_grad_()
        out = m(xi, key_padding_mask=mask)
        out.square().sum().backward()
        outs.append((out, xi.grad, m.o_proj.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_cache_object", [True, False])
def test_incremental_decoding_matches_the_full_sequence(with_cache_object):
    torch.manual_seed(0)
    rotary = RotaryEmbedding(16, max_position_embeddings=8)  # grows on demand
    attn = Attention(64, 4, 1, causal=True, rotary=rotary).eval()  # MQA
    x = torch.randn(2, 13, 64)
    full = attn(x)
    cache = KVCache(2, 1, 16, 16) if with_cache_object else None
    past, steps = None, []
    prompt = 5
    out, past = attn(x[:, :prompt], cache=cache, past_key_value=past, use_cache=True)
    steps.append(out)
    for t in range(prompt, 13):
        out, past = attn(x[:, t:t + 1], cache=cache, past_key_value=None if cache else past, use_cache=True)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    assert past[0].shape == (2, 1, 13, 16)


def test_cross_attention_with_padding():
    fused, eager = _pair(hidden_size=32, num_heads=4, kv_input_size=48, scale=1.0)
    x, enc = torch.randn(3, 7, 32), torch.randn(3, 9, 48)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    bias = torch.randn(4, 7, 9)
    torch.testing.assert_close(fused(x, enc, key_padding_mask=mask, attn_bias=bias),
                               eager(x, enc, key_padding_mask=mask, attn_bias=bias), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused_qkv", [True, False])
def test_cross_attention_reuses_its_cached_encoder_keys(fused_qkv):
    """Decoding step by step, cross-attention reads the encoder keys projected at the first
    step (from past_key_value or a filled KVCache, kv then not needed); passing the cache back
    concatenated the encoder keys a second time (9 -> 18 keys)."""
    attn = Attention(32, 4, kv_input_size=16, fused_qkv=fused_qkv).eval()
    x, enc = torch.randn(2, 5, 32), torch.randn(2, 9, 16)
    full = attn(x, enc)
    out, past = attn(x[:, :1], enc, use_cache=True)
    cache = KVCache(2, 4, 9, 8)
    first = attn(x[:, :1], enc, cache=cache)
    torch.testing.assert_close(first, out)
    steps, cached = [out], [first]
    for t in range(1, 5):
        out, past = attn(x[:, t:t + 1], None, past_key_value=past, use_cache=True)
        steps.append(out)
        cached.append(attn(x[:, t:t + 1], cache=cache))
    assert past[0].shape == (2, 4, 9, 8) and cache.length == 9
    torch.testing.assert_close(torch.cat(steps, 1), full)
    torch.testing.assert_close(torch.cat(cached, 1), full)


def test_dropout_only_in_training():
    attn = Attention(32, 4, dropout=0.5)
    x = torch.randn(2, 6, 32)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn.eval()(x))


def test_bad_configuration():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(64, 4, 3)
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="needs kv"):
        Attention(32, 4, kv_input_size=16)(torch.randn(1, 2, 32))
    with pytest.raises(ValueError, match="self-attention only"):
        Attention(32, 4, kv_input_size=16, rotary=RotaryEmbedding(8))
    with pytest.raises(ValueError, match=r"Attention: x must have width 32, got shape \(1, 2, 12\)"):
        Attention(32, 4)(torch.randn(1, 2, 12))  # was a matmul error naming no module
    with pytest.raises(ValueError, match=r"Attention: kv must have width 16, got shape \(1, 2, 32\)"):
        Attention(32, 4, kv_input_size=16)(torch.randn(1, 2, 32), kv=torch.randn(1, 2, 32))
    assert Attention(32, 4, kv_input_size=16)(torch.randn(1, 2, 32), kv=torch.randn(1, 3, 16)).shape == (1, 2, 32)
    from fastpt.nn import SwiGLU
    with pytest.raises(ValueError, match=r"SwiGLU: x must be \(\.\.\., 8\), got shape \(2, 5\)"):
        SwiGLU(8, 12)(torch.randn(2, 5))
    cache = KVCache(1, 4, 2, 8)
    with pytest.raises(ValueError, match="KVCache full"):
        Attention(32, 4, causal=True)(torch.randn(1, 3, 32), cache=cache)


def test_kv_cache_checks_keys_before_writing():
    """append checks batch, kv heads, head dim, dtype and device against the buffers first (the
    slice assignment would broadcast or cast silently); a failed call leaves the cache as it was."""
    cache = KVCache(2, 2, 8, 8)
    good = torch.randn(2, 2, 3, 8)
    cache.append(good, good)
    expect = re.escape("(batch_size, kv_heads, T, head_dim) = (2, 2, T, 8), got ")
    for shape in [(1, 1, 3, 8), (2, 1, 3, 8), (2, 2, 3, 4), (2, 2, 3)]:
        with pytest.raises(ValueError, match="k must be " + expect + re.escape(str(shape))):
            cache.append(torch.randn(shape), good)
    with pytest.raises(ValueError, match="v must be " + expect):
        cache.append(good, torch.randn(1, 2, 3, 8))
    with pytest.raises(TypeError, match="v must have the cache's dtype torch.float32, got torch.float64"):
        cache.append(good, good.double())
    with pytest.raises(ValueError, match="k must be on the cache's device cpu, got meta"):
        cache.append(good.to("meta"), good)
    with pytest.raises(ValueError, match="k and v must have the same T, got 3 and 2"):
        cache.append(good, good[:, :, :2])
    assert cache.length == 3 and torch.equal(cache.k[:, :, :3], good)
    torch.testing.assert_close(cache.append(good, good)[0], torch.cat([good, good], 2))

    attn = Attention(32, 4, 2, causal=True).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    cache = KVCache(2, 2, 8, 8)                                  # float32: the module is float64
    with pytest.raises(TypeError, match="cache's dtype torch.float32, got torch.float64"):
        attn(x, cache=cache)
    assert cache.length == 0
    cache = KVCache(2, 2, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="key_padding_mask"):    # fails after the append: rolled back
        attn(x, cache=cache, key_padding_mask=torch.ones(2, 3, dtype=torch.bool))
    assert cache.length == 0
    torch.testing.assert_close(attn(x, cache=cache), attn(x))


def test_unbatched_input_names_x():
    attn = Attention(32, 4)
    with pytest.raises(ValueError, match=r"x must be \(batch, length, hidden\), got shape \(5, 32\)"):
        attn(torch.randn(5, 32))
