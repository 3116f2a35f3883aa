"""Plots written as PNG files (matplotlib, file-only backend)."""

from __future__ import annotations

import os
from pathlib import Path

from fedtune.report.rows import RoundRow, RunSummary


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as PNG atomically and free it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)
    pyplot().close(fig)


def plot_accuracy_vs_bytes(rows: list[RoundRow], path: Path, summary: RunSummary) -> None:
    plt = pyplot()
    total = [(r.cum_bytes_down + r.cum_bytes_up) / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(total, [r.accuracy for r in rows], marker="o", label=summary.method)
    ax.axhline(summary.majority_accuracy, color="grey", linestyle=":", label="majority class")
    if summary.centralized_accuracy is not None:
        ax.axhline(summary.centralized_accuracy, color="green", linestyle="--", label="centralized")
    for r, x in zip(rows, total):
        ax.annotate(f"r{r.round}", (x, r.accuracy), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("cumulative bytes, down + up (MB)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{summary.method} on {summary.model}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
