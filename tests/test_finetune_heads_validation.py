"""Task heads and prompt tuning on awkward input: prompt tuning with QA, token labels,
token_type_ids and position_ids; regression and class label shapes; QA positions outside
the real tokens; all-padding rows and empty texts; empty batches."""

from types import SimpleNamespace

import pytest
import torch
from torch.nn.functional import cross_entropy

from fastpt.finetune import (FinetuneConfig, QuestionAnswering, SequenceClassifier, TokenClassifier,
                             encode, prepare, prompt_masked_labels, sequence_logprobs)
from fastpt.finetune.heads import pool
from fastpt.models import Decoder, DecoderConfig, Encoder, EncoderConfig
from fastpt.models.common import positions_from_mask

V, N_VIRTUAL = 50, 3


def _encoder():
    torch.manual_seed(0)
    return Encoder(EncoderConfig.from_name("bert-tiny", vocab_size=V, dropout=0.0, attention_dropout=0.0))


def _decoder(kind="llama"):
    torch.manual_seed(0)
    return Decoder(DecoderConfig.from_name(f"{kind}-tiny", vocab_size=V))


def _prompt(model):
    return prepare(model, FinetuneConfig(strategy="prompt", num_virtual_tokens=N_VIRTUAL)).eval()


def _ids(B=2, T=6):
    return torch.randint(5, V, (B, T), generator=torch.Generator().manual_seed(1))


# Prompt tuning: inputs and outputs stay those of the real tokens.

def test_prompt_tuned_qa_scores_the_given_positions_on_the_real_tokens():
    qa = _prompt(QuestionAnswering(_encoder()))
    ids, mask = _ids(), torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6])
    assert qa(ids, mask).loss is None  # used to fail: labels=None reached features()
    start, end = torch.tensor([2, 3]), torch.tensor([4, 5])
    out = qa(ids, mask, start_positions=start, end_positions=end)
    assert out.logits.shape == (2, 6, 2)  # the virtual positions are dropped
    expected = (cross_entropy(out.logits[..., 0], start) + cross_entropy(out.logits[..., 1], end)) / 2
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match=r"end_positions\[0\] = 5 is not a real token of row 0"):
        qa(ids, mask, start_positions=start, end_positions=torch.tensor([5, 5]))


def test_prompt_tuned_token_classifier_logits_line_up_with_the_input():
    tc = _prompt(TokenClassifier(_decoder(), 3, dropout=0.0))
    ids, labels = _ids(), torch.tensor([[0, 1, 2, -100, 1, 0], [2, 2, 1, 0, -100, -100]])
    out = tc(ids, labels=labels)
    assert out.logits.shape == (2, 6, 3)
    torch.testing.assert_close(out.loss, cross_entropy(out.logits.flatten(0, 1), labels.flatten()))


def test_prompt_tuned_decoder_lm_logits_line_up_and_feed_dpo_log_probs():
    lm = _prompt(_decoder("gpt2"))
    ids, mask = _ids(), torch.ones(2, 6, dtype=torch.bool)
    labels = ids.clone()
    labels[:, 0] = -100  # else the first token is scored from the last virtual one
    out = lm(ids, mask, labels=labels)
    assert out.logits.shape == (2, 6, V)
    expected = cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    assert sequence_logprobs(lm, ids, mask, labels).shape == (2,)  # used to be a shape error


