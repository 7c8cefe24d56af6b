"""The Trainer's forward passes: each micro-batch's loss (or loss terms) and label count, checked."""

from __future__ import annotations

import math
import numbers

import torch

from fastpt.pretrain.mlm import IGNORE_INDEX


def _loss_of(output) -> torch.Tensor:
    # .get: a dict without a "loss" key is a model that returned no loss too (was a bare KeyError).
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: pass labels in the batch (or a loss_fn)")
    return loss


def _check_term(name: str, term) -> None:
    """One ``loss_terms`` entry: a (weight, count) pair with a finite weight >= 0. A bare weight
    failed as "'float' object is not subscriptable", a third item was ignored, a negative weight
    trained the term upwards and a bool one counted as 1."""
    if not isinstance(term, (tuple, list)) or len(term) != 2:
        raise ValueError(f"loss_terms must map each term to a (weight, count) pair, got {name!r}: {term!r}")
    weight = term[0]
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight < math.inf:
        raise ValueError(f"loss_terms must give each term a weight that is a finite number >= 0, "
                         f"got {name!r}: {weight!r}")


def _check_differentiable(loss: torch.Tensor, source: str) -> None:
    """In training, a loss without a graph (detached, or computed under no_grad) failed in
    backward as "element 0 of tensors does not require grad"."""
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise ValueError(f"{source} does not depend on any trainable parameter (it has no grad_fn: "
                         "computed under torch.no_grad, detached, or from frozen weights only)")


def _check_loss(loss, source: str) -> torch.Tensor:
    """A loss must be one floating-point number in a tensor: a vector (a per-token loss) failed
    in backward as "grad can be implicitly created only for scalar outputs", a Python float or
    an integer tensor with errors naming neither the loss nor where it came from."""
    if not torch.is_tensor(loss) or not loss.is_floating_point():
        what = f"a {loss.dtype} tensor" if torch.is_tensor(loss) else type(loss).__name__
        raise TypeError(f"{source} must be a floating-point tensor (differentiable), got {what}")
    if loss.numel() != 1:
        raise ValueError(f"{source} must be one number (the mean over the batch), got a tensor of shape "
                         f"{tuple(loss.shape)} and dtype {loss.dtype}")
    return loss.reshape(())


class LossMixin:
    """The :class:`~fastpt.train.trainer.Trainer`'s forwards: a batch on the device, run
    through the wrapped model, and its loss or loss terms read off the output and checked."""

    def _count(self, batch) -> torch.Tensor:
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if labels is None:
            first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
            return torch.tensor(float(first.shape[0]))
        return (labels[..., self.config.label_shift:] != IGNORE_INDEX).sum().float().cpu()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _on_device(self, batch):
        """``batch`` (a dict, list or tuple of tensors and other values, nested) with its tensors
        on the training device. Counts are taken from the collated batch before, on the CPU."""
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self._on_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._on_device(v) for v in batch)
        return batch

    def _terms_of(self, batch) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """``loss_terms(batch)`` checked: (names, weights (K,), counts (K,))."""
        try:
            terms = self.loss_terms(batch)
        except KeyError as e:  # a bare KeyError('labels') named neither loss_terms nor the batch
            raise ValueError(f"loss_terms needs the batch field {e}, which this batch lacks (it has "
                             f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__})") from e
        if not isinstance(terms, dict) or not terms:
            raise ValueError(f"loss_terms must return a non-empty dict {{name: (weight, count)}}, got {terms!r}")
        names = list(terms)
        for n in names:
            _check_term(n, terms[n])
        weights = torch.tensor([float(terms[n][0]) for n in names])
        counts = torch.stack([torch.as_tensor(terms[n][1], dtype=torch.float32).detach().cpu() for n in names])
        if counts.dim() != 1 or not bool((counts >= 0).all()) or not bool(torch.isfinite(counts).all()):
            raise ValueError(f"loss_terms must give each term a count that is a number >= 0 (the items its mean "
                             f"is over), got {dict(zip(names, counts.tolist()))}")
        return names, weights, counts

    @staticmethod
    def _term_means(output, names: list[str]) -> torch.Tensor:
        """(K,) float32: each named term of the model's output, a mean."""
        values = [output.get(n) if isinstance(output, dict) else getattr(output, n, None) for n in names]
        missing = [n for n, v in zip(names, values) if v is None]
        if missing:
            raise ValueError(f"loss_terms names {missing}, which the model's output ({type(output).__name__}) "
                             "lacks: each term must be an output field holding that term's mean")
        return torch.stack([_check_loss(v, f"loss term {n!r} of the model's output").float()
                            for n, v in zip(names, values)])

    def _run(self, batch):
        """The model's output on ``batch`` (without logits where the model can skip them)."""
        if not isinstance(batch, dict):  # the model is called with **batch
            raise TypeError(f"a batch must be a dict of the model's inputs (from collate_fn, or the default "
                            f"collation of dict examples), got {type(batch).__name__}; or give a loss_fn")
        batch = self._on_device(batch)
        if self._loss_without_logits and "return_logits" not in batch and batch.get("labels") is not None:
            return self.wrapped(**batch, return_logits=False)
        return self.wrapped(**batch)

    def _forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            if self.loss_fn is not None:
                out = self.loss_fn(self.wrapped, self._on_device(batch))
                if not isinstance(out, (tuple, list)) or len(out) != 2:
                    raise TypeError(f"loss_fn must return (mean_loss, count), got {type(out).__name__}")
                loss, count = _check_loss(out[0], "the mean loss of loss_fn"), out[1]
                count = torch.as_tensor(count, dtype=torch.float32).detach().cpu()
                if count.dim() != 0 or not bool(count >= 0) or not bool(torch.isfinite(count)):
                    raise ValueError(f"loss_fn must return (mean_loss, count) with count a number >= 0 "
                                     f"(the label tokens the mean is over), got count {count}")
                return loss.float(), count
            return _check_loss(_loss_of(self._run(batch)), "the model's loss").float(), self._count(batch)
