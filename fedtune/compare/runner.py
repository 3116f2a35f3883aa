"""Run a comparison's cells, each a `fedtune run` in its own process (Ray, the model
and its memory go away with it), logged to CELL_DIR/run.log; its progress is read
from the run directory's metrics as they land. A finished cell is not run again
and an interrupted one is resumed from its checkpoint, so rerunning `fedtune
compare` after a crash finishes the grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fedtune import checkpoint
from fedtune.checkpoint import CHECKPOINT
from fedtune.compare.grid import Cell, Comparison
from fedtune.report.console import format_round
from fedtune.report.rows import METRIC_NAMES, SUMMARY, read_rows, read_summary


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    run_dir: Path | None  # None: the cell failed
    error: str = ""


def cell_dir(comparison: Comparison, cell: Cell) -> Path:
    return comparison.output_dir / "cells" / cell.slug


def finished_run(directory: Path) -> Path | None:
    done = sorted(directory.glob(f"*/{SUMMARY}"))
    return done[-1].parent if done else None


def finished_cells(comparison: Comparison) -> list[CellResult]:
    """The cells finished so far, in grid order; the others are left out (not failed)."""
    return [CellResult(cell, run_dir) for cell in comparison.cells if (run_dir := finished_run(cell_dir(comparison, cell)))]


def _follow(child: subprocess.Popen, directory: Path, shown: int, echo: Callable[[str], None]) -> None:
    """Echo the rounds of the newest run directory under ``directory`` after round
    ``shown`` as they land, until ``child`` ends."""
    while True:
        ended = child.poll() is not None
        runs = sorted(p.parent for p in directory.glob("*/config.toml"))
        for row in read_rows(runs[-1], after=shown) if runs else []:
            echo(format_round(row).strip())
            shown = row.round
        if ended:
            return
        time.sleep(1.0)


def run_order(cells: list[Cell]) -> list[Cell]:
    """The cells seed by seed (stable within a seed), so the first cells finished
    are whole seeds of every other combination."""
    seeds = list(dict.fromkeys(cell.values.get("seed") for cell in cells))
    return sorted(cells, key=lambda cell: seeds.index(cell.values.get("seed")))


def run_cells(comparison: Comparison, echo=print) -> list[CellResult]:
    """Every cell finished, in grid order; ``comparison.parallel`` cells at a time,
    splitting the machine's cores between them, in ``run_order``."""
    cores = os.cpu_count() or 1
    clients_each = max(1, cores // comparison.parallel)
    total = len(comparison.cells)

    def one(numbered: tuple[int, Cell]) -> CellResult:
        i, cell = numbered
        head = f"[{i}/{total}] {cell.label}"
        directory = cell_dir(comparison, cell)
        if run_dir := finished_run(directory):
            echo(f"{head}: finished earlier")
            return CellResult(cell, run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        interrupted = sorted(p.parent for p in directory.glob(f"*/{CHECKPOINT}"))
        shown = -1  # the last round echoed
        if interrupted:
            args = ["--resume", str(interrupted[-1])]
            shown = checkpoint.load(interrupted[-1])["round"]
            echo(f"{head}: resuming {interrupted[-1]}")
        else:
            overrides = [
                *cell.overrides,
                f"run.target_accuracy={comparison.target_accuracy}",
                f"run.output_dir={json.dumps(str(directory))}",
                f"simulation.max_parallel_clients={clients_each}",
            ]
            args = [str(comparison.base_config), *(a for o in overrides for a in ("--set", o))]
            echo(f"{head}: running")
        log = directory / "run.log"
        started = time.perf_counter()
        with log.open("a") as out, subprocess.Popen(
            [sys.executable, "-m", "fedtune.cli", "run", *args], stdout=out, stderr=subprocess.STDOUT
        ) as child:
            _follow(child, directory, shown, lambda line: echo(f"{head}: {line}"))
        code = child.returncode
        run_dir = finished_run(directory)
        if code or run_dir is None:
            last = log.read_text().strip().splitlines()[-1:] or ["no output"]
            echo(f"{head}: FAILED (exit {code}): {last[0]}  [log: {log}]")
            return CellResult(cell, None, last[0])
        summary = read_summary(run_dir)
        echo(f"{head}: done in {time.perf_counter() - started:.0f} s, final {METRIC_NAMES[summary.metric]} {summary.final_score:.3f}")
        return CellResult(cell, run_dir)

    with ThreadPoolExecutor(max_workers=comparison.parallel) as pool:
        finished = {result.cell.label: result for result in pool.map(one, enumerate(run_order(comparison.cells), start=1))}
    return [finished[cell.label] for cell in comparison.cells]
