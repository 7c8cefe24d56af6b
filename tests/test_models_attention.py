"""The models' attention entry point (eager reference vs fused path) and the training
features built on it: packed documents, prefix LM, inputs_embeds, gradients on both paths."""

from __future__ import annotations

import math

import pytest
import torch

from models_util import max_err, randomize_
from fastpt.models import Decoder, Encoder, Seq2Seq, from_name
from fastpt.models._attention import attend
from fastpt.models.common import Attention


def _naive(q, k, v, allowed, bias, scale):
    """float64, one (b, h) at a time, GQA by repeating kv heads."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = (q[b, h].double() @ k[b, h // G].double().T) * scale
            if bias is not None:
                s = s + bias.expand(B, H, T, -1)[b, h].double()
            s = s.masked_fill(~allowed[b], float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            out[b, h] = p @ v[b, h // G].double()
    return out


@pytest.mark.parametrize("T, S", [(5, 5), (1, 9), (4, 9)])
@pytest.mark.parametrize("use_fused", [True, False])
def test_attend_semantics(T, S, use_fused):
    B, H, Hkv, D = 3, 8, 2, 12
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, :3] = False          # left padding
    pad[2, :] = False           # every key masked: that row must give zeros, not NaN
    bias = torch.randn(1, H, T, S)
    i, j = torch.arange(T).view(T, 1), torch.arange(S).view(1, S)
    causal_allowed = (j <= i + S - T).expand(B, T, S)
    for causal in (False, True):
        for b in (None, bias):
            allowed = pad.view(B, 1, S) & (causal_allowed if causal else True)
            got = attend(q, k, v, causal=causal, key_padding_mask=pad, attn_bias=b, scale=0.7,
                         use_fused=use_fused)
            ref = _naive(q, k, v, allowed, b, 0.7)
            assert torch.isfinite(got).all()
            assert max_err(got, ref) < 1e-5
            assert (got[2] == 0).all()
    plain = attend(q, k, v, use_fused=use_fused)
    assert max_err(plain, _naive(q, k, v, torch.ones(B, T, S, dtype=torch.bool), None, 1 / math.sqrt(D))) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_path_equals_fused_op(dtype):
    """A decoding step (T = 1) on the CPU takes the float32 matmul path: it must equal
    fastpt.ops.attention (fp32: 1e-5; bf16: at most one bf16 rounding step apart)."""
    from fastpt.ops import attention
    B, H, Hkv, S, D = 3, 8, 2, 97, 64
    q = torch.randn(B, 1, H, D).to(dtype).transpose(1, 2)      # a (B, T, H, D) view, as the model's
    cache = torch.randn(2, B, Hkv, S + 5, D).to(dtype)
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]                # KV-cache views
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, :40] = False
    pad[2, :] = False
    bias = torch.randn(1, H, 1, S).to(dtype)
    for kw in (dict(), dict(causal=True, key_padding_mask=pad), dict(attn_bias=bias, scale=0.5)):
        got = attend(q, k, v, **kw)
        ref = attention(q, k, v, **kw)
        assert got.dtype == dtype and got.shape == (B, H, 1, D)
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7 * ref.abs().max().item()
        assert max_err(got, ref) <= tol, kw


def test_bias_gets_gradient_on_both_paths():
    q, k, v = (torch.randn(2, 4, 6, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 4, 6, 6, requires_grad=True)
    grads = []
    for fused in (True, False):
        out = attend(q, k, v, causal=True, attn_bias=bias, scale=1.0, use_fused=fused)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v, bias)))
    for a, b in zip(*grads):
        assert max_err(a, b) < 1e-5


def test_bad_shapes():
    q = torch.randn(1, 6, 4, 8)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attend(q, torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attend(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), key_padding_mask=torch.ones(1, 5),
               use_fused=False)


MODELS = {"bert": lambda: Encoder(from_name("bert-tiny")), "gpt2": lambda: Decoder(from_name("gpt2-tiny")),
          "llama": lambda: Decoder(from_name("llama-tiny")), "t5": lambda: Seq2Seq(from_name("t5-tiny"))}


def _without_dropout(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, Attention):
            m.dropout = 0.0


@pytest.mark.parametrize("name", MODELS)
def test_fused_and_eager_paths_agree_with_gradients(name):
    model = MODELS[name]()
    model.train()
    _without_dropout(model)  # so both runs see the same function
    ids = torch.randint(3, 1000, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 8:] = 0
    batch = dict(input_ids=ids, labels=ids)
    if name == "t5":
        batch.update(attention_mask=mask, labels=ids[:, :6])
    elif name == "bert":
        batch.update(attention_mask=mask, next_sentence_label=torch.tensor([0, 1]))
    results = []
    for fused in (True, False):
        model.use_fused = fused
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}))
    (la, ga), (lb, gb) = results
    assert max_err(la, lb) < 1e-4
    assert ga.keys() == gb.keys() == {n for n, _ in model.named_parameters()}  # every parameter trains
    for n in ga:
        assert max_err(ga[n], gb[n]) < 1e-4 * max(1.0, ga[n].abs().max().item()), n
    if name == "t5":  # the learned relative bias is trained on the fused path too
        assert ga["encoder.relative_bias.embedding.weight"].abs().sum() > 0


def test_use_fused_propagates():
    model = Decoder(from_name("llama-tiny"), use_fused=False)
    assert all(m.use_fused is False for m in model.modules() if hasattr(m, "use_fused"))
    model.use_fused = True
    assert all(m.use_fused is True for m in model.modules() if hasattr(m, "use_fused"))


@pytest.mark.parametrize("use_fused", [True, False])
def test_packed_documents_equal_separate_sequences(use_fused):
    model = Decoder(from_name("llama-tiny"), use_fused=use_fused).eval()
    randomize_(model)
    a, b = torch.randint(0, 1000, (1, 5)), torch.randint(0, 1000, (1, 7))
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        out = model(packed, document_ids=docs).logits
        assert max_err(out[:, :5], model(a).logits) < 1e-5
        assert max_err(out[:, 5:], model(b).logits) < 1e-5
    gpt2 = Decoder(from_name("gpt2-tiny"), use_fused=use_fused).eval()
    with torch.no_grad():
        assert max_err(gpt2(packed, document_ids=docs).logits[:, 5:], gpt2(b).logits) < 1e-5


def test_prefix_lm():
    model = Decoder(from_name("llama-tiny")).eval()
    ids = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        causal = model(ids).logits
        prefix = model(ids, prefix_lengths=torch.tensor([1, 4])).logits
        changed = ids.clone()
        changed[:, 2] = (ids[:, 2] + 1) % 1000  # inside row 1's prefix, after row 0's
        after = model(changed, prefix_lengths=torch.tensor([1, 4])).logits
    assert max_err(prefix[0], causal[0]) < 1e-5               # prefix of 1 token = causal
    assert max_err(after[0, :2], prefix[0, :2]) < 1e-6        # row 0: causal, earlier rows unchanged
    assert max_err(after[1, :2], prefix[1, :2]) > 1e-4        # row 1: the prefix is bidirectional


@pytest.mark.parametrize("name", ["bert", "llama", "t5"])
def test_inputs_embeds_and_hidden_states(name):
    model = MODELS[name]().eval()
    ids = torch.randint(3, 1000, (2, 6))
    emb = {"bert": lambda m: m.embeddings.tokens, "llama": lambda m: m.embed_tokens,
           "t5": lambda m: m.shared}[name](model)(ids)
    extra = dict(decoder_input_ids=ids[:, :3]) if name == "t5" else {}
    with torch.no_grad():
        a = model(input_ids=ids, output_hidden_states=True, **extra)
        b = model(inputs_embeds=emb, **extra)
    assert torch.equal(a.logits, b.logits)
    n_layers = model.config.num_decoder_layers if name == "t5" else model.config.num_layers
    assert len(a.hidden_states) == n_layers + 1
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=emb, **extra)


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast(name):
    model = MODELS[name]().eval()
    randomize_(model)
    ids = torch.randint(3, 1000, (2, 8))
    extra = dict(decoder_input_ids=ids[:, :4]) if name == "t5" else {}
    with torch.no_grad():
        ref = model(ids, **extra).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(ids, **extra).logits
            if name != "bert":
                out = model.generate(ids, max_new_tokens=3, eos_token_id=[])
                assert out.shape[1] == (1 if name == "t5" else 8) + 3
    assert max_err(got, ref) < 5e-2 * ref.abs().max().item()


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5"])
def test_training_step_compiles_fullgraph(name):
    """The MLPs' linear_activation (fused in inference, two steps in training) and the
    inference routes' guards trace without a graph break; loss and gradients as eager."""
    model = MODELS[name]()
    _without_dropout(model)  # so both runs see the same function
    ids = torch.randint(3, 1000, (2, 8))
    extra = dict(decoder_input_ids=ids[:, :4], labels=ids[:, :4]) if name == "t5" else dict(labels=ids)
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(model(ids, **extra).loss, params, allow_unused=True)  # BERT: no NSP head
    compiled = torch.compile(lambda: model(ids, **extra).loss, fullgraph=True)
    got = torch.autograd.grad(compiled(), params, allow_unused=True)
    assert sum(w is not None for w in want) > len(params) // 2
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            assert max_err(g, w) <= 1e-5 * max(w.abs().max().item(), 1.0)


def test_projection_input_cast_once_changes_nothing(monkeypatch):
    """bf16 autocast inference: x cast to bf16 once for q, k and v (plain Linears) gives the
    same output as each projection casting it; a hooked projection keeps fp32 x."""
    attn = Attention(64, 4, 2, 16, bias=True).eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        once = attn(x)
        shared = attn._projection_input(x)
        monkeypatch.setattr(Attention, "_projection_input", lambda self, x: x)
        each = attn(x)
        monkeypatch.undo()
        attn.k_proj.register_forward_pre_hook(lambda m, args: None)
        hooked = attn._projection_input(x)
    assert torch.equal(once, each)
    from fastpt.ops import _onednn
    assert shared.dtype == (torch.bfloat16 if _onednn.bf16_available() else torch.float32)
    assert hooked is x
