"""Fine-tuning outcomes and speed (issue F7).

``strategies``: a GPT-2-style tiny decoder pre-trained on the embedded corpus (causal LM),
then fine-tuned on the world's sentiment task (labels on half of the adjectives, test on the
other half) with every strategy; one table of test
accuracy, trainable parameters, median step time and peak memory of a training step (the
most memory torch's CPU allocator holds, from the profiler's allocation records).
``icl``: zero/one/few-shot accuracy of the same pre-trained decoder on the pattern tasks.
``lora_speed``: a LoRA fine-tuning step of the F5 benchmark decoder (Llama, 6 layers,
d 512, GQA 8/2, SwiGLU 1408) with fastpt's fused LoRA vs full fine-tuning vs the same LoRA
built from eager ops, and the bytes of the frozen weights with an int8 base. Also a step of
the frozen decoder with no adapter at all, only the first attention norm's weight trainable
(``frozen``): the backward still runs through every layer, so it is what a LoRA step whose
adapters cost nothing would take (plus the first layer's q/k/v input gradient, ~1% of the
step, which LoRA skips), and ``full / frozen`` and ``eager LoRA / frozen`` bound the two
speed-ups any LoRA implementation can reach at this shape. The four steps are timed round
by round, the order rotating each round (``rounds.alternate_rounds``), so warm-up or a
frequency drift within a round does not always favour the same one.

Run: ``python -m fastpt.benchmarks.finetune [--quick] [--only strategies,icl,lora_speed]
[--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from fastpt._atomic import atomic_write_json
from fastpt.alloc import peak_memory_bytes
from fastpt.benchmarks.rounds import alternate_rounds, check_json_path, check_subsets, split_list
from fastpt.commands.common import check_output_dir
from fastpt.commands.options import ConfigError

PARTS = ("strategies", "icl", "lora_speed")


def pretrained_decoder(out_dir: str, quick: bool):
    """Pre-train (or reuse) a gpt2-tiny decoder on the world corpus. The quick and the full
    decoder (10x the steps and ~8x the documents) are kept apart: one never stands in for the
    other in a later run's accuracies."""
    from fastpt.data.tokenizer import load_tokenizer
    from fastpt.models import Decoder
    from fastpt.train.recipes import pretrain_decoder, save_pretrained_with_tokenizer
    size = "quick" if quick else "full"
    path = os.path.join(out_dir, f"decoder-{size}")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        print(f"reusing the pre-trained decoder in {path}", flush=True)
        return Decoder.from_pretrained(path), load_tokenizer(path)
    steps = 150 if quick else 1500
    result = pretrain_decoder(os.path.join(out_dir, f"pretrain-{size}"), preset="gpt2-tiny", max_steps=steps,
                              seq_len=256, batch_size=8,
                              n_docs=4000 if quick else 30000, progress=False)
    save_pretrained_with_tokenizer(result, path)
    return result.model, result.tokenizer


def strategies(out_dir: str, quick: bool) -> list[dict]:
    from fastpt.data.world import World
    from fastpt.finetune import STRATEGIES
    from fastpt.finetune.compare import compare_strategies
    base, tok = pretrained_decoder(out_dir, quick)
    world = World(0)
    # Labels on half of the adjectives, test on the other half: with shared adjectives every
    # strategy (even training from scratch) reaches 100%, which compares nothing.
    train = world.sentiment(64 if quick else 200, seed=1, adjectives="seen")
    test = world.sentiment(200 if quick else 1000, seed=2, adjectives="unseen")
    return compare_strategies(base, tok, STRATEGIES, train, test, epochs=2 if quick else 8)


def icl(out_dir: str, quick: bool) -> list[dict]:
    from fastpt.data.world import ICL_TASKS, World
    from fastpt.icl import few_shot_table
    model, tok = pretrained_decoder(out_dir, quick)
    world = World(0)
    tasks = {task: (world.icl(task, 20 if quick else 100, seed=5), world.icl(task, 200, seed=6))
             for task in ICL_TASKS}
    return few_shot_table(model, tok, tasks, (0, 1, 4))


