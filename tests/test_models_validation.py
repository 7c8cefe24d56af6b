"""Input and config validation of the models: bad values raise a clear error naming the
argument instead of crashing later or giving silently wrong results."""

from __future__ import annotations

import pytest
import torch

from fastpt.models import (Decoder, DecoderConfig, Encoder, EncoderConfig, Seq2Seq, Seq2SeqConfig,
                           from_name)
from fastpt.models.seq2seq import relative_position_bucket


@pytest.fixture(scope="module")
def encoder():
    return Encoder(from_name("bert-tiny")).eval()


@pytest.fixture(scope="module")
def t5():
    return Seq2Seq(from_name("t5-tiny", dropout=0.0)).eval()


def _ids(B=2, T=6):
    return torch.randint(1, 1000, (B, T))


# -- Seq2SeqConfig: relative attention buckets ---------------------------------------------

@pytest.mark.parametrize("num_buckets, max_distance", [(1, 128), (2, 128), (3, 128), (4, 1), (4, 2),
                                                       (32, 1), (32, 8), (32, 16), (5, 2)])
def test_bucket_settings_that_break_the_bucket_function_raise(num_buckets, max_distance):
    with pytest.raises(ValueError, match="relative_attention_(num_buckets|max_distance)"):
        Seq2SeqConfig.from_name("t5-tiny", relative_attention_num_buckets=num_buckets,
                                relative_attention_max_distance=max_distance)


@pytest.mark.parametrize("num_buckets, max_distance", [(4, 3), (5, 3), (7, 4), (32, 17), (32, 128), (64, 33)])
def test_accepted_bucket_settings_give_monotone_in_range_buckets(num_buckets, max_distance):
    cfg = Seq2SeqConfig.from_name("t5-tiny", relative_attention_num_buckets=num_buckets,
                                  relative_attention_max_distance=max_distance)
    distance = torch.arange(3000)
    for bidirectional in (True, False):  # the encoder's and the decoder's buckets
        for sign in (1, -1):
            b = relative_position_bucket(sign * distance, bidirectional, cfg.relative_attention_num_buckets,
                                         cfg.relative_attention_max_distance)
            assert 0 <= int(b.min()) and int(b.max()) < num_buckets
            if bidirectional or sign == -1:  # the causal decoder maps every future key to bucket 0
                assert bool((b.diff() >= 0).all()), "buckets must not decrease with distance"


def test_smallest_bucket_settings_run_at_40_tokens():
    m = Seq2Seq(from_name("t5-tiny", relative_attention_num_buckets=4,
                          relative_attention_max_distance=3)).eval()
    ids = _ids(1, 40)
    assert torch.isfinite(m(ids, decoder_input_ids=ids[:, :30]).logits).all()


# -- config replace() re-derives defaulted fields ----------------------------------------------

def test_replace_rederives_defaulted_fields():
    llama = from_name("llama-tiny")  # head_dim defaulted; intermediate_size given by the preset
    wide = llama.replace(hidden_size=128)
    assert (wide.head_dim, wide.intermediate_size) == (16, 176)
    assert wide == DecoderConfig.from_name("llama-tiny", hidden_size=128)

    gpt2 = from_name("gpt2-tiny").replace(hidden_size=128)
    assert (gpt2.head_dim, gpt2.intermediate_size) == (32, 512)

    base = DecoderConfig(vocab_size=100, hidden_size=64, num_layers=1, num_heads=4)
    as_gpt2 = base.replace(flavour="gpt2")
    assert as_gpt2 == DecoderConfig(flavour="gpt2", vocab_size=100, hidden_size=64, num_layers=1, num_heads=4)
    assert (as_gpt2.hidden_act, as_gpt2.norm_eps, as_gpt2.tie_word_embeddings) == ("gelu_new", 1e-5, True)
    assert as_gpt2.replace(flavour="llama") == base

    t5 = from_name("t5-tiny")
    assert t5.replace(num_layers=3).num_decoder_layers == 3


