"""``Trainer``: the pre-training / fine-tuning loop, from one CPU process to torchrun + DDP/FSDP.

The model is any ``nn.Module`` whose ``forward(**batch)`` returns an object (or dict) with a
``loss`` that is the mean over the batch's label tokens (or a ``loss_fn`` returns that mean and
the count). One optimizer step back-propagates ``loss_i * n_i`` for each of its ``grad_accum``
micro-batches, then scales the gradients by ``world / N`` (N = label tokens over all
micro-batches and ranks, known only after the forwards when a ``loss_fn`` counts them; the
world size undoes DDP's average), so the update equals the one of a single large batch
whatever the split. A model whose forward takes ``return_logits`` (fastpt's encoders, decoders
and seq2seq models) is called with ``return_logits=False`` when the batch has labels: the
loss without the (B, T, V) logits (chunked for decoders, the labelled positions only for MLM).

A loss made of terms averaged over different things (ELECTRA: generator MLM loss over masked
tokens + 50 x discriminator loss over all real tokens; BERT: MLM + NSP over sequences) states
them with ``loss_terms(batch) -> {name: (weight, count)}`` (a method of the model, or a Trainer
argument): ``loss = sum(weight * output.<name>)``, each ``output.<name>`` the mean over ``count``
items of the batch. The counts come from the batch alone, so the Trainer sums them over the
step's micro-batches and ranks before the forwards and back-propagates each term with the weight
``count / total count`` of its own term: the update of one large batch again, term by term.
Each term's mean over the step is logged under its name (metrics.jsonl) beside the loss; a term
of weight 0 is logged only (DPO's reward margin and accuracy).

``TrainerConfig.device``: "cuda" moves the model to the GPU of each process's LOCAL_RANK (NCCL
joins the processes), "cpu" to the CPU (gloo); "auto" (the default) keeps it where it is, a
model on a GPU going to LOCAL_RANK's. Batches are collated on the CPU, their label counts taken
there, then moved to the device.

Under DDP every parameter must get a gradient in every step, unless the model (or a module in
it) sets ``ddp_find_unused_parameters = True`` (BERT's heads in MLM-only training or fine-tuning,
ELECTRA's unused pooler and heads): the Trainer then passes
DDP's ``find_unused_parameters``, and otherwise refuses a step that left a parameter without a
gradient, naming it, before the update (DDP would have reduced only part of the gradient and
failed at the next forward). FSDP reduces the gradients that exist and needs neither.

Data order is a pure function of (seed, epoch) through ``DistributedSampler`` (also with one
process), which is what makes 1-process and 2-process runs and resumed runs agree. A
collator's randomness (its ``generator``: MLM masks, prefix splits, spans) is restarted for
every batch from (seed, rank, epoch, batch index): ranks draw different masks, DataLoader
workers change nothing, and a resumed run draws the masks the uninterrupted one drew.

The global RNGs (Python, NumPy, torch: dropout, a model's own sampling such as ELECTRA's) are
seeded per rank once the model is built and wrapped, with :func:`rank_seed`: rank 0 (and a
single process) with ``seed`` itself, the other ranks with seeds of their own, so ranks draw
independent dropout masks. The weights stay the same on every rank: the model is built before
the Trainer seeds anything (identically on every rank when the caller seeds before building it,
and DDP broadcasts rank 0's weights anyway), and every update applies the all-reduced gradient.
A checkpoint holds every rank's RNG states, and each rank resumes from its own.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import time
import warnings

import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from fastpt.alloc import use_steady_allocator
from fastpt.pretrain.mlm import IGNORE_INDEX
from fastpt.train.batches import IterableBatches, KeyedCollate, MapBatches, as_is
from fastpt.train import distributed as fdist
from fastpt.train.config import TrainerConfig
from fastpt.train.interrupt import StopRequest, TrainingInterrupted
from fastpt.train.logging import MetricsLog
from fastpt.train.schedules import lr_lambda, make_optimizer
from fastpt.train.seeding import rank_seed, seed_everything  # noqa: F401  (re-exported)
from fastpt.train.trainer_eval import EvaluationMixin
from fastpt.train.trainer_loss import LossMixin, _check_differentiable
from fastpt.train.trainer_state import CheckpointMixin


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each layer of every ``nn.ModuleList`` in the backward (non-reentrant);
    returns how many layers were wrapped."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for layer in module:
                if not getattr(layer, "_fastpt_checkpointed", False):
                    forward = layer.forward
                    layer.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
                    layer._fastpt_checkpointed = True
                    count += 1
    return count


def _check_arguments(model, config, train_data, **functions) -> None:
    """The Trainer's arguments of the wrong kind, refused when it is built: they failed later,
    at the first batch, as AttributeErrors or "'int' object is not callable"."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, TrainerConfig):
        raise TypeError(f"config must be a TrainerConfig (TrainerConfig.from_dict builds one from a dict), "
                        f"got {type(config).__name__}")
    if not isinstance(train_data, IterableDataset) and not (
            hasattr(train_data, "__len__") and hasattr(train_data, "__getitem__")):
        raise TypeError("train_data must be a map-style dataset (indexable, with a length) or an "
                        f"IterableDataset, got {type(train_data).__name__}")
    for name, f in functions.items():
        if f is not None and not callable(f):
            raise TypeError(f"{name} must be callable or None, got {type(f).__name__}")


