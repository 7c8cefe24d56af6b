"""``Trainer.evaluate``: the token-weighted mean loss over the evaluation data, on every rank."""

from __future__ import annotations

import torch
from torch.utils.data import IterableDataset

from fastpt.pretrain.mlm import IGNORE_INDEX
from fastpt.train import distributed as fdist
from fastpt.train.batches import KeyedCollate


class EvaluationMixin:
    """The :class:`~fastpt.train.trainer.Trainer`'s evaluation (it uses the Trainer's loader
    and forwards)."""

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the evaluation data, each example counted once (all
        ranks); with ``loss_terms``, the weighted sum of each term's mean over the data. A collator draws the same masks at every evaluation, from a stream of its own:
        neither the training masks, nor the global RNG, nor the module's train/eval mode change."""
        if self.eval_data is None:
            raise ValueError("Trainer.evaluate() needs eval_data: none was given to the Trainer")
        was_training = self.wrapped.training
        self.wrapped.eval()
        try:
            # A model may draw from the global RNG in eval mode too (sampling): what it draws
            # must not move the training run's dropout.
            with torch.random.fork_rng(devices=[]):
                weights, sums = self._eval_sums()
        finally:
            self.wrapped.train(was_training)
        if sums is None:
            raise ValueError("eval_data yields no example: there is nothing to evaluate")
        k = len(weights)
        term_sums, counts = sums[:k].double(), sums[k:2 * k].double()
        if counts.sum() == 0:
            raise ValueError(f"eval_data holds no label token (every label is {IGNORE_INDEX}): "
                             "its mean loss is undefined")
        return float((weights.double() * torch.where(counts > 0, term_sums / counts.clamp(min=1), 0.0)).sum())

    def _eval_terms(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights, mean x count, count) of each loss term of one batch (one term without
        ``loss_terms``: the loss and its label tokens)."""
        if self.loss_terms is None:
            loss, count = self._forward(batch)
            return torch.ones(1), torch.where(count > 0, loss.cpu() * count, 0.0).reshape(1), count.reshape(1)
        names, weights, counts = self._terms_of(batch)
        with self._autocast():
            means = self._term_means(self._run(batch), names).cpu()
        return weights, torch.where(counts > 0, means * counts, 0.0), counts

    def _eval_sums(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(term weights (K,), [term sums (K), counts (K), batches]) over every rank's share of
        the evaluation data; (None, None) when no rank has a batch.
        Every rank runs as many forwards as the rank with the most batches (FSDP gathers the
        weights in each forward, DDP may sync buffers): a rank out of batches repeats its last
        one, or a batch of example 0, without counting it."""
        weights = sums = None
        batches = iter(self._loader(self.eval_data, 0, train=False))
        filler = None
        while True:
            batch = next(batches, None)
            real = batch is not None
            more = real if self.world == 1 else bool(fdist.all_reduce_sum(torch.tensor(float(real))) > 0)
            if not more:  # every rank has run a forward by now, or none has
                return (weights, fdist.all_reduce_sum(sums)) if sums is not None else (None, None)
            if not real:
                batch = filler if filler is not None else self._eval_filler()
            weights, term_sums, counts = self._eval_terms(batch)
            row = torch.cat([term_sums, counts, torch.ones(1)]).detach().float()
            sums = (sums if sums is not None else torch.zeros_like(row)) + (row if real else 0.0)
            if real:
                filler = batch

    def _eval_filler(self):
        if isinstance(self.eval_data, IterableDataset):
            raise ValueError(f"eval_data gives process {self.rank} of {self.world} no example while others "
                             "have some: an iterable evaluation set must give every process one")
        return KeyedCollate(self.collate_fn, (self.config.seed, "eval-filler"))(0, [self.eval_data[0]])
