"""lm-evaluation-harness integration, offline: a local YAML task over a local JSONL file,
run by lm-eval with model type "fastpt" on a tiny model folder; its accuracy and per-choice
log-likelihoods equal fastpt's own ICL evaluation of the same items; rolling log-likelihood
against a direct log-softmax; generation stops at the stop string; `fastpt lm-eval`."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task reads a local file; never the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from fastpt.data.tokenizer import save_tokenizer, special_ids, train_tokenizer  # noqa: E402
from fastpt.data.world import World  # noqa: E402
from fastpt.icl import evaluate_multiple_choice, loglikelihood, requests_for  # noqa: E402
from fastpt.models import Decoder, DecoderConfig  # noqa: E402
from fastpt.models.hf import save_pretrained  # noqa: E402

TASK = "fastpt_local_city_of"


class _Request:  # the part of lm-eval's Instance the model reads
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    world = World(0)
    tok = train_tokenizer(list(world.documents(1000)), "bpe", vocab_size=300)
    torch.manual_seed(0)
    config = DecoderConfig.from_name("llama-tiny", vocab_size=tok.get_vocab_size(),
                                     bos_token_id=special_ids(tok).bos, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("model")
    save_pretrained(Decoder(config).eval(), path)
    save_tokenizer(tok, str(path))
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    items = World(0).icl("city_of", 6, seed=5)
    d = tmp_path_factory.mktemp("tasks")
    with open(d / "items.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    # lm-eval's multiple choice: context doc_to_text, continuation target_delimiter + choice;
    # fastpt's default PromptFormat builds the same "input ->" / " choice" pairs.
    (d / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'items.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{input}}}} ->"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{choices.index(target)}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
""")
    return d, items


@pytest.fixture(scope="module")
def fastpt_lm(folder):
    from fastpt.icl.lm_eval_harness import FastptLM
    return FastptLM(pretrained=str(folder))


def test_lm_eval_task_equals_fastpt_icl(folder, task_dir, fastpt_lm):
    from lm_eval.tasks import TaskManager
    d, items = task_dir
    results = lm_eval.simple_evaluate(model="fastpt", model_args=f"pretrained={folder}", tasks=[TASK],
                                      num_fewshot=0, task_manager=TaskManager(include_path=str(d)),
                                      log_samples=True, bootstrap_iters=0)
    ours = evaluate_multiple_choice(fastpt_lm.model, fastpt_lm.tokenizer, items, k=0, pool=items,
                                    bos_id=fastpt_lm.bos_id)
    assert results["results"][TASK]["acc,none"] == pytest.approx(ours.acc)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    for sample, item in zip(samples, items):
        expected = loglikelihood(fastpt_lm.model, fastpt_lm.tokenizer, requests_for(item, []),
                                 bos_id=fastpt_lm.bos_id)
        got = [float(r[0][0]) for r in sample["resps"]]
        assert got == pytest.approx([s.logprob for s in expected], rel=1e-6)


def test_loglikelihood_rolling_matches_direct_log_softmax(fastpt_lm):
    text = "Ruza lives in Varna. She works as a baker in the old town by the river."
    ids = fastpt_lm.tokenizer.encode(text, add_special_tokens=False).ids
    seq = torch.tensor([[fastpt_lm.bos_id] + ids])
    assert seq.shape[1] <= fastpt_lm.max_length
    with torch.no_grad():
        logp = torch.log_softmax(fastpt_lm.model(input_ids=seq[:, :-1]).logits.float(), -1)
    direct = float(logp[0].gather(1, seq[0, 1:, None]).sum())
    (rolled,) = fastpt_lm.loglikelihood_rolling([_Request(text)], disable_tqdm=True)
    assert rolled == pytest.approx(direct, rel=1e-5)


def test_loglikelihood_rolling_long_document_predicts_every_token_once(fastpt_lm, monkeypatch):
    from fastpt.icl import lm_eval_harness
    text = " ".join(["Ruza lives in Varna and works as a baker."] * 20)
    ids = fastpt_lm.tokenizer.encode(text, add_special_tokens=False).ids
    n, M = len(ids), fastpt_lm.max_length
    assert n > M  # several windows
    real, windows, scores = lm_eval_harness.score_tokens, [], []

    def spy(model, pairs):  # the (context, continuation) windows the document is scored in
        windows.extend(pairs)
        scores.extend(real(model, pairs))
        return scores[-len(pairs):]
    monkeypatch.setattr(lm_eval_harness, "score_tokens", spy)
    (rolled,) = fastpt_lm.loglikelihood_rolling([_Request(text)], disable_tqdm=True)
    assert len(windows) > 1
    # every token scored once, in order, the first after the BOS token; each window fits the model
    assert [t for _, cont in windows for t in cont] == ids
    assert windows[0][0] == [fastpt_lm.bos_id]
    assert all(len(ctx) + len(cont) <= M + 1 for ctx, cont in windows)
    assert rolled == pytest.approx(sum(s.logprob for s in scores), rel=1e-12)
    assert math.isfinite(rolled) and rolled < 0


