"""The typed records of a run: one RoundRow per evaluated round (metrics.jsonl) and
the RunSummary (summary.json). Report, compare, deploy and the console all read
and write them through this module; the JSON files are their only other form."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
METRIC_NAMES = {"accuracy": "accuracy", "rouge_l": "Rouge-L"}  # a task's score, as people read it


@dataclass(frozen=True)
class HardwareRow:
    """A round on the simulated fleet (hardware/)."""

    sim_round_s: float  # simulated duration of this round
    sim_time_s: float  # simulated clock after it
    failed: int  # clients whose device failed mid-round
    stragglers: int  # clients past hardware.deadline_s
    took_part: dict[str, int] = field(default_factory=dict)  # aggregated updates by device class


@dataclass(frozen=True)
class Dropped:
    """An uplink the server refused, or a client it lost, and why."""

    client: str
    stage: str  # structure, size, header, codec, tensors, values, examples, norm, error; failed: raised or vanished
    reason: str


@dataclass(frozen=True)
class RoundRow:
    round: int  # 0: the model before any training (zero-shot)
    score: float | None  # the task metric: accuracy (classify), Rouge-L (instruct; None on rounds that do not generate)
    loss: float
    bytes_down: int  # payload bytes this round (every attempt)
    bytes_up: int
    cum_bytes_down: int
    cum_bytes_up: int
    clients: int  # uplinks received this round, every attempt, rejected ones too
    wall_time_s: float
    sampled: int | None = None  # clients sent a downlink, every attempt
    attempts: int | None = None  # tries of this round, when more than one (federation.round_retries)
    aggregated: int | None = None  # updates folded into the model
    rejected: dict[str, int] | None = None  # uplinks refused and clients lost, by stage
    dropped: list[Dropped] | None = None  # each of them, with its reason
    train_loss: float | None = None  # mean over the clients' valid uplinks
    # Wall time of the training phase against the clients' own training time:
    # their ratio is the framework's overhead (benchmarks/round_overhead.py).
    round_train_time_s: float | None = None
    client_train_time_s: float | None = None
    skipped: bool = False  # too few valid updates: the model is unchanged
    epsilon: float | None = None  # privacy spent so far (the largest over clients)
    hardware: HardwareRow | None = None
    macro_f1: float | None = None  # classify with more than two classes
    per_class: dict[str, list[float]] | None = None  # class -> [precision, recall, F1] (with macro_f1)
    perplexity: float | None = None  # instruct
    metric: str = "accuracy"  # what score is: accuracy (classify) or rouge_l (instruct)


@dataclass(frozen=True)
class RunSummary:
    method: str
    model: str
    rounds: int
    final_score: float | None  # of the last round that measured it (instruct: generated)
    best_score: float | None
    final_loss: float
    majority_score: float | None  # classify: always predicting the majority class
    zero_shot_score: float | None
    total_bytes_down: int
    total_bytes_up: int
    bytes_per_client_round_down: int
    bytes_per_client_round_up: int
    message_bytes_down: int
    message_bytes_up: int
    client_rounds: int  # uplinks received
    wall_time_s: float
    dropped: dict[str, int] | None = None  # uplinks refused and clients lost over the run, by stage
    retried_rounds: int | None = None
    skipped_rounds: int | None = None
    privacy: str | None = None  # "client" or "sample" level DP, with the epsilon spent at delta
    epsilon: float | None = None
    delta: float | None = None
    sim_time_s: float | None = None  # the simulated fleet's clock, and what happened on it
    client_rounds_by_device: dict[str, int] | None = None
    failed: int | None = None
    stragglers: int | None = None
    target_accuracy: float | None = None  # run.target_accuracy, and when it was first reached
    rounds_to_target: int | None = None
    bytes_to_target: int | None = None
    sim_time_to_target_s: float | None = None
    stopped: str | None = None  # why the run ended before run.rounds
    centralized_score: float | None = None  # the centralized baseline (run.centralized_baseline)
    centralized_loss: float | None = None
    centralized_steps: int | None = None
    metric: str = "accuracy"  # what the scores are: accuracy (classify) or rouge_l (instruct)
    dataset: str = ""  # data.source's name
    zero_shot_loss: float | None = None
    final_macro_f1: float | None = None
    final_per_class: dict[str, list[float]] | None = None  # class -> [precision, recall, F1]
    final_perplexity: float | None = None

    @property
    def total_bytes(self) -> int:
        return self.total_bytes_down + self.total_bytes_up


def to_json(record: RoundRow | RunSummary) -> dict[str, Any]:
    """The record's JSON form: unset fields (None, False) left out, and a value that
    is not finite (a diverged loss) written as null, with what it was under
    "non_finite": the files hold valid JSON only."""
    data = {k: v for k, v in dataclasses.asdict(record).items() if v is not None and v is not False}
    odd = {k: str(v) for k, v in data.items() if isinstance(v, float) and not math.isfinite(v)}
    return data | dict.fromkeys(odd) | ({"non_finite": odd} if odd else {})


def from_json(cls: type, data: dict[str, Any]) -> Any:
    """A RoundRow or RunSummary from its JSON form, non-finite values and left-out
    Nones restored; keys it does not know (written by a newer fedtune) are left out."""
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    # to_json leaves None out: a field without a default that is absent was None.
    values = {f.name: None for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    values |= {k: v for k, v in data.items() if k in known}
    values |= {k: float(v) for k, v in data.get("non_finite", {}).items() if k in known}
    if values.get("hardware") is not None:
        values["hardware"] = HardwareRow(**values["hardware"])
    if cls is RoundRow and values.get("dropped") is not None:
        values["dropped"] = [Dropped(**d) for d in values["dropped"]]
    return cls(**values)


def append_row(run_dir: Path, row: RoundRow) -> None:
    """Add a row to metrics.jsonl at once: every finished round is on disk."""
    with (run_dir / METRICS).open("a") as f:
        f.write(json.dumps(to_json(row), allow_nan=False) + "\n")


def read_rows(run_dir: Path, after: int = -1) -> list[RoundRow]:
    """The rows of metrics.jsonl after round ``after``; a line still being written ends them."""
    path, rows = run_dir / METRICS, []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = from_json(RoundRow, json.loads(line))
        except json.JSONDecodeError:
            break
        if row.round > after:
            rows.append(row)
    return rows


def read_summary(run_dir: Path) -> RunSummary:
    return from_json(RunSummary, json.loads((run_dir / SUMMARY).read_text()))
