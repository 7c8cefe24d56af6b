"""The benchmark harness: record fields, ratio, byte and peak-memory arithmetic, agreement with
eager, and the order of timed rounds. No timing assertions (the machine is noisy)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench_util import FAST, TINY
from fastpt.benchmarks import harness, run


def _by_impl(records):
    return {r.impl: r for r in records}


# The transformer ops (fp32, fwd and fwdbwd); the MDP ops are covered in tests/test_mdp_bench.py.
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
