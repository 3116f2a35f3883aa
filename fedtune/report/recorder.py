"""A run's records as it goes: the ledger of every message, one RoundRow per
evaluated round (appended to metrics.jsonl at once and printed), and at the end
the summary. A resumed run first cuts both files back to its checkpoint's round."""

from __future__ import annotations

import time
from pathlib import Path

from fedtune.checkpoint import cut_back
from fedtune.config import RunConfig
from fedtune.ledger import Ledger
from fedtune.report.console import print_round
from fedtune.report.rows import METRICS, RoundRow, RunSummary, append_row, from_json
from fedtune.report.summary import summarize
from fedtune.tasks import EvalResult


class Recorder:
    def __init__(self, run_dir: Path, majority: float | None, resumed_round: int | None = None, wall_before: float = 0.0,
                 metric: str = "accuracy") -> None:
        self.run_dir, self.majority, self.metric = run_dir, majority, metric
        self.started = time.perf_counter() - wall_before  # a resumed run's clock goes on
        ledger = run_dir / "ledger.jsonl"
        if resumed_round is None:
            self.rows: list[RoundRow] = []
            self.ledger = Ledger(ledger)
        else:
            self.rows = [from_json(RoundRow, r) for r in cut_back(run_dir / METRICS, resumed_round)]
            self.ledger = Ledger.resume(ledger, resumed_round)

    def wall_time(self) -> float:
        return time.perf_counter() - self.started

    def record(self, rnd: int, result: EvalResult, **fields: object) -> RoundRow:
        """Round ``rnd``'s row, with its bytes from the ledger; on disk and on the console at once."""
        row = RoundRow(
            round=rnd,
            score=result.score,
            loss=result.loss,
            macro_f1=result.macro_f1,
            per_class={k: list(v) for k, v in result.per_class.items()} if result.per_class else None,
            perplexity=result.perplexity,
            metric=self.metric,
            bytes_down=self.ledger.total("down", rnd),
            bytes_up=self.ledger.total("up", rnd),
            cum_bytes_down=self.ledger.total("down"),
            cum_bytes_up=self.ledger.total("up"),
            clients=sum(1 for t in self.ledger.transfers if t.round == rnd and t.direction == "up"),
            wall_time_s=round(self.wall_time(), 3),
            **fields,
        )
        self.rows.append(row)
        append_row(self.run_dir, row)
        print_round(row, self.rows[0].score if rnd else None, self.majority)
        return row

    def summary(self, config: RunConfig, stopped: str | None, privacy: dict[str, object] | None = None) -> RunSummary:
        return summarize(config, self.rows, self.ledger, self.majority, self.wall_time(), stopped, privacy, self.metric)
