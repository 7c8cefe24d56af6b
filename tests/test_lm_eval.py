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


def test_loglikelihood_rolling_long_document_predicts_every_token_once(fastpt_lm):
    text = " ".join(["Ruza lives in Varna and works as a baker."] * 20)
    n = len(fastpt_lm.tokenizer.encode(text, add_special_tokens=False).ids)
    assert n > fastpt_lm.max_length  # several windows
    (rolled,) = fastpt_lm.loglikelihood_rolling([_Request(text)], disable_tqdm=True)
    assert math.isfinite(rolled) and rolled < 0
    # per token, no better than the model's best and no worse than uniform by much
    assert -rolled / n < 2 * math.log(fastpt_lm.tokenizer.get_vocab_size())


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
    with pytest.raises(ValueError, match="greedily"):
        fastpt_lm.generate_until([_Request("Ruza ->", {"do_sample": True})], disable_tqdm=True)


def test_bad_model_args(tmp_path):
    from fastpt.icl.lm_eval_harness import FastptLM
    with pytest.raises(ValueError, match="pretrained=PATH"):
        FastptLM()
    with pytest.raises(ValueError, match="no config.json"):
        FastptLM(pretrained=str(tmp_path))


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
