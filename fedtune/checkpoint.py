"""Resume after a crash. After every round the server saves what it needs to
continue (the round, the method's server state, the privacy accountant, the
simulated clock) to RUN_DIR/checkpoint.pt, replaced atomically; `fedtune run
--resume RUN_DIR` continues after the last completed round. metrics.jsonl and
ledger.jsonl are appended as a round goes, so they may hold part of the round a
crash interrupted: resuming cuts them back to the checkpoint's round."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fedtune.errors import FedtuneError

CHECKPOINT = "checkpoint.pt"


def save(run_dir: Path, state: dict) -> None:
    tmp = run_dir / f"{CHECKPOINT}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)  # a crash leaves the old checkpoint or the new, never half of one


def require(run_dir: Path) -> Path:
    """The checkpoint of ``run_dir``, or a one-line error if there is none."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FedtuneError(f"{run_dir} has no {CHECKPOINT}: nothing to resume (no round finished, or not a run directory)")
    return path


def load(run_dir: Path) -> dict:
    path = require(run_dir)
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise FedtuneError(f"cannot read {path}: {exc}") from None


def cut_back(path: Path, last_round: int) -> list[dict]:
    """The records of a JSON-lines file up to ``last_round``, the file rewritten
    (atomically) to hold only those; a line cut short by the crash ends the file."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record["round"] <= last_round:
            records.append(record)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
    return records
