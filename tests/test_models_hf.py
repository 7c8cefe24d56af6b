"""fastpt models against Hugging Face transformers (tiny random models, fp32): logits,
losses and hidden states within 1e-4, conversion both ways, save/load in HF layout,
and clear errors for checkpoints that do not fit."""

from __future__ import annotations

import json
import os

import pytest
import torch

from models_util import hf_bert, hf_gpt2, hf_llama, hf_t5, max_err, randomize_, transformers
from fastpt.models import (CheckpointError, Decoder, Encoder, Seq2Seq, from_hf, from_name,
                           from_pretrained, to_hf)

TOL = 1e-4
B, T = 2, 11


def _ids(vocab=97, shape=(B, T)):
    return torch.randint(3, vocab, shape)


def _mask():
    m = torch.ones(B, T, dtype=torch.long)
    m[1, 7:] = 0  # right padding in row 1
    return m


HF_DECODERS = {
    "llama-gqa": lambda: hf_llama(),
    "llama-odd": lambda: hf_llama(hidden_size=36, num_attention_heads=3, num_key_value_heads=3,
                                  intermediate_size=50, num_hidden_layers=3),
    "llama-headdim-bias": lambda: hf_llama(hidden_size=40, num_attention_heads=4, num_key_value_heads=1,
                                           head_dim=14, attention_bias=True, mlp_bias=True, rope_theta=500.0),
    "gpt2": lambda: hf_gpt2(),
    "gpt2-odd": lambda: hf_gpt2(n_embd=42, n_head=3, n_layer=3, n_inner=50),
}


@pytest.mark.parametrize("name", HF_DECODERS)
@pytest.mark.parametrize("use_fused", [True, False])
def test_decoder_matches_transformers(name, use_fused):
    hf = HF_DECODERS[name]()
    randomize_(hf)
    model = from_hf(hf, use_fused=use_fused).eval()
    ids = _ids()
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels, output_hidden_states=True)
        out = model(ids, labels=labels, output_hidden_states=True)
    assert max_err(out.logits, ref.logits) < TOL
    assert abs(out.loss.item() - ref.loss.item()) < TOL
    assert len(out.hidden_states) == len(ref.hidden_states)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert max_err(a, b) < TOL


@pytest.mark.parametrize("use_fused", [True, False])
def test_decoder_left_padding_matches_transformers(use_fused):
    hf = hf_llama()
    randomize_(hf)
    model = from_hf(hf, use_fused=use_fused).eval()
    ids, mask = _ids(), torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = model(ids, attention_mask=mask).logits  # positions from the mask by default
    assert max_err(out[mask.bool()], ref[mask.bool()]) < TOL
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("use_fused", [True, False])
def test_encoder_matches_transformers(use_fused):
    hf = hf_bert()
    randomize_(hf)
    model = from_hf(hf, use_fused=use_fused).eval()
    ids, mask = _ids(), _mask()
    segments = torch.zeros(B, T, dtype=torch.long)
    segments[:, 6:] = 1
    labels = torch.full((B, T), -100)
    labels[:, 2:5] = ids[:, 2:5]
    nsp = torch.tensor([0, 1])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=segments, labels=labels,
                 next_sentence_label=nsp, output_hidden_states=True)
        out = model(ids, attention_mask=mask, token_type_ids=segments, labels=labels,
                    next_sentence_label=nsp, output_hidden_states=True)
    assert max_err(out.logits, ref.prediction_logits) < TOL
    assert max_err(out.nsp_logits, ref.seq_relationship_logits) < TOL
    assert abs(out.loss.item() - ref.loss.item()) < TOL
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert max_err(a, b) < TOL


