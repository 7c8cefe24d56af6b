"""Metrics to JSONL and CSV as training goes, and a loss-curve PNG at the end."""

from __future__ import annotations

import csv
import json
import os

from fastpt._atomic import atomic_write


class MetricsLog:
    """Append-only metrics: one JSON object per line, plus a CSV with a fixed header (rewritten
    only when a resumed run drops the rows after its checkpoint). Keys outside the CSV's columns
    (the terms of a composite loss, DPO's rewards) are in the JSONL only."""

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
            self._csv_rows(f, [row], header=new)

    def resume(self, step: int) -> None:
        """Continue the log of a run resumed from its checkpoint at ``step``. Rows after it were
        written by the run that died after that checkpoint, and the resumed run writes them
        again: they are dropped from both files. The earlier rows are read back, so the loss
        curve covers the whole run."""
        if not self.enabled:
            self.rows = [r for r in self.rows if r["step"] <= step]
            return
        rows = []
        if os.path.exists(self.jsonl):
            with open(self.jsonl) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:  # the last line of a process killed while writing it
                        continue
                    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                        rows.append(row)
        self.rows = rows

        def write_jsonl(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                self._csv_rows(f, rows, header=True)
        atomic_write(self.jsonl, write_jsonl)
        atomic_write(self.csv, write_csv)

    def _csv_rows(self, f, rows: list, header: bool) -> None:
        """Write ``rows`` to the open CSV file ``f`` in the fixed columns (keys outside them are
        left out, missing ones left empty), after the header line when ``header``."""
        writer = csv.DictWriter(f, fieldnames=self.COLUMNS, extrasaction="ignore")
        if header:
            writer.writeheader()
        writer.writerows(rows)

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
