"""What a person reads: one line per round, wherever a run is watched (`fedtune run`,
`deploy submit`, `compare`), and the summary table at the end."""

from __future__ import annotations

from tqdm import tqdm

from fedtune.report.rows import METRIC_NAMES, RoundRow, RunSummary


def format_round(row: RoundRow, zero_shot: float | None = None, majority: float | None = None, dropped: bool = False) -> str:
    """One round: the task's score against the baselines known, loss, bytes, privacy spent,
    and who took part; with ``dropped``, a line more for each uplink refused or
    client lost (where the server's own log is not on the console)."""
    head = "zero-shot" if row.round == 0 else f"round {row.round}"
    baselines = [f"zero-shot {zero_shot:.3f}"] if zero_shot is not None and row.round else []
    baselines += [f"majority class {majority:.3f}"] if majority is not None else []
    reference = f" ({', '.join(baselines)})" if baselines else ""
    privacy = f"  epsilon {row.epsilon:.2f}" if row.epsilon is not None else ""
    score = f"{METRIC_NAMES[row.metric]} {row.score:.3f}{reference}  " if row.score is not None else ""
    extra = f"  macro-F1 {row.macro_f1:.3f}" if row.macro_f1 is not None else ""
    extra += f"  perplexity {row.perplexity:.2f}" if row.perplexity is not None else ""
    line = (f"{head:>9}: {score}loss {row.loss:.3f}{extra}  "
            f"down {human_bytes(row.bytes_down)}  up {human_bytes(row.bytes_up)}{privacy}")
    if row.sampled is not None:
        line += f"  clients {row.aggregated or 0}/{row.sampled}"
    if row.rejected:
        line += "  dropped: " + ", ".join(f"{stage} {n}" for stage, n in row.rejected.items())
    if row.attempts:
        line += f"  ({row.attempts} tries)"
    if row.skipped:
        line += "  skipped: too few valid updates, the model is unchanged"
    if dropped and row.dropped:
        line += "".join(f"\n{'':>11}{d.client} {d.stage}: {d.reason}" for d in row.dropped)
    return line


def print_round(row: RoundRow, zero_shot: float | None = None, majority: float | None = None) -> None:
    tqdm.write(format_round(row, zero_shot, majority))  # above a progress bar, if one is shown


def summary_table(s: RunSummary) -> str:
    name = METRIC_NAMES[s.metric]
    figures = [(f"final {name}", s.final_score), (f"best {name}", s.best_score), (f"zero-shot {name}", s.zero_shot_score),
               (f"majority-class {name}", s.majority_score), ("final macro-F1", s.final_macro_f1),
               ("final perplexity", s.final_perplexity)]
    rows = [(k, f"{v:.3f}") for k, v in figures if v is not None]
    if s.zero_shot_loss is not None:
        rows.append(("held-out loss, zero-shot -> final", f"{s.zero_shot_loss:.3f} -> {s.final_loss:.3f}"))
    if s.centralized_score is not None:
        rows.append(("centralized baseline", f"{s.centralized_score:.3f}"))
    if s.privacy is not None:
        rows.append((f"{s.privacy}-level DP", f"epsilon {s.epsilon:.2f}, delta {s.delta:g}"))
    if s.stopped is not None:
        rows.append(("stopped", s.stopped))
    if s.dropped:
        rows.append(("updates dropped", ", ".join(f"{stage} {n}" for stage, n in s.dropped.items())))
    if s.retried_rounds or s.skipped_rounds:
        rows.append(("rounds retried / skipped", f"{s.retried_rounds or 0} / {s.skipped_rounds or 0}"))
    if s.sim_time_s is not None:
        by_device = ", ".join(f"{d} {n}" for d, n in s.client_rounds_by_device.items())
        rows.append(("simulated time", f"{s.sim_time_s:.1f} s ({s.failed} failed, {s.stragglers} stragglers)"))
        rows.append(("client rounds by device", by_device))
    if s.target_accuracy is not None:
        reached = s.rounds_to_target
        text = "not reached" if reached is None else f"round {reached}, {human_bytes(s.bytes_to_target)}"
        if reached is not None and s.sim_time_to_target_s is not None:
            text += f", {s.sim_time_to_target_s:.1f} s simulated"
        rows.append((f"{name} {s.target_accuracy:.2f}", text))
    rows += [
        ("bytes down / up", f"{human_bytes(s.total_bytes_down)} / {human_bytes(s.total_bytes_up)}"),
        ("per client-round down / up", f"{human_bytes(s.bytes_per_client_round_down)} / "
         f"{human_bytes(s.bytes_per_client_round_up)}"),
        ("client rounds", str(s.client_rounds)),
        ("wall time", f"{s.wall_time_s:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
