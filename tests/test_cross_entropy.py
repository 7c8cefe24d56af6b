"""fastpt.ops.softmax_cross_entropy_ against a float64 reference, per CPU kernel build:
row losses, the in-place gradient, ignored rows, extreme logits, strided rows, opcheck,
bad input; and ops.cross_entropy, the differentiable loss built on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastpt import ops
from tolerances import assert_close
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


# ---------------------------------------------------------------- ops.cross_entropy (autograd)

def _loss_and_grad(fn, logits, labels, **kw):
    x = logits.clone().requires_grad_()
    loss = fn(x, labels, **kw)
    loss.backward()
    return loss.detach(), x.grad


def _eager_cross_entropy(x, labels, reduction="mean", num_items=None):
    """transformers' ForCausalLMLoss arithmetic: float32 logits, F.cross_entropy."""
    acc = x if x.dtype == torch.float64 else x.float()
    loss = F.cross_entropy(acc, labels, ignore_index=IGNORE, reduction="sum" if num_items else reduction)
    return loss / num_items if num_items else loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction,num_items", [("mean", None), ("sum", None), ("mean", 17)])
def test_cross_entropy_matches_float64_reference(dtype, reduction, num_items):
    logits, labels = (3 * torch.randn(37, 1001)).to(dtype), labels_for(37, 1001)
    kw = dict(reduction=reduction, num_items=num_items)
    loss, grad = _loss_and_grad(lambda x, y, **k: ops.cross_entropy(x, y, ignore_index=IGNORE, **k), logits, labels, **kw)
    ref_loss, ref_grad = _loss_and_grad(_eager_cross_entropy, logits.double(), labels, **kw)
    eager_loss, eager_grad = _loss_and_grad(_eager_cross_entropy, logits, labels, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and grad.dtype == dtype
    assert_close(loss, ref_loss, dtype, "fwd", eager=eager_loss, what="loss")
    assert_close(grad, ref_grad, dtype, "bwd", eager=eager_grad, what="grad")
    assert (grad[labels == IGNORE] == 0).all()


def test_cross_entropy_gradcheck():
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, IGNORE, 3, 8, 2, 5])
    assert torch.autograd.gradcheck(lambda x: ops.cross_entropy(x, labels), (logits,))
    assert torch.autograd.gradcheck(lambda x: ops.cross_entropy(x, labels, reduction="sum"), (logits,))


def test_cross_entropy_second_backward_and_scaled_grad_output():
    """The saved gradient is never scaled in place: retain_graph gives the same gradient twice,
    and a grad_output other than 1 (loss * 3) scales it."""
    logits, labels = torch.randn(8, 50, requires_grad=True), labels_for(8, 50)
    loss = ops.cross_entropy(logits, labels)
    first, = torch.autograd.grad(loss, logits, retain_graph=True)
    second, = torch.autograd.grad(loss, logits, retain_graph=True)
    tripled, = torch.autograd.grad(3 * loss, logits)
    assert torch.equal(first, second)
    torch.testing.assert_close(tripled, 3 * first)


def test_cross_entropy_strided_logits_and_int32_labels():
    base = torch.randn(40, 12)
    logits = base.t()  # (12, 40), unit stride along rows: copied for the kernel
    labels = torch.randint(0, 40, (12,), dtype=torch.int32)
    loss, grad = _loss_and_grad(ops.cross_entropy, logits, labels)
    ref_loss, ref_grad = _loss_and_grad(_eager_cross_entropy, logits.double(), labels.long())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_cross_entropy_all_ignored_is_nan_with_zero_gradient_as_torch():
    labels = torch.full((3,), IGNORE)
    loss, grad = _loss_and_grad(ops.cross_entropy, torch.randn(3, 5), labels)
    ref_loss, ref_grad = _loss_and_grad(F.cross_entropy, torch.randn(3, 5), labels)
    assert loss.isnan() and ref_loss.isnan() and torch.equal(grad, ref_grad)


