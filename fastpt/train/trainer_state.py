"""``Trainer.save`` / ``Trainer.load``: its state to and from a checkpoint, checked to resume the same run."""

from __future__ import annotations

import json

import torch
from torch.utils.data import IterableDataset

from fastpt.train import checkpoint as ckpt
from fastpt.train import distributed as fdist
from fastpt.train.batches import seed_of
from fastpt.train.seeding import rank_seed, seed_everything


class CheckpointMixin:
    """The :class:`~fastpt.train.trainer.Trainer`'s checkpoints (see fastpt.train.checkpoint
    for the files)."""

    def _state_options(self, strict: bool = True):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=strict)

    def save(self) -> str | None:
        """Checkpoint model, optimizer, scheduler, and every rank's RNG states and data
        position. Every rank takes part in gathering full state dicts (needed under FSDP) and
        the RNG states; rank 0 writes."""
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = self._state_options()
        model_state = get_model_state_dict(self.wrapped, options=options)
        optim_state = get_optimizer_state_dict(self.wrapped, self.optimizer, options=options)
        # Ranks can be at different places in their data (an iterable dataset's shares differ
        # in length): each resumes from its own.
        positions = torch.zeros(self.world, 2, dtype=torch.long)
        positions[self.rank] = torch.tensor([self.epoch, self.batches_in_epoch])
        positions = fdist.all_reduce_sum(positions).tolist()
        rng_states = fdist.gather_to_rank0(ckpt.rng_state())  # each rank draws its own masks
        path = None
        if self.rank == 0:
            path = ckpt.save_checkpoint(
                self.config.output_dir + "/checkpoints", self.step, model_state, optim_state,
                self.scheduler.state_dict(),
                {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "ranks": positions},
                extra={"config": self.config.to_dict(), "world_size": self.world},
                keep_last=self.config.keep_last, rng_states=rng_states)
        fdist.barrier()
        return path

    def load(self, path: str) -> None:
        """Resume from a checkpoint folder (or a root with ``latest``): weights, optimizer,
        scheduler, data position, this rank's RNG states; metrics rows after its step are dropped."""
        from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                             set_optimizer_state_dict)
        state = ckpt.load_checkpoint(path)
        # Every check comes before the first change, so a refused checkpoint leaves this
        # trainer as it was (a caller may then fall back to an older checkpoint).
        self._check_same_run(state)
        ckpt.check_against(state, self.model)
        self._check_scheduler_state(state)
        position = self._data_position(state)
        rng_rank = self._rng_rank(state)
        options = self._state_options()
        try:
            set_model_state_dict(self.wrapped, state["model"], options=options)
            # Not strict: a parameter that never had a gradient (ELECTRA's unused pooler) has no
            # AdamW state to save, and gets it at its first gradient as in the uninterrupted run.
            # check_against has already matched every saved state with a parameter.
            set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"],
                                     options=self._state_options(strict=False))
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ckpt.CheckpointError(f"{state['folder']} does not match this model/optimizer: {e}") from None
        self._apply_config_hyperparameters()
        if rng_rank is not None:
            ckpt.restore_rng(state, rng_rank)
        else:  # see _rng_rank
            seed_everything(seed_of(rank_seed(self.config.seed, self.rank), "resumed", state["step"]))
        # A collator generator state in checkpoints of older versions is not needed: every
        # batch's masks now follow from (seed, rank, epoch, batch index).
        self.step = state["step"]
        self.epoch, self.batches_in_epoch = position
        self.metrics.resume(self.step)

    def _apply_config_hyperparameters(self) -> None:
        """After a resume: the optimizer's state (moments, step counts) is the checkpoint's, its
        hyper-parameters this config's. Loaded as saved, the first step after a resume with a
        raised max_steps (how a finished run trains on) applied the lr of the old schedule's
        end, and an lr, weight_decay or betas changed for the resumed run were ignored for good
        (the saved base lr and param groups won). With the config unchanged this changes nothing."""
        groups, cfg = self.optimizer.param_groups, self.config
        self.scheduler.base_lrs = [cfg.lr] * len(groups)
        for group, lmbda in zip(groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * lmbda(self.scheduler.last_epoch)
            group["betas"] = cfg.betas
        groups[0]["weight_decay"] = cfg.weight_decay  # the matrices' group (see param_groups)
        self.scheduler._last_lr = [group["lr"] for group in groups]

    def _data_position(self, state: dict) -> tuple[int, int]:
        """This rank's (epoch, batches_in_epoch). Checkpoints of older versions hold rank 0's
        only, which is every rank's when the shares have equal lengths (map-style data)."""
        data = state["data"]
        ranks = data.get("ranks")
        if ranks is None:
            return data["epoch"], data["batches_in_epoch"]
        if len(ranks) != self.world:
            raise ckpt.CheckpointError(f"{state['folder']}/{ckpt.STATE_FILE}: field 'data.ranks' holds "
                                       f"{len(ranks)} data positions for {self.world} processes")
        return tuple(ranks[self.rank])

    def _rng_rank(self, state: dict) -> int | None:
        """Whose saved RNG states this rank restores: its own. A checkpoint of an older fastpt
        holds rank 0's alone, which every rank drew from; rank 0 restores it, the others (None)
        start new streams from (seed, rank, step)."""
        saved = ckpt.rng_processes(state)
        if saved is None:
            return 0 if self.rank == 0 else None
        if saved != self.world:
            raise ckpt.CheckpointError(f"{state['folder']}/{ckpt.STATE_FILE}: field 'rng' holds the RNG states "
                                       f"of {saved} processes, not {self.world}: resume with {saved} processes")
        return self.rank

    def _check_same_run(self, state: dict) -> None:
        """The saved data position counts batches of batch_size on each of world_size
        processes (and, for an iterable dataset, DataLoader workers, which deal its examples),
        in the order the seed shuffled them in: with other values it would point at other
        examples (skipped or repeated)."""
        extra = state["extra"]
        config = extra.get("config") if isinstance(extra.get("config"), dict) else {}
        saved = {"batch_size": config.get("batch_size"), "processes": extra.get("world_size"),
                 "seed": config.get("seed")}
        now = {"batch_size": self.config.batch_size, "processes": self.world, "seed": self.config.seed}
        if isinstance(self.train_data, IterableDataset):
            saved["num_workers"], now["num_workers"] = config.get("num_workers"), self.config.num_workers
        differ = [f"{k}={saved[k]} (now {now[k]})" for k in now if saved[k] is not None and saved[k] != now[k]]
        if differ:
            raise ckpt.CheckpointError(
                f"{state['folder']} was written with {', '.join(differ)}: its data position "
                f"(epoch {state['data']['epoch']}, batch {state['data']['batches_in_epoch']}) would not "
                "resume the same data; resume with the same batch_size, seed, number of processes"
                + (" and num_workers" if "num_workers" in now else ""))

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
