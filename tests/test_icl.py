"""In-context learning: prompt construction, log-likelihood scoring vs a direct
log-softmax computation, multiple-choice and generation evaluation."""

import pytest
import torch

from fastpt.data.tokenizer import special_ids, train_tokenizer
from fastpt.data.world import World
from fastpt.icl import (PromptFormat, build_prompt, evaluate_generation, evaluate_multiple_choice, few_shot_table,
                        generate_answer, loglikelihood, requests_for, sample_examples, split_request)
from fastpt.models import Decoder, DecoderConfig


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def tok(world):
    return train_tokenizer(list(world.documents(2000)), "bpe", vocab_size=400)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tok):
    torch.manual_seed(0)
    config = DecoderConfig.from_name(f"{request.param}-tiny", vocab_size=tok.get_vocab_size())
    return Decoder(config).eval()


def test_prompts_are_deterministic_and_exclude_the_query(world):
    items = world.icl("city_of", 30)
    q = items[0]
    ex = sample_examples(items, q, 5, seed=3)
    assert q not in ex and ex == sample_examples(items, q, 5, seed=3)
    assert sample_examples(items, q, 0, seed=3) == []
    prompt = build_prompt(q, ex[:2], PromptFormat(description="Homes:"))
    lines = prompt.split("\n")
    assert lines[0] == "Homes:" and lines[1] == f"{ex[0]['input']} -> {ex[0]['target']}"
    assert lines[-1] == f"{q['input']} ->"
    reqs = requests_for(q, ex[:2])
    assert len(reqs) == len(q["choices"]) and all(c.startswith(" ") for _, c in reqs)
    with pytest.raises(ValueError, match="pool has only"):
        sample_examples(items[:3], q, 5, seed=0)
    # a pool entry with the query's input and target (another dict, no choices) would show
    # the answer: it is excluded like the query itself
    pool = [{"input": "Ruza", "target": "Varna"}, {"input": "Bob", "target": "Sofia"},
            {"input": "Ann", "target": "Rome"}]
    query = {"input": "Ruza", "target": "Varna", "choices": ["Varna", "Sofia"]}
    assert pool[0] not in sample_examples(pool, query, 2, seed=0)
    with pytest.raises(ValueError, match="pool has only 2"):
        sample_examples(pool, query, 3, seed=0)
    with pytest.raises(TypeError, match="k must be an int"):
        sample_examples(pool, query, 1.0, seed=0)


def test_trailing_space_moves_to_the_continuation(tok):
    a = split_request(tok, "Ruza lives in ", "Varna")
    b = split_request(tok, "Ruza lives in", " Varna")
    assert a == b
    with pytest.raises(ValueError, match="adds no token"):
        split_request(tok, "Ruza", "")


def test_trailing_newline_moves_to_the_continuation_as_in_lm_eval(tok):
    """lm-eval moves all trailing whitespace of the context (context.rstrip())."""
    assert split_request(tok, "Q: x\nA:\n", "B") == split_request(tok, "Q: x\nA:", "\nB")
    assert split_request(tok, "Q: x\nA: \n ", "B") == split_request(tok, "Q: x\nA:", " \n B")


def test_acc_norm_divides_by_the_choice_length_as_lm_eval(monkeypatch, tok):
    """lm-eval's acc_norm: log-likelihood / len(choice), the target prefix not counted. With
    these scores lm-eval picks "Sofia" (-22.74 / 5 > -5.64 / 1); dividing by len(" " + choice)
    would pick "a" (-5.64 / 2 > -22.74 / 6)."""
    from fastpt.icl import evaluate as evaluate_module
    from fastpt.icl.scoring import Score
    monkeypatch.setattr(evaluate_module, "loglikelihood", lambda *a, **k: [
        Score(-5.643, False, 1), Score(-22.740, False, 3)])
    item = {"input": "Ruza", "target": "Sofia", "choices": ["a", "Sofia"]}
    result = evaluate_multiple_choice(None, tok, [item], k=0, pool=[])
    assert result.acc == 0.0 and result.acc_norm == 1.0
    with pytest.raises(TypeError, match="choices must be a list of strings"):
        evaluate_multiple_choice(None, tok, [dict(item, choices="Sofia")], k=0, pool=[])