class Trainer(LossMixin, EvaluationMixin, CheckpointMixin):
    """Train ``model`` on ``train_data`` (a map-style or iterable ``Dataset``).

    ``collate_fn`` builds batches (an objective's collator). ``loss_fn(model, batch)`` may
    replace the default ``model(**batch).loss`` and must then return ``(mean_loss, count)``:
    the mean over the batch's ``count`` label tokens (the update weights it by ``count``).
    ``loss_terms(batch)`` (default: the model's own ``loss_terms`` method, if any) states a
    composite loss term by term, see the module docstring; it is not used with a ``loss_fn``.
    """

    def __init__(self, model: torch.nn.Module, config: TrainerConfig, train_data, *,
                 eval_data=None, collate_fn=None, loss_fn=None, loss_terms=None):
        _check_arguments(model, config, train_data, collate_fn=collate_fn, loss_fn=loss_fn, loss_terms=loss_terms)
        if loss_fn is not None and loss_terms is not None:
            raise ValueError("give loss_fn or loss_terms, not both: a loss_fn returns one mean and its count")
        if eval_data is not None and not isinstance(eval_data, IterableDataset):
            if not hasattr(eval_data, "__len__") or not hasattr(eval_data, "__getitem__"):
                raise ValueError("eval_data must be a map-style dataset (indexable, with a length) or an "
                                 f"IterableDataset, got {type(eval_data).__name__}")
            if len(eval_data) == 0:
                raise ValueError("eval_data is empty: pass eval_data=None to train without evaluation")
        self.config = config
        self.device = fdist.resolve_device(config.device, model)
        self.rank, self.world = fdist.init_from_env(self.device)
        if config.activation_checkpointing:
            enable_activation_checkpointing(model)
        model.to(self.device)  # before DDP / FSDP and the optimizer, which take its parameters
        self.model = model
        # A classifier around an Encoder inherits the Encoder's unused heads with it.
        find_unused = any(getattr(m, "ddp_find_unused_parameters", False) for m in model.modules())
        self.wrapped = fdist.wrap_model(model, config.strategy, self.world, find_unused_parameters=find_unused,
                                        device=self.device)
        self._every_parameter_needs_a_gradient = (
            isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel) and not find_unused)
        # After the weights exist (and DDP has broadcast rank 0's): the streams differ per rank
        # from here on, the weights never do.
        seed_everything(rank_seed(config.seed, self.rank))
        self.optimizer = make_optimizer(model, config.lr, config.weight_decay, config.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(
            config.schedule, config.warmup_steps, config.max_steps, config.min_lr_ratio))
        self.train_data, self.eval_data = train_data, eval_data
        self.collate_fn, self.loss_fn = collate_fn, loss_fn
        # fastpt's models (a forward that takes return_logits) give their loss without the
        # (B, T, V) logits: the Trainer reads only losses, and those logits cost memory of V / d
        # times a layer's activations and, in MLM, a vocabulary projection of every token where
        # only the ~15% labelled ones are scored.
        self._loss_without_logits = "return_logits" in inspect.signature(model.forward).parameters
        self.loss_terms = loss_terms if loss_terms is not None or loss_fn is not None \
            else getattr(model, "loss_terms", None)
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0
        self.metrics = MetricsLog(config.output_dir, enabled=self.rank == 0)

    # -- data -------------------------------------------------------------------------------

    def _loader(self, data, epoch: int, train: bool, skip: int = 0):
        """Collated batches of this rank's share of ``data``: for training, of ``epoch``
        (shuffled, incomplete batches dropped) from batch ``skip`` on; for evaluation, every
        example once. Skipped batches are never collated."""
        bs = self.config.batch_size
        collate = KeyedCollate(self.collate_fn, (self.config.seed, "train" if train else "eval", self.rank, epoch))
        # A loader's own generator: creating a loader draws a seed from it, and drawing from the
        # global RNG instead would shift dropout after a resume (which creates a new loader). Its
        # seed is the workers' base seed: per rank, so that a dataset drawing random numbers in
        # DataLoader workers draws other numbers on each rank (rank 0 keeps the seed it had).
        loader_seed = rank_seed(self.config.seed * 1000 + epoch, self.rank)
        common = {"batch_size": None, "collate_fn": as_is, "num_workers": self.config.num_workers,
                  "generator": torch.Generator().manual_seed(loader_seed)}
        if isinstance(data, IterableDataset):
            loader = DataLoader(IterableBatches(data, bs, train, skip, collate), **common)
            return itertools.islice(loader, skip, None)
        if train:
            sampler = DistributedSampler(data, num_replicas=self.world, rank=self.rank,
                                         shuffle=True, seed=self.config.seed, drop_last=True)
            sampler.set_epoch(epoch)
            indices = list(sampler)
            n_batches = len(indices) // bs
        else:
            # Not DistributedSampler: it pads the shares to equal length by repeating examples,
            # which the evaluation would count twice.
            indices = list(range(self.rank, len(data), self.world))
            n_batches = -(-len(indices) // bs)
        batches = [indices[i * bs:(i + 1) * bs] for i in range(n_batches)]
        return DataLoader(MapBatches(data, batches, collate), sampler=range(skip, n_batches), **common)

    def _micro_batches(self):
        """Endless micro-batches from the saved data position; tracks epoch and offset."""
        while True:
            produced = False
            for batch in self._loader(self.train_data, self.epoch, True, self.batches_in_epoch):
                produced = True
                self.batches_in_epoch += 1
                yield batch
            if not produced and self.batches_in_epoch == 0:
                raise ValueError("the training data yields no batch (fewer examples than "
                                 f"batch_size={self.config.batch_size} x processes?)")
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    # -- training ---------------------------------------------------------------------------

    def train_step(self, micro_batches: list) -> dict:
        """One optimizer step over the given micro-batches; returns the loss, gradient norm
        and label tokens (over all ranks; with ``loss_terms``, the first term's count), the
        learning rate the step applied, and ``terms``: each loss term's mean (empty without
        ``loss_terms``). Raises
        FloatingPointError, before the optimizer changes any weight, when the loss or the
        gradient norm is not finite."""
        self.wrapped.train()
        terms: dict[str, float] = {}
        if self.loss_terms is not None:
            loss, total, terms = self._backward_terms(micro_batches)
        else:
            loss, total = self._backward_weighted(micro_batches)
        # The norm is taken without clipping too: it tells whether the step is finite.
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # Before optimizer.step and any save: the weights and the checkpoints on disk (which
            # keep_last would prune for NaN ones) stay as they were after the last good step.
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"step {self.step + 1}: the loss ({loss}) or gradient norm ({grad_norm}) "
                                     "is not finite; the step was not applied and nothing was saved")
        lr = self.optimizer.param_groups[0]["lr"]  # the one this step applies, before the scheduler moves it
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss, "grad_norm": grad_norm, "tokens": total, "lr": lr, "terms": terms}

    def _sync_context(self, last: bool):
        """DDP all-reduces the gradients in the last micro-batch's backward only."""
        if isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel) and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def _backward_weighted(self, micro_batches: list) -> tuple[float, float]:
        """Back-propagates the mean loss over all label tokens of the step (the default loss or
        a ``loss_fn``, whose counts are known only after their forwards); returns (loss, tokens)."""
        loss_sum = torch.zeros(())
        n_seen = torch.zeros(())
        for i, batch in enumerate(micro_batches):
            with self._sync_context(last=i == len(micro_batches) - 1):
                loss, count = self._forward(batch)
                _check_differentiable(loss, "the loss")
                # The sum over the micro-batch's tokens: the mean over all of the step's tokens
                # needs their total, which a loss_fn gives only with its forward.
                (loss * count).backward()
            # A micro-batch without label tokens has a NaN mean (0 / 0) and adds nothing.
            loss_sum += torch.where(count > 0, loss.detach().cpu() * count, 0.0)
            n_seen += count
        self._check_every_parameter_got_a_gradient()
        loss_sum, total = (float(x) for x in fdist.all_reduce_sum(torch.stack([loss_sum, n_seen])))
        self._refuse_a_step_without_labels(total, len(micro_batches))
        for p in self.model.parameters():
            if p.grad is not None:  # DDP averaged the sums over ranks: world / total makes the mean
                p.grad.mul_(self.world / total)
        return loss_sum / total, total

    def _backward_terms(self, micro_batches: list) -> tuple[float, float, dict[str, float]]:
        """Back-propagates sum(weight * mean of the term over the step's items) for a loss
        stated by ``loss_terms``; returns (loss, the first term's count over the step, each
        term's mean over the step (None for a term with nothing to average))."""
        terms = [self._terms_of(batch) for batch in micro_batches]
        names, weights = terms[0][0], terms[0][1]
        if any(t[0] != names for t in terms):
            raise ValueError(f"loss_terms must name the same terms in every micro-batch, got "
                             f"{sorted({tuple(t[0]) for t in terms})}")
        counts = torch.stack([t[2] for t in terms])  # (micro-batches, K)
        # Before any forward: each term's share of the step, and DDP averages over ranks.
        totals = fdist.all_reduce_sum(counts.sum(0))
        self._refuse_a_step_without_labels(float(totals.sum()), len(micro_batches))
        scale = weights * self.world / totals.clamp(min=1)
        sums = torch.zeros(len(names))
        for i, batch in enumerate(micro_batches):
            with self._sync_context(last=i == len(micro_batches) - 1):
                with self._autocast():
                    means = self._term_means(self._run(batch), names)
                # A term with nothing to average over here has a NaN mean (0 / 0) and adds nothing.
                count = counts[i].to(means.device)
                term_sums = torch.where(count > 0, means * count, 0.0)
                _check_differentiable(means, f"the loss terms {names}")
                (term_sums * scale.to(means.device)).sum().backward()
            sums += term_sums.detach().cpu()
        self._check_every_parameter_got_a_gradient()
        sums = fdist.all_reduce_sum(sums)
        means = torch.where(totals > 0, sums / totals.clamp(min=1), 0.0)
        loss = float((weights * means).sum())
        return loss, float(totals[0]), {n: float(m) if t > 0 else None
                                        for n, m, t in zip(names, means.tolist(), totals.tolist())}

    def _refuse_a_step_without_labels(self, total: float, n_micro: int) -> None:
        if total == 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise ValueError(f"step {self.step + 1}: its {n_micro} micro-batches hold no label token "
                             f"on any of the {self.world} processes (every label is {IGNORE_INDEX}): "
                             "the mean loss is undefined")

    def _check_every_parameter_got_a_gradient(self) -> None:
        """Under DDP without find_unused_parameters, a parameter without a gradient leaves its
        bucket un-reduced (the ranks' gradients differ) and DDP fails at the next forward."""
        if not self._every_parameter_needs_a_gradient:
            return
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if not fdist.all_reduce_sum(torch.tensor(float(len(missing)))) > 0:
            return
        self.optimizer.zero_grad(set_to_none=True)
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise RuntimeError(
            f"step {self.step + 1}: under DDP, {len(missing)} parameters got no gradient on process "
            f"{self.rank}{': ' + shown if missing else ' (but some did on another process)'}. DDP needs every "
            "parameter to reach the loss: leave unused parameters out of the model, or set "
            "`ddp_find_unused_parameters = True` on it (then no output may depend on them "
            "either). The step was not applied")

    def train(self, resume_from: str | None = None) -> dict:
        """Run to ``max_steps`` (resuming from a checkpoint folder when given); returns the
        last metrics row. On SIGINT/SIGTERM the current step finishes, a checkpoint is saved
        and :class:`TrainingInterrupted` is raised (see fastpt.train.interrupt)."""
        cfg = self.config
        if cfg.steady_alloc and not use_steady_allocator():
            warnings.warn("steady_alloc: this C library has no mallopt (not glibc); the default allocator stays",
                          stacklevel=2)
        if resume_from is not None:
            self.load(resume_from)
        batches = self._micro_batches()
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress or self.rank != 0,
                   desc="train", dynamic_ncols=True)
        row: dict = {}
        window_tokens, window_start = 0.0, time.perf_counter()
        with StopRequest() as stop, bar:
            while self.step < cfg.max_steps:
                stats = self.train_step([next(batches) for _ in range(cfg.grad_accum)])
                window_tokens += stats["tokens"]
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
                done = self.step == cfg.max_steps
                row = {"step": self.step, "loss": stats["loss"], "lr": stats["lr"],
                       "grad_norm": stats["grad_norm"], "tokens": stats["tokens"]}
                row.update({n: v for n, v in stats["terms"].items() if n not in row})
                if self.eval_data is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or done):
                    row["eval_loss"] = self.evaluate()
                if self.step % cfg.log_every == 0 or done or "eval_loss" in row:
                    elapsed = time.perf_counter() - window_start
                    row["tokens_per_s"] = window_tokens / elapsed if elapsed > 0 else None
                    window_tokens, window_start = 0.0, time.perf_counter()
                    self.metrics.write(row)
                # A stop request is honoured on save steps too: it saves once, not a step later.
                save_now = (cfg.save_every and self.step % cfg.save_every == 0) or done
                path = self.save() if save_now else None
                if not done and self._stop_agreed(stop):
                    # Not `path or self.save()`: ranks other than 0 get None from save() too.
                    raise TrainingInterrupted(self.step, path if save_now else self.save())
        self.metrics.plot()
        return row

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any rank was asked to stop (all ranks must save together)."""
        if self.world == 1:
            return stop.requested
        return bool(fdist.all_reduce_sum(torch.tensor(float(stop.requested))) > 0)
