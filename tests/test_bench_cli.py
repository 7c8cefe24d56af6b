"""The benchmark's output files, allocator modes, config and CLI: JSON and Markdown, argument
errors, and child runs that crash part-way."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import subprocess
import sys

import pytest

from bench_util import FAST, TINY
from fastpt import alloc, cli
from fastpt.benchmarks import harness, run


def _records():
    spec = run.load_spec("swiglu")
    return (harness.measure_case(spec, TINY["swiglu"], "fp32", "fwd", alloc="steady",
                                 compile=False, timing=FAST)
            + harness.measure_case(spec, TINY["swiglu"], "fp32", "fwd", alloc="default",
                                   compile=False, timing=FAST))


def test_json_and_markdown(tmp_path):
    records = _records()
    path = tmp_path / "r.json"
    harness.write_json(records, str(path))
    text = path.read_text()
    assert len(json.loads(text)) == len(records) == 4
    assert len(text.strip().splitlines()) == len(records) + 2  # "[", one line each, "]"
    assert harness.read_json(str(path)) == records
    fields = set(json.loads(text)[0])
    assert {"op", "dtype", "mode", "shape", "impl", "median_ms", "ratio_vs_eager",
            "ratio_vs_compile", "pct_copy_bandwidth", "alloc"} <= fields

    md = tmp_path / "r.md"
    harness.write_markdown(records, str(md), preamble="machine")
    lines = md.read_text().strip().splitlines()
    assert lines[0] == "machine"
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + 2  # header, alignment, one row per (alloc) case
    assert all(ln.count("|") == len(harness.COLUMNS) + 1 for ln in table)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_use_steady_allocator_on_glibc(tmp_path):
    # A child process, so this test process keeps its allocator as it was; cwd away from the
    # repository root, whose source fastpt/ has no _C.
    code = "import fastpt.alloc as a; print(a.use_steady_allocator())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert out.stdout.strip() == "True"


def test_child_env(monkeypatch):
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1")
    assert run.child_env("steady", 2)["MALLOC_TOP_PAD_"] == alloc.STEADY_ENV["MALLOC_TOP_PAD_"]
    default = run.child_env("default", 3)
    assert not any(k.startswith("MALLOC_") for k in default)
    assert default["OMP_NUM_THREADS"] == "3"


def test_config_validates():
    assert run.BenchConfig(quick=True).dtypes == run.QUICK_DTYPES
    assert run.BenchConfig().dtypes == ("fp32", "bf16")
    for bad, match in (({"ops": ("nope",)}, r"ops must be .*got \['nope'\]"),
                       ({"modes": ()}, r"modes must be a non-empty subset .*got \[\]"),
                       ({"threads": 0}, "threads must be an int >= 1, got 0"),
                       ({"budget_s": -1.0}, "budget_s must be >= 0 and finite, got -1.0"),
                       ({"budget_s": math.inf}, "budget_s must be >= 0 and finite, got inf"),
                       ({"threads": 2.5}, "threads must be an int >= 1, got 2.5"),
                       ({"allocs": ("huge",)}, r"allocs must be .*got \['huge'\]")):
        with pytest.raises(ValueError, match=match):
            run.BenchConfig(**bad)


def test_cli_help_exits_zero(capsys):
    for argv in (["--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    assert "--no-compile" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["nope"], ["bench", "--ops", "foo"], ["bench", "--ops", ""],
                                  ["bench", "--dtypes", "int8"], ["bench", "--modes", "bwd"],
                                  ["bench", "--alloc", "huge"], ["bench", "--threads", "0"],
                                  ["bench", "--threads", "two"], ["bench", "--budget", "-1"],
                                  ["bench", "--unknown"]])
def test_cli_bad_args_exit_two(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_end_to_end(tmp_path):
    """Both allocator modes in child processes, records merged into one JSON and table."""
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    cmd = [sys.executable, "-m", "fastpt", "bench", "--quick", "--ops", "swiglu", "--modes", "fwd",
           "--no-compile", "--budget", "0", "--json", str(js), "--markdown", str(md)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    records = harness.read_json(str(js))
    assert sorted((r.alloc, r.impl) for r in records) == [
        ("default", "eager"), ("default", "fastpt"), ("steady", "eager"), ("steady", "fastpt")]
    assert "swiglu" in out.stdout and "swiglu" in md.read_text()


# Installed in the children of `fastpt bench` through PYTHONPATH: the steady child measures
# its first case, then dies at the start of the second (the default child runs them all).
_CRASHING_SITECUSTOMIZE = """
import os, signal
from fastpt.benchmarks import harness
_measure, _done = harness.measure_case, []
def measure_case(*args, **kwargs):
    if kwargs.get("alloc") == "steady" and _done:
        {crash}
    _done.append(1)
    return _measure(*args, **kwargs)
