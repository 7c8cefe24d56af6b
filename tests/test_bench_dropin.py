"""The drop-in benchmark's plumbing on tiny shapes (no timing assertions), and its agreement
check: every implementation is compared with the case's reference (unpatched transformers /
PEFT, the fp32 product for int8) before timing; one that disagrees is timed but marked."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from fastpt.benchmarks import dropin as bench  # noqa: E402


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "LLAMA", dict(vocab_size=97, hidden_size=64, intermediate_size=88,
                                             num_attention_heads=4, num_key_value_heads=2))
    monkeypatch.setitem(bench.TRAIN, "quick", dict(B=2, T=16, layers=1))
    monkeypatch.setitem(bench.INT8, "quick", (64, 128, 96))


def _assert_agree(rows, reference):
    assert rows[0].impl == reference and rows[0].agrees is None and rows[0].max_rel_error is None
    for r in rows[1:]:
        assert r.agrees is True, r
    assert "FAIL" not in "\n".join(bench.case_rows(rows))


@pytest.mark.parametrize("dtype", bench.DTYPES)
def test_llama_rows(tiny, dtype):
    rows = bench.measure_train("llama", dtype, "quick", budget_s=0.0)
    assert [r.impl for r in rows] == ["hf", "hf+patch", "hf+patch+ce"]
    assert rows[0].speedup == 1.0 and all(r.median_ms > 0 and r.peak_mib > 0 and r.rounds == 3 for r in rows)
    _assert_agree(rows, "hf")


def test_lora_rows(tiny):
    pytest.importorskip("peft")
    rows = bench.measure_train("lora", "fp32", "quick", budget_s=0.0)
    assert [r.impl for r in rows] == ["peft", "peft+patch", "peft+patch+ce", "fastpt-lora"]
    assert all(r.speedup > 0 and r.peak_mib > 0 for r in rows)
    _assert_agree(rows, "peft")  # fastpt's LoRA model too: it gets PEFT's LoRA factors


def _wrong_patch(monkeypatch, factor):
    """fastpt.patch(..., fused_cross_entropy=True) that also scales the final norm's output."""
    import fastpt
    patch = fastpt.patch

    def wrong(model, **kw):
        report = patch(model, **kw)
        if kw.get("fused_cross_entropy"):
            norm = next(m for n, m in model.named_modules() if n.endswith("model.norm"))
            norm.register_forward_hook(lambda m, args, y: y * factor)
        return report
    monkeypatch.setattr(fastpt, "patch", wrong)


def test_wrong_patched_training_step_fails(tiny, monkeypatch):
    """A patched model 0.1% off in its final norm (loss and gradients move) is still timed,
    but marked: agrees=False, FAIL speedups, listed under the table; the others agree."""
    _wrong_patch(monkeypatch, 1.001)
    with pytest.warns(UserWarning, match=r"hf\+patch\+ce differs from hf"):
        rows = bench.measure_train("llama", "fp32", "quick", budget_s=0.0)
    by = {r.impl: r for r in rows}
    assert by["hf+patch+ce"].agrees is False and by["hf+patch+ce"].max_rel_error > bench.FP32_TOL["bwd"]
    assert by["hf+patch+ce"].median_ms > 0 and by["hf+patch+ce"].speedup > 0  # timed, ratio kept for JSON
    assert by["hf+patch"].agrees is True and by["hf"].agrees is None
    line = bench.case_rows(rows)[2].split(" | ")
    assert line[3] == "hf+patch+ce" and line[5] == "FAIL" and line[7] == "FAIL"
    assert bench.disagreements(rows)[0].startswith("hf+patch+ce disagrees with hf in llama fp32")


def test_wrong_bf16_patched_training_step_fails(tiny, monkeypatch):
    _wrong_patch(monkeypatch, 1.1)
    with pytest.warns(UserWarning, match="differs from hf"):
        rows = bench.measure_train("llama", "bf16", "quick", budget_s=0.0)
    assert [r.agrees for r in rows] == [None, True, False] and rows[2].max_rel_error > 0.05


def test_int8_rows_have_errors(tiny):
    pytest.importorskip("bitsandbytes")
    rows = {r.impl: r for r in bench.measure_int8("quick", budget_s=0.0)}
    assert set(rows) == {"bnb", "bnb-dequant", "fastpt", "fp32"}
    assert rows["fp32"].rel_error == 0.0 and rows["fp32"].agrees is None
    # both quantize to int8: an error well above fp32 rounding, well below the signal
    assert 1e-5 < rows["bnb"].rel_error < 0.05 and 1e-5 < rows["fastpt"].rel_error < 0.05
    assert all(r.agrees is True and r.max_rel_error == r.rel_error for n, r in rows.items() if n != "fp32")


class _Off(torch.nn.Module):
    """A layer whose output is ``layer``'s times ``factor``."""

    def __init__(self, layer, factor):
        super().__init__()
        self.layer, self.factor = layer, factor

    def forward(self, x):
        return self.layer(x) * self.factor


def _int8_layers_with(monkeypatch, wrong: dict):
    """bench._int8_layers with the layers named in ``wrong`` scaled by their factor; the
    bitsandbytes ones replaced by fastpt's layer (so the test needs no bitsandbytes)."""
    def layers(m, k, n):
        from fastpt.nn import Int8Linear
        torch.manual_seed(0)
        lin, x = torch.nn.Linear(k, n), torch.randn(m, k)
        out = {name: Int8Linear.from_linear(lin).eval() for name in ("bnb", "bnb-dequant", "fastpt")}
        return x, lin, {name: _Off(layer, wrong[name]) if name in wrong else layer for name, layer in out.items()}
    monkeypatch.setattr(bench, "_int8_layers", layers)