def _greedy_text(lm, prompt, n):
    from fastpt.models import generate
    ids = [lm.bos_id] + lm.tokenizer.encode(prompt, add_special_tokens=False).ids
    out = generate(lm.model, torch.tensor([ids]), max_new_tokens=n)
    return lm.tokenizer.decode(out[0, len(ids):].tolist())


def test_generate_until_cuts_at_stop_and_respects_max_tokens(fastpt_lm):
    full = _greedy_text(fastpt_lm, "Ruza ->", 6)
    stop = full[len(full) // 2] if full else "x"  # a character the greedy text does contain
    out = fastpt_lm.generate_until([_Request("Ruza ->", {"until": [stop, "zzz"], "max_gen_toks": 6}),
                                    _Request("Ruza ->", {"until": "zzz", "max_gen_toks": 3})], disable_tqdm=True)
    assert out[0] == full[:full.index(stop)] if stop in full else out[0] == full
    assert out[1] == _greedy_text(fastpt_lm, "Ruza ->", 3)


def test_bad_model_args(tmp_path):
    from fastpt.icl.lm_eval_harness import FastptLM
    with pytest.raises(ValueError, match="pretrained=PATH"):
        FastptLM()
    with pytest.raises(ValueError, match="no config.json"):
        FastptLM(pretrained=str(tmp_path))


def test_a_fine_tuned_task_head_is_not_scored_as_a_language_model(folder, tmp_path):
    """A merged classifier's folder holds its base's config.json: lm-eval scored that base's
    untrained LM head (exit 0), where generate and eval refuse such a folder."""
    from fastpt.finetune import FinetuneConfig, SequenceClassifier, prepare, save_merged
    from fastpt.icl.lm_eval_harness import FastptLM
    from fastpt.models import from_pretrained
    model = prepare(SequenceClassifier(from_pretrained(folder), 2), FinetuneConfig(strategy="lora", lora_r=2))
    save_merged(model, str(tmp_path / "ft"))
    with pytest.raises(ValueError, match=r"a fine-tuned task head \(head_config.json\), not a language model"):
        FastptLM(pretrained=str(tmp_path / "ft"))


def test_fastpt_lm_eval_command(folder, task_dir, tmp_path, capsys):
    from fastpt.cli import main
    from fastpt.commands.lm_eval import lm_eval_argv
    assert lm_eval_argv(["--tasks", "x"]) == ["run", "--model", "fastpt", "--tasks", "x"]
    d, _ = task_dir
    rc = main(["lm-eval", "--model_args", f"pretrained={folder}", "--tasks", TASK, "--include_path", str(d),
               "--output_path", str(tmp_path / "out")])
    assert rc == 0
    written = list((tmp_path / "out").rglob("results*.json"))
    assert written, "lm-eval wrote no results file"
    assert "acc,none" in json.loads(written[0].read_text())["results"][TASK]


# --- HFLM fidelity: token split, rolling windows, gen_kwargs, truncation (audit 3, F1-F5) ---

def _hf_score(model, ctx, cont):
    """HFLM's _loglikelihood_tokens in float64: (ctx + cont)[-(max_length + 1):][:-1] read."""
    import copy
    M = model.config.max_position_embeddings
    inp = (ctx + cont)[-(M + 1):][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(copy.deepcopy(model).double()(input_ids=torch.tensor([inp])).logits[0], -1)
    return float(logp[len(inp) - len(cont):].gather(1, torch.tensor(cont)[:, None]).sum())


def test_split_is_lm_eval_encode_pair(fastpt_lm):
    """fastpt's split equals lm-eval's own TemplateLM._encode_pair (HFLM's) on the same
    tokenizer, also where a BPE merge crosses the context/continuation boundary."""
    from lm_eval.api.model import TemplateLM
    from fastpt.icl import split_request

    class Causal:  # what _encode_pair reads of an LM
        backend = "causal"

        def tok_encode(self, text, add_special_tokens=None):
            return fastpt_lm.tokenizer.encode(text, add_special_tokens=False).ids

    words = "Ruza lives in Varna and works as a baker in the old town".split()
    for context, continuation in [(f"She said {w[:cut]}", w[cut:] + " today") for w in words
                                  for cut in range(1, len(w))] + [("Q: x\nA: \n", "B")]:
        ctx, cont = TemplateLM._encode_pair(Causal(), context, continuation)
        assert split_request(fastpt_lm.tokenizer, context, continuation) == (ctx, cont)


def test_rolling_windows_use_the_model_length(fastpt_lm):
    """HFLM: get_rolling_token_windows(max_seq_len=max_length, context_len=1), each window
    scored with its last token never read; fastpt used max_length - 1."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    M, tok = fastpt_lm.max_length, fastpt_lm.tokenizer
    long_text = " ".join(["Ruza lives in Varna and works as a baker."] * 12)
    exact = tok.decode(tok.encode(long_text, add_special_tokens=False).ids[:M])
    for text in [exact, long_text]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert len(ids) >= M
        expected = sum(_hf_score(fastpt_lm.model, *make_disjoint_window(w))
                       for w in get_rolling_token_windows(ids, fastpt_lm.bos_id, M, 1))
        (rolled,) = fastpt_lm.loglikelihood_rolling([_Request(text)], disable_tqdm=True)
        assert rolled == pytest.approx(expected, rel=1e-5)


def test_gen_kwargs_token_aliases_follow_lm_eval(fastpt_lm):
    """lm-eval's normalize_gen_kwargs: max_gen_toks > max_new_tokens > max_tokens >
    max_completion_tokens; fastpt read only max_gen_toks (256 tokens for the others)."""
    from lm_eval.models.utils import normalize_gen_kwargs
    from fastpt.icl.lm_eval_harness import generation_options
    cases = [{"until": ["zzz"], "max_new_tokens": 3}, {"until": ["zzz"], "max_tokens": 3},
             {"until": ["zzz"], "max_completion_tokens": 2}, {"max_gen_toks": 2, "max_new_tokens": 5},
             {"max_new_tokens": 4, "max_tokens": 1}, {"until": "zzz"}]
    for gen_kwargs in cases:
        expected = normalize_gen_kwargs(gen_kwargs, fastpt_lm.max_gen_toks)["max_gen_toks"]
        assert generation_options(gen_kwargs, fastpt_lm.max_gen_toks)[1] == expected
    (out,) = fastpt_lm.generate_until([_Request("Ruza ->", cases[0])], disable_tqdm=True)
    assert out == _greedy_text(fastpt_lm, "Ruza ->", 3)


def test_empty_stop_string_is_ignored_as_lm_eval(fastpt_lm):
    from lm_eval.models.utils import postprocess_generated_text
    full = _greedy_text(fastpt_lm, "Ruza ->", 8)
    (out,) = fastpt_lm.generate_until([_Request("Ruza ->", {"until": ["zzz", ""], "max_gen_toks": 8})],
                                      disable_tqdm=True)
    assert full and out == postprocess_generated_text(full, ["zzz", ""], None) == full
    from fastpt.icl.evaluate import cut_at_stop
    for text, stop in [("xabc", ["bc", "ab"]), ("Varna\nSofia", ["", "\n"]), ("a b", " ")]:
        assert cut_at_stop(text, stop) == postprocess_generated_text(text, stop, None)


def test_sampling_follows_lm_eval_do_sample_and_temperature(fastpt_lm, monkeypatch):
    """lm-eval samples when do_sample is True, or unset with temperature > 0, with
    transformers' top_k 50 / top_p 1.0 unless given; fastpt decoded those greedily."""
    import fastpt.models
    real, seen = fastpt.models.generate, []

    def spy(*args, **kwargs):
        seen.append({k: v for k, v in kwargs.items() if k != "max_new_tokens"})
        return real(*args, **kwargs)

    monkeypatch.setattr(fastpt.models, "generate", spy)
    cases = [({"temperature": 0.7}, dict(do_sample=True, temperature=0.7, top_k=50, top_p=1.0)),
             ({"temperature": 0.7, "do_sample": False}, {}),
             ({"do_sample": False, "temperature": 0.0, "until": ["\n"]}, {}),
             ({"do_sample": True, "temperature": 0.5, "top_p": 0.9, "top_k": 5},
              dict(do_sample=True, temperature=0.5, top_k=5, top_p=0.9)),
             ({"num_beams": 2}, dict(num_beams=2))]
    for gen_kwargs, expected in cases:
        seen.clear()
        fastpt_lm.generate_until([_Request("Ruza ->", dict(gen_kwargs, max_gen_toks=3))], disable_tqdm=True)
        assert seen == [expected], gen_kwargs
    with pytest.raises(ValueError, match="temperature must be > 0"):  # as transformers refuses it
        fastpt_lm.generate_until([_Request("Ruza ->", {"do_sample": True, "max_gen_toks": 3})],
                                 disable_tqdm=True)
    with pytest.raises(ValueError, match=r"gen_kwargs \['typical_p'\] are not supported"):
        fastpt_lm.generate_until([_Request("Ruza ->", {"typical_p": 0.5})], disable_tqdm=True)


def test_generate_until_left_truncates_as_hflm(fastpt_lm):
    """HFLM keeps the last max_length - max_gen_toks context tokens (a RoPE model too;
    fastpt used to generate from the whole context)."""
    from fastpt.models import generate
    M, lm, n = fastpt_lm.max_length, fastpt_lm, 10
    context = " ".join(["Ruza lives in Varna."] * 4)
    ids = [lm.bos_id] + lm.tokenizer.encode(context, add_special_tokens=False).ids

    def greedy(prompt_ids):
        return lm.tokenizer.decode(generate(lm.model, torch.tensor([prompt_ids]),
                                            max_new_tokens=n)[0, len(prompt_ids):].tolist())

    expected = greedy(ids[-(M - n):])
    assert len(ids) + n > M and expected != greedy(ids)  # truncation changes the output here
    request = _Request(context, {"until": ["zzz"], "max_gen_toks": n})
    (out,) = lm.generate_until([request], disable_tqdm=True)
    assert out == expected
    with pytest.raises(ValueError, match=f"max_gen_toks={M} leaves no room.*fewer than {M}"):
        lm.generate_until([_Request(context, {"max_gen_toks": M})], disable_tqdm=True)


def test_a_model_without_bos_scores_empty_contexts_after_eos_as_hflm(folder, tmp_path):
    # HFLM's prefix token is BOS, else EOS: it stands in for an empty context (and starts
    # rolling windows); non-empty contexts are read as they are.
    from fastpt.data.tokenizer import load_tokenizer, save_tokenizer
    from fastpt.icl.lm_eval_harness import FastptLM
    from fastpt.icl.scoring import score_tokens
    from fastpt.models import from_pretrained
    model = from_pretrained(folder)
    eos = special_ids(load_tokenizer(folder)).eos
    no_bos = Decoder(model.config.replace(bos_token_id=None, eos_token_id=eos))
    no_bos.load_state_dict(model.state_dict())
    save_pretrained(no_bos, tmp_path)
    save_tokenizer(load_tokenizer(folder), str(tmp_path))
    lm = FastptLM(pretrained=str(tmp_path))
    tok = lm.tokenizer
    (empty, given) = lm.loglikelihood([_Request("", "Ruza lives"), _Request("Ruza", " lives")])
    ids = tok.encode("Ruza lives", add_special_tokens=False).ids
    want_empty = score_tokens(lm.model, [([eos], ids)])[0].logprob
    ctx = tok.encode("Ruza", add_special_tokens=False).ids
    want_given = score_tokens(lm.model, [(ctx, tok.encode("Ruza lives", add_special_tokens=False).ids[len(ctx):])])
    assert empty[0] == pytest.approx(want_empty, abs=1e-5)
    assert given[0] == pytest.approx(want_given[0].logprob, abs=1e-5)
    (rolling,) = lm.loglikelihood_rolling([_Request("Ruza lives")])
    assert rolling == pytest.approx(want_empty, abs=1e-5)


def test_gen_kwargs_of_the_wrong_kind_are_refused():
    from fastpt.icl.lm_eval_harness import generation_options
    with pytest.raises(TypeError, match="stop must be a string, a list of strings or None"):
        generation_options({"until": 5}, 8)
    with pytest.raises(TypeError, match="gen_kwargs must be a dict, got str"):
        generation_options("abc", 8)
    with pytest.raises(ValueError, match="temperature must be finite"):
        generation_options({"temperature": float("nan")}, 8)  # NaN > 0 is False: greedy before
    with pytest.raises(TypeError, match="do_sample must be true or false"):
        generation_options({"do_sample": "false"}, 8)  # a true string before
    assert generation_options({"until": None}, 8)[0] == []
