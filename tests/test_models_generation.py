"""Generation: token-for-token against transformers' generate (greedy, beam search,
repetition penalty), cached vs uncached logits, batched left padding, stop tokens,
sampling filters."""

from __future__ import annotations

import pytest
import torch

from models_util import hf_gpt2, hf_llama, hf_t5, max_err, randomize_
from fastpt.models import Decoder, from_hf, from_name, generate
from fastpt.models.generation import _as_batch, _filter
from fastpt.ops.gemm import own_kernel_active

# HF generate sizes its T5 cache by num_layers, so the decoder depth must equal it here.
HF = {"llama": hf_llama, "gpt2": hf_gpt2, "t5": lambda: hf_t5(num_decoder_layers=2)}


def _pair(name):
    hf = HF[name]()
    randomize_(hf, 0.05)
    return hf, from_hf(hf).eval()


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("options", [dict(), dict(num_beams=3), dict(repetition_penalty=1.5)],
                         ids=["greedy", "beam3", "penalty"])
def test_matches_transformers_generate(name, options):
    hf, model = _pair(name)
    ids = torch.randint(3, 97, (1, 7))
    ref = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0, **options)
    ours = model.generate(ids, max_new_tokens=16, eos_token_id=[], **options)
    assert torch.equal(ours, ref)


def test_stop_token_matches_transformers():
    hf, model = _pair("llama")
    ids = torch.randint(3, 97, (1, 6))
    free = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    stop = int(free[0, 6 + 4])  # the 5th new token becomes a stop token
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=stop, pad_token_id=0)
    ours = model.generate(ids, max_new_tokens=12, eos_token_id=stop, pad_token_id=0)
    assert torch.equal(ours, ref)
    first = (free[0, 6:] == stop).nonzero()[0].item()
    assert ours.shape[1] == 6 + first + 1  # stopped right after it


@pytest.mark.parametrize("use_fused", [True, False])
def test_cached_equals_uncached_logits(use_fused):
    model = Decoder(from_name("llama-tiny"), use_fused=use_fused).eval()
    randomize_(model)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 12)
        parts = [model(ids[:, :5], past_key_values=cache).logits]
        parts += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(5, 9)]
        parts.append(model(ids[:, 9:], past_key_values=cache).logits)
    assert cache.length == 12
    assert max_err(torch.cat(parts, 1), full) < 1e-5
    # a forward's use_cache=True cache is sized to its input: the error says what to use instead
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)
        with pytest.raises(ValueError, match=r"KV cache full: 6 tokens > max_length 5; .*model.new_cache"):
            model(ids[:, 5:6], past_key_values=out.past_key_values)


def test_seq2seq_cached_equals_uncached():
    _, model = _pair("t5")
    ids, dec = torch.randint(3, 97, (2, 9)), torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        full = model(input_ids=ids, decoder_input_ids=dec).logits
        memory = model.encode(ids)[0]
        cache = model.new_cache(2, 6)
        steps = [model(encoder_outputs=memory, decoder_input_ids=dec[:, t:t + 1], past_key_values=cache).logits
                 for t in range(6)]
    assert max_err(torch.cat(steps, 1), full) < 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("use_fused", [True, False])
def test_batched_prompts_equal_single_prompts(name, use_fused):
    _, model = _pair(name)
    model.use_fused = use_fused
    prompts = [[10, 11, 12, 13, 14, 15], [20, 21], [30, 31, 32]]
    batched = model.generate(prompts, max_new_tokens=6, eos_token_id=[])
    for row, prompt in zip(batched, prompts):
        single = model.generate([prompt], max_new_tokens=6, eos_token_id=[])
        assert torch.equal(row[-6:], single[0, -6:])
    beams = model.generate(prompts, max_new_tokens=5, num_beams=2, eos_token_id=[])
    for row, prompt in zip(beams, prompts):
        assert torch.equal(row[-5:], model.generate([prompt], max_new_tokens=5, num_beams=2, eos_token_id=[])[0, -5:])


def test_right_padding_is_moved_left():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out, m = _as_batch(ids, mask, pad_id=0)
    assert out.tolist() == [[5, 6, 7], [0, 8, 9]]
    assert m.tolist() == [[True, True, True], [False, True, True]]
    _, model = _pair("llama")
    assert torch.equal(model.generate(ids, mask, max_new_tokens=4, eos_token_id=[]),
                       model.generate([[5, 6, 7], [8, 9]], max_new_tokens=4, eos_token_id=[]))


