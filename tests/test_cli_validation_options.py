"""User errors of the CLI end in one line on stderr and a non-zero exit status, never a traceback,
before any work or file is written: option types, output paths, numbers, MDP options."""

import os
import subprocess
import sys
import tempfile

import pytest

from cli_validation_util import AWAY, ENV, _error
from fastpt import cli
from fastpt.cli import main


# -- 1, 11: option types, checked before anything is written ---------------------------------

def test_betas_of_the_wrong_type_are_refused_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    err = _error(capsys, ["pretrain", "--output-dir", str(out), "--max-steps", "1", "--betas", "a,b"])
    assert "betas" in err
    config = tmp_path / "c.toml"
    config.write_text('[train]\nbetas = ["a", "b"]\n')
    assert "betas" in _error(capsys, ["pretrain", "--config", str(config), "--output-dir", str(out)])
    assert not out.exists()  # no partial output folder


def test_finetune_checks_train_options_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    err = _error(capsys, ["finetune", "--base", str(tmp_path), "--output-dir", str(out),
                          "--betas", "0.9,x"])
    assert "betas" in err and not out.exists()


# -- 2: output paths --------------------------------------------------------------------------

def _unwritable() -> str:
    probe = "/sys/fastpt-test/x"
    if not os.path.isdir("/sys"):
        pytest.skip("no /sys")
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pytest.skip("/sys is writable here")
    except OSError:
        return probe


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_output_dir_must_be_a_writable_folder(tmp_path, capsys, command):
    afile = tmp_path / "afile"
    afile.write_text("x")
    extra = ["--base", str(tmp_path)] if command == "finetune" else []
    base = [command, *extra, "--max-steps", "1", "--output-dir"]
    assert "not a folder" in _error(capsys, [*base, str(afile)])
    assert "is a file, not a folder" in _error(capsys, [*base, str(afile / "sub")])
    assert "not writable" in _error(capsys, [*base, _unwritable()])


