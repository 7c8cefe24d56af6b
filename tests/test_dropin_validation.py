"""Drop-in behaviour found by the audits: a patched HF model saves and pickles as the original,
unpatching a peft model's inner model restores its attention, the per-family helpers refuse
another family, subclasses / remote code / torch.nn.RMSNorm are reported (never silently
skipped), the report and unpatch's count agree with what runs, fastpt.nn.RMSNorm's defaults
are torch.nn.RMSNorm's, and the lm-eval backend left-truncates long generation contexts and
names a bad max_gen_toks."""

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


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXModel
    return GPTNeoXModel(GPTNeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64)).eval()


def _bert():
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)).eval()


def _llama_of(cls):
    from transformers import LlamaConfig
    torch.manual_seed(0)
    return cls(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("helper, make", [("patch_llama", _llama), ("patch_llama", _mistral),
                                          ("patch_gpt2", _gpt2), ("patch_bert", _bert),
                                          ("patch_t5", lambda: _t5("relu"))])
def test_family_helper_patches_as_patch(helper, make):
    fn = getattr(fastpt.patch, helper)
    assert getattr(fastpt, helper) is fn and helper in fastpt.patch.__all__
    model, plain = make(), make()
    report = fn(model)
    assert report == fastpt.patch(plain) and report.patched
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    assert fastpt.unpatch(model) == sum(report.patched.values())


@pytest.mark.parametrize("helper, make, message", [
    ("patch_gpt2", _llama, r"patch_gpt2 patches model types gpt2; the model has 'llama': use fastpt.patch.patch_llama"),
    ("patch_llama", lambda: _t5("relu"), r"the model has 't5': use fastpt.patch.patch_t5"),
    ("patch_llama", _gpt_neox, r"the model has 'gpt_neox': fastpt patches llama, .* only"),
    ("patch_bert", lambda: torch.nn.Linear(2, 2), r"no transformers config in it: not a transformers model"),
])
def test_family_helper_refuses_another_family(helper, make, message):
    model = make()
    classes = [type(m) for m in model.modules()]
    with pytest.raises(fastpt.patch.PatchError, match=message):
        getattr(fastpt.patch, helper)(model)
    assert [type(m) for m in model.modules()] == classes
    with pytest.raises(TypeError, match=f"fastpt.patch.{helper} expects a torch.nn.Module"):
        getattr(fastpt.patch, helper)("model")


def test_mixed_families_patch_only_the_supported_ones_attention():
    # Every config got "fastpt", so GPT-NeoX's attention ran fastpt's while the report said
    # it was not patched.
    import fastpt.patch.attention as pa
    model = torch.nn.ModuleDict(dict(a=_llama_of(transformers.LlamaModel), b=_gpt_neox()))
    before = model.b.config._attn_implementation
    with pytest.warns(UserWarning, match="model type 'gpt_neox' is not one of"):
        report = fastpt.patch(model, strict=False)
    assert report.patched["attention"] == 1 and report.not_patched["GPTNeoXAttention"] == "unknown to fastpt"
    assert model.a.config._attn_implementation == "fastpt" and model.b.config._attn_implementation == before
    calls = []
    original = pa.attention
    pa.attention = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            model.b(input_ids=torch.randint(1, 97, (1, 6)))
            assert not calls
            model.a(input_ids=torch.randint(1, 97, (1, 6)))
            assert len(calls) == 1
    finally:
        pa.attention = original
    assert fastpt.unpatch(model) == sum(report.patched.values())


@pytest.mark.parametrize("make", [_bert, lambda: transformers.GPT2Model(_gpt2().config)], ids=["bert", "gpt2"])
def test_unpatch_counts_the_attention_it_restores(make):
    model = make()
    report = fastpt.patch(model)
    assert report.patched["attention"] > 0
    assert fastpt.unpatch(model) == sum(report.patched.values())
    assert model.config._attn_implementation != "fastpt" and fastpt.unpatch(model) == 0


def _no_linear(patched: dict) -> dict:
    return {k: n for k, n in patched.items() if k != "linear"}  # "linear": only where fastpt's GEMM is faster


def _with_subclasses(own_forward: bool):
    """A Llama whose attention, norms and MLP are user subclasses of HF's classes (with or
    without their own forward)."""
    from transformers.models.llama import modeling_llama as ml
    body = {"forward": lambda self, *a, **k: super(type(self), self).forward(*a, **k)} if own_forward else {}
    model = _llama()
    layer = model.model.layers[0]
    for attr, base in [("self_attn", ml.LlamaAttention), ("mlp", ml.LlamaMLP),
                       ("input_layernorm", ml.LlamaRMSNorm), ("post_attention_layernorm", ml.LlamaRMSNorm)]:
        module = getattr(layer, attr)
        module.__class__ = type("My" + base.__name__[5:], (base,), dict(body))
    return model


def test_subclasses_keeping_the_forward_are_patched_as_their_base():
    model, reference = _with_subclasses(own_forward=False), _llama()
    report = fastpt.patch(model)
    assert report == fastpt.patch(_llama()) and not report.not_patched
    subclass = type(model.model.layers[0].self_attn)
    assert subclass.__name__ == "MyAttention" and subclass._fastpt_kind == "rope"
    x = torch.randint(1, 97, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, reference(input_ids=x).logits, rtol=1e-4, atol=1e-5)
    fastpt.unpatch(model)
    assert type(model.model.layers[0].self_attn).__name__ == "MyAttention"
    assert type(model.model.layers[0].self_attn).__mro__[1].__name__ == "LlamaAttention"


def test_subclasses_remote_code_and_torch_rms_norm_are_reported_not_skipped():
    model = _with_subclasses(own_forward=True)
    model.model.norm = torch.nn.RMSNorm(32, eps=1e-6)
    remote = type("FooAttention", (torch.nn.Module,), {"__module__": "transformers_modules.foo.modeling_foo"})
    model.model.layers[0].extra = remote()
    classes, attn = [type(m) for m in model.modules()], model.config._attn_implementation
    with pytest.raises(fastpt.patch.PatchError, match="not patched: .*MyAttention") as err:
        fastpt.patch(model)
    assert [type(m) for m in model.modules()] == classes and model.config._attn_implementation == attn
    why = err.value.report.not_patched
    assert set(why) == {"MyAttention", "MyMLP", "MyRMSNorm", "RMSNorm", "FooAttention"}
    assert why["MyAttention"].startswith("subclass of LlamaAttention with its own forward")
    assert why["MyMLP"] == "subclass of LlamaMLP with its own forward"
    assert why["RMSNorm"].startswith("torch.nn.RMSNorm") and "remote code" in why["FooAttention"]
    with pytest.warns(UserWarning, match="partial patch") as caught:
        report = fastpt.patch(model, strict=False)
    assert caught[0].filename == __file__  # the warning points at the caller
    assert _no_linear(report.patched) == {"loss": 1} and "not patched MyAttention" in str(report)
    assert not fastpt.patch.modules.is_patched(model.model.layers[0].self_attn)


def test_causal_lm_subclass_with_its_own_forward_or_loss():
    from transformers import LlamaForCausalLM

    class OwnForward(LlamaForCausalLM):
        def forward(self, *a, **k):
            return super().forward(*a, **k)

    class OwnLoss(LlamaForCausalLM):
        loss_function = property(lambda self: None)

    assert fastpt.patch(_llama_of(OwnForward)).patched["loss"] == 1  # its loss_function is HF's
    with pytest.raises(fastpt.patch.PatchError, match="OwnForward .*fused_cross_entropy not applied"):
        fastpt.patch(_llama_of(OwnForward), fused_cross_entropy=True)
    with pytest.raises(fastpt.patch.PatchError, match="OwnLoss .*its own loss_function"):
        fastpt.patch(_llama_of(OwnLoss))


def test_norm_with_eps_zero_and_mlp_with_another_activation_are_kept():
    # fastpt's kernel refuses eps 0 (the forward raised after patch), and an MLP whose act_fn
    # is not SiLU would have run SwiGLU silently.
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=0.0)).eval()
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    reference = copy.deepcopy(model)
    report = fastpt.patch(model)
    assert "rms_norm" not in report.patched and "swiglu" not in report.patched
    assert "eps 0.0" in report.kept["LlamaRMSNorm"] and "GELU" in report.kept["LlamaMLP"]
    x = torch.randint(1, 97, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, reference(input_ids=x).logits, rtol=1e-4, atol=1e-5)


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
