"""CLI user errors on data and model folders, in one line: labels and texts of JSONL data, ICL
records, Ctrl-C, a resume with no steps left, and audit 3's argument errors and messages."""

import json
import os
import subprocess
import sys

import pytest

from cli_validation_util import AWAY, ENV, _error
from fastpt.cli import main

TINY = ["--preset", "gpt2-tiny", "--n-docs", "60", "--vocab-size", "300", "--seq-len", "32",
        "--batch-size", "2", "--no-progress", "--log-every", "1"]


def _writes(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    assert main(["pretrain", "--output-dir", str(out), "--max-steps", "2", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def classifier(pretrained, tmp_path_factory):
    """A fine-tuned classifier whose data fields are 'review' and 'stars'."""
    tmp = tmp_path_factory.mktemp("ft")
    data = _writes(tmp / "train.jsonl", [{"review": "good film", "stars": "pos"},
                                         {"review": "bad film", "stars": "neg"}] * 2)
    out = tmp / "out"
    assert main(["finetune", "--base", str(pretrained / "final"), "--train", data,
                 "--text-field", "review", "--label-field", "stars", "--output-dir", str(out),
                 "--strategy", "probe", "--max-steps", "1", "--batch-size", "2", "--no-progress"]) == 0
    info = json.load(open(out / "final" / "finetune.json"))
    assert (info["text_field"], info["label_field"]) == ("review", "stars")
    return out / "final"


# -- 3, 4: labels and texts of classification data -----------------------------------------

@pytest.mark.parametrize("label,message", [
    ([1], "got list [1]"), ({"a": 1}, "got dict"), (None, "got null"), (True, "got bool True"),
    (1.0, "got float 1.0")])
def test_finetune_refuses_labels_that_are_not_str_or_int(tmp_path, capsys, label, message):
    data = _writes(tmp_path / "d.jsonl", [{"text": "a b", "label": "x"}, {"text": "a b", "label": label}])
    err = _error(capsys, ["finetune", "--base", str(tmp_path), "--train", data,
                          "--output-dir", str(tmp_path / "o")])
    assert f"d.jsonl:2: 'label' must be a string or an integer, {message}" in err
    assert not (tmp_path / "o").exists()


def test_finetune_needs_two_labels_and_nonempty_texts(tmp_path, capsys):
    base = ["finetune", "--base", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--train"]
    one = _writes(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}] * 3)
    assert "at least 2 distinct labels" in _error(capsys, [*base, one])
    # Blank lines do not shift the line numbers in messages.
    (tmp_path / "empty.jsonl").write_text('{"text": "a", "label": 0}\n\n{"text": "", "label": 1}\n')
    assert "empty.jsonl:3: 'text' is empty" in _error(capsys, [*base, str(tmp_path / "empty.jsonl")])
    assert "'text' must be a string" in _error(
        capsys, [*base, _writes(tmp_path / "n.jsonl", [{"text": None, "label": 0}])])


def test_eval_classify_uses_the_finetuned_fields_and_checks_records(classifier, tmp_path, capsys):
    ok = _writes(tmp_path / "ok.jsonl", [{"review": "good film", "stars": "pos"}])
    assert main(["eval", "--model", str(classifier), "--task", "classify", "--data", ok]) == 0
    assert "accuracy" in capsys.readouterr().out
    base = ["eval", "--model", str(classifier), "--task", "classify", "--data"]
    cases = [
        ({"stars": "pos"}, "no 'review'"),
        ({"review": "good"}, "no 'stars'"),
        ({"review": "", "stars": "pos"}, "'review' is empty"),
        ({"review": "x", "stars": [1]}, "must be a string or an integer"),
        ({"review": "x", "stars": "meh"}, "not among the model's"),
    ]
    for i, (row, message) in enumerate(cases):
        data = _writes(tmp_path / f"c{i}.jsonl", [row])
        assert message in _error(capsys, [*base, data]), row


# -- 6, 7: ICL records, input paths ----------------------------------------------------------

@pytest.mark.parametrize("row,message", [
    ({"input": "a", "target": "Varna", "choices": "Varna"}, "'choices' must be a non-empty list"),
    ({"input": 1, "target": 2, "choices": [2, 3]}, "'choices' must be a non-empty list"),
    ({"input": 1, "target": "b", "choices": ["b"]}, "'input' must be a string"),
    ({"input": "a", "target": "X", "choices": ["b", "c"]}, "'target' 'X' is not among"),
])
def test_icl_records_are_checked(pretrained, tmp_path, capsys, row, message):
    data = _writes(tmp_path / "icl.jsonl", [row])
    err = _error(capsys, ["eval", "--model", str(pretrained / "final"), "--data", data, "--shots", "0"])
    assert f"icl.jsonl:1: {message}" in err


def test_folders_given_for_files(pretrained, tmp_path, capsys):
    assert "prompts_file: " in _error(capsys, ["generate", "--model", str(tmp_path),
                                               "--prompts-file", str(tmp_path)])
    assert "icl.pool: " in _error(capsys, ["eval", "--model", str(pretrained / "final"),
                                           "--pool", str(tmp_path), "--limit", "2"])


# -- 8: Ctrl-C --------------------------------------------------------------------------------

def test_ctrl_c_outside_training_exits_130_with_one_line(capsys, monkeypatch):
    from fastpt.commands import generate

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(generate, "run", interrupted)
    assert _error(capsys, ["generate"], status=130) == "fastpt generate: interrupted"


def test_ctrl_c_while_generating_in_a_child(pretrained, tmp_path):
    """A real SIGINT during generation: status 130, no traceback."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "-c", (
        "import sys, fastpt.commands.generate as g\n"
        "def slow(*a):\n"
        "    print('ready', flush=True)\n"
        # Short sleeps: a SIGINT the kernel hands to one of torch's threads does not cut the
        # main thread's sleep short, so Python would run its handler only after a long one.
        "    import time\n"
        "    for _ in range(600): time.sleep(0.1)\n"
        "g.continuations = slow\n"
        "from fastpt.cli import main\n"
        f"sys.exit(main(['generate', '--model', {str(pretrained / 'final')!r}, '--prompt', 'a']))\n")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=AWAY)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "fastpt generate: interrupted", err


# -- 10: resume with no steps left ----------------------------------------------------------

def test_resume_at_max_steps_does_nothing(pretrained, capsys):
    final = pretrained / "final" / "model.safetensors"
    before = os.stat(final).st_mtime_ns
    err = _error(capsys, ["pretrain", "--output-dir", str(pretrained), "--resume",
                          "--max-steps", "1", *TINY])
    assert "already at step 2 >= train.max_steps 1" in err
    assert os.stat(final).st_mtime_ns == before


# -- audit 3, F6 + F8: every argument error before the first file is written ----------------

@pytest.fixture(scope="module")
def folders(pretrained, tmp_path_factory):
    """Model and tokenizer folders built without training: a BERT encoder, a Llama decoder (no
    biases), a model folder without tokenizer.json, an 800-token tokenizer, and small corpora."""
    import shutil

    from fastpt.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
    from fastpt.data.world import World
    from fastpt.models import Decoder, DecoderConfig, Encoder, EncoderConfig
    root = tmp_path_factory.mktemp("folders")
    docs = list(World(0).documents(200, seed=0))
    wordpiece = train_tokenizer(docs, "wordpiece", vocab_size=300)
    encoder = Encoder(EncoderConfig.from_name("bert-tiny", vocab_size=wordpiece.get_vocab_size()))
    bpe = load_tokenizer(str(pretrained / "final"))
    llama = Decoder(DecoderConfig.from_name("llama-tiny", vocab_size=bpe.get_vocab_size()))
    for name, model, tok in (("encoder", encoder, wordpiece), ("llama", llama, bpe)):
        model.save_pretrained(str(root / name))
        save_tokenizer(tok, str(root / name))
    save_tokenizer(train_tokenizer(docs, "bpe", vocab_size=800), str(root / "tok800"))
    shutil.copytree(pretrained / "final", root / "notok")
    (root / "notok" / "tokenizer.json").unlink()
    (root / "empty.txt").write_text("")
    _writes(root / "docs.jsonl", [{"text": "Ann ate at Bo."}] * 3)
    _writes(root / "train.jsonl", [{"text": "good film", "label": "pos"},
                                   {"text": "bad film", "label": "neg"}] * 2)
    return root


_PRETRAIN = ["pretrain", "--max-steps", "1", *TINY]
_FINETUNE = ["finetune", "--train", "{f}/train.jsonl", "--max-steps", "1", "--batch-size", "2",
             "--no-progress"]
# The failing argument sets of audit 3 (F6, F8) and the text each error line must hold;
# {dec} is a pre-trained gpt2 decoder folder (128 positions), {f} the `folders` fixture.
AUDIT_CASES = {
    "vocab 10": ([*_PRETRAIN, "--vocab-size", "10"], "data.vocab_size: expected an integer >= 257"),
    "seq_len 0": ([*_PRETRAIN, "--seq-len", "0"], "data.seq_len: expected an integer >= 2"),
    "seq_len -5": ([*_PRETRAIN, "--seq-len", "-5"], "data.seq_len: expected an integer >= 2"),
    "encoder seq_len 2": ([*_PRETRAIN, "--preset", "bert-tiny", "--seq-len", "2"],
                          "data.seq_len: expected an integer >= 3"),
    "n_docs 0": ([*_PRETRAIN, "--n-docs", "0"], "data.n_docs: expected an integer >= 1, got 0"),
    "n_docs -1": ([*_PRETRAIN, "--n-docs", "-1"], "data.n_docs: expected an integer >= 1, got -1"),
    "empty corpus": ([*_PRETRAIN, "--corpus", "{f}/empty.txt"], "holds no documents"),
    # was the Trainer's "the training data yields no batch", with no document count
    "encoder corpus of fewer documents than a batch": (
        [*_PRETRAIN, "--preset", "bert-tiny", "--corpus", "{f}/docs.jsonl", "--batch-size", "4"],
        "holds 3 document(s); an encoder trains on one example per document"),
    "field missing": ([*_PRETRAIN, "--corpus", "{f}/docs.jsonl", "--field", "nofield"], "'nofield'"),
    "tokenizer folder without tokenizer.json": ([*_PRETRAIN, "--tokenizer", "{f}"],
                                                "data.tokenizer: no tokenizer.json"),
    "tokenizer without eos": ([*_PRETRAIN, "--tokenizer", "{f}/encoder"],
                              "data.tokenizer: the tokenizer has no EOS token"),
    "tokenizer larger than init_from": ([*_PRETRAIN, "--init-from", "{dec}", "--tokenizer", "{f}/tok800"],
                                        "do not fit model.init_from's vocab_size"),
    "seq_len beyond init_from": ([*_PRETRAIN, "--init-from", "{dec}", "--seq-len", "129"],
                                 "data.seq_len: 129 > model.init_from's max_position_embeddings 128"),
    "electra from init_from": ([*_PRETRAIN, "--init-from", "{f}/encoder", "--objective", "electra"],
                               "'electra' cannot continue"),
    "base without tokenizer.json": ([*_FINETUNE, "--base", "{f}/notok"], "model.base: no tokenizer.json"),
    "max_length 0": ([*_FINETUNE, "--base", "{dec}", "--max-length", "0"],
                     "data.max_length: expected an integer >= 1, got 0"),
    "max_length -1": ([*_FINETUNE, "--base", "{dec}", "--max-length", "-1"],
                      "data.max_length: expected an integer >= 1, got -1"),
    "n_train -3": (["finetune", "--base", "{dec}", "--n-train", "-3", "--max-steps", "1", "--no-progress"],
                   "data.n_train: expected an integer >= 1, got -3"),
    "bitfit on llama": ([*_FINETUNE, "--base", "{f}/llama", "--strategy", "bitfit"],
                        "finetune.strategy: 'bitfit' does not apply"),
    "prefix on encoder": ([*_FINETUNE, "--base", "{f}/encoder", "--strategy", "prefix"],
                          "finetune.strategy: 'prefix' does not apply"),
}


@pytest.mark.parametrize("case", AUDIT_CASES)
def test_argument_errors_leave_the_output_folder_untouched(pretrained, folders, tmp_path, capsys, case):
    """Each fails with one line naming the option, and writes neither *_options.json nor
    tokenizer.json: the output folder is still absent, and an existing one still empty."""
    args, message = AUDIT_CASES[case]
    args = [a.format(dec=pretrained / "final", f=folders) for a in args]
    absent, empty = tmp_path / "absent", tmp_path / "empty"
    empty.mkdir()
    errors = [_error(capsys, [*args, "--output-dir", str(out)]) for out in (absent, empty)]
    assert not absent.exists(), sorted(os.listdir(absent))
    assert not any(empty.iterdir()), sorted(os.listdir(empty))
    assert all(message in err for err in errors), errors


# -- audit 3, F9: messages that name the option ---------------------------------------------

@pytest.mark.parametrize("data", ["world:city_of", "jsonl"])
def test_eval_refuses_a_negative_limit(tmp_path, capsys, data):
    if data == "jsonl":
        data = _writes(tmp_path / "icl.jsonl", [{"input": "a", "target": "b", "choices": ["b", "c"]}])
    err = _error(capsys, ["eval", "--model", str(tmp_path), "--data", data, "--limit", "-1"])
    assert err == "fastpt eval: error: limit: expected an integer >= 0, got -1"


@pytest.mark.parametrize("shots,message", [(",", "icl.shots: no numbers of examples given"),
                                           ("0,-1", "icl.shots: -1 is not a number of examples")])
def test_eval_checks_every_shot_count_before_loading_the_model(tmp_path, capsys, monkeypatch,
                                                               shots, message):
    from fastpt.commands import evaluate
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", lambda *a: pytest.fail("loaded first"))
    out = tmp_path / "r.json"
    err = _error(capsys, ["eval", "--model", str(tmp_path), "--shots", shots, "--output", str(out)])
    assert message in err and not out.exists()


def test_generate_names_a_prompts_file_that_is_not_text(tmp_path, capsys):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"a prompt\n\xf0\x28\x8c\xbc\xff\n")
    err = _error(capsys, ["generate", "--model", str(tmp_path), "--prompts-file", str(binary)])
    assert f"{binary}: not valid UTF-8" in err


def test_a_jsonl_file_that_is_not_text_is_named(pretrained, tmp_path, capsys):
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(b'{"input": "a"}\n\xff\xfe\n')
    err = _error(capsys, ["eval", "--model", str(pretrained / "final"), "--data", str(binary)])
    assert f"{binary}: not valid UTF-8" in err


def test_generate_names_a_prompt_longer_than_learned_positions(pretrained, capsys):
    long_prompt = "Ann ate at Bo. " * 100   # far more than the gpt2 model's 128 positions
    err = _error(capsys, ["generate", "--model", str(pretrained / "final"), "--prompt", long_prompt])
    assert "prompt 1: " in err and "more than the model's 128 learned positions" in err
