"""The benchmark harness and the CLI: record fields, ratio and byte arithmetic, output
files, allocator modes, argument errors. No timing assertions (the machine is noisy)."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import subprocess
import sys

import pytest
import torch

from fastpt import alloc, cli
from fastpt.benchmarks import harness, run

TINY = {"rms_norm": {"x": (8, 32)}, "swiglu": {"gate": (8, 32), "up": (8, 32)},
        "rope": {"q": (1, 4, 8, 16), "k": (1, 2, 8, 16)}, "attention": {"q": (1, 2, 16, 32)},
        "attention_causal": {"q": (1, 2, 16, 32)},
        "int8_matmul": {"a": (32, 64), "b": (32, 64)},
        "int8_linear": {"x": (32, 64), "w": (24, 64)},
        "lora_linear": {"x": (8, 32), "w": (16, 32), "a": (4, 32), "b": (16, 4)},
        "linear": {"x": (8, 32), "w": (16, 32)}}
FAST = harness.Timing(budget_s=0.0, min_rounds=3, warmup=1)


def _by_impl(records):
    return {r.impl: r for r in records}


# The transformer ops (fp32, fwd and fwdbwd); the MDP ops are covered in tests/test_mdp.py.
# Each op in each mode it has (the int8 ops are forward-only).
@pytest.mark.parametrize("op,mode", [(op, mode) for op in run.OPS if op in TINY
                                     for mode in run.load_spec(op).modes])
def test_records_and_ratios(op, mode, monkeypatch):
    # Stand-in for torch.compile: the harness logic is what is tested, not inductor.
    monkeypatch.setattr(harness, "_compile", lambda fn: fn)
    spec = run.load_spec(op)
    records = harness.measure_case(spec, TINY[op], "fp32", mode, alloc="steady", timing=FAST,
                                   threads=2)
    by = _by_impl(records)
    assert [r.impl for r in records] == ["fastpt", "eager", "compile", *spec.baselines]
    assert all((r.peak_mib is not None) == spec.peak_memory for r in records)
    if spec.flops:  # compute-bound ops: a FLOP rate for every implementation
        assert all(r.gflops > 0 for r in records)
    for r in records:
        assert (r.op, r.dtype, r.mode, r.alloc, r.threads) == (op, "fp32", mode, "steady", 2)
        assert r.shape == harness.shape_str(TINY[op])
        assert r.median_ms > 0 and r.rounds >= FAST.min_rounds and r.copy_gbps > 0
        assert math.isclose(r.pct_copy_bandwidth,
                            100 * r.bytes / (r.median_ms * 1e6) / r.copy_gbps, rel_tol=1e-9)
    f = by["fastpt"]
    assert math.isclose(f.ratio_vs_eager, by["eager"].median_ms / f.median_ms, rel_tol=1e-9)
    assert math.isclose(f.ratio_vs_compile, by["compile"].median_ms / f.median_ms, rel_tol=1e-9)
    assert all(r.ratio_vs_eager is None and r.ratio_vs_compile is None for r in records[1:])


def test_peak_memory_counts_temporaries_and_outputs():
    x = torch.randn(256, 1024)  # 1 MiB
    assert 2 * 2**20 <= harness.peak_memory_bytes(lambda: (x * 2 + 1).sum()) <= 2 * 2**20 + 64
    assert harness.peak_memory_bytes(lambda: x.clone()) == 2**20
    assert harness.peak_memory_bytes(lambda: None) == 0
    # a temporary inside a fused op (int8_linear's int8 copy of x) counts too
    from fastpt.nn import Int8Linear
    layer = Int8Linear.from_linear(torch.nn.Linear(1024, 256))
    assert harness.peak_memory_bytes(lambda: layer(x)) >= 256 * 1024 + 256 * 256 * 4  # int8 x + out


def test_several_shape_cases_per_size():
    assert harness.shape_cases({"x": (1, 2)}) == [{"x": (1, 2)}]
    assert harness.shape_cases([{"x": (1,)}, {"x": (2,)}]) == [{"x": (1,)}, {"x": (2,)}]


def test_peak_memory_counts_matmul_temporaries():
    x = torch.randn(256, 256)
    assert harness.peak_memory_bytes(lambda: (x @ x) @ x) >= 2 * x.numel() * 4


def test_no_compile_has_no_compile_record():
    records = harness.measure_case(run.load_spec("swiglu"), TINY["swiglu"], "bf16", "fwd",
                                   compile=False, timing=FAST)
    assert [r.impl for r in records] == ["fastpt", "eager"]
    assert records[0].ratio_vs_compile is None and records[0].ratio_vs_eager > 0


def _swiglu_with(fastpt=None, baselines=None, **kw):
    import dataclasses
    spec = run.load_spec("swiglu")
    return dataclasses.replace(spec, fastpt=fastpt or spec.fastpt, baselines=baselines or {}, **kw)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_wrong_kernel_is_recorded_and_fails_the_table(mode, tmp_path):
    """A fastpt impl returning wrong values is still timed, but its record says it disagrees
    and its ratio cells print as FAIL (in fwdbwd, a wrong forward with right gradients too)."""
    if mode == "fwd":
        wrong = lambda gate, up: torch.zeros_like(gate)  # noqa: E731
    else:  # right gradients, forward output off by 1
        eager = run.load_spec("swiglu").eager
        wrong = lambda gate, up: eager(gate, up) + 1.0  # noqa: E731
    spec = _swiglu_with(fastpt=wrong)
    with pytest.warns(UserWarning, match="fastpt differs from eager"):
        records = harness.measure_case(spec, TINY["swiglu"], "fp32", mode, compile=False, timing=FAST)
    by = _by_impl(records)
    assert by["fastpt"].agrees is False and by["fastpt"].max_rel_error > 1e-2
    assert by["fastpt"].median_ms > 0 and by["eager"].agrees is None
    row = harness.case_row(records)
    assert row[harness.COLUMNS.index("x eager")] == "FAIL"
    assert row[harness.COLUMNS.index("fastpt %bw")] == "FAIL"
    table = harness.markdown_table(records)
    assert "| FAIL |" in table and "fastpt disagrees with eager" in table
    harness.write_json(records, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())[0]["agrees"] is False


def test_right_kernel_agrees():
    records = harness.measure_case(_swiglu_with(), TINY["swiglu"], "fp32", "fwdbwd",
                                   compile=False, timing=FAST)
    by = _by_impl(records)
    assert by["fastpt"].agrees is True and 0 <= by["fastpt"].max_rel_error < 1e-5
    assert "FAIL" not in harness.markdown_table(records)


def test_every_impl_is_checked_and_raw_ones_skipped():
    eager = run.load_spec("swiglu").eager
    baselines = {"good": eager, "short": lambda gate, up: eager(gate, up)[:1, :1],
                 "int": lambda gate, up: eager(gate, up).to(torch.int32) * 1000}
    with pytest.warns(UserWarning, match="short differs from eager"):
        records = harness.measure_case(_swiglu_with(baselines=baselines, raw=("int",)),
                                       TINY["swiglu"], "fp32", "fwd", compile=False, timing=FAST)
    by = _by_impl(records)
    assert by["good"].agrees is True
    assert by["short"].agrees is False and by["short"].max_rel_error is None  # wrong shape
    assert by["int"].agrees is None and by["int"].max_rel_error is None       # raw by design
    assert "short disagrees with eager" in harness.markdown_table(records)
    # a missing output is a disagreement, not silently ignored
    assert harness.max_rel_error((torch.ones(2),), (torch.ones(2), torch.ones(2))) is None


def test_int8_tolerances():
    i8mm, i8lin = run.load_spec("int8_matmul"), run.load_spec("int8_linear")
    assert harness.agree_tolerance(i8mm, "fastpt", torch.float32) <= 1e-5
    assert harness.agree_tolerance(i8mm, "fastpt", torch.bfloat16) <= 2e-2
    assert i8mm.raw == ("int_mm",)
    other, tol = i8lin.agree_also["fastpt"]
    assert other == "llm_int8_eager" and tol <= 1e-5
    # both pass on the real kernels (fp32 and bf16; forward only)
    for spec, shapes in ((i8mm, TINY["int8_matmul"]), (i8lin, TINY["int8_linear"])):
        for dtype in spec.dtypes:
            records = harness.measure_case(spec, shapes, dtype, "fwd", compile=False, timing=FAST)
            assert all(r.agrees is not False for r in records), records


def test_int8_linear_counts_only_the_int8_path():
    spec = run.load_spec("int8_linear")
    inputs = spec.make_inputs(TINY["int8_linear"], torch.float32, False)
    x, w, b, packed, colsum, scale, w_int8 = inputs.args
    out = spec.eager(*inputs.args)
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    assert spec.nbytes(inputs, (out,), "fwd") == sum(map(nb, (x, packed, colsum, scale, b, out)))
    assert spec.nbytes(inputs, (out,), "fwd") < harness.minimal_bytes(inputs, (out,), "fwd") - nb(w)


def test_minimal_bytes():
    x, w = torch.empty(8, 32), torch.empty(32)
    inputs = harness.Inputs(args=(x, w, 1e-6), grad=(0, 1), bwd_reads=(0, 1))
    y = torch.empty(8, 32)
    xb, wb = 8 * 32 * 4, 32 * 4
    assert harness.minimal_bytes(inputs, (y,), "fwd") == 2 * xb + wb
    # backward: reads grad_y, x, w; writes grad_x, grad_w
    assert harness.minimal_bytes(inputs, (y,), "fwdbwd") == (2 * xb + wb) + (3 * xb + 2 * wb)


def test_spec_registry():
    for op in run.OPS:
        spec = run.load_spec(op)
        assert spec.name == op and {"full", "quick"} <= set(spec.shapes)
        def size(shapes):
            return min(sum(math.prod(s) for s in case.values()) for case in harness.shape_cases(shapes))
        assert size(spec.shapes["quick"]) < size(spec.shapes["full"])


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


@pytest.fixture
def order_spy(monkeypatch):
    """Tiny decoders for the trainer and fine-tuning benchmarks, and the order in which their
    timed rounds call each implementation (recorded around rounds.alternate_rounds)."""
    import fastpt.models
    from fastpt.benchmarks import finetune, rounds, trainer
    real_from_name = fastpt.models.from_name
    monkeypatch.setattr(fastpt.models, "from_name",
                        lambda name, **kw: real_from_name("llama-tiny", num_layers=1))
    order = []

    def spy(calls, *args, **kwargs):
        logged = {name: (lambda name=name, fn=fn: (order.append(name), fn()))
                  for name, fn in calls.items()}
        return rounds.alternate_rounds(logged, *args, **kwargs)
    for module in (trainer, finetune):
        monkeypatch.setattr(module, "alternate_rounds", spy)
    return order


def test_trainer_benchmark_alternates_which_step_goes_first(order_spy):
    from fastpt.benchmarks import trainer
    result = trainer.measure(quick=True, steps=3)
    assert order_spy == ["bare", "trainer", "trainer", "bare", "bare", "trainer"]
    assert result["steps"] == 3 and result["trainer_vs_bare"] > 0


def test_lora_speed_rotates_the_order_of_its_steps(order_spy):
    from fastpt.benchmarks import finetune
    result = finetune.lora_speed(quick=True)
    impls = ["full", "lora_fastpt", "lora_eager", "frozen"]
    assert order_spy == impls + impls[1:] + impls[:1]  # 2 rounds, each starting one later
    assert set(result["step_s"]) == set(impls) and all(t > 0 for t in result["step_s"].values())


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
