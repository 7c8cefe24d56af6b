"""The training CLI: pretrain -> finetune -> generate / eval on tiny runs, TOML configs and
their errors, Ctrl-C leaving a resumable checkpoint, and torchrun."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file

from fastpt.cli import build_parser, main
from fastpt.commands import options as opts

TINY = ["--preset", "gpt2-tiny", "--n-docs", "300", "--vocab-size", "300", "--seq-len", "32",
        "--batch-size", "4", "--no-progress", "--log-every", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Child processes run away from the repository root: `python -m` puts the working directory
# first on sys.path, and the fastpt/ source folder there has no compiled _C.
AWAY = tempfile.gettempdir()


def _fastpt(args, **kw):
    return subprocess.run([sys.executable, "-m", "fastpt", *args], capture_output=True, text=True,
                          timeout=240, env=ENV, cwd=AWAY, **kw)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    assert main(["pretrain", "--output-dir", str(out), "--max-steps", "25", "--lr", "3e-3", *TINY]) == 0
    return out


def test_pretrain_writes_a_loadable_model_and_metrics(pretrained):
    from fastpt.models import Decoder, from_pretrained
    model = from_pretrained(pretrained / "final")
    assert isinstance(model, Decoder)
    assert (pretrained / "final" / "tokenizer.json").is_file()
    rows = [json.loads(line) for line in open(pretrained / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learned something
    options = json.load(open(pretrained / "pretrain_options.json"))
    assert options["max_steps"] == 25 and options["preset"] == "gpt2-tiny"


def test_a_fresh_run_refuses_to_overwrite_checkpoints(pretrained, capsys):
    assert main(["pretrain", "--output-dir", str(pretrained), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("strategy,saved_as", [("lora", "merged"), ("adapters", "adapter")])
def test_finetune_then_eval_classify(pretrained, tmp_path, capsys, strategy, saved_as):
    out = tmp_path / "ft"
    assert main(["finetune", "--base", str(pretrained / "final"), "--output-dir", str(out),
                 "--strategy", strategy, "--max-steps", "8", "--batch-size", "8", "--n-train", "32",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.count("trainable params: ") == 1  # was printed twice
    info = json.load(open(out / "final" / "finetune.json"))
    assert info["saved_as"] == saved_as and info["labels"] == [0, 1]
    result = json.load(open(out / "result.json"))
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["n_test"] == 1000
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"text": "Ann ate at Bo. The soup was bad and the service was slow.", "label": 0},
        {"text": "Ann ate at Bo. The soup was great and the service was kind.", "label": 1}]))
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out / "final"), "--task", "classify", "--data", str(data),
                 "--output", str(report)]) == 0
    assert "accuracy" in capsys.readouterr().out
    results = json.load(open(report))["results"]
    assert results[0]["n"] == 2 and results[0]["accuracy"] in (0.0, 0.5, 1.0)


def test_finetune_reads_string_labels_from_jsonl(pretrained, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"review {i}", "label": ["neg", "pos"][i % 2]})
                              for i in range(16)))
    out = tmp_path / "ft"
    assert main(["finetune", "--base", str(pretrained / "final"), "--output-dir", str(out),
                 "--train", str(data), "--test", str(data), "--strategy", "probe", "--max-steps", "2",
                 "--no-progress"]) == 0
    assert json.load(open(out / "final" / "finetune.json"))["labels"] == ["neg", "pos"]
    assert json.load(open(out / "result.json"))["n_test"] == 16


def test_a_prompt_flag_with_commas_is_one_prompt(pretrained, capsys):
    # A flag's text was split at commas into several prompts ("1,2" into the numbers 1 and 2,
    # which crashed the tokenizer); several prompts come from a TOML list.
    for prompt in ("Ruza lives in Pilou, and she", "1,2"):
        assert main(["generate", "--model", str(pretrained / "final"), "--prompt", prompt,
                     "--max-new-tokens", "2", "--stop", "a, b"]) == 0
        assert capsys.readouterr().out.count("\n---") == 1


def test_generate_matches_the_python_api(pretrained, capsys):
    from fastpt.data.tokenizer import load_tokenizer
    from fastpt.models import from_pretrained
    assert main(["generate", "--model", str(pretrained / "final"), "--prompt", "Ruza lives in",
                 "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.split("\n---")[0]
    model, tok = from_pretrained(pretrained / "final").eval(), load_tokenizer(pretrained / "final")
    ids = tok.encode("Ruza lives in", add_special_tokens=False).ids
    out = model.generate([ids], max_new_tokens=5)[0, len(ids):].tolist()
    stops = {model.config.eos_token_id, model.config.pad_token_id}
    assert printed == "Ruza lives in" + tok.decode([t for t in out if t not in stops])


def test_eval_icl_and_perplexity(pretrained, tmp_path, capsys):
    report = tmp_path / "icl.json"
    assert main(["eval", "--model", str(pretrained / "final"), "--data", "world:city_of",
                 "--limit", "6", "--shots", "0,2", "--output", str(report)]) == 0
    rows = json.load(open(report))["results"]
    assert [r["k"] for r in rows] == [0, 2] and all(r["n"] == 6 for r in rows)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Ruza lives in Varna.\n\nThe soup was good.\n")
    assert main(["eval", "--model", str(pretrained / "final"), "--task", "perplexity",
                 "--data", str(corpus), "--output", str(report)]) == 0
    ppl = json.load(open(report))["results"][0]["perplexity"]
    vocab = json.load(open(pretrained / "final" / "config.json"))["vocab_size"]
    assert 1.0 < ppl < vocab  # better than uniform after pre-training


# -- configs -------------------------------------------------------------------------------

def test_every_subcommand_has_help(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        if name == "bench-models":  # passes its options on to its own parser
            continue
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: fastpt " + name in capsys.readouterr().out


def test_config_file_then_flags_override(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('output_dir = "x"\n[train]\nlr = 1\nmax_steps = 7\nbetas = [0.8, 0.9]\n'
                   '[data]\ncorpus = "world"\n')
    from fastpt.commands.pretrain import OPTIONS
    parser = build_parser()
    v = opts.resolve(parser.parse_args(["pretrain", "--config", str(cfg), "--max-steps", "9"]), OPTIONS)
    assert v["lr"] == 1.0 and isinstance(v["lr"], float)  # a TOML integer where a float goes
    assert v["max_steps"] == 9 and v["output_dir"] == "x" and v["betas"] == [0.8, 0.9]
    assert v["batch_size"] == 8  # TrainerConfig's default


@pytest.mark.parametrize("text,message", [
    ("foo = 1\n", "unknown key 'foo'"),
    ("[train]\nlr = \"fast\"\n", "key 'train.lr' must be a number"),
    ("[train]\nmax_steps = 1.5\n", "key 'train.max_steps' must be an integer"),
    ("[train]\nbf16 = 1\n", "key 'train.bf16' must be true or false"),
    ("lr = 0.1\n", "unknown key 'lr' (did you mean 'train.lr'?)"),
    ("[model\n", "not valid TOML"),
    ("[data]\ncorpus = \"/no/such/corpus.txt\"\n", "data.corpus: no such file"),
    ("[model]\npreset = \"gpt5\"\n", "model.preset: 'gpt5' is not one of"),
    ("[train]\nmax_steps = 0\n", "max_steps must be a positive integer"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    proc = _fastpt(["pretrain", "--config", str(cfg), "--output-dir", str(tmp_path / "out")])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_missing_files_are_named(tmp_path):
    (tmp_path / "folder").mkdir()
    for args, message in [(["pretrain", "--config", str(tmp_path / "nope.toml")], "--config: no such file"),
                          (["pretrain", "--config", str(tmp_path / "folder")], "is a folder; give a file"),
                          (["pretrain", "--corpus", str(tmp_path / "folder")],
                           f"data.corpus: {tmp_path / 'folder'} is a folder"),  # was "no such file"
                          (["finetune", "--base", str(tmp_path / "nope")], "model.base: no such file"),
                          (["finetune"], "model.base: required"),
                          (["eval", "--model", str(tmp_path)], "not a model folder")]:
        proc = _fastpt(args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert message in proc.stderr, (args, proc.stderr)


def test_shipped_configs_parse():
    from fastpt.commands import demo, evaluate, finetune, generate, pretrain
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    modules = {"pretrain": pretrain, "finetune": finetune, "generate": generate, "eval": evaluate,
               "demo": demo}
    files = sorted(os.listdir(root))
    assert files
    for name in files:
        command = name.split("-")[0].removesuffix(".toml")
        values = opts.load_toml(os.path.join(root, name), modules[command].OPTIONS)
        assert values, name


def test_pretrain_help_example_builds_a_valid_trainer_config(monkeypatch):
    """The example of `fastpt pretrain --help` (--max-steps 50 over the shipped config's 60
    warmup steps) failed with "warmup_steps (60) must be <= max_steps (50)"."""
    import shlex
    from fastpt.cli import build_parser
    from fastpt.commands import pretrain
    from fastpt.commands.common import trainer_config
    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))
    parser = build_parser()
    epilog = next(a for a in parser._actions if a.dest == "command").choices["pretrain"].epilog
    args = parser.parse_args(shlex.split(epilog.removeprefix("Example: fastpt ")))
    values = opts.resolve(args, pretrain.OPTIONS)
    assert trainer_config("out", opts.section_values(values, pretrain.OPTIONS, "train")).max_steps == 100


def test_target_modules_flag_takes_a_comma_separated_list():
    """--target-modules q_proj,v_proj was one module name 'q_proj,v_proj' (not found)."""
    from fastpt.cli import build_parser
    from fastpt.commands import finetune
    parser = build_parser()
    for flag, expected in (("q_proj,v_proj", ["q_proj", "v_proj"]), ("all-linear", "all-linear"),
                           ("o_proj", "o_proj"), ("none", None)):
        args = parser.parse_args(["finetune", "--target-modules", flag])
        assert opts.resolve(args, finetune.OPTIONS)["target_modules"] == expected


# -- interrupt and torchrun ------------------------------------------------------------------

def _steps(out):
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]


def test_ctrl_c_during_pretrain_leaves_a_resumable_checkpoint(tmp_path):
    """SIGINT mid-run: the step finishes, a checkpoint is written, exit status 130; resuming
    gives bit-for-bit the weights of a run that was never interrupted."""
    args = [*TINY, "--schedule", "constant"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "fastpt", "pretrain", "--output-dir", str(cut),
                             "--max-steps", "100000", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=AWAY)
    deadline = time.time() + 120
    while time.time() < deadline and not (
            (cut / "metrics.jsonl").exists() and len(_steps(cut)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    state = json.load(open(cut / "checkpoints" / "latest"))
    step = int(state["path"].split("-")[-1])
    assert step >= 3
    total = step + 3
    resumed = _fastpt(["pretrain", "--output-dir", str(cut), "--max-steps", str(total), "--resume", *args])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _steps(cut)[-3:] == [step + 1, step + 2, step + 3]
    whole = tmp_path / "whole"
    fresh = _fastpt(["pretrain", "--output-dir", str(whole), "--max-steps", str(total), *args])
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    a = load_file(cut / "final" / "model.safetensors")
    b = load_file(whole / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pretrain_under_torchrun(tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", "-m", "fastpt", "pretrain", "--output-dir", str(out),
                           "--max-steps", "4", *TINY], capture_output=True, text=True, timeout=240,
                          env=ENV, cwd=AWAY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(out) == [1, 2, 3, 4]
    assert proc.stdout.count("done: step 4") == 1  # rank 0 reports, once
    assert proc.stdout.count("pre-training ") == 1  # also before the Trainer starts the group
    assert (out / "final" / "model.safetensors").is_file()


def test_pretrain_continues_from_a_model_folder(pretrained, tmp_path):
    """init_from: the run starts at the given weights (its first loss is the pre-trained
    model's, far below a fresh model's) and keeps its tokenizer."""
    out = tmp_path / "more"
    assert main(["pretrain", "--output-dir", str(out), "--init-from", str(pretrained / "final"),
                 "--max-steps", "2", "--lr", "1e-4", *TINY]) == 0
    first = json.loads(open(out / "metrics.jsonl").readline())["loss"]
    before = [json.loads(line)["loss"] for line in open(pretrained / "metrics.jsonl")]
    assert abs(first - before[-1]) < 0.3 and first < before[0] - 1.0  # ~4.2 against ~5.7
    assert (out / "tokenizer.json").read_text() == (pretrained / "final" / "tokenizer.json").read_text()


def test_generate_stops_at_every_eos_id_and_skips_empty_stop_strings(pretrained):
    # A config's eos_token_id may be a list (as in HF files); an empty --stop cuts nothing,
    # as lm-eval skips empty stop terms.
    from fastpt.commands.generate import continuations
    from fastpt.data.tokenizer import load_tokenizer
    from fastpt.models import from_pretrained
    model, tok = from_pretrained(pretrained / "final").eval(), load_tokenizer(pretrained / "final")
    ids = tok.encode("Ruza lives in", add_special_tokens=False).ids
    v = dict(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_beams=1,
             repetition_penalty=1.0, seed=0, stop=["", "\x00never"])
    # sampled (greedy repeats one token here), with the generator continuations() seeds
    free = model.generate([ids], max_new_tokens=12, do_sample=True,
                          generator=torch.Generator().manual_seed(0))[0, len(ids):].tolist()
    first_new = next(j for j, t in enumerate(free) if j > 0 and t not in free[:j])
    model.config.eos_token_id = [model.config.eos_token_id, free[first_new]]
    (text,) = continuations(model, tok, ["Ruza lives in"], v)
    assert text == tok.decode(free[:first_new]) and text != ""
