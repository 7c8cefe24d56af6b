"""The drop-in benchmark's plumbing on tiny shapes (no timing assertions)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from fastpt.benchmarks import dropin as bench  # noqa: E402


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "LLAMA", dict(vocab_size=97, hidden_size=64, intermediate_size=88,
                                             num_attention_heads=4, num_key_value_heads=2))
    monkeypatch.setitem(bench.TRAIN, "quick", dict(B=2, T=16, layers=1))
    monkeypatch.setitem(bench.INT8, "quick", (64, 128, 96))


def test_llama_rows(tiny):
    rows = bench.measure_train("llama", "fp32", "quick", budget_s=0.0)
    assert [r.impl for r in rows] == ["hf", "hf+patch", "hf+patch+ce"]
    assert rows[0].speedup == 1.0 and all(r.median_ms > 0 and r.peak_mib > 0 and r.rounds == 3 for r in rows)


def test_lora_rows(tiny):
    pytest.importorskip("peft")
    rows = bench.measure_train("lora", "fp32", "quick", budget_s=0.0)
    assert [r.impl for r in rows] == ["peft", "peft+patch", "peft+patch+ce", "fastpt-lora"]
    assert all(r.speedup > 0 and r.peak_mib > 0 for r in rows)


def test_int8_rows_have_errors(tiny):
    pytest.importorskip("bitsandbytes")
    rows = {r.impl: r for r in bench.measure_int8("quick", budget_s=0.0)}
    assert set(rows) == {"bnb", "bnb-dequant", "fastpt", "fp32"}
    assert rows["fp32"].rel_error == 0.0
    # both quantize to int8: an error well above fp32 rounding, well below the signal
    assert 1e-5 < rows["bnb"].rel_error < 0.05 and 1e-5 < rows["fastpt"].rel_error < 0.05


def test_int8_failing_bitsandbytes_gives_a_failed_row(tiny, monkeypatch):
    """A bitsandbytes layer that raises becomes a "failed" row; the others are still measured."""
    import torch

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no CPU kernel")

    def layers(m, k, n):
        from fastpt.nn import Int8Linear
        torch.manual_seed(0)
        lin, x = torch.nn.Linear(k, n), torch.randn(m, k)
        return x, lin, {"bnb": Broken(), "bnb-dequant": Broken(), "fastpt": Int8Linear.from_linear(lin).eval()}
    monkeypatch.setattr(bench, "_int8_layers", layers)
    rows = {r.impl: r for r in bench.measure_int8("quick", budget_s=0.0)}
    assert list(rows) == ["bnb", "bnb-dequant", "fastpt", "fp32"]
    assert "RuntimeError: no CPU kernel" in rows["bnb"].failed and rows["bnb-dequant"].failed
    assert rows["fastpt"].failed is None and rows["fastpt"].median_ms > 0
    assert 1e-5 < rows["fastpt"].rel_error < 0.05 and rows["fp32"].rel_error == 0.0
    assert rows["fastpt"].speedup is None  # no bitsandbytes time to compare with
    assert "failed: RuntimeError" in bench._row(rows["bnb"])


def test_cli_rejects_bad_lists():
    with pytest.raises(SystemExit) as e:
        bench.main(["--cases", "nope"])
    assert e.value.code == 2
