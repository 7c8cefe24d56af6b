"""The comparison every op test makes: fastpt vs the float64 reference vs eager PyTorch in
the same dtype, outputs and input gradients alike, through the one tolerance table."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from tolerances import assert_close


def run_with_grads(fn: Callable, diff_inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
                   dtype: torch.dtype, *args, **kwargs) -> tuple[torch.Tensor, ...]:
    """fn(*diff_inputs, *args, **kwargs) with diff_inputs cast to dtype and requiring grad,
    then backward of grad_outputs (cast to dtype). Returns (*outputs, *input grads)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in diff_inputs]
    out = fn(*leaves, *args, **kwargs)
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    torch.autograd.backward(outs, [g.to(dtype) for g in grad_outputs])
    return (*(o.detach() for o in outs), *(t.grad for t in leaves))


def check_against_reference(fastpt_fn: Callable, reference_fn: Callable, names: Sequence[str],
                            diff_inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
                            dtype: torch.dtype, *args, **kwargs) -> None:
    """``names``: one per output, then one per differentiable input (its gradient).
    ``args``/``kwargs`` go to both functions unchanged (tables, eps, layout, ...)."""
    ours = run_with_grads(fastpt_fn, diff_inputs, grad_outputs, dtype, *args, **kwargs)
    ref = run_with_grads(reference_fn, diff_inputs, grad_outputs, torch.float64, *args, **kwargs)
    eager = run_with_grads(reference_fn, diff_inputs, grad_outputs, dtype, *args, **kwargs)
    n_out = len(ours) - len(diff_inputs)
    assert len(names) == len(ours)
    for i, (name, a, r, e) in enumerate(zip(names, ours, ref, eager)):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype} != {dtype}"
        assert_close(a, r, dtype, "fwd" if i < n_out else "bwd", eager=e, what=name)
