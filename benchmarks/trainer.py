"""Trainer overhead: tokens/s of the F5 benchmark decoder under ``fastpt.train.Trainer``
vs the bare training step (forward + backward + AdamW) on the same model and batches.

The two alternate step by step in one process (the host is shared and drifts), the one that
goes first swapping each round (``rounds.alternate_rounds``), so warm-up or a frequency
drift within a round does not always favour the same one. The Trainer adds token counting,
gradient clipping, the LR schedule and metrics bookkeeping; the target (issue F6) is a
throughput within 10% of the bare step.

Run: ``python -m fastpt.benchmarks.trainer [--quick] [--steps N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from fastpt._atomic import atomic_write_json
from fastpt.benchmarks.rounds import alternate_rounds, check_json_path
from fastpt.cli import positive_int_arg


def _setup(quick: bool):
    from fastpt.models import Decoder, from_name
    config = from_name("llama-small", vocab_size=32000, max_position_embeddings=2048)
    if quick:
        config = config.replace(num_layers=2)
    B, T = (2, 128) if quick else (8, 512)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (B, T))
    shape = f"B={B},T={T},{config.num_layers} layers"
    return Decoder(config), Decoder(config), {"input_ids": ids, "labels": ids}, B * (T - 1), shape


def measure(quick: bool = False, steps: int = 6) -> dict:
    from fastpt.train import Trainer, TrainerConfig
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 (timed steps per implementation), got {steps!r}")
    bare_model, trainer_model, batch, tokens, shape = _setup(quick)
    trainer_model.load_state_dict(bare_model.state_dict())
    opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-4)

    def bare_step():  # without the logits, as the Trainer calls a fastpt model
        loss = bare_model(**batch, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainerConfig(output_dir=out, max_steps=10**6, batch_size=batch["input_ids"].shape[0],
                            lr=1e-4, label_shift=1, progress=False)
        trainer = Trainer(trainer_model, cfg, [batch])

        def trainer_step():
            trainer.train_step([batch])

        calls = {"bare": bare_step, "trainer": trainer_step}
        for fn in calls.values():  # warm-up
            fn()
        samples = alternate_rounds(calls, budget_s=0.0, min_rounds=steps, max_rounds=steps)
    med = {k: statistics.median(wall for wall, _ in v) for k, v in samples.items()}
    return {"shape": shape,
            "bare_tokens_per_s": tokens / med["bare"], "trainer_tokens_per_s": tokens / med["trainer"],
            "trainer_vs_bare": med["bare"] / med["trainer"], "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=positive_int_arg, default=6, help="timed steps per implementation (default: 6)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    check_json_path(p, args.json)
    result = measure(args.quick, args.steps)
    print(f"{result['shape']}: bare {result['bare_tokens_per_s']:.0f} tok/s, Trainer "
          f"{result['trainer_tokens_per_s']:.0f} tok/s, Trainer/bare = {result['trainer_vs_bare']:.3f}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
