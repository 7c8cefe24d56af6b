"""Section "finetune": the pre-trained decoder fine-tuned as a sentiment classifier with each
strategy, and the same architecture trained from random weights. The labelled reviews use
half of the adjectives and the test reviews the other half, so the test polarity can only
come from pre-training (fastpt.finetune.compare)."""

from __future__ import annotations

from fastpt.demo import plots
from fastpt.demo.report import row_printer

HEADERS = ["strategy", "test accuracy", "trainable parameters", "train s", "step ms", "peak MiB"]

LABELS = {
    "full": "full",
    "partial": "partial (embeddings + first layer frozen)",
    "probe": "linear probe",
    "lora": "LoRA r=4 (q, v)",
    "int8_lora": "LoRA r=4 on an int8 base",
    "adapters": "Houlsby adapters (d/4)",
    "prefix": "prefix tuning (8 positions)",
    "prompt": "prompt tuning (8 tokens)",
    "ia3": "IA3",
    "bitfit": "BitFit",
    "full, from scratch": "full, from random weights",
}


def _percent(p: float) -> str:
    return f"{p:.0f}%" if p >= 10 else f"{p:.1f}%" if p >= 1 else f"{p:.2f}%"


def _row(r: dict) -> list[str]:
    return [LABELS.get(r["strategy"], r["strategy"]), f"{100 * r['accuracy']:.1f}%",
            f"{r['trainable']:,} ({_percent(r['trainable_pct'])})", f"{r['train_s']:.2f}",
            f"{r['step_ms']:.1f}", f"{r['peak_mib']:.2f}"]


def run(ctx, sec) -> None:
    from tqdm.auto import tqdm

    from fastpt.finetune.compare import compare_strategies, steps_per_run
    cfg = ctx.config
    base, tokenizer = ctx.decoder(sec)
    train = ctx.world.sentiment(cfg.n_train, seed=1, adjectives="seen")
    test = ctx.world.sentiment(cfg.n_test, seed=2, adjectives="unseen")
    total = steps_per_run(len(train), cfg.finetune_epochs) * (len(cfg.strategies) + 1)
    with tqdm(total=total, desc="fine-tuning", disable=not cfg.progress, leave=False) as bar:
        show = row_printer(HEADERS, [41, 13, 20, 7, 7, 8], write=bar.write)
        rows = compare_strategies(base, tokenizer, cfg.strategies, train, test,
                                  epochs=cfg.finetune_epochs, seed=cfg.seed, progress=bar,
                                  on_row=lambda r: show(_row(r)))
    sec.table(HEADERS, [_row(r) for r in rows], echo=False, caption=(
        f"The pre-trained {cfg.decoder_preset} decoder as a 2-class sentiment "
        f"classifier: {len(train)} labelled reviews on half of the adjectives, {cfg.finetune_epochs} "
        f"epochs, tested on {len(test)} reviews with the other half. Peak memory: what torch's "
        "allocator holds during one training step."))
    plots.finetune_comparison(ctx.path("finetune.png"), rows, LABELS)
    sec.image("finetune.png", "test accuracy and trainable parameters per strategy")
