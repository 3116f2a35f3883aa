"""The run directory: ``<output_dir>/<name>-<timestamp>/`` with the resolved config
(reusable as input), and what a finished run adds: summary.json and the plot."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig
from fedtune.report.plots import plot_score_vs_bytes
from fedtune.report.rows import SUMMARY, RoundRow, RunSummary, read_rows, read_summary, to_json
from fedtune.tasks import EvalResult, Generation

GENERATIONS = "generations.jsonl"


def plot_path(run_dir: Path, summary: RunSummary) -> Path:
    return run_dir / f"{summary.metric}_vs_bytes.png"


def create_run_dir(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(config.run.output_dir).expanduser() / f"{config.run.name}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    write_atomic(run_dir / "config.toml", to_toml(config.to_dict()))
    return run_dir


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    # JSON literals of str, int, float, bool and lists of them are valid TOML
    # values; a table of them is written inline.
    def literal(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()) + "}"
        return json.dumps(value)

    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {literal(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def finish(run_dir: Path, rows: list[RoundRow], summary: RunSummary) -> None:
    write_atomic(run_dir / SUMMARY, json.dumps(to_json(summary), indent=2, allow_nan=False) + "\n")
    plot_score_vs_bytes(rows, plot_path(run_dir, summary), summary)


def write_generations(run_dir: Path, zero_shot: tuple[Generation, ...], final: tuple[Generation, ...]) -> None:
    """generations.jsonl: per held-out prompt, its reference and the zero-shot and final model's responses."""
    lines = [json.dumps({"prompt": z.prompt, "reference": z.reference, "zero_shot": z.output, "final": f.output})
             for z, f in zip(zero_shot, final)]
    write_atomic(run_dir / GENERATIONS, "\n".join(lines) + "\n")


def add_centralized(run_dir: Path, result: EvalResult, steps: int) -> RunSummary:
    """Fold the centralized baseline into summary.json and the plot."""
    summary = dataclasses.replace(read_summary(run_dir), centralized_score=result.score,
                                  centralized_loss=result.loss, centralized_steps=steps)
    finish(run_dir, read_rows(run_dir), summary)
    return summary
