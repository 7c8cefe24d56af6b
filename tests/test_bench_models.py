"""The model benchmark's plumbing on tiny models (no timing assertions), and its agreement
check: every implementation is compared with the reference (``use_fused=False``) before
timing, and one that disagrees is timed but marked (agrees=False, FAIL)."""

from __future__ import annotations

import json

import pytest
import torch

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


@pytest.mark.parametrize("dtype", bench.DTYPES)
@pytest.mark.parametrize("case", bench.CASES)
def test_correct_implementations_agree(tiny, case, dtype):
    by = {r.impl: r for r in bench.measure(case, dtype, size="quick", budget_s=0.0, min_rounds=1)}
    assert by["eager"].agrees is None and by["eager"].max_rel_error is None  # the reference
    for impl in ("fastpt", "transformers"):
        assert by[impl].agrees is True, by[impl]
        assert 0 <= by[impl].max_rel_error <= (bench.FP32_TOL["bwd"] if dtype == "fp32" else 0.05)
    assert "FAIL" not in "\n".join(bench.case_rows(list(by.values())))


def test_reference_checked_when_not_timed(tiny):
    results = bench.measure("encoder", "fp32", impls=("fastpt", "transformers"), size="quick",
                            budget_s=0.0, min_rounds=1)
    assert [(r.impl, r.agrees) for r in results] == [("fastpt", True), ("transformers", True)]


def _scale_output(monkeypatch, impl: str, module: str, factor: float):
    """A wrong ``impl``: the output of its submodule ``module`` times ``factor``."""
    models = bench._models

    def wrong(config, impls):
        out = models(config, impls)
        if impl in out:
            out[impl].get_submodule(module).register_forward_hook(lambda m, args, y: y * factor)
        return out
    monkeypatch.setattr(bench, "_models", wrong)


def _assert_fails(results, impl, min_error):
    by = {r.impl: r for r in results}
    assert by[impl].agrees is False and by[impl].max_rel_error > min_error
    assert by[impl].median_ms > 0 and by[impl].rounds >= 1  # still timed
    others = [i for i in ("fastpt", "transformers") if i != impl]
    assert all(by[i].agrees is True for i in others) and by["eager"].agrees is None
    return by


def test_wrong_training_step_fails(tiny, monkeypatch):
    """A fused model 0.1% off in its final norm (loss and every gradient move) fails in fp32."""
    _scale_output(monkeypatch, "fastpt", "final_norm", 1.001)
    with pytest.warns(UserWarning, match="fastpt differs from eager"):
        results = bench.measure("train", "fp32", size="quick", budget_s=0.0, min_rounds=1)
    by = _assert_fails(results, "fastpt", bench.FP32_TOL["bwd"])
    cells = bench.case_rows(results)[0].split(" | ")
    assert cells[5:7] == ["FAIL", "FAIL"]  # x eager, x transformers
    assert by["fastpt"].ratio_vs_eager > 0  # the ratio is still recorded (JSON)


def test_wrong_bf16_training_step_fails(tiny, monkeypatch):
    _scale_output(monkeypatch, "transformers", "model.norm", 1.1)
    with pytest.warns(UserWarning, match="transformers differs from eager"):
        results = bench.measure("train", "bf16", size="quick", budget_s=0.0, min_rounds=1)
    _assert_fails(results, "transformers", 0.05)
    fastpt_row, _, transformers_row = bench.case_rows(results)
    # fastpt's ratio against a wrong baseline is no ratio either; its x eager stands
    assert fastpt_row.split(" | ")[5] != "FAIL" and fastpt_row.split(" | ")[6] == "FAIL"
    assert transformers_row.split(" | ")[5:7] == ["FAIL", "FAIL"]


def test_wrong_encoder_output_fails(tiny, monkeypatch):
    _scale_output(monkeypatch, "fastpt", "layers.1", 1.001)  # bert-tiny's last layer
    with pytest.warns(UserWarning, match="differs from eager"):
        results = bench.measure("encoder", "fp32", size="quick", budget_s=0.0, min_rounds=1)
    _assert_fails(results, "fastpt", bench.FP32_TOL["fwd"])


def test_wrong_decode_tokens_fail(tiny, monkeypatch):
    """A decoder whose last generated token is another one than the greedy choice fails, and
    its tokens/s prints FAIL."""
    decode_fn = bench._decode_fn

    def wrong(impl, model, ids, new, dtype):
        run = decode_fn(impl, model, ids, new, dtype)
        if impl != "fastpt":
            return run

        def bad():
            out = run().clone()
            out[0, -1] = (out[0, -1] + 1) % model.config.vocab_size
            return out
        return bad
    monkeypatch.setattr(bench, "_decode_fn", wrong)
    with pytest.warns(UserWarning, match="fastpt differs from eager"):
        results = bench.measure("decode", "fp32", size="quick", budget_s=0.0, min_rounds=1)
    _assert_fails(results, "fastpt", 1e-3)
    cells = bench.case_rows(results)[0].split(" | ")
    assert cells[5:8] == ["FAIL", "FAIL", "FAIL"]  # x eager, x transformers, tokens/s


