"""The MDP benchmark specs run through the benchmark harness, and their baselines agree with fastpt."""

from __future__ import annotations

import pytest
import torch


# ---------------------------------------------------------------- benchmarks (harness wiring)

@pytest.mark.parametrize("op,impls", [
    ("value_iteration_sparse", ["fastpt", "eager", "scipy"]),
    ("value_iteration_dense", ["fastpt", "eager", "numpy", "pymdptoolbox"]),
    ("value_iteration_solve", ["fastpt", "eager", "fastpt_jacobi"])])
def test_benchmark_specs(op, impls, recwarn):
    pytest.importorskip("scipy")
    if op == "value_iteration_dense":
        pytest.importorskip("mdptoolbox")
    from fastpt.benchmarks import harness, run
    spec = run.load_spec(op)
    shapes = {"P": (300, 3, 5)} if op != "value_iteration_dense" else {"P": (3, 40, 40)}
    records = harness.measure_case(spec, shapes, "fp64", "fwd", timing=harness.Timing(
        budget_s=0.0, min_rounds=2, warmup=1))
    assert [r.impl for r in records] == impls
    assert all(r.median_ms > 0 and r.bytes > 0 for r in records)
    assert not [w for w in recwarn.list if "differs from eager" in str(w.message)]
    # the baselines agree with fastpt too (the solves: two eps-optimal answers, eps = 1e-6)
    case = spec.make_inputs(shapes, torch.float64, False).args[0]
    want = spec.fastpt(case)
    tol = 1e-6 if op == "value_iteration_solve" else 1e-12
    for name, fn in spec.baselines.items():
        got = fn(case)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=tol)
        assert torch.equal(got[1].long(), want[1])
