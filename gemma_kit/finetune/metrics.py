"""The metrics of a run (metrics.jsonl, loss.png): gemma_kit.training.metrics, kept importable
under its earlier name."""

from gemma_kit.training.metrics import (
    MetricsLog,
    plot_losses,
    plot_metrics,
    read_metrics,
)

__all__ = ["MetricsLog", "plot_losses", "plot_metrics", "read_metrics"]
