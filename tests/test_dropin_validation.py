"""Drop-in behaviour found by the audit: a patched HF model saves and pickles as the original,
unpatching a peft model's inner model restores its attention, fastpt.nn.RMSNorm's defaults are
torch.nn.RMSNorm's, and the lm-eval backend left-truncates long generation contexts and names
a bad max_gen_toks."""

from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import torch

import fastpt
import fastpt.nn as fnn

transformers = pytest.importorskip("transformers")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=1)).eval()


def _t5(proj):
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4, feed_forward_proj=proj)).eval()


# --- fastpt.patch -------------------------------------------------------------------------

@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_patched_model_saves_original_architectures(make, tmp_path):
    plain = make()
    plain.save_pretrained(tmp_path / "plain")
    patched = make()
    fastpt.patch(patched)
    assert type(patched).__name__ == type(plain).__name__
    patched.save_pretrained(tmp_path / "patched")
    read = [json.loads((tmp_path / d / "config.json").read_text())["architectures"] for d in ("plain", "patched")]
    assert read[0] == read[1] == [type(plain).__name__]


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_patched_model_pickles(make):
    model = make()
    fastpt.patch(model)
    x = torch.randint(1, 97, (2, 8))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    for other in copies:
        assert type(other) is type(model)  # still patched, the same cached class
        assert [type(m) for m in other.modules()] == [type(m) for m in model.modules()]
        with torch.no_grad():
            assert torch.equal(other(input_ids=x).logits, ref)
        assert fastpt.unpatch(other) == fastpt.unpatch(copy.deepcopy(model)) > 0
        assert type(other) is type(model)._fastpt_original
        assert other.config._attn_implementation != "fastpt"
    assert model.config._attn_implementation == "fastpt"  # the copies' unpatching left it alone


def test_unpatch_inner_peft_model_restores_attention():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    inner = model.base_model.model
    before = inner.config._attn_implementation
    fastpt.patch(model)
    assert inner.config._attn_implementation == "fastpt"
    assert fastpt.unpatch(inner) > 0
    assert inner.config._attn_implementation == before
    assert not any(fastpt.patch.modules.is_patched(m) for m in model.modules())
    # patch again from the inside, unpatch from the outside
    fastpt.patch(inner)
    fastpt.unpatch(model)
    assert inner.config._attn_implementation == before


def test_t5_gated_mlp_kept_reason():
    silu = fastpt.patch(_t5("gated-silu")).kept["T5DenseGatedActDense"]
    assert "GELU" not in silu.upper() and "silu" in silu.lower()
    gelu = fastpt.patch(_t5("gated-gelu")).kept["T5DenseGatedActDense"]
    assert "gelu" in gelu.lower()


@pytest.mark.parametrize("bad", [None, "model", 3])
def test_unpatch_non_module_is_type_error(bad):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastpt.patch(bad)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastpt.unpatch(bad)


# --- fastpt.nn.RMSNorm ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_defaults_are_torch(dtype):
    torch.manual_seed(0)
    theirs, ours = torch.nn.RMSNorm(16, dtype=dtype), fnn.RMSNorm(16, dtype=dtype)
    assert ours.eps is theirs.eps is None
    x = torch.randn(3, 5, 16, dtype=dtype) * 1e-4  # small enough that eps matters
    tol = dict(rtol=1e-5, atol=0) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
    torch.testing.assert_close(ours(x), theirs(x), **tol)
    # HF's keyword keeps HF's default eps
    assert fnn.RMSNorm(hidden_size=16).eps == 1e-6
    assert fnn.RMSNorm(16, eps=1e-5).eps == 1e-5


def test_rms_norm_reset_parameters():
    norm = fnn.RMSNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(8))
    fnn.RMSNorm(8, elementwise_affine=False).reset_parameters()  # no weight: nothing to do


def test_models_keep_their_config_eps():
    from fastpt.models import Decoder, DecoderConfig
    config = DecoderConfig.from_name("llama-tiny", vocab_size=50, num_layers=1)
    norms = [m for m in Decoder(config).modules() if isinstance(m, fnn.RMSNorm)]
    assert norms and all(m.eps == config.norm_eps for m in norms)


# --- lm-eval backend ------------------------------------------------------------------------

class _Request:  # the part of lm-eval's Instance the model reads
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    pytest.importorskip("lm_eval")
    from fastpt.data.tokenizer import save_tokenizer, special_ids, train_tokenizer
    from fastpt.data.world import World
    from fastpt.models import Decoder, DecoderConfig
    from fastpt.models.hf import save_pretrained
    tok = train_tokenizer(list(World(0).documents(300)), "bpe", vocab_size=300)
    torch.manual_seed(0)
    config = DecoderConfig.from_name("gpt2-tiny", vocab_size=tok.get_vocab_size(), num_layers=1,
                                     bos_token_id=special_ids(tok).bos, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("gpt2")
    save_pretrained(Decoder(config).eval(), path)
    save_tokenizer(tok, str(path))
    return path


def test_lm_eval_generate_long_context_is_left_truncated(gpt2_folder):
    from fastpt.icl.lm_eval_harness import FastptLM
    from fastpt.models import generate
    lm = FastptLM(pretrained=str(gpt2_folder))
    context = "Ruza lives in Varna. " * 40
    ids = lm.tokenizer.encode(context, add_special_tokens=False).ids
    assert len(ids) > 32
    (text,) = lm.generate_until([_Request(context, {"until": ["\n"], "max_gen_toks": 5})])
    # the same as generating from the last 32 - 5 + 1 tokens (the BOS dropped first)
    kept = ids[len(ids) + 1 - 28:]
    out = generate(lm.model, torch.tensor([kept]), max_new_tokens=5)
    expected = lm.tokenizer.decode(out[0, len(kept):].tolist())
    assert text == (expected[:expected.find("\n")] if "\n" in expected else expected)
    # max_gen_toks that leaves no room for the context is refused, as lm-eval's HF model asserts
    with pytest.raises(ValueError, match="max_gen_toks=100 leaves no room"):
        lm.generate_until([_Request("Ruza", {"until": ["\n"], "max_gen_toks": 100})])


@pytest.mark.parametrize("bad", ["abc", -1, 0, 2.5, True])
def test_lm_eval_bad_max_gen_toks_is_named(gpt2_folder, bad):
    from fastpt.icl.lm_eval_harness import FastptLM
    with pytest.raises(ValueError, match="max_gen_toks"):
        FastptLM(pretrained=str(gpt2_folder), max_gen_toks=bad)
    lm = FastptLM(pretrained=str(gpt2_folder))
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm.generate_until([_Request("Ruza", {"until": ["\n"], "max_gen_toks": bad})])
    assert FastptLM(pretrained=str(gpt2_folder), max_gen_toks="7").max_gen_toks == 7