def test_int8_error_far_beyond_int8_is_marked(tiny, monkeypatch):
    """fastpt's int8 layer 10% off the fp32 product (int8 error: ~5e-3) is marked."""
    _int8_layers_with(monkeypatch, {"fastpt": 1.1})
    with pytest.warns(UserWarning, match="fastpt differs from fp32"):
        rows = {r.impl: r for r in bench.measure_int8("quick", budget_s=0.0)}
    assert rows["fastpt"].agrees is False and rows["fastpt"].rel_error > 0.05
    assert rows["fastpt"].max_rel_error == rows["fastpt"].rel_error and rows["fastpt"].median_ms > 0
    assert rows["bnb"].agrees is True and rows["bnb-dequant"].agrees is True
    lines = {r.impl: line.split(" | ") for r, line in zip(rows.values(), bench.case_rows(list(rows.values())))}
    assert lines["fastpt"][5] == lines["fastpt"][7] == "FAIL" and lines["bnb-dequant"][5] != "FAIL"


def test_int8_wrong_baseline_marks_every_speedup(tiny, monkeypatch):
    """When bitsandbytes (the speedups' baseline) is the wrong one, no speedup is valid."""
    _int8_layers_with(monkeypatch, {"bnb": 0.8})
    with pytest.warns(UserWarning, match="bnb differs from fp32"):
        rows = bench.measure_int8("quick", budget_s=0.0)
    assert [r.agrees for r in rows] == [False, True, True, None]
    assert all(line.split(" | ")[5] == "FAIL" for line in bench.case_rows(rows))


def test_cli_marks_disagreement_in_table_and_json(tiny, monkeypatch, tmp_path, capsys):
    _int8_layers_with(monkeypatch, {"fastpt": 1.1})
    path = tmp_path / "r.json"
    with pytest.warns(UserWarning):
        assert bench.main(["--quick", "--cases", "int8", "--budget", "0", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| int8 | fp32 | x=64x128 w=96x128 | fastpt |" in out and "| FAIL |" in out
    assert "fastpt disagrees with fp32 in int8" in out
    records = {r["impl"]: r for r in json.loads(path.read_text())}
    assert records["fastpt"]["agrees"] is False and records["fastpt"]["max_rel_error"] > 0.05
    assert records["bnb"]["agrees"] is True and records["fp32"]["agrees"] is None


class _Broken(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("no CPU kernel")


def _layers_with_broken_bitsandbytes(m, k, n):
    """bench._int8_layers with bitsandbytes layers that raise."""
    from fastpt.nn import Int8Linear
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(k, n), torch.randn(m, k)
    return x, lin, {"bnb": _Broken(), "bnb-dequant": _Broken(), "fastpt": Int8Linear.from_linear(lin).eval()}


def test_int8_failing_bitsandbytes_gives_a_failed_row(tiny, monkeypatch):
    """A bitsandbytes layer that raises becomes a "failed" row; the others are still measured."""
    monkeypatch.setattr(bench, "_int8_layers", _layers_with_broken_bitsandbytes)
    rows = {r.impl: r for r in bench.measure_int8("quick", budget_s=0.0)}
    assert list(rows) == ["bnb", "bnb-dequant", "fastpt", "fp32"]
    assert "RuntimeError: no CPU kernel" in rows["bnb"].failed and rows["bnb-dequant"].failed
    assert rows["fastpt"].failed is None and rows["fastpt"].median_ms > 0
    assert 1e-5 < rows["fastpt"].rel_error < 0.05 and rows["fp32"].rel_error == 0.0
    assert rows["fastpt"].speedup is None  # no bitsandbytes time to compare with
    assert "failed: RuntimeError" in bench._row(rows["bnb"])
    assert rows["bnb"].agrees is None and rows["fastpt"].agrees is True  # a failed row is not compared


def test_cli_rejects_bad_lists(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--cases", "nope"])
    assert e.value.code == 2 and "--cases must be a comma-separated subset" in capsys.readouterr().err


def test_cli_refuses_a_json_path_in_a_missing_folder_before_timing(tmp_path, monkeypatch, capsys):
    # Checked first: the results of a long run would otherwise be lost at the write.
    monkeypatch.setattr(bench, "HEADER", None)  # printing it would mean the run had started
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--json", str(tmp_path / "missing" / "r.json")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_failed_row_writes_strict_json(tiny, monkeypatch, tmp_path):
    """A failed implementation's median_ms was NaN, which json.dump writes as the token NaN:
    not JSON (strict parsers refuse the whole file). It is null, and "-" in the table."""
    monkeypatch.setattr(bench, "_int8_layers", _layers_with_broken_bitsandbytes)
    path = tmp_path / "r.json"
    assert bench.main(["--quick", "--cases", "int8", "--budget", "0", "--json", str(path)]) == 0

    def strict(token):
        raise ValueError(f"not JSON: {token}")
    records = {r["impl"]: r for r in json.loads(path.read_text(), parse_constant=strict)}
    assert records["bnb"]["median_ms"] is None and "no CPU kernel" in records["bnb"]["failed"]
    assert "| bnb | - |" in "\n".join(bench.case_rows([bench.Result(**records["bnb"])]))
