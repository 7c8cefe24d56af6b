"""Bad input to the benchmark commands and honest reporting (no timing assertions): every
option error names the option and comes before any timing; output files are never lost or
overwritten by one another; a ratio is never reported for an implementation that disagreed."""

from __future__ import annotations

import math

import pytest

from fastpt import cli
from fastpt.benchmarks import finetune, harness, rounds, run, trainer


def _exits_two(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_timing(monkeypatch):
    """Any timing or model building fails the test: the errors must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("the benchmark started before refusing its options")
    for module in (trainer, finetune):
        monkeypatch.setattr(module, "alternate_rounds", boom)
    monkeypatch.setattr(trainer, "_setup", boom)
    for name in ("strategies", "icl", "lora_speed"):
        monkeypatch.setattr(finetune, name, boom)
    return boom


# ------------------------------------------------------------------ fastpt bench


def test_bench_refuses_the_same_file_for_json_and_markdown(tmp_path, monkeypatch, capsys):
    """Before: the Markdown replaced the JSON written a moment earlier (the records lost)."""
    monkeypatch.setattr(run, "_run_child", lambda *a: pytest.fail("the suite ran"))
    old = tmp_path / "r.json"
    old.write_text("[]\n")
    assert cli.main(["bench", "--quick", "--json", str(old), "--markdown", str(tmp_path / "." / "r.json")]) == 2
    assert "--json and --markdown name the same file" in capsys.readouterr().err
    assert old.read_text() == "[]\n"
    with pytest.raises(ValueError, match="json_path and markdown_path name the same file"):
        run.run_suite(run.BenchConfig(quick=True), str(old), str(old))


@pytest.mark.parametrize("flag", ["--json", "--markdown"])
def test_bench_refuses_an_empty_output_path(flag, monkeypatch, capsys):
    """Before: --json "" was taken for no --json: the run wrote nothing, silently."""
    monkeypatch.setattr(run, "_run_child", lambda *a: pytest.fail("the suite ran"))
    assert cli.main(["bench", "--quick", flag, ""]) == 2
    assert f"{flag}: expected a file path, got ''" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--budget", "--threads"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0x"])
def test_bench_refuses_bad_numbers(flag, value, capsys):
    if flag == "--budget" and value == "0x":
        value = "1e999"  # inf spelt as a float literal
    assert f"argument {flag}" in _exits_two(cli.main, ["bench", flag, value], capsys)


def test_config_and_timing_refuse_what_would_time_nothing():
    with pytest.raises(ValueError, match="budget_s must be >= 0 and finite, got nan"):
        run.BenchConfig(budget_s=math.nan)
    for kwargs, match in (({"budget_s": math.inf}, "budget_s must be a finite number of seconds >= 0, got inf"),
                          ({"min_rounds": 0}, "min_rounds must be an int >= 1, got 0"),
                          ({"max_rounds": 0}, "max_rounds must be an int >= 1, got 0"),
                          ({"min_rounds": 5, "max_rounds": 2}, "max_rounds must be >= min_rounds"),
                          ({"warmup": 0}, "warmup must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            harness.Timing(**kwargs)
    # Before: no round at all, then an IndexError / StatisticsError on the empty samples.
    with pytest.raises(ValueError, match="max_rounds must be an int >= 1, got 0"):
        rounds.alternate_rounds({"a": lambda: None}, 0.0, 1, 0)
    with pytest.raises(ValueError, match="budget_s must be a finite number of seconds >= 0, got nan"):
        rounds.alternate_rounds({"a": lambda: None}, math.nan, 1, 1)


# ------------------------------------------------------------------ bench-models, bench-dropin


def _script(name):
    pytest.importorskip("transformers")
    import importlib
    return importlib.import_module(f"fastpt.benchmarks.{name}")


@pytest.mark.parametrize("name", ["models", "dropin"])
@pytest.mark.parametrize("argv,message", [
    (["--threads", "0"], "argument --threads: '0': expected a positive integer"),
    (["--threads", "-2"], "argument --threads: '-2': expected a positive integer"),
    (["--budget", "nan"], "argument --budget: 'nan': expected a finite number of seconds >= 0"),
    (["--budget", "-1"], "argument --budget: '-1': expected a finite number of seconds >= 0"),
    (["--budget", "inf"], "argument --budget: 'inf': expected a finite number of seconds >= 0"),
    (["--json", ""], "--json: expected a file path, got ''"),
    (["--dtypes", "fp32,"], "--dtypes must be a comma-separated subset of fp32,bf16, got 'fp32,'"),
])
def test_model_scripts_refuse_bad_values_before_timing(name, argv, message, monkeypatch, capsys):
    """Before: --threads 0 was a RuntimeError traceback from torch after the parse; a NaN,
    negative or infinite budget and an empty --json path were taken (the last wrote nothing)."""
    bench = _script(name)
    for measure in ("measure", "measure_train", "measure_int8"):
        if hasattr(bench, measure):
            monkeypatch.setattr(bench, measure, lambda *a, **k: pytest.fail("the benchmark started"))
    assert message in _exits_two(bench.main, ["--quick", *argv], capsys)


@pytest.mark.parametrize("name,argv", [("models", ["--cases", "encoder,encoder", "--dtypes", "fp32, fp32"]),
                                       ("dropin", ["--cases", "int8,int8"])])
def test_model_scripts_run_a_listed_case_once(name, argv, monkeypatch, capsys):
    """Before: a case listed twice was measured and reported twice."""
    bench = _script(name)
    calls = []
    if name == "models":
        monkeypatch.setattr(bench, "measure", lambda case, dtype, *a, **k: calls.append((case, dtype)) or [])
    else:
        monkeypatch.setattr(bench, "measure_int8", lambda *a, **k: calls.append("int8") or [])
    assert bench.main(["--quick", *argv]) == 0
    assert calls in ([("encoder", "fp32")], ["int8"])


# ------------------------------------------------------------------ trainer, finetune


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "argument --steps: '0': expected a positive integer"),
    (["--steps", "-3"], "argument --steps: '-3': expected a positive integer"),
    (["--json", "/nonexistent-folder/r.json"], "does not exist"),
    (["--json", ""], "--json: expected a file path, got ''"),
])
def test_trainer_benchmark_refuses_bad_values_before_timing(argv, message, no_timing, capsys):
    """Before: --steps 0 timed nothing and died in statistics.median; a --json path in a
    missing folder failed at the write, after the measurements."""
    assert message in _exits_two(trainer.main, ["--quick", *argv], capsys)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        trainer.measure(quick=True, steps=0)


@pytest.mark.parametrize("argv,message", [
    (["--only", "nope"], "--only must be a comma-separated subset of strategies,icl,lora_speed, got 'nope'"),
    (["--only", ""], "--only must be a comma-separated subset"),
    (["--json", "/nonexistent-folder/r.json"], "does not exist"),
])
def test_finetune_benchmark_refuses_bad_values_before_running(argv, message, no_timing, capsys):
    """Before: an unknown --only part was a KeyError after the parts before it had run."""
    assert message in _exits_two(finetune.main, ["--quick", *argv], capsys)


def test_finetune_benchmark_refuses_a_file_as_its_out_folder(tmp_path, no_timing, capsys):
    out = tmp_path / "file"
    out.write_text("")
    assert "--out" in _exits_two(finetune.main, ["--quick", "--only", "icl", "--out", str(out)], capsys)


def test_finetune_quick_decoder_never_stands_in_for_the_full_one(tmp_path, monkeypatch):
    """Before: one cache folder for both sizes: a full run after a --quick one reported the
    accuracies of the quick (150-step) decoder as the full (1500-step) one's."""
    import fastpt.train.recipes as recipes
    trained = []

    class Result:
        model, tokenizer = "model", "tokenizer"

    def pretrain(out, **kw):
        trained.append((out, kw["max_steps"]))
        return Result()

    def save(result, path):
        import os
        os.makedirs(path)
        open(os.path.join(path, "model.safetensors"), "w").close()
    monkeypatch.setattr(recipes, "pretrain_decoder", pretrain)
    monkeypatch.setattr(recipes, "save_pretrained_with_tokenizer", save)
    finetune.pretrained_decoder(str(tmp_path), quick=True)
    assert finetune.pretrained_decoder(str(tmp_path), quick=False) == ("model", "tokenizer")
    assert [steps for _, steps in trained] == [150, 1500]
    assert trained[0][0] != trained[1][0]


@pytest.fixture
def tiny_llama(monkeypatch):
    import fastpt.models
    real = fastpt.models.from_name
    monkeypatch.setattr(fastpt.models, "from_name", lambda name, **kw: real("llama-tiny", num_layers=1))


def test_lora_speed_checks_fastpt_lora_against_the_eager_lora(tiny_llama):
    result = finetune.lora_speed(quick=True)
    assert result["lora_agrees"] is True and result["lora_max_rel_error"] < 1e-5
    assert result["lora_vs_full"] > 0 and result["lora_vs_eager_lora"] > 0


def test_lora_speed_gives_no_ratio_to_a_wrong_lora(tiny_llama, monkeypatch):
    """Before: no check at all: a fused LoRA computing something else got its speed-ups."""
    import fastpt.finetune.lora as lora
    real = lora.lora_linear
    monkeypatch.setattr(lora, "lora_linear", lambda *a, **k: real(*a, **k) * 1.01)
    with pytest.warns(UserWarning, match="lora_fastpt differs from lora_eager"):
        result = finetune.lora_speed(quick=True)
    assert result["lora_agrees"] is False and result["lora_max_rel_error"] > 1e-3
    assert result["lora_vs_full"] is None and result["lora_vs_eager_lora"] is None


def test_models_peak_memory_child_runs_with_the_benchmark_threads(monkeypatch):
    """Before: the --memory child ran with torch's default threads (every core), not --threads."""
    import subprocess
    bench = _script("models")
    codes = []

    def fake_run(cmd, **kwargs):
        codes.append(cmd[-1])
        return subprocess.CompletedProcess(cmd, 0, stdout="12.5\n")
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    assert bench.peak_memory("fastpt", "fp32", "quick", threads=3) == 12.5
    assert "torch.set_num_threads(3)" in codes[0]
