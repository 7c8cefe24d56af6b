"""``Trainer``: the pre-training / fine-tuning loop, from one CPU process to torchrun + DDP/FSDP.

The model is any ``nn.Module`` whose ``forward(**batch)`` returns an object (or dict) with a
``loss`` that is the mean over the batch's label tokens. One optimizer step gathers
``grad_accum`` micro-batches, counts their label tokens on every rank, and back-propagates
``loss_i * n_i / N`` (N = tokens over all micro-batches and ranks, times the world size that
DDP averages over), so the update equals the one of a single large batch whatever the split.

Data order is a pure function of (seed, epoch) through ``DistributedSampler`` (also with one
process), which is what makes 1-process and 2-process runs and resumed runs agree.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import time

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from fastpt.pretrain.mlm import IGNORE_INDEX
from fastpt.train import checkpoint as ckpt
from fastpt.train import distributed as fdist
from fastpt.train.config import TrainerConfig
from fastpt.train.interrupt import StopRequest, TrainingInterrupted
from fastpt.train.logging import MetricsLog
from fastpt.train.schedules import lr_lambda, make_optimizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def _loss_of(output) -> torch.Tensor:
    loss = output["loss"] if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: pass labels in the batch (or a loss_fn)")
    return loss


class _Skip(IterableDataset):
    """An iterable dataset without its first ``n`` items."""

    def __init__(self, data, n: int):
        self.data, self.n = data, n

    def __iter__(self):
        return itertools.islice(iter(self.data), self.n, None)


def _collate_generator(collate_fn) -> torch.Generator | None:
    """The torch.Generator an objective's collator draws its masks from, if it has one."""
    g = getattr(collate_fn, "generator", None)
    return g if isinstance(g, torch.Generator) else None