class _FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are the rows of ``table`` (position by position)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table[None, : input_ids.shape[1]]})()


@pytest.mark.parametrize("dtype", bench.DTYPES)
def test_decode_ties_agree_other_tokens_do_not(dtype):
    """Greedy tokens may differ only where the reference's best logits tie (within rounding)."""
    # positions 1 and 2 predict the two new tokens after a 2-token prompt
    table = torch.tensor([[0.0, 0.0, 0.0], [1.0, 3.0, 3.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    compare = bench._decode_compare(_FixedLogits(table), prompt=2, dtype=dtype)
    prompt = [0, 0]
    ref = (torch.tensor([prompt + [1, 0]]),)
    assert compare(ref, ref) == (0.0, 0.0)
    err, tol = compare((torch.tensor([prompt + [2, 0]]),), ref)  # a tie at the first new token
    assert err == 0.0 <= tol
    err, tol = compare((torch.tensor([prompt + [1, 2]]),), ref)  # 1 below the best of 3
    assert err == pytest.approx(1 / 3) and err > tol
    for seq in ([0, 0, 1], [0, 0, 1, 7], [1, 0, 1, 0]):  # a missing token, no such token, another prompt
        assert compare((torch.tensor([seq]),), ref)[0] is None


def test_rows_mark_a_wrong_baseline():
    r = [bench.Result("train", "fp32", "fastpt", "s", 1.0, 2.0, 3.0, agrees=True, max_rel_error=0.0),
         bench.Result("train", "fp32", "eager", "s", 2.0),
         bench.Result("train", "fp32", "transformers", "s", 3.0, agrees=False, max_rel_error=None)]
    fastpt, eager, transformers = (row.split(" | ") for row in bench.case_rows(r))
    assert fastpt[5:7] == ["2.00", "FAIL"] and eager[5:7] == ["-", "-"] and transformers[5:7] == ["FAIL", "FAIL"]
    assert bench.disagreements(r) == ["transformers disagrees with eager in train fp32 s (max relative error: -); "
                                      "its ratios are not valid"]


def test_cli_marks_disagreement_in_table_and_json(tiny, monkeypatch, tmp_path, capsys):
    _scale_output(monkeypatch, "fastpt", "layers.1", 1.01)
    path = tmp_path / "r.json"
    with pytest.warns(UserWarning):
        assert bench.main(["--quick", "--cases", "encoder", "--dtypes", "fp32", "--budget", "0",
                           "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| encoder | fp32 | L=2 B=2 T=16 | fastpt |" in out and "| FAIL | FAIL |" in out
    assert "FAIL: the outputs differ from eager" in out and "fastpt disagrees with eager in encoder" in out
    records = {r["impl"]: r for r in json.loads(path.read_text())}
    assert records["fastpt"]["agrees"] is False and records["fastpt"]["max_rel_error"] > 1e-3
    assert records["transformers"]["agrees"] is True and records["eager"]["agrees"] is None


def test_a_crashing_case_keeps_the_others_results(tiny, monkeypatch, tmp_path, capsys):
    """A case whose reference (or any implementation) raises used to end the run with nothing
    written: it is now a "missing" record, the run goes on, and the exit status is 1."""
    real = bench.measure

    def measure(case, dtype, *a, **k):
        if dtype == "bf16":
            raise RuntimeError("eager exploded")
        return real(case, dtype, *a, **k)
    monkeypatch.setattr(bench, "measure", measure)
    path = tmp_path / "r.json"
    assert bench.main(["--quick", "--cases", "encoder", "--budget", "0", "--json", str(path)]) == 1
    captured = capsys.readouterr()
    assert "encoder bf16: failed, RuntimeError: eager exploded" in captured.err
    assert "INCOMPLETE: 1 of 2 cases have no record: encoder bf16 (RuntimeError: eager exploded)" in captured.out
    records = json.loads(path.read_text())
    assert {(r["dtype"], r["impl"]) for r in records} == {("fp32", "fastpt"), ("fp32", "eager"),
                                                          ("fp32", "transformers"), ("bf16", "missing")}
    missing = next(r for r in records if r["impl"] == "missing")
    assert missing["median_ms"] is None and missing["failed"] == "RuntimeError: eager exploded"


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
