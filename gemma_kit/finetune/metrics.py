"""Metrics of a run: one JSON object per line in OUT_DIR/metrics.jsonl, and a loss-curve PNG.

Training rows carry step, loss, grad_norm, lr, loss_tokens, tokens_per_s and elapsed; held-out
rows carry step, eval_loss and eval_ppl. A resumed run first drops the rows written after the
checkpoint it resumes from (those steps are trained again), so the file always describes one
consistent run.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys


class MetricsLog:
    """Appends rows to a JSONL file, flushing each one (a killed run keeps what it logged)."""

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except json.JSONDecodeError:  # a line cut short by a killed run
        return math.inf


def read_metrics(path: str | os.PathLike) -> list[dict]:
    rows = []
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_losses(metrics_path: str | os.PathLike,
                png_path: str | os.PathLike) -> pathlib.Path | None:
    """Training and held-out loss against step, as a PNG. Needs matplotlib ([finetune] extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'gemma-kit[finetune]'): no loss PNG",
              file=sys.stderr)
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, label="training loss", linewidth=0.8, alpha=0.4)
        window = max(1, len(losses) // 10)
        if window > 1:  # small batches are noisy: a running mean shows the trend
            recent = [losses[max(0, i - window + 1):i + 1] for i in range(len(losses))]
            smooth = [sum(r) / len(r) for r in recent]
            ax.plot(steps, smooth, label=f"training loss, mean of {window}", linewidth=1.5)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = pathlib.Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