def test_scores_equal_a_direct_log_softmax(model, tok):
    reqs = [("Ruza lives in", " Varna"), ("Ruza lives in", " Fasutra town"),
            ("The soup was", " delicious and warm"), ("Directory:", "\nBob -> baker")]
    scores = loglikelihood(model, tok, reqs)
    for (ctx, cont), s in zip(reqs, scores):
        c_ids, t_ids = split_request(tok, ctx, cont)
        ids = torch.tensor([c_ids + t_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
        pos = torch.arange(len(c_ids) - 1, len(c_ids) + len(t_ids) - 1)
        direct = logp[pos, torch.tensor(t_ids)]
        assert s.logprob == pytest.approx(float(direct.sum()), rel=1e-4, abs=1e-4)
        assert s.is_greedy == bool((logp[pos].argmax(-1) == torch.tensor(t_ids)).all())
        assert s.n_tokens == len(t_ids)


def test_empty_context_needs_bos(model, tok):
    with pytest.raises(ValueError, match="bos_id"):
        loglikelihood(model, tok, [("", "Varna")])
    bos = special_ids(tok).bos
    assert loglikelihood(model, tok, [("", "Varna")], bos_id=bos)[0].logprob < 0


def test_multiple_choice_and_generation_run_without_gradients(model, tok, world):
    items = world.icl("job_of", 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate_multiple_choice(model, tok, items, k=2, pool=world.icl("job_of", 40, seed=1))
    assert result.n == 6 and len(result.predictions) == 6
    assert all(p in it["choices"] for p, it in zip(result.predictions, items))
    assert result.acc == sum(p == it["target"] for p, it in zip(result.predictions, items)) / 6
    acc = evaluate_generation(model, tok, items[:2], k=1, pool=world.icl("job_of", 40, seed=1),
                              max_new_tokens=4)
    assert 0.0 <= acc <= 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    from fastpt.icl.scoring import score_tokens  # (lm-eval's rolling windows call it directly)
    graphs = []
    handle = model.register_forward_hook(lambda m, args, out: graphs.append(out.logits.requires_grad))
    try:
        score_tokens(model, [([1, 5, 9], [4, 7])])
    finally:
        handle.remove()
    assert graphs and not any(graphs)  # no autograd graph built
    with pytest.raises(ValueError, match="not among the choices"):
        evaluate_multiple_choice(model, tok, [{"input": "x", "target": "y", "choices": ["z"]}],
                                 k=0, pool=[])


def test_malformed_items_and_empty_prompts_name_the_problem(model, tok):
    with pytest.raises(ValueError, match=r"items\[0\] lacks \['choices'\]"):
        evaluate_multiple_choice(model, tok, [{"input": "x", "target": "y"}], k=0, pool=[])
    with pytest.raises(ValueError, match=r"pool\[1\] lacks \['target'\]"):
        evaluate_multiple_choice(model, tok, [{"input": "x", "target": "y", "choices": ["y"]}], k=1,
                                 pool=[{"input": "a", "target": "b"}, {"input": "c"}])
    with pytest.raises(ValueError, match="no items"):
        evaluate_generation(model, tok, [], k=0, pool=[])  # was a ZeroDivisionError
    with pytest.raises(ValueError, match="bos_id"):
        generate_answer(model, tok, "")  # was torch's error about a float index tensor


def test_long_contexts_lose_their_oldest_tokens(model, tok):
    long_ctx = " ".join(["Ruza lives in Varna."] * 80)  # far beyond 128/256 positions
    s = loglikelihood(model, tok, [(long_ctx, " Varna")])[0]
    ctx, cont = split_request(tok, long_ctx, " Varna")
    assert len(ctx) + len(cont) > model.config.max_position_embeddings + 1  # the case under test
    expected, greedy = _hflm_reference(model, ctx, cont)  # the last max_length + 1 tokens, as HFLM
    assert s.n_tokens == len(cont) and s.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert s.is_greedy == greedy
    with pytest.raises(ValueError, match="does not fit"):
        loglikelihood(model, tok, [("x", " " + " ".join(["Varna"] * 400))])


# --- lm-eval HFLM fidelity: token split, truncation, generation (audit 3, F1, F2, F5) ---

def _boundary_requests():
    """Mid-word cuts: the continuation starts inside a word, where BPE merges cross the cut."""
    words = "Ruza lives in Varna and works as a baker in the old town by the river".split()
    return [(f"She said {w[:cut]}", w[cut:] + " today") for w in words for cut in range(1, len(w))]


def _encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def test_context_tokens_are_the_context_encoded_alone(tok):
    """lm-eval's _encode_pair: ctx = encode(context), cont = encode(context + cont)[len(ctx):].
    The first len(ctx) tokens of the whole differ from encode(context) when a merge crosses
    the boundary; fastpt used to return those."""
    crossing = 0
    for context, continuation in _boundary_requests():
        ctx, cont = split_request(tok, context, continuation)
        whole = _encode(tok, context + continuation)
        assert ctx == _encode(tok, context)
        assert cont == whole[len(ctx):]
        crossing += whole[:len(ctx)] != ctx
    assert crossing > 0, "no request with a merge across the boundary: the test checks nothing"


@torch.no_grad()
def _hflm_reference(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """lm-eval HFLM's _loglikelihood_tokens in float64: the model reads
    (ctx + cont)[-(max_length + 1):][:-1] in one plain forward pass."""
    import copy
    M = model.config.max_position_embeddings
    inp = (ctx + cont)[-(M + 1):][:-1]
    ref = copy.deepcopy(model).double()
    logp = torch.log_softmax(ref(input_ids=torch.tensor([inp])).logits[0].double(), -1)
    rows, target = logp[len(inp) - len(cont):], torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_boundary_requests_score_as_lm_eval(model, tok):
    bos = special_ids(tok).bos
    reqs = [r for r in _boundary_requests()
            if _encode(tok, (r[0] + r[1]))[:len(_encode(tok, r[0]))] != _encode(tok, r[0])][:4]
    for (context, continuation), s in zip(reqs, loglikelihood(model, tok, reqs, bos_id=bos)):
        ctx = [bos] + _encode(tok, context)
        cont = _encode(tok, context + continuation)[len(ctx) - 1:]
        expected, greedy = _hflm_reference(model, ctx, cont)
        assert s.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert s.is_greedy == greedy


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def short_model(request, tok):
    """A model of 32 positions, so requests overflow it."""
    torch.manual_seed(0)
    config = DecoderConfig.from_name(f"{request.param}-tiny", vocab_size=tok.get_vocab_size(),
                                     max_position_embeddings=32)
    return Decoder(config).eval()


def test_truncation_and_prefix_cache_match_lm_eval(short_model):
    """HFLM reads max_length context + continuation tokens (the last continuation token is
    predicted, never read) and scores a continuation of exactly max_length tokens. fastpt
    used to read one token less and to refuse that continuation. Choices sharing a context
    go through the KV cache together and must score as if alone."""
    from fastpt.icl.scoring import score_tokens
    M = short_model.config.max_position_embeddings
    gen = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, 300, (n,), generator=gen).tolist()

    ctx_short, ctx_long = ids(5), ids(50)
    pairs = [(ids(2), ids(M - 1)),                  # M + 1 tokens: HFLM reads all but the last
             (ids(1), ids(M)),                      # a continuation of exactly max_length tokens
             (ctx_long, ids(3)), (ctx_long, ids(7)),
             (ctx_short, ids(1)), (ctx_short, ids(4)), (ctx_short, ids(1)), (ctx_short, ids(9))]
    for (ctx, cont), s in zip(pairs, score_tokens(short_model, pairs)):
        expected, greedy = _hflm_reference(short_model, ctx, cont)
        assert s.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert s.is_greedy == greedy and s.n_tokens == len(cont)
    with pytest.raises(ValueError, match=f"continuation of {M + 1} tokens.*at most {M}"):
        score_tokens(short_model, [(ids(1), ids(M + 1))])


@torch.no_grad()
def _greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens by plain forward passes over the whole sequence (no cache)."""
    eos, out = model.config.eos_token_id, []
    for _ in range(n):
        token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
    return out


def test_generation_keeps_the_last_max_length_minus_new_tokens(short_model, tok):
    """lm-eval HFLM keeps the last max_length - max_gen_toks prompt tokens, for every model
    family (fastpt used to truncate only GPT-2, and kept one token more)."""
    M, bos = short_model.config.max_position_embeddings, special_ids(tok).bos
    for prompt, n in [(" ".join(["Ruza lives in Varna."] * 3), 6), ("Ruza lives in Varna.", 20)]:
        ids = [bos] + _encode(tok, prompt)
        assert len(ids) + n > M  # the case under test
        expected = tok.decode(_greedy_reference(short_model, ids[-(M - n):], n))
        assert generate_answer(short_model, tok, prompt, stop=(), max_new_tokens=n, bos_id=bos) == expected
    with pytest.raises(ValueError, match=f"max_new_tokens={M} leaves no room.*expected max_new_tokens < {M}"):
        generate_answer(short_model, tok, "Ruza", max_new_tokens=M, bos_id=bos)


def test_stop_strings_cut_as_lm_eval_and_empty_ones_are_ignored():
    """lm-eval's postprocess_generated_text: each non-empty stop string in turn keeps the text
    before its first occurrence; "" would cut everything and is skipped."""
    from fastpt.icl.evaluate import cut_at_stop
    assert cut_at_stop("Varna\nSofia", ["", "\n"]) == "Varna"
    assert cut_at_stop("Varna", [""]) == "Varna"
    assert cut_at_stop("Varna\nSofia", "\n") == "Varna"
    assert cut_at_stop("xabc", ["bc", "ab"]) == "xa"  # in turn, not at the earliest start


def test_prompt_and_request_arguments_are_checked(model, tok):
    for field in ("target_prefix", "description_separator", "example_separator"):
        with pytest.raises(TypeError, match=f"PromptFormat.{field} must be a str, got NoneType"):
            PromptFormat(**{field: None})  # rendered as the text "None" before
    query = {"input": "Ruza", "target": "Varna"}
    with pytest.raises(TypeError, match=r"pool\[0\] must be a dict"):
        sample_examples(["a"], query, 1, 0)
    with pytest.raises(TypeError, match="query must be a dict"):
        sample_examples([query], "Ruza", 1, 0)
    with pytest.raises(TypeError, match="pool must be a list of examples"):
        sample_examples(None, query, 1, 0)  # was "'NoneType' object is not iterable"
    for shots in (("1",), 2, [True]):  # ("1",) was "'<' not supported between 'str' and 'int'"
        with pytest.raises(TypeError, match="shots must be a list of ints"):
            few_shot_table(model, tok, {"t": ([query], [query])}, shots=shots)
    with pytest.raises(ValueError, match=r"examples\[0\] lacks \['input'\]"):
        build_prompt(query, [{"target": "x"}])
    with pytest.raises(TypeError, match=r"query\['choices'\] must be a list of answers"):
        requests_for({**query, "choices": "bc"}, [])  # split into characters before
    for bad in (["ab"], [(5, " x")], [("a", None)], [("a",)]):
        with pytest.raises(TypeError, match=r"requests\[0\] must be a \(context, continuation\) pair"):
            loglikelihood(model, tok, bad)
    with pytest.raises(TypeError, match="bos_id must be a token id"):
        loglikelihood(model, tok, [("a", " b")], bos_id="x")
    for stop in (5, [None]):
        with pytest.raises(TypeError, match="stop must be a string, a list of strings or None"):
            generate_answer(model, tok, "Ruza ->", stop=stop, max_new_tokens=2)
    assert generate_answer(model, tok, "Ruza ->", stop=None, max_new_tokens=2) == \
        generate_answer(model, tok, "Ruza ->", stop=(), max_new_tokens=2)


def test_a_prompt_tuned_model_scores_and_answers_through_its_soft_tokens(model, tok):
    """The scoring cache starts with the soft tokens (copied to every choice's row) and the
    positions they take are not the input's: scores equal the wrapper's own forward."""
    import copy
    from fastpt.finetune import FinetuneConfig, prepare
    tuned = prepare(copy.deepcopy(model), FinetuneConfig(strategy="prompt", num_virtual_tokens=5)).eval()
    torch.nn.init.normal_(tuned.prompt.embeddings, std=0.5)
    from fastpt.icl.scoring import max_length
    assert max_length(tuned) == model.config.max_position_embeddings - 5
    reqs = [("Ruza lives in", " Varna"), ("Ruza lives in", " Fasutra town")]
    scores, plain = loglikelihood(tuned, tok, reqs), loglikelihood(model, tok, reqs)
    for (ctx, cont), s, p in zip(reqs, scores, plain):
        c_ids, t_ids = split_request(tok, ctx, cont)
        with torch.no_grad():
            logp = torch.log_softmax(tuned(input_ids=torch.tensor([c_ids + t_ids])).logits.double(), -1)[0]
        pos = torch.arange(len(c_ids) - 1, len(c_ids) + len(t_ids) - 1)
        assert s.logprob == pytest.approx(float(logp[pos, torch.tensor(t_ids)].sum()), rel=1e-4, abs=1e-4)
        assert s.logprob != pytest.approx(p.logprob, abs=1e-3)  # the soft tokens matter
    ids = _encode(tok, "Ruza lives in")
    expected = tok.decode(_greedy_reference(tuned, ids, 4))
    assert generate_answer(tuned, tok, "Ruza lives in", stop=(), max_new_tokens=4) == expected
