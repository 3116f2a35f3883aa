"""Plots written as PNG files (matplotlib, file-only backend)."""

from __future__ import annotations

import os
from pathlib import Path

from fedtune.report.rows import METRIC_NAMES, RoundRow, RunSummary


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


def plot_score_vs_bytes(rows: list[RoundRow], path: Path, summary: RunSummary) -> None:
    """The task's score after each evaluated round against the bytes sent so far."""
    plt = pyplot()
    rows = [r for r in rows if r.score is not None]
    total = [(r.cum_bytes_down + r.cum_bytes_up) / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(total, [r.score for r in rows], marker="o", label=summary.method)
    if summary.majority_score is not None:
        ax.axhline(summary.majority_score, color="grey", linestyle=":", label="majority class")
    if summary.centralized_score is not None:
        ax.axhline(summary.centralized_score, color="green", linestyle="--", label="centralized")
    for r, x in zip(rows, total):
        ax.annotate(f"r{r.round}", (x, r.score), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("cumulative bytes, down + up (MB)")
    ax.set_ylabel(f"held-out {METRIC_NAMES[summary.metric]}")
    ax.set_title(f"{summary.method}, {summary.model} on {summary.dataset}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