def test_encoder_from_bert_model_keeps_heads():
    hf = transformers.BertModel(hf_bert().config).eval()
    randomize_(hf)
    model = from_hf(hf).eval()
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids)
        out = model(ids)
    assert max_err(out.last_hidden_state, ref.last_hidden_state) < TOL
    assert max_err(out.pooler_output, ref.pooler_output) < TOL


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
@pytest.mark.parametrize("use_fused", [True, False])
def test_seq2seq_matches_transformers(ff, use_fused):
    hf = hf_t5(feed_forward_proj=ff)
    randomize_(hf)
    model = from_hf(hf, use_fused=use_fused).eval()
    ids, mask = _ids(), _mask()
    labels = _ids(shape=(B, 6))
    labels[1, 4:] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert max_err(out.logits, ref.logits) < TOL
    assert max_err(out.encoder_last_hidden_state, ref.encoder_last_hidden_state) < TOL
    assert abs(out.loss.item() - ref.loss.item()) < TOL


def test_relative_buckets_long_distances():
    """Distances past max_distance and both directions, against HF's bucket function."""
    from transformers.models.t5.modeling_t5 import T5Attention
    from fastpt.models.seq2seq import relative_position_bucket
    rel = torch.arange(-300, 300).view(1, -1)
    for bidirectional in (True, False):
        ours = relative_position_bucket(rel, bidirectional, 32, 128)
        ref = T5Attention._relative_position_bucket(rel, bidirectional, 32, 128)
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("preset", ["bert-tiny", "gpt2-tiny", "llama-tiny", "t5-tiny"])
def test_to_hf_and_back(preset):
    cfg = from_name(preset)
    model = {"bert": Encoder, "decoder": Decoder, "t5": Seq2Seq}[cfg.model_type](cfg).eval()
    randomize_(model)
    hf = to_hf(model).eval()
    back = from_hf(hf).eval()
    ids = _ids(cfg.vocab_size)
    kw = dict(decoder_input_ids=ids[:, :5]) if cfg.model_type == "t5" else {}
    with torch.no_grad():
        ours, ref = model(ids, **kw).logits, hf(ids, **kw)
        ref = ref.prediction_logits if cfg.model_type == "bert" else ref.logits
        assert max_err(ours, ref) < TOL
        for (n, a), b in zip(model.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), n


@pytest.mark.parametrize("preset", ["bert-tiny", "gpt2-tiny", "llama-tiny", "t5-tiny"])
def test_save_load_round_trip_exact(preset, tmp_path):
    cfg = from_name(preset)
    if preset == "t5-tiny":
        cfg = cfg.replace(tie_word_embeddings=False)  # T5 v1.1 layout: own lm_head
    model = {"bert": Encoder, "decoder": Decoder, "t5": Seq2Seq}[cfg.model_type](cfg)
    randomize_(model)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config == cfg
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys()
    assert all(torch.equal(sd[k], ld[k]) for k in sd)


def test_transformers_reads_our_checkpoint(tmp_path):
    model = Decoder(from_name("llama-tiny")).eval()
    randomize_(model)
    model.save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(1000)
    with torch.no_grad():
        assert max_err(model(ids).logits, hf(ids).logits) < TOL


def test_we_read_transformers_checkpoint(tmp_path):
    hf = hf_gpt2()
    randomize_(hf)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert max_err(model(ids).logits, hf(ids).logits) < TOL


def _edit_checkpoint(path, edit):
    from safetensors.torch import load_file, save_file
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def test_checkpoint_errors_list_every_bad_tensor(tmp_path):
    Decoder(from_name("llama-tiny")).save_pretrained(tmp_path)

    def edit(t):
        del t["model.layers.0.mlp.up_proj.weight"]
        del t["model.norm.weight"]
        t["model.layers.9.extra.weight"] = torch.zeros(2)
        t["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    _edit_checkpoint(tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    msg = str(e.value)
    for text in ("missing tensors (2)", "model.layers.0.mlp.up_proj.weight", "model.norm.weight",
                 "unexpected tensors (1): model.layers.9.extra.weight",
                 "mis-shaped tensor model.layers.1.self_attn.k_proj.weight: file has [3, 64], "
                 "model expects [16, 64]"):
        assert text in msg


def test_checkpoint_errors_name_integer_and_non_finite_tensors(tmp_path):
    Decoder(from_name("llama-tiny")).save_pretrained(tmp_path)

    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)
        t["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    _edit_checkpoint(tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    msg = str(e.value)
    assert "not floating-point (1): model.norm.weight (torch.int32)" in msg
    assert "NaN or infinite values (1): model.layers.0.mlp.up_proj.weight" in msg


def test_truncated_and_corrupt_files(tmp_path):
    Decoder(from_name("gpt2-tiny")).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        from_pretrained(tmp_path)
    file.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        from_pretrained(tmp_path)


def test_no_pickle(tmp_path):
    Decoder(from_name("gpt2-tiny")).save_pretrained(tmp_path)
    os.replace(tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never pickle"):
        from_pretrained(tmp_path)


def test_unsupported_configs_are_refused(tmp_path):
    Decoder(from_name("llama-tiny")).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="RoPE scaling"):
        from_pretrained(tmp_path)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="holds a Decoder, not a Encoder"):
        Encoder.from_pretrained(tmp_path)