def test_prompt_tuned_encoder_takes_token_type_ids():
    sc = _prompt(SequenceClassifier(_encoder(), 2, dropout=0.0))
    ids = _ids()
    plain = sc(ids).logits
    torch.testing.assert_close(sc(ids, token_type_ids=torch.zeros_like(ids)).logits, plain)
    second = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    assert not torch.allclose(sc(ids, token_type_ids=second).logits, plain)  # still read
    with pytest.raises(ValueError, match=r"token_type_ids must be \(B, T\) = \(2, 6\)"):
        sc(ids, token_type_ids=torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_prompt_tuned_sequence_labels_are_not_taken_for_token_labels(kind):
    sc = _prompt(SequenceClassifier(_encoder() if kind == "bert" else _decoder(kind), 1, dropout=0.0))
    ids, y = _ids(), torch.randn(2)
    # (B, 1) regression targets used to get -100 columns as if they were token labels
    torch.testing.assert_close(sc(ids, labels=y.unsqueeze(1)).loss, sc(ids, labels=y).loss)
    tc = _prompt(TokenClassifier(_decoder(), 3))
    with pytest.raises(ValueError, match=r"labels must be \(B, T\) = \(2, 6\) like input_ids, got \(2, 5\)"):
        tc(ids, labels=torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_prompt_tuned_explicit_positions_equal_the_default(kind):
    model = _prompt(_encoder() if kind == "bert" else _decoder(kind))
    ids, mask = _ids(), torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    positions = torch.arange(6).unsqueeze(0) if kind == "bert" else positions_from_mask(mask, 6)
    torch.testing.assert_close(model(ids, mask, position_ids=positions).logits, model(ids, mask).logits)


def test_prompt_tuned_cache_refuses_what_would_misplace_the_soft_tokens():
    lm = _prompt(_decoder())
    ids = _ids()
    base_cache = lm.model(input_ids=ids, use_cache=True).past_key_values  # no soft tokens in it
    with pytest.raises(ValueError, match="not this prompt's soft tokens"):
        lm(ids[:, :1], past_key_values=base_cache)
    cache = lm(ids, use_cache=True).past_key_values
    assert cache.length == N_VIRTUAL + ids.shape[1]
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, real tokens cached \+ new\) = \(2, 7\)"):
        lm(ids[:, :1], attention_mask=torch.ones(2, 7 + N_VIRTUAL), past_key_values=cache)
    with pytest.raises(ValueError, match="prompt tuning does not support document_ids"):
        lm(ids, document_ids=torch.zeros_like(ids))
    head = _prompt(SequenceClassifier(_decoder(), 2))
    with pytest.raises(ValueError, match="a KV cache needs prompt tuning on a bare Decoder or Seq2Seq"):
        head(ids, use_cache=True)
    with pytest.raises(TypeError, match="generate needs prompt tuning on a bare Decoder or Seq2Seq"):
        head.generate([[1, 2]])
    with pytest.raises(TypeError, match="input_ids must be a \\(B, T\\) tensor"):
        lm([[1, 2]])


# SequenceClassifier and TokenClassifier labels.

def test_regression_labels_b_by_1_give_the_same_loss_as_b():
    sc = SequenceClassifier(_decoder(), 1, dropout=0.0).eval()
    ids, y = _ids(4, 5), torch.randn(4)
    loss = sc(ids, labels=y).loss
    torch.testing.assert_close(sc(ids, labels=y.unsqueeze(1)).loss, loss)  # was a (4, 4) mean
    with pytest.raises(ValueError, match=r"regression labels must be \(B,\) or \(B, 1\) with B = 4, "
                                         r"got \(4, 2\)"):
        sc(ids, labels=torch.randn(4, 2))


def test_class_labels_of_another_shape_or_range_are_named():
    sc = SequenceClassifier(_decoder(), 3, dropout=0.0)
    with pytest.raises(ValueError, match=r"labels must be \(B,\) = \(2,\), got \(2, 1\)"):
        sc(_ids(), labels=torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_labels=3\).*got 3"):
        sc(_ids(), labels=torch.tensor([0, 3]))
    tc = TokenClassifier(_decoder(), 3)
    with pytest.raises(ValueError, match=r"labels must be \(B, T\) like the input = \(2, 6\), got \(6, 2\)"):
        tc(_ids(), labels=torch.zeros(6, 2, dtype=torch.long))  # same size: flatten() hid it


# QuestionAnswering positions.

@pytest.mark.parametrize("start, end, match", [
    ([1, 2], [5, 5], r"end_positions\[0\] = 5 is not a real token of row 0"),   # padding
    ([1, 6], [3, 5], r"start_positions\[1\] = 6 is not a real token of row 1"),  # == T
    ([-1, 2], [3, 5], r"start_positions\[0\] = -1 is not a real token of row 0"),
])
def test_qa_positions_outside_the_real_tokens_are_refused(start, end, match):
    qa = QuestionAnswering(_encoder())
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6])
    with pytest.raises(ValueError, match=match):
        qa(_ids(), mask, start_positions=torch.tensor(start), end_positions=torch.tensor(end))


def test_qa_positions_need_both_integers_of_shape_b():
    qa, ids = QuestionAnswering(_encoder()), _ids()
    with pytest.raises(ValueError, match="both start_positions and end_positions"):
        qa(ids, start_positions=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="end_positions must hold integer"):
        qa(ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match=r"start_positions must be \(B,\) = \(2,\)"):
        qa(ids, start_positions=torch.tensor([[1, 2]]), end_positions=torch.tensor([3, 4]))


def test_qa_positions_on_left_padded_rows_are_accepted():
    qa = QuestionAnswering(_encoder()).eval()
    mask, start, end = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]), torch.tensor([2, 0]), torch.tensor([5, 3])
    out = qa(_ids(), mask, start_positions=start, end_positions=end)
    expected = (cross_entropy(out.logits[..., 0], start) + cross_entropy(out.logits[..., 1], end)) / 2
    torch.testing.assert_close(out.loss, expected)