harness.measure_case = measure_case
"""


@pytest.mark.parametrize("crash,status", [
    ("os._exit(3)", "exit status 3"),
    ("os.kill(os.getpid(), signal.SIGSEGV)", "exit status -11, killed by SIGSEGV")])
def test_cli_marks_a_crashed_child(crash, status, tmp_path, monkeypatch, capsys):
    """A child that dies part-way: exit status 1, and the console, the Markdown and the JSON
    say which run crashed, how, and which requested cases have no record."""
    import os
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_CRASHING_SITECUSTOMIZE.format(crash=crash))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["bench", "--quick", "--ops", "swiglu", "--modes", "fwd,fwdbwd", "--no-compile",
            "--budget", "0", "--json", str(js), "--markdown", str(md)]
    assert cli.main(argv) == 1
    shape = harness.shape_str(run.load_spec("swiglu").shapes["quick"])
    headline = (f"INCOMPLETE: the steady run crashed ({status}); "
                "1 of 2 requested cases have no record")
    missing = f"steady swiglu fp32 fwdbwd {shape}"
    out, err = capsys.readouterr()
    assert f"{headline}:\n  {missing}" in out
    assert f"error: the steady run crashed ({status})" in err
    assert "default" not in out.split("INCOMPLETE")[1]  # the default run is complete
    text = md.read_text()
    assert f"**{headline}:**\n\n- {missing}\n" in text
    assert text.index("INCOMPLETE") < text.index("| alloc |")  # above the table
    table = [ln for ln in text.splitlines() if ln.startswith(("| steady", "| default"))]
    assert len(table) == 3  # steady fwd, default fwd and fwdbwd
    records = harness.read_json(str(js))  # still one Record per line
    placeholders = [r for r in records if r.impl == run.MISSING]
    assert [(r.alloc, r.op, r.dtype, r.mode, r.shape) for r in placeholders] == [
        ("steady", "swiglu", "fp32", "fwdbwd", shape)]
    p = placeholders[0]
    assert p.median_ms is None and p.ratio_vs_eager is None and p.pct_copy_bandwidth is None
    assert sorted((r.alloc, r.mode) for r in records if r.impl == "fastpt") == [
        ("default", "fwd"), ("default", "fwdbwd"), ("steady", "fwd")]


def test_child_output_lines_cut_short_are_missing_cases(tmp_path):
    """One JSON line per case: a line a crash cut short does not parse, so its case is
    reported missing instead of half its records showing up (or the parse failing)."""
    records = _records()
    path = tmp_path / "records.jsonl"
    whole = json.dumps([dataclasses.asdict(r) for r in records[:2]])
    cut = json.dumps([dataclasses.asdict(r) for r in records[2:]])
    path.write_text(whole + "\n" + cut[: len(cut) // 2])
    assert run.read_child_records(str(path)) == records[:2]
    assert run.read_child_records(str(tmp_path / "none.jsonl")) == []


def test_incomplete_text():
    ok = run.ChildRun("default", 0, [], [])
    killed = run.ChildRun("steady", -9, [], [("rope", "bf16", "fwd", "q=1x2")], requested=4)
    silent = run.ChildRun("steady", 0, [], [("rope", "fp32", "fwd", "q=1x2")], requested=1)
    assert ok.complete and not killed.complete and not silent.complete
    assert run.incomplete_text([ok]) == ""
    assert run.incomplete_text([ok, killed]) == (
        "INCOMPLETE: the steady run crashed (exit status -9, killed by SIGKILL); "
        "1 of 4 requested cases have no record:\n  steady rope bf16 fwd q=1x2")
    assert run.incomplete_text([silent], markdown=True) == (
        "**INCOMPLETE: the steady run ended (exit status 0); 1 of 1 requested cases have no "
        "record:**\n\n- steady rope fp32 fwd q=1x2")
    crashed_late = run.ChildRun("default", 1, [], [])
    assert run.incomplete_text([crashed_late]) == (
        "INCOMPLETE: the default run crashed (exit status 1); every requested case has a record.")


def test_cpu_model_names_family_and_model(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
                    "model name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 99\nmodel\t\t: 9\n"
                    "model name\t: other\n")
    assert run.cpu_model(str(info)) == "AMD EPYC (family 25, model 1)"
    # No /proc/cpuinfo (macOS, Windows) or no family line: the platform's name.
    assert run.cpu_model(str(tmp_path / "missing")) == (platform.processor() or platform.machine())
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert run.cpu_model(str(info)) == "Some CPU"
