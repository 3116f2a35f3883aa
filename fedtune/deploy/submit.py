"""Submit a prepared run directory to a SuperLink and follow it to the end.

The ServerApp reads the run directory's config.toml (and to resume, its
checkpoint) and writes metrics, ledger and summary there, so the directory must
be on a file system the ServerApp shares: the same machine for `fedtune deploy
local`, the shared results volume under docker-compose. Rounds are printed from
metrics.jsonl as they land; Flower's own status says whether the run completed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fedtune import checkpoint
from fedtune.deploy.flwr_cli import FlwrCli
from fedtune.errors import FedtuneError
from fedtune.report.console import format_round
from fedtune.report.rows import SUMMARY, RunSummary, read_rows, read_summary

APP = Path(__file__).parents[1] / "app" / "flower"  # the Flower app that names fedtune's ServerApp and ClientApp


def run_to_end(flwr: FlwrCli, run_dir: Path, resume: bool = False, alive: Callable[[], None] = lambda: None,
               status_every_s: float = 5.0) -> RunSummary:
    """Run the job in ``run_dir`` on the federation; returns its summary. ``alive``
    raises if a process the run needs has died. Ctrl-C stops the run on the SuperLink."""
    run_id = flwr.submit(APP, {"run-dir": str(run_dir.resolve()), "resume": resume})
    print(f"run {run_id} submitted to the SuperLink", flush=True)
    shown = checkpoint.load(run_dir)["round"] if resume else -1  # the last round printed
    status, details, checked = "", "", 0.0
    try:
        while not status.startswith("finished"):
            time.sleep(1.0)
            shown = _print_new_rounds(run_dir, shown)
            alive()
            # Each check is a `flwr` process: every few seconds, every second once the summary is written.
            if time.monotonic() - checked >= status_every_s or (run_dir / SUMMARY).exists():
                status, details = flwr.status(run_id)
                checked = time.monotonic()
    except KeyboardInterrupt:
        flwr.stop(run_id)
        raise
    _print_new_rounds(run_dir, shown)
    if status != "finished:completed":
        raise FedtuneError(f"run {run_id} {status.removeprefix('finished:')}: {details}")
    return read_summary(run_dir)


def _print_new_rounds(run_dir: Path, shown: int) -> int:
    """Print the rows of metrics.jsonl after round ``shown``; returns the last round printed."""
    for row in read_rows(run_dir, after=shown):
        print(format_round(row, dropped=True), flush=True)  # the ServerApp's log is elsewhere
        shown = row.round
    return shown