def test_replace_keeps_explicit_fields():
    cfg = DecoderConfig(vocab_size=100, hidden_size=64, num_layers=1, num_heads=4, head_dim=32)
    assert cfg.replace(num_layers=2).head_dim == 32
    assert from_name("llama-tiny").replace(hidden_size=128, head_dim=8).head_dim == 8
    assert from_name("t5-tiny", num_decoder_layers=1).replace(num_layers=3).num_decoder_layers == 1
    with pytest.raises(ValueError, match="num_kv_heads"):  # the preset's GQA is explicit
        from_name("llama-tiny").replace(flavour="gpt2")


@pytest.mark.parametrize("cls, field", [(DecoderConfig, "eos_token_id"), (DecoderConfig, "bos_token_id"),
                                        (EncoderConfig, "pad_token_id"),
                                        (Seq2SeqConfig, "decoder_start_token_id")])
def test_bool_token_ids_raise(cls, field):
    with pytest.raises(ValueError, match=field):
        cls(**{field: True})


# -- generate on an encoder ---------------------------------------------------------------

def test_encoder_generate_raises_type_error(encoder):
    with pytest.raises(TypeError, match="Encoder is not generative"):
        encoder.generate(_ids(), max_new_tokens=2)


# -- attention masks of the wrong shape (all ones used to pass) ----------------------------

@pytest.mark.parametrize("shape", [(2, 5), (6,), (2, 7), (1, 6)])
def test_encoder_rejects_wrong_shape_mask(encoder, shape):
    with pytest.raises(ValueError, match=r"attention_mask must be .*\(2, 6\)"):
        encoder(_ids(), attention_mask=torch.ones(shape))


def test_all_ones_masks_of_the_right_shape_still_mean_no_mask(encoder, t5):
    ids = _ids()
    torch.testing.assert_close(encoder(ids, attention_mask=torch.ones(2, 6)).logits, encoder(ids).logits)
    dec = ids[:, :4]
    torch.testing.assert_close(
        t5(ids, attention_mask=torch.ones(2, 6), decoder_input_ids=dec,
           decoder_attention_mask=torch.ones(2, 4)).logits,
        t5(ids, decoder_input_ids=dec).logits)


def test_seq2seq_rejects_wrong_shape_masks(t5):
    ids = _ids()
    with pytest.raises(ValueError, match=r"attention_mask must be .*\(2, 6\)"):
        t5(ids, attention_mask=torch.ones(2, 5), decoder_input_ids=ids)
    with pytest.raises(ValueError, match=r"^attention_mask must be .*\(2, 6\)"):
        t5(encoder_outputs=torch.randn(2, 6, 64), attention_mask=torch.ones(2, 4), decoder_input_ids=ids)
    with pytest.raises(ValueError, match=r"decoder_attention_mask must be .*\(2, 4\)"):
        t5(ids, decoder_input_ids=ids[:, :4], decoder_attention_mask=torch.ones(2, 5))


def test_seq2seq_decoder_mask_covers_the_cache(t5):
    ids = _ids()
    cache = t5.new_cache(2, 8)
    t5(ids, decoder_input_ids=ids[:, :3], past_key_values=cache)
    t5(ids, decoder_input_ids=ids[:, 3:4], past_key_values=cache, decoder_attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"decoder_attention_mask must be .*\(2, 5\)"):
        t5(ids, decoder_input_ids=ids[:, 4:5], past_key_values=cache, decoder_attention_mask=torch.ones(2, 1))


# -- lower-priority input checks -------------------------------------------------------------

def test_encoder_empty_input_raises(encoder):
    with pytest.raises(ValueError, match="at least one token"):
        encoder(torch.zeros(2, 0, dtype=torch.long))


def test_encoder_next_sentence_labels_checked(encoder):
    ids = _ids()
    for bad, match in ((torch.tensor([0, 2]), r"0 \(IsNext\), 1 \(NotNext\) or -100, got 2"),
                       (torch.tensor([0, -5]), "got -5"),
                       (torch.tensor([0, 1, 1]), r"must be \(2,\) integers"),
                       (torch.tensor([0.0, 1.0]), r"must be \(2,\) integers")):
        with pytest.raises(ValueError, match=match):
            encoder(ids, next_sentence_label=bad)
    nsp = torch.tensor([0, -100])  # -100: that row is ignored, as in F.cross_entropy
    out = encoder(ids, next_sentence_label=nsp)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.nsp_logits, nsp))


