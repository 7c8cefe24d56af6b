"""A tiny causal LM trained by fastpt's Trainer; run by tests/test_trainer.py in subprocesses
(plain, killed mid-way with SIGKILL, resumed, and under torchrun with 2 gloo processes)."""

import argparse
import os
import signal
import sys

import torch

from fastpt.train import Trainer, TrainerConfig


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16, dropout: float = 0.1):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(2))
        self.head = torch.nn.Linear(dim, vocab)
        self.dropout = torch.nn.Dropout(dropout)  # exercises the RNG state a resume must restore

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + torch.tanh(layer(self.dropout(h)))
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=-100)
        return {"loss": loss, "logits": logits}


def make_data(n: int = 64, T: int = 12, vocab: int = 50) -> list:
    g = torch.Generator().manual_seed(1234)
    data = []
    for i in range(n):
        ids = torch.randint(0, vocab, (T,), generator=g)
        labels = ids.clone()
        labels[: i % 5] = -100  # uneven label counts: exercises the token-count normalisation
        data.append({"input_ids": ids, "labels": labels})
    return data


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--kill-at", type=int, default=0, help="SIGKILL this process at that step")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--strategy", default="auto")
    args = p.parse_args()
    torch.manual_seed(0)
    model = TinyLM(dropout=args.dropout)
    cfg = TrainerConfig(output_dir=args.out, max_steps=args.steps, batch_size=args.batch_size,
                        grad_accum=args.grad_accum, lr=1e-2, warmup_steps=2, save_every=args.save_every,
                        label_shift=1, progress=False, log_every=1, keep_last=3,
                        strategy=args.strategy)
    trainer = Trainer(model, cfg, make_data())
    if args.kill_at:
        step = trainer.train_step

        def dying_step(micro):
            if trainer.step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(micro)
        trainer.train_step = dying_step
    trainer.train(resume_from=os.path.join(args.out, "checkpoints") if args.resume else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(trainer.wrapped, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))  # collective under FSDP
    if trainer.rank == 0:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in weights.items()},
                  os.path.join(args.out, "final.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
