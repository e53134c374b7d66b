"""Metrics of a run: one JSON object per line in OUT_DIR/metrics.jsonl, and PNG plots of them.

Training rows carry step, loss, grad_norm, lr, the objective's own metrics (fine-tuning:
loss_tokens), tokens_per_s and elapsed; held-out rows carry step and what the objective's
evaluation returns (fine-tuning: eval_loss and eval_ppl). A resumed run first drops the rows
written after the checkpoint it resumes from (those steps are trained again), so the file always
describes one consistent run.
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
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) <= resume_step
            ]
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


def plot_metrics(
    metrics_path: str | os.PathLike,
    png_path: str | os.PathLike,
    series: dict[str, str],
    *,
    ylabel: str,
    smooth: tuple[str, ...] = (),
    markers: tuple[str, ...] = (),
) -> pathlib.Path | None:
    """Metrics against step, as a PNG (None, with a note, without matplotlib).

    series: {key in the metrics rows: label}; each key is drawn from the rows that have it.
    smooth: keys that also get a running mean over a tenth of their points (one step's value
    is noisy with small batches); markers: keys drawn with dots (few points, e.g. held-out).
    Needs matplotlib ([finetune] extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed (pip install 'gemma-kit[finetune]'): no "
            f"{pathlib.Path(png_path).name}",
            file=sys.stderr,
        )
        return None
    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, label in series.items():
        points = [(r["step"], r[key]) for r in rows if key in r]
        if not points:
            continue
        steps, values = zip(*points)
        if key in markers:
            ax.plot(steps, values, "o-", label=label)
            continue
        ax.plot(steps, values, label=label, linewidth=0.8, alpha=0.4 if key in smooth else 1.0)
        window = max(1, len(values) // 10)
        if key in smooth and window > 1:
            recent = [values[max(0, i - window + 1) : i + 1] for i in range(len(values))]
            ax.plot(
                steps,
                [sum(r) / len(r) for r in recent],
                label=f"{label}, mean of {window}",
                linewidth=1.5,
            )
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = pathlib.Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path


def plot_losses(
    metrics_path: str | os.PathLike,
    png_path: str | os.PathLike,
    *,
    ylabel: str = "cross-entropy (nats / token)",
) -> pathlib.Path | None:
    """Training and held-out loss against step (the `loss` and `eval_loss` rows), as a PNG."""
    return plot_metrics(
        metrics_path,
        png_path,
        {"loss": "training loss", "eval_loss": "held-out loss"},
        ylabel=ylabel,
        smooth=("loss",),
        markers=("eval_loss",),
    )
