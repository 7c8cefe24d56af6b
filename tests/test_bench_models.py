"""The model benchmark's plumbing on tiny models (no timing assertions)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from fastpt.benchmarks import models as bench  # noqa: E402
from fastpt.models import from_name  # noqa: E402


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "llama_config", lambda quick: from_name("llama-tiny"))
    monkeypatch.setattr(bench, "bert_config", lambda quick: from_name("bert-tiny", dropout=0.0))
    monkeypatch.setitem(bench.TRAIN, "quick", dict(B=2, T=16))
    monkeypatch.setitem(bench.DECODE, "quick", dict(prompt=8, new=4))
    monkeypatch.setitem(bench.ENCODER, "quick", dict(B=2, T=16))


@pytest.mark.parametrize("case", bench.CASES)
def test_measure_records(tiny, case):
    results = bench.measure(case, "fp32", size="quick", budget_s=0.0, min_rounds=2)
    assert [r.impl for r in results] == list(bench.IMPLS)
    fastpt = results[0]
    assert fastpt.ratio_vs_eager > 0 and fastpt.ratio_vs_transformers > 0
    assert all(r.median_ms > 0 and r.rounds == 2 for r in results)
    assert (fastpt.tokens_per_s is not None) == (case == "decode")


def test_cli_rejects_bad_lists(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--cases", "nope"])
    assert e.value.code == 2