# ---------------------------------------------------------------- audit 3

def test_t5_v11_saved_by_transformers_5_loads(tmp_path):
    # transformers 5 writes tie_word_embeddings=true, scale_decoder_outputs=false and no
    # lm_head.weight for a T5 v1.1 (untied, unscaled): its head is shared.weight.
    hf = hf_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    randomize_(hf)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    ids, dec = _ids(), _ids(shape=(B, 5))
    with torch.no_grad():
        ours = model(input_ids=ids, decoder_input_ids=dec).logits
        ref = hf(input_ids=ids, decoder_input_ids=dec).logits
        # fp32 rounding on logits of magnitude ~30 (an unscaled head); a wrong or scaled head is off by ~10
        assert max_err(ours, ref) < 1e-6 * ref.abs().max()
        assert torch.equal(ours, from_hf(hf)(input_ids=ids, decoder_input_ids=dec).logits)


@pytest.mark.parametrize("base, full", [
    (lambda: transformers.GPT2Model(hf_gpt2().config), transformers.GPT2LMHeadModel),
    (lambda: transformers.LlamaModel(hf_llama(tie_word_embeddings=True).config), transformers.LlamaForCausalLM),
], ids=["GPT2Model", "LlamaModel-tied"])
def test_base_decoder_layouts_with_tied_heads_load(tmp_path, base, full):
    hf = base().eval()
    randomize_(hf, 0.2)
    hf.save_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        ref = full.from_pretrained(tmp_path).eval()(ids).logits
        assert max_err(from_pretrained(tmp_path)(ids).logits, ref) < TOL
        assert max_err(from_hf(hf)(ids).logits, ref) < TOL


def test_base_llama_without_a_head_is_refused_briefly(tmp_path):
    hf = transformers.LlamaModel(hf_llama().config)  # untied: the head is not in the file
    hf.save_pretrained(tmp_path)
    for load in (lambda: from_pretrained(tmp_path), lambda: from_hf(hf)):
        with pytest.raises(CheckpointError, match=r"base model \(LlamaModel: no 'model.' prefix\) without an "
                                                  r"LM head") as e:
            load()
        assert len(str(e.value)) < 400  # not every tensor name


@pytest.mark.parametrize("rope", [dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
                                  dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}),
                                  dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64})],
                         ids=["linear", "default-with-factor", "llama3"])
def test_rope_scaling_in_config_objects_is_refused(rope):
    with pytest.raises(ValueError, match="RoPE scaling is not supported"):
        from_hf(hf_llama(**rope))


def test_bert_decoder_is_refused():
    hf = transformers.BertModel(hf_bert(is_decoder=True).config)  # causal self-attention in transformers
    with pytest.raises(ValueError, match="is_decoder=true is not supported"):
        from_hf(hf)


def test_default_token_ids_outside_a_small_vocabulary_are_dropped():
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=4,
                                                              n_positions=64))  # bos/eos: 50256
    with pytest.warns(UserWarning, match="bos_token_id 50256, eos_token_id 50256"):
        model = from_hf(hf)
    assert model.config.bos_token_id is None and model.config.eos_token_id is None