class _EagerLoRA(torch.nn.Module):
    """LoRA from plain ops (what PEFT computes): base(x) + s * B(A(x))."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.A = torch.nn.Linear(base.in_features, r, bias=False)
        self.B = torch.nn.Linear(r, base.out_features, bias=False)
        torch.nn.init.normal_(self.B.weight, std=0.01)

    def forward(self, x):
        return self.base(x) + self.scale * self.B(self.A(x))


def lora_speed(quick: bool) -> dict:
    """Times the four steps (see the module docstring) from the same base weights. Before
    timing, the first step of fastpt's LoRA is checked against the eager LoRA's (the same
    factors, B nonzero so that A gets a gradient): the loss and every factor's gradient within
    agreement.FP32_TOL["bwd"]. If they disagree, ``lora_agrees`` is false and the LoRA ratios
    are null."""
    import copy

    from fastpt.benchmarks.agreement import FP32_TOL, check_first_calls, tensor_compare
    from fastpt.finetune import add_lora
    from fastpt.finetune.lora import _targets
    from fastpt.models import Decoder, from_name
    from fastpt.nn.int8_linear import Int8Linear
    config = from_name("llama-small", vocab_size=32000, max_position_embeddings=2048)
    if quick:
        config = config.replace(num_layers=2)
    B, T = (2, 128) if quick else (8, 512)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (B, T))
    base = Decoder(config)
    targets = _targets(base, "all-linear")
    models = {impl: copy.deepcopy(base) for impl in ("full", "lora_fastpt", "lora_eager", "frozen")}
    models["frozen"].requires_grad_(False)
    models["frozen"].layers[0].attn_norm.weight.requires_grad_(True)
    add_lora(models["lora_fastpt"], r=16, alpha=32, target_modules="all-linear")
    models["lora_eager"].requires_grad_(False)
    for path in targets:
        parent, _, leaf = path.rpartition(".")
        owner = models["lora_eager"].get_submodule(parent)
        setattr(owner, leaf, _EagerLoRA(getattr(owner, leaf), 16, 32))
    factors = {  # per target: (A, B) of each LoRA model, in the same order
        "lora_fastpt": [(m.lora_A["default"].weight, m.lora_B["default"].weight)
                        for m in map(models["lora_fastpt"].get_submodule, targets)],
        "lora_eager": [(m.A.weight, m.B.weight) for m in map(models["lora_eager"].get_submodule, targets)]}
    with torch.no_grad():  # the same factors in both
        for (a, b), (ea, eb) in zip(factors["lora_fastpt"], factors["lora_eager"], strict=True):
            ea.copy_(a)
            b.copy_(eb)
    steps = {}
    for impl, m in models.items():
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m=m, opt=opt, impl=impl, check=False):
            loss = m(input_ids=ids, labels=ids, return_logits=False).loss
            loss.backward()
            # the check's outputs: the loss and the factors' gradients, before the update
            out = (loss.detach(), *(p.grad for ab in factors[impl] for p in ab)) if check else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out
        steps[impl] = step
    # The LoRA steps' first call is the agreement check, the others' a plain one: each impl's
    # warm-up (the first AdamW step allocates its state).
    agreement, _ = check_first_calls({i: (lambda i=i: steps[i](check=True)) for i in ("lora_eager", "lora_fastpt")},
                                     "lora_eager", tensor_compare(FP32_TOL["bwd"]), "finetune lora_speed")
    lora_agrees, lora_error = agreement["lora_fastpt"]
    steps["full"]()
    steps["frozen"]()
    rounds = 2 if quick else 4
    samples = alternate_rounds(steps, budget_s=0.0, min_rounds=rounds, max_rounds=rounds)
    med = {k: statistics.median(wall for wall, _ in v) for k, v in samples.items()}
    peaks = {k: peak_memory_bytes(fn) / 2**20 for k, fn in steps.items()}
    linears = [mod for mod in models["full"].modules() if isinstance(mod, torch.nn.Linear) and mod is not models["full"].lm_head]
    fp32_bytes = sum(l.weight.numel() * 4 for l in linears[:8])
    int8_bytes = sum(sum(b.numel() * b.element_size() for b in Int8Linear.from_linear(l).buffers())
                     for l in linears[:8])
    return {"shape": f"B={B},T={T},{config.num_layers} layers",
            "step_s": med, "peak_mib": peaks,
            "lora_agrees": lora_agrees, "lora_max_rel_error": lora_error,
            "lora_vs_full": med["full"] / med["lora_fastpt"] if lora_agrees else None,
            "lora_vs_eager_lora": med["lora_eager"] / med["lora_fastpt"] if lora_agrees else None,
            "bound_full_vs_frozen": med["full"] / med["frozen"],
            "bound_eager_lora_vs_frozen": med["lora_eager"] / med["frozen"],
            "int8_frozen_bytes_vs_fp32": int8_bytes / fp32_bytes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated from {','.join(PARTS)}")
    p.add_argument("--out", default="runs/bench-finetune",
                   help="folder of the pre-trained decoder (reused by later runs of the same size)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    only = split_list(args.only)
    check_subsets(p, only=(only, PARTS))
    check_json_path(p, args.json)
    if any(part != "lora_speed" for part in only):
        try:
            check_output_dir(args.out, "--out")
        except ConfigError as e:
            p.error(str(e))
    parts = {"strategies": strategies, "icl": icl, "lora_speed": lambda o, q: lora_speed(q)}
    results = {}
    for name in only:
        start = time.perf_counter()
        results[name] = parts[name](args.out, args.quick)
        print(f"== {name} ({time.perf_counter() - start:.0f} s)")
        print(json.dumps(results[name], indent=1))
    if args.json:
        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
