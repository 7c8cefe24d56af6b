"""fastpt.ops.softmax_cross_entropy_ against a float64 reference, per CPU kernel build:
row losses, the in-place gradient, ignored rows, extreme logits, strided rows, opcheck,
bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastpt import ops
from fastpt.models.loss import _eager_softmax_xent_

IGNORE = -100


def reference(logits: torch.Tensor, labels: torch.Tensor, grad_scale: float = 1.0):
    """Row losses and the gradient of grad_scale * their sum, in float64."""
    x = logits.double()
    valid = labels != IGNORE
    loss = F.cross_entropy(x, labels, ignore_index=IGNORE, reduction="none")
    grad = (torch.softmax(x, -1) - F.one_hot(labels.clamp(min=0), x.shape[1])) * grad_scale
    return loss, grad * valid.unsqueeze(1)


def labels_for(rows: int, cols: int) -> torch.Tensor:
    labels = torch.randint(0, cols, (rows,))
    labels[::3] = IGNORE
    return labels


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 2), (7, 31), (7, 32), (5, 33), (33, 1000), (4, 32000)])
def test_matches_float64_reference(cpu_capability, rows, cols, dtype):
    """FlashAttention's rule: within 2x the error of eager PyTorch at the same precision."""
    logits = (3 * torch.randn(rows, cols)).to(dtype)
    labels = labels_for(rows, cols)
    ref_loss, ref_grad = reference(logits, labels)
    got = logits.clone()
    loss = ops.softmax_cross_entropy_(got, labels)
    eager_loss, eager_grad = _eager_softmax_xent_(logits, labels, labels != IGNORE, torch.float32, True)
    assert loss.dtype == torch.float32 and got.dtype == dtype
    assert err(loss, ref_loss) <= 2 * err(eager_loss, ref_loss) + 1e-6
    assert err(got, ref_grad) <= 2 * err(eager_grad, ref_grad) + 1e-7
    assert (loss[labels == IGNORE] == 0).all() and (got[labels == IGNORE] == 0).all()


def test_float64_exact():
    logits, labels = torch.randn(9, 77, dtype=torch.float64), labels_for(9, 77)
    ref_loss, ref_grad = reference(logits, labels, 0.125)
    loss = ops.softmax_cross_entropy_(logits, labels, grad_scale=0.125)
    assert loss.dtype == torch.float64
    assert err(loss, ref_loss) < 1e-13 and err(logits, ref_grad) < 1e-15


def test_loss_only_leaves_logits_alone():
    logits, labels = torch.randn(6, 50), labels_for(6, 50)
    before = logits.clone()
    loss = ops.softmax_cross_entropy_(logits, labels, write_grad=False)
    assert torch.equal(logits, before)
    assert err(loss, reference(before, labels)[0]) < 1e-5


def test_extreme_logits(cpu_capability):
    """Large logits do not overflow (the row max is subtracted); -inf logits (a masked
    vocabulary) get probability 0, as in eager PyTorch."""
    logits = torch.randn(4, 100) * 1e4
    logits[:, 50:60] = float("-inf")
    labels = torch.tensor([0, 1, 99, 49])
    ref_loss, ref_grad = reference(logits, labels)
    got = logits.clone()
    loss = ops.softmax_cross_entropy_(got, labels)
    assert torch.isfinite(loss).all() and torch.isfinite(got).all()
    assert err(loss, ref_loss) <= 1e-6 * ref_loss.abs().max().item() and err(got, ref_grad) < 1e-6
    assert (got[:, 50:60] == 0).all()


def test_nan_logits_give_nan_like_eager():
    logits = torch.randn(3, 40)
    logits[1, 7] = float("nan")
    loss = ops.softmax_cross_entropy_(logits.clone(), torch.tensor([0, 0, 0]))
    ref = F.cross_entropy(logits, torch.tensor([0, 0, 0]), reduction="none")
    assert torch.equal(torch.isnan(loss), torch.isnan(ref))


def test_strided_rows_written_in_place():
    """A slice of wider rows (row stride > classes) is read and written in place; the columns
    outside it are untouched."""
    base = torch.randn(8, 70)
    view = base[:, 3:67]
    before = base.clone()
    labels = labels_for(8, 64)
    ref_loss, ref_grad = reference(view.clone(), labels)
    loss = ops.softmax_cross_entropy_(view, labels)
    assert err(loss, ref_loss) < 1e-5 and err(base[:, 3:67], ref_grad) < 1e-6
    assert torch.equal(base[:, :3], before[:, :3]) and torch.equal(base[:, 67:], before[:, 67:])


def test_empty_rows():
    loss = ops.softmax_cross_entropy_(torch.empty(0, 10), torch.empty(0, dtype=torch.long))
    assert loss.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    logits, labels = torch.randn(5, 40).to(dtype), labels_for(5, 40)
    torch.library.opcheck(torch.ops.fastpt.softmax_cross_entropy_.default, (logits, labels, 0.5, IGNORE, True))


@pytest.mark.parametrize("logits,labels,error,match", [
    (torch.randn(4, 10), torch.tensor([0, 1, 10, 2]), ValueError, r"label 10 in row 2 is outside \[0, 10\)"),
    (torch.randn(4, 10), torch.tensor([0, 1, -1, 2]), ValueError, "label -1 in row 2"),
    (torch.randn(4, 10), torch.tensor([0, 1, 2]), ValueError, r"labels must have shape \(4\)"),
    (torch.randn(4, 10), torch.tensor([0, 1, 2, 3], dtype=torch.int32), TypeError, "labels must be int64"),
    (torch.randn(10), torch.tensor([0]), ValueError, "logits must be 2-D"),
    (torch.randn(10, 4).t(), torch.tensor([0, 1, 2, 3]), ValueError, "unit stride along classes"),
    (torch.zeros(4, 10, dtype=torch.int64), torch.tensor([0, 1, 2, 3]), TypeError, "logits must be float32"),
    (torch.randn(1, 10).expand(4, 10), torch.tensor([0, 1, 2, 3]), ValueError, "rows overlap"),
    (torch.randn(2, 0), torch.tensor([IGNORE, IGNORE]), ValueError, "has no classes"),
])
def test_bad_input(logits, labels, error, match):
    with pytest.raises(error, match=match):
        ops.softmax_cross_entropy_(logits, labels)


def test_refuses_autograd_inputs():
    with pytest.raises(RuntimeError, match="no autograd"):
        ops.softmax_cross_entropy_(torch.randn(2, 5, requires_grad=True), torch.tensor([0, 1]))