def test_demo_out_that_cannot_be_created(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "cannot create" in _error(capsys, ["demo", "--quick", "--sections", "mdp",
                                              "--out", str(afile / "x")])
    assert "cannot create" in _error(capsys, ["demo", "--quick", "--sections", "mdp",
                                              "--out", _unwritable()])


def test_eval_output_is_checked_before_evaluating(tmp_path, capsys, monkeypatch):
    from fastpt.commands import evaluate
    monkeypatch.setattr(evaluate, "perplexity", lambda *a: pytest.fail("evaluated first"))
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", lambda *a: (None, None))
    base = ["eval", "--model", str(tmp_path), "--task", "perplexity", "--output"]
    assert "is a folder" in _error(capsys, [*base, str(tmp_path)])
    assert "not writable" in _error(capsys, [*base, _unwritable() + ".json"])


def test_bench_json_is_checked_before_the_suite(tmp_path, capsys, monkeypatch):
    from fastpt.benchmarks import run
    monkeypatch.setattr(run, "run_suite", lambda *a, **k: pytest.fail("ran the suite first"))
    assert "is a folder" in _error(capsys, ["bench", "--quick", "--json", str(tmp_path)])
    (tmp_path / "afile").write_text("x")
    assert "is a file, not a folder" in _error(capsys, ["bench", "--quick", "--markdown",
                                                        str(tmp_path / "afile" / "x.md")])


@pytest.mark.parametrize("exc", [IsADirectoryError(21, "Is a directory", "adir"),
                                 NotADirectoryError(20, "Not a directory", "f/x"),
                                 PermissionError(13, "Permission denied", "/sys/x"),
                                 FileExistsError(17, "File exists", "f")])
def test_os_errors_of_a_command_are_one_line(capsys, monkeypatch, exc):
    from fastpt.commands import generate

    def boom(args):
        raise exc
    monkeypatch.setattr(generate, "run", boom)
    err = _error(capsys, ["generate"])
    assert err == f"fastpt generate: error: {exc.filename}: {exc.strerror}"


# -- 9, 13, 14: numbers -----------------------------------------------------------------------

def test_non_finite_budgets_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quick", "--budget", "inf"])
    assert e.value.code == 2 and "finite" in capsys.readouterr().err
    assert "kernel_budget_s: expected a finite number" in _error(
        capsys, ["demo", "--quick", "--kernel-budget-s", "inf"])
    assert "mdp_epsilon" in _error(capsys, ["demo", "--quick", "--mdp-epsilon", "inf"])


def test_demo_options_that_failed_a_section_late_are_refused_up_front(capsys):
    # the in-context section failed only after pre-training the decoder
    assert "icl_shots: expected at most 200 examples" in _error(capsys, ["demo", "--quick", "--icl-shots", "0,250"])
    err = _error(capsys, ["demo", "--quick", "--kernel-ops", "rms_norm,int8_matmul", "--kernel-modes", "fwdbwd"])
    assert err.endswith("kernel_ops: int8_matmul run in none of kernel_modes ['fwdbwd'] (int8_matmul: fwd)"), err


def test_mdp_options(capsys, monkeypatch):
    from fastpt.mdp import examples
    monkeypatch.setattr(examples, "physical_memory", lambda: 64 * 2**30)
    assert "transitions need about" in _error(capsys, ["mdp", "--states", "100000000000"])
    # the demo checks its MDP as it checks its other options, before any section runs
    assert "transitions need about" in _error(capsys, ["demo", "--quick", "--mdp-states", "100000000000"])
    err = _error(capsys, ["mdp", "--gamma", "1", "--states", "10"])
    assert "--gamma" in err and "terminal=" not in err
    assert "--epsilon" in _error(capsys, ["mdp", "--epsilon", "inf", "--states", "10"])
    # was found after the gridworld had printed, as "error: ..." without the command's name
    assert main(["mdp", "--gauss-seidel", "--stop", "span", "--states", "10"]) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith("fastpt mdp: error: --gauss-seidel takes the sup rule only")
    assert "gridworld" not in printed.out


def test_mdp_and_bench_take_a_toml_config(tmp_path, capsys):
    """`fastpt mdp` and `fastpt bench` had no --config, which every other command takes."""
    cfg = tmp_path / "mdp.toml"
    cfg.write_text('states = 40\nsuccessors = 3\ngamma = 0.5\ngauss-seidel = true\n')
    assert main(["mdp", "--config", str(cfg), "--gamma", "0.8"]) == 0  # a flag overrides the file
    out = capsys.readouterr().out
    assert "states=40" in out and "gamma=0.8" in out and "Gauss-Seidel" in out
    for text, message in (('states = "x"\n', "key 'states': 'x': expected a positive integer"),
                          ("nope = 1\n", "unknown key 'nope'; mdp takes actions, epsilon"),
                          ("gauss_seidel = 1\n", "key 'gauss_seidel' must be true or false"),
                          ('stop = "max"\n', "key 'stop' must be one of sup, span"),
                          ("states = [1, [2]]\n", "must be a number, a string or a list of them"),
                          ("[mdp\n", "not valid TOML")):
        cfg.write_text(text)
        assert message in _error(capsys, ["mdp", "--config", str(cfg)])
    assert "no such file" in _error(capsys, ["mdp", "--config", str(tmp_path / "none.toml")])
    bench = tmp_path / "bench.toml"
    bench.write_text('ops = ["rms_norm", "swiglu"]\nquick = true\nbudget = 0.5\n')
    argv = ["bench", "--config", str(bench), "--budget", "2"]
    args = cli.build_parser().parse_args(argv)
    args.rest, args.argv = [], argv
    again = cli._with_toml_config(args)
    assert again.ops == ("rms_norm", "swiglu") and again.quick is True and again.budget == 2.0


# -- one subprocess: the whole path from the console entry point ---------------------------

def test_no_traceback_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastpt", "pretrain", "--max-steps", "1",
                           "--betas", "a,b", "--output-dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, env=ENV, cwd=AWAY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


# -- audit 3, F7: an output file in a folder that does not exist ----------------------------

def test_eval_output_in_a_missing_folder_is_refused_before_evaluating(tmp_path, capsys, monkeypatch):
    from fastpt.commands import evaluate
    monkeypatch.setattr(evaluate, "perplexity", lambda *a: pytest.fail("evaluated first"))
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", lambda *a: (None, None))
    err = _error(capsys, ["eval", "--model", str(tmp_path), "--task", "perplexity",
                          "--output", str(tmp_path / "new" / "sub" / "r.json")])
    target = tmp_path / "new" / "sub"
    assert f"output: cannot write {target}/r.json: the folder {target} does not exist" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("flag", ["--json", "--markdown"])
def test_bench_output_in_a_missing_folder_is_refused_before_the_suite(tmp_path, capsys, monkeypatch, flag):
    from fastpt.benchmarks import run
    monkeypatch.setattr(run, "run_suite", lambda *a, **k: pytest.fail("ran the suite first"))
    err = _error(capsys, ["bench", "--quick", flag, str(tmp_path / "new" / "r.out")])
    assert f"{flag}: cannot write" in err and "does not exist" in err