@pytest.mark.parametrize("return_logits", [True, False])
def test_encoder_labels_checked(encoder, return_logits):
    ids = _ids()
    with pytest.raises(ValueError, match=r"labels must be \(B, T\) = \(2, 6\)"):
        encoder(ids, labels=ids[:, :5], return_logits=return_logits)
    with pytest.raises(ValueError, match="labels must lie in"):
        encoder(ids, labels=ids + 1000, return_logits=return_logits)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    logits = encoder(ids).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(encoder(ids, labels=labels, return_logits=return_logits).loss, expected)


@pytest.mark.parametrize("return_logits", [True, False])
def test_seq2seq_labels_named_in_errors(t5, return_logits):
    ids = _ids()
    for bad in (ids + 1000, ids - 2000):  # out of the vocabulary; negative but not -100
        with pytest.raises(ValueError, match="^labels must lie in"):
            t5(ids, labels=bad, return_logits=return_logits)
    with pytest.raises(ValueError, match=r"labels must be \(B, T\) = \(2, 6\)"):
        t5(ids, decoder_input_ids=ids, labels=ids[:, :4], return_logits=return_logits)
    with pytest.raises(ValueError, match=r"labels must be \(batch, length\)"):
        t5(ids, labels=ids[0], return_logits=return_logits)


def test_seq2seq_encoder_outputs_forms(t5):
    ids = _ids()
    memory = t5.encode(ids)[0]
    want = t5(encoder_outputs=memory, decoder_input_ids=ids[:, :3]).logits
    torch.testing.assert_close(t5(encoder_outputs=(memory,), decoder_input_ids=ids[:, :3]).logits, want)
    with pytest.raises(TypeError, match="encoder_outputs"):
        t5(encoder_outputs={"last_hidden_state": memory}, decoder_input_ids=ids)
    with pytest.raises(ValueError, match=r"encoder_outputs must be \(B, S, hidden_size=64\)"):
        t5(encoder_outputs=torch.randn(2, 6, 32), decoder_input_ids=ids)


def test_decoder_unchanged_by_shared_mask_check():
    # key_padding gained an optional shape check; the Decoder, which checks the shape itself,
    # still treats an all-ones mask as none.
    m = Decoder(from_name("llama-tiny")).eval()
    ids = _ids()
    torch.testing.assert_close(m(ids, attention_mask=torch.ones(2, 6)).logits, m(ids).logits)


