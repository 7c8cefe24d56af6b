"""Section "pretrain": a tiny BERT-style encoder with masked language modelling and a tiny
decoder with causal language modelling, both on the embedded world corpus (tokenizer trained
on it), through fastpt.train.recipes; loss curves."""

from __future__ import annotations

import time

from fastpt.demo import plots

HEADERS = ["model", "objective", "parameters", "steps", "first loss", "final loss", "seconds"]


def run(ctx, sec) -> None:
    cfg = ctx.config
    rows, curves = [], {}
    for kind, preset, objective in (("encoder", cfg.encoder_preset, "MLM"),
                                    ("decoder", cfg.decoder_preset, "causal LM")):
        start = time.perf_counter()
        result = ctx.pretrain(kind)
        seconds = time.perf_counter() - start
        points = [(r["step"], r["loss"]) for r in result.metrics if r.get("loss") is not None]
        if not points:
            raise RuntimeError(f"the {kind} run logged no loss")
        parameters = sum(p.numel() for p in result.model.parameters())
        rows.append([f"{kind} ({preset})", objective, f"{parameters:,}", points[-1][0],
                     f"{points[0][1]:.3f}", f"{points[-1][1]:.3f}", f"{seconds:.1f}"])
        curves[f"{kind} ({preset}, {objective})"] = points
    sec.table(HEADERS, rows, caption=(
        f"{cfg.n_docs} documents of the world corpus, vocabulary {cfg.vocab_size}, sequences "
        f"of up to {cfg.seq_len} tokens, learning rate {cfg.pretrain_lr:g}. The models are saved "
        "in `encoder/` and `decoder/` (Hugging Face layout + tokenizer.json): try "
        "`fastpt generate --model <out>/decoder --prompt \"...\"`."))
    plots.loss_curves(ctx.path("pretrain_loss.png"), curves)
    sec.image("pretrain_loss.png", "pre-training loss curves")
