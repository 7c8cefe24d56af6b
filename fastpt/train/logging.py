"""Metrics to JSONL and CSV as training goes, and a loss-curve PNG at the end."""

from __future__ import annotations

import csv
import json
import os


class MetricsLog:
    """Append-only metrics: one JSON object per line, plus a CSV with a fixed header."""

    COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "eval_loss")

    def __init__(self, output_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.jsonl = os.path.join(output_dir, "metrics.jsonl")
        self.csv = os.path.join(output_dir, "metrics.csv")
        self.rows: list[dict] = []
        if enabled:
            os.makedirs(output_dir, exist_ok=True)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        new = not os.path.exists(self.csv)
        with open(self.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def plot(self, path: str | None = None) -> str | None:
        """Write the training (and evaluation) loss curve as a PNG; returns its path."""
        train = [(r["step"], r["loss"]) for r in self.rows if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if r.get("eval_loss") is not None]
        if not self.enabled or not train:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        path = path or os.path.join(os.path.dirname(self.jsonl), "loss_curve.png")
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*train), label="train")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