@pytest.mark.parametrize("logits,labels,kw,error,match", [
    (torch.randn(4, 10), torch.tensor([0, 1, 10, 2]), {}, ValueError, r"label 10 in row 2 is outside \[0, 10\)"),
    (torch.randn(4, 10), torch.tensor([0, 1, 2]), {}, ValueError, r"logits must be \(N, C\) and labels \(N,\)"),
    (torch.randn(10), torch.tensor([0]), {}, ValueError, r"logits must be \(N, C\)"),
    (torch.zeros(4, 10, dtype=torch.int64), torch.tensor([0, 1, 2, 3]), {}, TypeError, "logits must be a float"),
    (torch.randn(4, 10), torch.tensor([0.0, 1, 2, 3]), {}, TypeError, "labels must be an integer"),
    (torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), {"reduction": "none"}, ValueError, "reduction must be one of"),
    (torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), {"num_items": 0}, ValueError, "num_items must be > 0"),
])
def test_cross_entropy_bad_input(logits, labels, kw, error, match):
    with pytest.raises(error, match=match):
        ops.cross_entropy(logits.requires_grad_() if logits.is_floating_point() else logits, labels, **kw)


def test_cross_entropy_without_autograd_reads_expanded_logits():
    """Evaluation writes nothing, so rows that share memory are fine there, as in F."""
    logits, labels = torch.randn(1, 11).expand(6, 11), torch.randint(0, 11, (6,))
    with torch.no_grad():
        torch.testing.assert_close(ops.cross_entropy(logits, labels), F.cross_entropy(logits, labels))


def test_cross_entropy_large_grad_output_does_not_overflow_float16():
    """A GradScaler multiplies the loss by 65536 (> float16's max): the backward scales the
    float16 gradient in float32 arithmetic, as autograd does through an upcast."""
    logits = torch.randn(4, 10, dtype=torch.float16, requires_grad=True)
    labels = torch.tensor([1, 2, 3, IGNORE])
    (ops.cross_entropy(logits, labels) * 65536).backward()
    ref = logits.detach().float().requires_grad_()
    (F.cross_entropy(ref, labels, ignore_index=IGNORE) * 65536).backward()
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad.float(), ref.grad, rtol=2e-3, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_without_grad_leaves_logits_alone(dtype):
    """Evaluation (no grad): the loss from one read of the logits, which stay as they were."""
    logits, labels = (3 * torch.randn(9, 300)).to(dtype), labels_for(9, 300)
    before = logits.clone()
    with torch.no_grad():
        loss = ops.cross_entropy(logits, labels, ignore_index=IGNORE)
        strided = ops.cross_entropy(logits.t().contiguous().t(), labels, ignore_index=IGNORE)
    ref = _eager_cross_entropy(logits.double(), labels)
    assert torch.equal(logits, before) and not loss.requires_grad
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(strided, loss)


@pytest.mark.parametrize("kw", [{}, {"reduction": "sum"}, {"num_items": 7}, {"num_items": torch.tensor(7)}])
@pytest.mark.parametrize("ignored", ["some", "all"])
def test_cross_entropy_compiles_fullgraph(kw, ignored):
    """Under torch.compile(fullgraph=True) the mean's count stays a tensor (reading it was a
    data-dependent graph break): loss and gradient as eager, NaN with a zero gradient when
    every row is ignored."""
    logits = torch.randn(9, 13, requires_grad=True)
    labels = labels_for(9, 13) if ignored == "some" else torch.full((9,), IGNORE)
    want = ops.cross_entropy(logits, labels, ignore_index=IGNORE, **kw)
    (want_grad,) = torch.autograd.grad(want, logits)
    compiled = torch.compile(lambda x, y: ops.cross_entropy(x, y, ignore_index=IGNORE, **kw),
                             fullgraph=True, backend="eager")
    got = compiled(logits, labels)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert got.dtype == want.dtype == torch.float32
    assert bool(got.isnan()) == bool(want.isnan()) == (ignored == "all" and kw == {})
    torch.testing.assert_close(got, want, equal_nan=True)
    torch.testing.assert_close(got_grad, want_grad)
    if ignored == "all":
        assert not got_grad.any()