# All-padding rows and empty texts.

@pytest.mark.parametrize("how", ["mean", "last", "cls"])
def test_pool_refuses_an_all_padding_row(how):
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="attention_mask row 1 is all padding"):
        pool(torch.randn(2, 3, 4), mask, how)


def test_sequence_classifier_refuses_an_all_padding_row():
    sc = SequenceClassifier(_decoder(), 2)
    with pytest.raises(ValueError, match="attention_mask row 1 is all padding"):
        sc(torch.tensor([[3, 4, 5], [0, 0, 0]]), torch.tensor([[1, 1, 1], [0, 0, 0]]),
           labels=torch.tensor([0, 1]))


class _WordTokenizer:
    """One id per word and no special tokens, so an empty text has no token (as GPT-2's BPE)."""

    def encode_batch(self, texts):
        return [SimpleNamespace(ids=[5 + len(w) for w in t.split()]) for t in texts]


@pytest.mark.parametrize("texts, batch_size, index", [(["", "hello"], 64, 0), (["hi there", "x", " "], 2, 2)])
def test_encode_names_the_text_with_no_tokens(texts, batch_size, index):
    model = _decoder("gpt2").train()
    with pytest.raises(ValueError, match=rf"texts\[{index}\] = '\s*' has no tokens"):
        encode(model, _WordTokenizer(), texts, batch_size=batch_size)
    assert model.training  # put back as it was


# Empty batches and batch builders.

@pytest.mark.parametrize("head, kw", [
    ("seq", dict(labels=torch.zeros(0, dtype=torch.long))),
    ("tok", dict(labels=torch.zeros(0, 3, dtype=torch.long))),
    ("qa", dict(start_positions=torch.zeros(0, dtype=torch.long), end_positions=torch.zeros(0, dtype=torch.long))),
])
def test_heads_refuse_a_loss_over_an_empty_batch(head, kw):
    model = {"seq": lambda: SequenceClassifier(_decoder(), 2), "tok": lambda: TokenClassifier(_decoder(), 2),
             "qa": lambda: QuestionAnswering(_encoder())}[head]()
    with pytest.raises(ValueError, match=r"got an empty batch \(B = 0\)"):  # was a NaN loss
        model(torch.zeros(0, 3, dtype=torch.long), torch.ones(0, 3, dtype=torch.long), **kw)


@pytest.mark.parametrize("prompts, answers, counts", [([], [], "0 prompts and 0 answers"),
                                                      ([[1, 2], [3]], [[4]], "2 prompts and 1 answers")])
def test_prompt_masked_labels_needs_one_answer_per_prompt(prompts, answers, counts):
    with pytest.raises(ValueError, match=f"prompt_ids and answer_ids .* got {counts}"):
        prompt_masked_labels(prompts, answers, pad_id=0)


@pytest.mark.parametrize("prompts, answers, name", [([1, 2], [[3]], "prompt_ids"), ([[1]], [[3.5]], "answer_ids"),
                                                    (None, [[3]], "prompt_ids")])
def test_prompt_masked_labels_needs_lists_of_token_ids(prompts, answers, name):
    with pytest.raises(TypeError, match=f"{name} must be a list of token-id lists"):  # was "'int' object ..."
        prompt_masked_labels(prompts, answers, pad_id=0)


def test_strategies_that_need_a_fastpt_model_name_what_they_got():
    for strategy in ("adapters", "partial", "ia3", "prefix", "prompt"):
        with pytest.raises(TypeError, match=f"strategy '{strategy}' needs a fastpt Encoder, Decoder or Seq2Seq"
                                            ".* got Linear"):  # was "'Linear' object has no attribute 'config'"
            prepare(torch.nn.Linear(3, 3), FinetuneConfig(strategy=strategy))
    with pytest.raises(TypeError, match=r"tokenizer.encode\(text\).ids"):
        FinetuneConfig(strategy="prompt", prompt_init_text="Classify the review")


@pytest.mark.parametrize("head", [SequenceClassifier, TokenClassifier])
@pytest.mark.parametrize("num_labels, error, match", [(-1, ValueError, "num_labels must be >= 1, got -1"),
                                                      (0, ValueError, "num_labels must be >= 1, got 0"),
                                                      ("2", TypeError, "num_labels must be an int, got str")])
def test_heads_refuse_a_num_labels_below_one(head, num_labels, error, match):
    with pytest.raises(error, match=match):  # TokenClassifier took 0 and gave a bare torch error on -1
        head(_decoder(), num_labels)