class Trainer:
    """Train ``model`` on ``train_data`` (a map-style or iterable ``Dataset``).

    ``collate_fn`` builds batches (an objective's collator). ``loss_fn(model, batch)`` may
    replace the default ``model(**batch).loss`` and must then return ``(mean_loss, count)``.
    """

    def __init__(self, model: torch.nn.Module, config: TrainerConfig, train_data, *,
                 eval_data=None, collate_fn=None, loss_fn=None):
        self.config = config
        self.rank, self.world = fdist.init_from_env()
        seed_everything(config.seed)
        if config.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.model = model
        self.wrapped = fdist.wrap_model(model, config.strategy, self.world)
        self.optimizer = make_optimizer(model, config.lr, config.weight_decay, config.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(
            config.schedule, config.warmup_steps, config.max_steps, config.min_lr_ratio))
        self.train_data, self.eval_data = train_data, eval_data
        self.collate_fn, self.loss_fn = collate_fn, loss_fn
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0
        self.metrics = MetricsLog(config.output_dir, enabled=self.rank == 0)

    # -- data -------------------------------------------------------------------------------

    def _loader(self, data, epoch: int, shuffle: bool, skip: int = 0) -> DataLoader:
        """Batches of ``data`` for ``epoch``, starting after ``skip`` batches. Skipped batches
        are never collated, so a collator's own RNG (restored from the checkpoint) is not
        advanced twice."""
        bs = self.config.batch_size
        # A loader's own generator: creating a loader draws a seed from it, and drawing from the
        # global RNG instead would shift dropout after a resume (which creates a new loader).
        common = {"collate_fn": self.collate_fn, "num_workers": self.config.num_workers,
                  "generator": torch.Generator().manual_seed(self.config.seed * 1000 + epoch)}
        if isinstance(data, IterableDataset):
            return DataLoader(_Skip(data, skip * bs), batch_size=bs, drop_last=shuffle, **common)
        sampler = DistributedSampler(data, num_replicas=self.world, rank=self.rank,
                                     shuffle=shuffle, seed=self.config.seed, drop_last=shuffle)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        n_batches = len(indices) // bs if shuffle else -(-len(indices) // bs)
        batches = [indices[i * bs:(i + 1) * bs] for i in range(skip, n_batches)]
        return DataLoader(data, batch_sampler=batches, **common)

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

    def _count(self, batch) -> torch.Tensor:
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if labels is None:
            first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
            return torch.tensor(float(first.shape[0]))
        return (labels[..., self.config.label_shift:] != IGNORE_INDEX).sum().float()

    def _forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        autocast = torch.autocast("cuda" if torch.cuda.is_available() else "cpu",
                                  dtype=torch.bfloat16, enabled=self.config.bf16)
        with autocast:
            if self.loss_fn is not None:
                loss, count = self.loss_fn(self.wrapped, batch)
                return loss.float(), torch.as_tensor(count, dtype=torch.float32)
            return _loss_of(self.wrapped(**batch)).float(), self._count(batch)

    # -- training ---------------------------------------------------------------------------

    def train_step(self, micro_batches: list) -> dict:
        """One optimizer step over the given micro-batches; returns loss, grad norm, tokens."""
        self.wrapped.train()
        counts = [self._count(b) for b in micro_batches] if self.loss_fn is None else None
        total = fdist.all_reduce_sum(torch.stack(counts).sum()) if counts is not None else None
        loss_sum = torch.zeros(())
        n_seen = torch.zeros(())
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext()
            if isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel) and not last:
                sync = self.wrapped.no_sync()
            with sync:
                loss, count = self._forward(batch)
                denom = total if total is not None else count * len(micro_batches)
                (loss * count * self.world / denom).backward()
            loss_sum += loss.detach() * count
            n_seen += count
        grad_norm = None
        if self.config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        stats = fdist.all_reduce_sum(torch.stack([loss_sum, n_seen]))
        return {"loss": float(stats[0] / stats[1]), "grad_norm": grad_norm, "tokens": float(stats[1])}

    def train(self, resume_from: str | None = None) -> dict:
        """Run to ``max_steps`` (resuming from a checkpoint folder when given); returns the
        last metrics row. On SIGINT/SIGTERM the current step finishes, a checkpoint is saved
        and :class:`TrainingInterrupted` is raised (see fastpt.train.interrupt)."""
        cfg = self.config
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
                row = {"step": self.step, "loss": stats["loss"], "lr": self.scheduler.get_last_lr()[0],
                       "grad_norm": stats["grad_norm"], "tokens": stats["tokens"]}
                if self.eval_data is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or done):
                    row["eval_loss"] = self.evaluate()
                if self.step % cfg.log_every == 0 or done or "eval_loss" in row:
                    elapsed = time.perf_counter() - window_start
                    row["tokens_per_s"] = window_tokens / elapsed if elapsed > 0 else None
                    window_tokens, window_start = 0.0, time.perf_counter()
                    self.metrics.write(row)
                if (cfg.save_every and self.step % cfg.save_every == 0) or done:
                    self.save()
                elif self._stop_agreed(stop):
                    raise TrainingInterrupted(self.step, self.save())
        self.metrics.plot()
        return row

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any rank was asked to stop (all ranks must save together)."""
        if self.world == 1:
            return stop.requested
        return bool(fdist.all_reduce_sum(torch.tensor(float(stop.requested))) > 0)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the evaluation data (all ranks)."""
        self.wrapped.eval()
        total = torch.zeros(2)
        for batch in self._loader(self.eval_data, 0, shuffle=False):
            loss, count = self._forward(batch)
            total += torch.stack([loss * count, count])
        total = fdist.all_reduce_sum(total)
        self.wrapped.train()
        return float(total[0] / total[1]) if total[1] > 0 else math.nan

    # -- checkpoints ------------------------------------------------------------------------

    def _state_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def save(self) -> str | None:
        """Checkpoint model, optimizer, scheduler, RNG and data position. Every rank takes
        part in gathering full state dicts (needed under FSDP); rank 0 writes."""
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = self._state_options()
        model_state = get_model_state_dict(self.wrapped, options=options)
        optim_state = get_optimizer_state_dict(self.wrapped, self.optimizer, options=options)
        path = None
        if self.rank == 0:
            path = ckpt.save_checkpoint(
                self.config.output_dir + "/checkpoints", self.step, model_state, optim_state,
                self.scheduler.state_dict(),
                {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch},
                extra={"config": self.config.to_dict(), "world_size": self.world},
                keep_last=self.config.keep_last, tensors=self._extra_tensors())
        fdist.barrier()
        return path

    def _extra_tensors(self) -> dict:
        g = _collate_generator(self.collate_fn)
        return {"collate.generator": g.get_state()} if g is not None else {}

    def load(self, path: str) -> None:
        """Resume from a checkpoint folder (or a root with ``latest``): weights, optimizer,
        scheduler, data position, RNGs."""
        from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                             set_optimizer_state_dict)
        state = ckpt.load_checkpoint(path)
        # Every check comes before the first change, so a refused checkpoint leaves this
        # trainer as it was (a caller may then fall back to an older checkpoint).
        self._check_same_run(state)
        ckpt.check_against(state, self.model)
        self._check_scheduler_state(state)
        g = _collate_generator(self.collate_fn)
        g_state = state["tensors"].get("collate.generator") if g is not None else None
        if g_state is not None:
            try:
                torch.Generator(device=g.device).set_state(g_state)
            except (TypeError, RuntimeError) as e:
                raise ckpt.CheckpointError(f"{state['folder']}/{ckpt.OPTIM_FILE}: extra/collate.generator "
                                           f"is no generator state ({e})") from None
        options = self._state_options()
        try:
            set_model_state_dict(self.wrapped, state["model"], options=options)
            set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"], options=options)
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ckpt.CheckpointError(f"{state['folder']} does not match this model/optimizer: {e}") from None
        ckpt.restore_rng(state)
        if g_state is not None:
            g.set_state(g_state)
        self.step = state["step"]
        self.epoch, self.batches_in_epoch = state["data"]["epoch"], state["data"]["batches_in_epoch"]

    def _check_same_run(self, state: dict) -> None:
        """The saved data position counts batches of batch_size on each of world_size
        processes: with other values it would point at other examples (skipped or repeated)."""
        extra = state["extra"]
        config = extra.get("config") if isinstance(extra.get("config"), dict) else {}
        saved = {"batch_size": config.get("batch_size"), "processes": extra.get("world_size")}
        now = {"batch_size": self.config.batch_size, "processes": self.world}
        differ = [f"{k}={saved[k]} (now {now[k]})" for k in now if saved[k] is not None and saved[k] != now[k]]
        if differ:
            raise ckpt.CheckpointError(
                f"{state['folder']} was written with {', '.join(differ)}: its data position "
                f"(epoch {state['data']['epoch']}, batch {state['data']['batches_in_epoch']}) would not "
                "resume the same data; resume with the same batch_size and number of processes")

    def _check_scheduler_state(self, state: dict) -> None:
        """A scheduler state with other fields or value types than this scheduler's own would
        load silently and fail (or mislead) later, at ``scheduler.step()``."""
        # This scheduler's own state as it reads back from JSON (tuples become lists).
        saved, own = state["scheduler"], json.loads(json.dumps(self.scheduler.state_dict()))
        bad = sorted(saved.keys() ^ own.keys()) if isinstance(saved, dict) else ["(not an object)"]
        bad += [k for k in own if isinstance(saved, dict) and k in saved and type(saved[k]) is not type(own[k])]
        if bad:
            raise ckpt.CheckpointError(f"{state['folder']}/{ckpt.STATE_FILE}: field 'scheduler' is no state of "
                                       f"{type(self.scheduler).__name__} (check {', '.join(bad)})")
