"""fastpt.patch under bf16 autocast: logits and gradients within 2x eager's error, and gradient
errors whose geometric mean over the parameters matches eager's."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from models_util import randomize_
from patch_util import FAMILIES, _logits_and_grads, _padded_batch
from tolerances import _max_err, assert_close
import fastpt


def _bf16_runs(name):
    """(float64, patched bf16, eager bf16) results of one random model of the family: each a
    pair of (logits, parameter gradients), the bf16 ones under autocast."""
    model = FAMILIES[name][0]()
    randomize_(model)
    reference, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    fastpt.patch(model)
    ids, mask = _padded_batch(left=name != "t5")
    exact = _logits_and_grads(ref64, name, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return exact, _logits_and_grads(model, name, ids, mask), _logits_and_grads(reference, name, ids, mask)


def _bf16_check(name, grads_too: bool):
    (ref, ref_grads), (out, grads), (eager, eager_grads) = _bf16_runs(name)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, eager=eager, what=f"{name} bf16 logits")
    for n in ref_grads if grads_too else ():  # fp32 parameters: fp32 gradients through bf16 activations
        assert_close(grads[n].bfloat16(), ref_grads[n], torch.bfloat16, eager=eager_grads[n].bfloat16(),
                     what=f"{name} bf16 grad {n}")


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_bf16_autocast_logits_within_twice_eager_error(name):
    _bf16_check(name, grads_too=False)


def test_bf16_autocast_llama_gradients_within_twice_eager_error():
    _bf16_check("llama", grads_too=True)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_bf16_autocast_gradient_errors_match_eager(name):
    """bf16 gradients judged over the distribution of errors instead of per tensor.

    A per-tensor max error is a lottery for T5, whose ReLU feed-forward lets a rounding
    difference anywhere flip some ReLUs and move whole rows of the gradients below them:
    over 12 seeds (~720 parameter gradients) PyTorch's own eager and SDPA attention paths
    were up to 73x apart in one tensor, and an fp32 attention came out worst most often
    (Llama, smooth, stays within ~2x, as the test above checks). So this test takes the
    per-parameter error ratio fastpt / eager (HF's default SDPA path) over 3 seeds and bounds
    its geometric mean. Measured: fastpt 1.03 on T5 and 0.94 on Llama (HF's eager attention
    1.06 and 0.97); the same attention with q, k, v, output and gradients rounded to 6
    mantissa bits 1.71 and 1.79.
    """
    log_ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        (_, ref_grads), (_, grads), (_, eager_grads) = _bf16_runs(name)
        assert grads.keys() == eager_grads.keys() == ref_grads.keys()
        for n, ref in ref_grads.items():
            err, eager_err = _max_err(grads[n].bfloat16(), ref), _max_err(eager_grads[n].bfloat16(), ref)
            assert math.isfinite(err), f"grad {n}: non-finite"
            log_ratios.append(math.log(max(err, 1e-30) / max(eager_err, 1e-30)))
    geomean = math.exp(sum(log_ratios) / len(log_ratios))
    assert geomean <= 1.25, f"{name} bf16 gradient error / eager's: geometric mean {geomean:.3f} over " \
                            f"{len(log_ratios)} parameter gradients > 1.25"
