"""The RunSummary of a run, from its rows, its ledger and its config."""

from __future__ import annotations

from pathlib import Path

from fedtune.config import RunConfig
from fedtune.ledger import Ledger
from fedtune.report.rows import RoundRow, RunSummary


def summarize(config: RunConfig, rows: list[RoundRow], ledger: Ledger, majority: float | None, wall: float,
              stopped: str | None = None, privacy: dict[str, object] | None = None, metric: str = "accuracy") -> RunSummary:
    """``rows`` start with round 0 (the zero-shot model); ``privacy``: the privacy
    policy's summary fields (mode, epsilon spent, delta), if the run has DP. Per
    client-round figures count the messages that were sent: a client that vanished
    received its downlink but sent no uplink."""
    client_rounds, downlinks = ledger.count("up"), ledger.count("down")
    stages = sorted({s for r in rows for s in r.rejected or {}})
    scored = [r.score for r in rows[1:] if r.score is not None]
    return RunSummary(
        method=config.federation.method,
        model=config.model.name,
        dataset=Path(config.data.source).name,
        rounds=rows[-1].round,
        metric=metric,
        final_score=scored[-1] if scored else None,
        best_score=max(scored, default=None),
        final_loss=rows[-1].loss,
        majority_score=majority,
        zero_shot_score=rows[0].score,
        zero_shot_loss=rows[0].loss,
        final_macro_f1=rows[-1].macro_f1,
        final_per_class=rows[-1].per_class,
        final_perplexity=rows[-1].perplexity,
        total_bytes_down=ledger.total("down"),
        total_bytes_up=ledger.total("up"),
        bytes_per_client_round_down=ledger.total("down") // max(downlinks, 1),
        bytes_per_client_round_up=ledger.total("up") // max(client_rounds, 1),
        message_bytes_down=ledger.total("down", field="message_bytes"),
        message_bytes_up=ledger.total("up", field="message_bytes"),
        client_rounds=client_rounds,
        wall_time_s=round(wall, 1),
        dropped={s: sum((r.rejected or {}).get(s, 0) for r in rows) for s in stages} or None,
        retried_rounds=sum(r.attempts is not None for r in rows) or None,
        skipped_rounds=sum(r.skipped for r in rows) or None,
        stopped=stopped,
        **(privacy or {}), **_hardware(rows), **target_figures(config.run.target_accuracy, rows),
    )


def _hardware(rows: list[RoundRow]) -> dict:
    if rows[-1].hardware is None:
        return {}
    played = [r.hardware for r in rows if r.hardware is not None]
    devices = sorted({d for h in played for d in h.took_part})
    return {
        "sim_time_s": rows[-1].hardware.sim_time_s,
        "client_rounds_by_device": {d: sum(h.took_part.get(d, 0) for h in played) for d in devices},
        "failed": sum(h.failed for h in played),
        "stragglers": sum(h.stragglers for h in played),
    }


def target_figures(target: float, rows: list[RoundRow]) -> dict:
    """The first round at the target score (0: none), with the bytes and simulated
    time spent by then: RunSummary's target fields."""
    if not target:
        return {}
    hit = next((r for r in rows[1:] if r.score is not None and r.score >= target), None)
    if hit is None:
        return {"target_accuracy": target, "rounds_to_target": None, "bytes_to_target": None, "sim_time_to_target_s": None}
    return {
        "target_accuracy": target,
        "rounds_to_target": hit.round,
        "bytes_to_target": hit.cum_bytes_down + hit.cum_bytes_up,
        "sim_time_to_target_s": hit.hardware.sim_time_s if hit.hardware else None,
    }