@pytest.mark.parametrize("flavour", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("kwargs, error, match", [
    ({"document_ids": torch.zeros(6, dtype=torch.long)}, ValueError, r"document_ids must be \(B, T\) = \(2, 6\)"),
    ({"document_ids": torch.zeros(2, 8, dtype=torch.long)}, ValueError, r"document_ids .* got \(2, 8\)"),
    ({"document_ids": torch.zeros(1, 6, dtype=torch.long)}, ValueError, r"document_ids .* got \(1, 6\)"),
    ({"document_ids": torch.zeros(2, 6)}, TypeError, "document_ids must hold integer ids"),
    ({"prefix_lengths": torch.tensor([2])}, ValueError, r"prefix_lengths must be \(B,\) = \(2,\)"),
    ({"prefix_lengths": torch.tensor([2, 3, 4])}, ValueError, r"prefix_lengths .* got \(3,\)"),
    ({"prefix_lengths": torch.tensor(2)}, ValueError, r"prefix_lengths .* got \(\)"),
    ({"prefix_lengths": torch.tensor([2.5, 3.0])}, TypeError, "prefix_lengths must hold integer lengths"),
    ({"prefix_lengths": torch.tensor([-1, 3])}, ValueError, r"prefix_lengths must lie in \[0, T=6\], got values in \[-1, 3\]"),
    ({"prefix_lengths": torch.tensor([100, 3])}, ValueError, r"prefix_lengths must lie in \[0, T=6\].*\[3, 100\]"),
])
def test_decoder_checks_document_ids_and_prefix_lengths(flavour, kwargs, error, match):
    m = Decoder(from_name(flavour)).eval()
    with pytest.raises(error, match=match):
        m(_ids(), **kwargs)


def test_decoder_accepts_prefix_lengths_at_both_ends():
    m = Decoder(from_name("llama-tiny")).eval()
    ids = _ids()
    # The range check is inclusive: 0 is plain causal attention, T a wholly bidirectional row.
    torch.testing.assert_close(m(ids, prefix_lengths=torch.tensor([0, 0])).logits, m(ids).logits)
    assert m(ids, prefix_lengths=torch.tensor([6, 6])).logits.shape == (2, 6, m.config.vocab_size)


# -- inputs that used to reach torch unchecked ---------------------------------------------

@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_decoder_names_bad_labels_embeds_positions_and_caches(flavour):
    torch.manual_seed(0)
    model = Decoder(from_name(f"{flavour}-tiny", vocab_size=120)).eval()
    ids = torch.randint(1, 120, (2, 5))
    with pytest.raises(TypeError, match="labels must hold integer token ids"):
        model(input_ids=ids, labels=ids.float())  # was torch's "expected target dtype Long"
    with pytest.raises(ValueError, match=r"labels must lie in \[0, vocab_size=120\)"):
        model(input_ids=ids, labels=ids + 200)  # was IndexError "Target 251 is out of bounds"
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        model(input_ids=ids, logits_to_keep=-2)  # gave the logits of x[:, 2:]
    with pytest.raises(ValueError, match=r"inputs_embeds must be \(batch, length, hidden_size=64\)"):
        model(inputs_embeds=torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(inputs_embeds=torch.randn(2, 64))
    with pytest.raises(TypeError, match="inputs_embeds must be floating point"):
        model(inputs_embeds=torch.ones(2, 5, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids must be \(B, T\) = \(2, 5\) or \(1, 5\)"):
        model(input_ids=ids, position_ids=torch.arange(3).unsqueeze(0))
    with pytest.raises(ValueError, match=r"past_key_values was made for .* = \(2, 3, "):
        model(input_ids=ids, past_key_values=model.new_cache(3, 10))
    with pytest.raises(TypeError, match="past_key_values must be a KVCache"):
        model(input_ids=ids, past_key_values=(torch.zeros(1), torch.zeros(1)))


def test_encoder_names_bad_embeds_and_id_shapes(encoder):
    ids = _ids()
    with pytest.raises(ValueError, match=r"inputs_embeds must be \(batch, length, hidden_size=\d+\)"):
        encoder(inputs_embeds=torch.randn(2, 6, 7))
    for name in ("token_type_ids", "position_ids"):
        with pytest.raises(ValueError, match=rf"{name} must be \(B, T\) = \(2, 6\) or \(1, 6\)"):
            encoder(input_ids=ids, **{name: torch.zeros(2, 3, dtype=torch.long)})


def test_seq2seq_names_a_wrong_cache_and_logits_to_keep(t5):
    from fastpt.models.cache import KVCache
    ids = _ids()
    with pytest.raises(TypeError, match="past_key_values must be a Seq2SeqCache"):
        t5(input_ids=ids, decoder_input_ids=ids, past_key_values=KVCache(1, 2, 1, 4, 8))
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        t5(input_ids=ids, decoder_input_ids=ids, logits_to_keep=-1)


def test_a_cache_larger_than_memory_and_a_float_eos_are_named():
    model = Decoder(from_name("llama-tiny", vocab_size=120)).eval()
    with pytest.raises(ValueError, match=r"a KV cache of max_length \d+ for batch 1 needs .* GiB, more than"):
        model.generate([[1, 5]], max_new_tokens=10**12)  # was an allocator error
    with pytest.raises(ValueError, match=r"eos_token_id must be a token id in \[0, 120\), got 2.0"):
        model.generate([[1, 5]], max_new_tokens=2, eos_token_id=2.0)  # was "'float' is not iterable"