def test_stop_tokens_pad_finished_rows():
    _, model = _pair("llama")
    prompts = [[10, 11, 12], [40, 41, 42, 43]]
    free = model.generate(prompts, max_new_tokens=8, eos_token_id=[])
    stop = int(free[0, -8 + 1])  # row 0 stops at its 2nd new token
    out = model.generate(prompts, max_new_tokens=8, eos_token_id=[stop, 96], pad_token_id=0)
    new = out[:, -out.shape[1] + 4:]
    row0 = new[0].tolist()
    k = row0.index(stop)
    assert all(t == 0 for t in row0[k + 1:])


def test_sampling():
    _, model = _pair("llama")
    ids = torch.randint(3, 97, (2, 5))
    greedy = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, eos_token_id=[]), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=True, top_p=1e-6, eos_token_id=[]), greedy)
    runs = [model.generate(ids, max_new_tokens=8, do_sample=True, temperature=2.0, eos_token_id=[],
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*runs)
    assert not torch.equal(runs[0], greedy)


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(_filter(logits, 1.0, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(_filter(logits, 1.0, 0, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(_filter(logits, 1.0, 0, 0.81)).tolist() == [[False, False, False, True]]
    assert torch.allclose(_filter(logits, 2.0, 0, 1.0).softmax(-1), (logits / 2).softmax(-1))
    # A tiny temperature is greedy, not NaN (logits / 1e-40 overflows float32).
    assert _filter(logits, 1e-40, 0, 1.0).softmax(-1).tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_bad_arguments():
    _, model = _pair("gpt2")
    for bad, match in ((dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
                       (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
                       (dict(do_sample=True, temperature=float("nan")), "temperature"),
                       (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(num_beams=0), "num_beams"),
                       (dict(length_penalty=float("nan")), "length_penalty must be finite"),
                       (dict(num_beams=2, do_sample=True), "does not sample"),
                       (dict(pad_token_id=-1), r"pad_token_id must be a token id in \[0, 97\)"),
                       (dict(eos_token_id=5000), "eos_token_id must be a token id"),
                       (dict(eos_token_id=[3, -1]), "eos_token_id must be a token id")):
        with pytest.raises(ValueError, match=match):
            generate(model, [[1, 2]], **bad)
    assert generate(model, [[1, 2]], max_new_tokens=2, temperature=0.0).shape == (1, 4)  # greedy: unused
    assert generate(model, [[1, 2]], max_new_tokens=2, eos_token_id=torch.tensor(3)).shape[0] == 1
    for bad, match in ((dict(max_new_tokens=2.5), "max_new_tokens must be an int"),
                       (dict(top_k=True), "top_k must be an int"),
                       (dict(cache_dtype=torch.int64), "cache_dtype must be a floating-point dtype")):
        with pytest.raises(TypeError, match=match):
            generate(model, [[1, 2]], **bad)
    with pytest.raises(TypeError, match="list of prompts"):
        generate(model, [1, 2, 3])
    with pytest.raises(TypeError, match=r"prompt 0 holds \[1.7\]"):
        generate(model, [[1.7, 2]])
    for empty in ([], torch.zeros(0, 3, dtype=torch.long)):  # no prompt at all, for greedy and beams
        for beams in (1, 2):
            with pytest.raises(ValueError, match="input_ids holds no prompts"):
                generate(model, empty, max_new_tokens=4, num_beams=beams)
    with pytest.raises(ValueError, match="a list of prompts of any lengths needs none"):
        generate(model, [[1, 2, 3], [4, 5, 6]], attention_mask=torch.tensor([[0, 0, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match="at least one token"):  # was an IndexError
        generate(model, torch.zeros(2, 0, dtype=torch.long))


def test_models_name_bad_token_ids():
    """Ids outside an embedding table, float or 1-D ids, and labels of another shape: errors
    that name them (torch's own: "index out of range in self", an unpacking error)."""
    _, gpt2 = _pair("gpt2")
    V, P = gpt2.config.vocab_size, gpt2.config.max_position_embeddings
    ids = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match=f"input_ids must lie in \\[0, vocab_size={V}\\)"):
        gpt2(input_ids=ids - V)
    with pytest.raises(TypeError, match="integer ids"):
        gpt2(input_ids=ids.float())
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        gpt2(input_ids=ids[0])
    with pytest.raises(ValueError, match="max_position_embeddings"):  # GPT-2's learned positions
        gpt2(input_ids=torch.randint(0, V, (1, P + 1)))
    with pytest.raises(ValueError, match=r"labels must be \(B, T\)"):
        gpt2(input_ids=ids, labels=ids[:, :3])
    from fastpt.models import Encoder, EncoderConfig
    bert = Encoder(EncoderConfig.from_name("bert-tiny", vocab_size=V))
    with pytest.raises(ValueError, match="type_vocab_size"):
        bert(input_ids=ids, token_type_ids=torch.full_like(ids, 5))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_decode_weights_change_nothing_and_are_restored(monkeypatch, name, autocast):
    """Weights cast once (autocast) and stored column-major (float32, where torch's BLAS
    runs the products) for the call: same tokens as without, and the parameters are the same
    tensors after."""
    import contextlib
    from fastpt.models import generation
    _, model = _pair(name)
    before = {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()}
    ids = torch.randint(3, 97, (2, 6))
    seen = []
    real = generation._decode_weights

    @contextlib.contextmanager
    def spy(*a, **k):
        with real(*a, **k):
            seen.append({n: (p.dtype, p.is_contiguous()) for n, p in model.named_parameters()})
            seen.append(model.layers[0].attn.fused_qkv)
            yield

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        monkeypatch.setattr(generation, "_decode_weights", spy)
        fast = model.generate(ids, max_new_tokens=8, eos_token_id=[])
        monkeypatch.setattr(generation, "_decode_weights", lambda *a, **k: contextlib.nullcontext())
        plain = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(fast, plain)
    inside = seen[0]["layers.0.attn.o_proj.weight" if name == "llama" else "layers.0.mlp.fc_in.weight"]
    # float32: column-major where torch's BLAS does the products, row-major for fastpt's
    assert inside == ((torch.bfloat16, True) if autocast else (torch.float32, own_kernel_active()))
    qkv = seen[1][0]  # q, k and v stacked: (H + 2 Hkv) D rows
    attn = model.layers[0].attn
    assert qkv.shape == ((attn.num_heads + 2 * attn.num_kv_heads) * attn.head_dim, model.config.hidden_size)
    assert qkv.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert attn.fused_qkv is None and getattr(model.layers[0], "fused_gate_up", None) is None
    for n, p in model.named_parameters():
        assert (p.data_ptr(), p.stride()) == before[n] and p.dtype == torch.float32


def test_decode_weights_cache_follows_weight_changes():
    """The decode copies are reused across calls, and rebuilt when a weight changes in place
    (an optimizer step) or is replaced."""
    _, model = _pair("llama")
    ids = torch.randint(3, 97, (1, 6))
    model.generate(ids, max_new_tokens=8, eos_token_id=[])
    cache = model._decode_weights_cache
    key = ("fused_qkv", id(model.layers[0].attn), "w")  # q, k, v stacked: always a copy
    first = cache[key][1]
    model.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert cache[key][1] is first                        # reused
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)                  # in place: version bump
        model.layers[1].attn.q_proj.weight = torch.nn.Parameter(model.layers[1].attn.q_proj.weight * 2)
    got = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    del model._decode_weights_cache
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=4, eos_token_id=[])  # < 8 tokens: no copies
    assert torch.equal(got[:, :10], ref)
    assert not hasattr(model, "_decode_weights_cache") or not model._decode_weights_cache


def test_clear_weight_caches_after_a_write_through_data():
    """A write through ``.data`` does not bump the version counter (as it escapes autograd's
    checks), so the decode copies cannot see it; fastpt.nn.clear_weight_caches drops them."""
    from fastpt.nn import clear_weight_caches
    _, model = _pair("llama")
    ids = torch.randint(3, 97, (1, 6))
    model.generate(ids, max_new_tokens=8, eos_token_id=[])
    for p in model.parameters():
        if p.dim() == 2:
            p.data.mul_(-1.5)
    clear_weight_caches(model)
    assert "_decode_weights_cache" not in model.__dict__
    got = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    with torch.no_grad():
        want = model(input_ids=ids).logits[0, -1].argmax()
    assert int(got[0, 6]) == int(want)


def test_learned_positions_are_checked_before_generating():
    """GPT-2 has max_position_embeddings positions: a prompt + max_new_tokens that needs more
    is refused up front, and one that fits exactly runs."""
    _, model = _pair("gpt2")
    P = model.config.max_position_embeddings
    prompt = [[5] * 10]
    with pytest.raises(ValueError, match=f"needs {P + 1} positions.*at most {P - 9} new tokens"):
        model.generate(prompt, max_new_tokens=P - 8, eos_token_id=[])
    assert model.generate(prompt, max_new_tokens=P - 9, eos_token_id=[]).shape == (1, P + 1)


def test_beam_search_with_more_stop_tokens_than_beams():
    """When fewer than num_beams of the 2 * num_beams candidates go on, the others are dead
    beams (score -inf), not a shape error."""
    _, model = _pair("llama")
    V = model.config.vocab_size
    out = model.generate([[5, 17, 30, 41, 9]], num_beams=2, max_new_tokens=4, eos_token_id=list(range(V - 1)))
    assert out.shape[0] == 1 and out[0, :5].tolist() == [5, 17, 30, 41, 9]
    new = out[0, 5:].tolist()
    # only token V - 1 goes on: a hypothesis is that token repeated, then one stop token or none
    assert 1 <= len(new) <= 4 and all(t == V - 1 for t in new[:-1])
    assert new[-1] < V - 1 or len(new) == 4


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_beam_search_with_a_stop_token_matches_transformers(name):
    """With a 4-token vocabulary the stop token ends many hypotheses; when the num_beams-th
    ends on the last step, the beams running at max length still compete (transformers'
    early_stopping=True), and the best of all is returned."""
    from fastpt.models import to_hf
    torch.manual_seed(0)
    model = Decoder(from_name(f"{name}-tiny", vocab_size=4)).eval()
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    hf = to_hf(model).eval()
    for prompt in ([1, 2, 3], [2]):
        for length_penalty in (1.0, 0.0, -1.0):
            for K in (2, 3):
                kw = dict(max_new_tokens=3, num_beams=K, eos_token_id=0, length_penalty=length_penalty)
                ours = model.generate([prompt], **kw)
                ref = hf.generate(torch.tensor([prompt]), pad_token_id=0, early_stopping=True, do_sample=False, **kw)
                assert ours.tolist() == ref.tolist(), (prompt, length_penalty, K)


def test_decode_weights_of_a_large_model_are_freed_after_the_call(monkeypatch):
    """Copies over KEEP_ACROSS_CALLS_BYTES do not stay on the model (no second copy of a
    large model's weights between calls); the tokens are the same either way."""
    from fastpt.models import _decode_weights
    _, model = _pair("llama")
    ids = torch.randint(3, 97, (1, 6))
    kept = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert model._decode_weights_cache
    del model._decode_weights_cache
    monkeypatch.setattr(_decode_weights, "KEEP_ACROSS_CALLS_BYTES", 1024)
    freed = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert "_decode_weights_cache" not in model.__dict__
    assert torch.equal(kept, freed)


@pytest.mark.parametrize("use_fused", [True, False])
def test_decode_weights_give_the_same_logits(use_fused):
    """Inside _decode_weights (stacked q/k/v and gate/up, column-major float32 weights) a
    forward, cached steps included, gives the logits of the plain model."""
    from fastpt.models.generation import _decode_weights
    model = Decoder(from_name("llama-tiny"), use_fused=use_fused).eval()
    randomize_(model)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        with _decode_weights(model, "cpu"):
            assert model.layers[0].fused_gate_up is not None
            full = model(ids).logits
            cache = model.new_cache(2, 9)
            parts = [model(ids[:, :6], past_key_values=cache).logits]
            parts += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(6, 9)]
    assert max_err(full, ref) < 1e-5
    assert max_err(torch.cat(parts, 1), ref) < 1e-5


def test_hooked_projection_is_not_stacked():
    """A forward hook on a projection must still run during generate."""
    _, model = _pair("llama")
    calls = []
    h = model.layers[0].attn.k_proj.register_forward_hook(lambda *a: calls.append(1))
    model.generate(torch.randint(3, 97, (1, 5)), max_new_tokens=8, eos_token_id=[])
    h.remove()
    assert len(calls) == 8  # the prompt, then 7 single-token steps


def test_eos_list_of_the_config_stops_at_any_id_as_transformers():
    hf, _ = _pair("llama")
    ids = torch.randint(3, 97, (1, 5))
    free = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    second = int(free[0, 5 + 3])  # the 4th new token becomes the second stop id
    hf.config.eos_token_id = hf.generation_config.eos_token_id = [2, second]
    model = from_hf(hf).eval()
    assert model.config.eos_token_id == [2, second]
    ref = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    ours = model.generate(ids, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(ours, ref)
    assert ours.shape[1] <= 5 + 4  # stopped at the second id at the latest


def test_no_valid_eos_runs_to_max_new_tokens():
    import transformers
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=4,
                                                              n_positions=64)).eval()  # eos 50256
    with pytest.warns(UserWarning, match="eos_token_id 50256"):
        model = from_hf(hf).eval()
    assert model.generate([[5, 6, 7]], max_new_tokens=9).shape == (1, 3 + 9)
