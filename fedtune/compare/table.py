"""The comparison's numbers: one row per finished run (table.csv), one line per
group of seeds with mean, spread and standard error (table.md), the Pareto front
of the task's score against bytes, and which differences exceed two standard errors."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.report.console import human_bytes
from fedtune.report.rows import METRIC_NAMES, RoundRow, RunSummary
from fedtune.report.run_dir import write_atomic

COLUMNS = (  # RunSummary fields, in table.csv order
    "final_score", "best_score", "final_loss", "total_bytes_down", "total_bytes_up",
    "bytes_per_client_round_down", "bytes_per_client_round_up", "rounds_to_target", "bytes_to_target",
    "sim_time_s", "sim_time_to_target_s", "epsilon", "wall_time_s",
)


@dataclass
class Group:
    """The runs of one grid point, over seeds."""

    name: str
    values: dict[str, str]  # axis -> value, without the seed
    runs: list[RunSummary] = field(default_factory=list)  # each seed's
    seeds: list[str] = field(default_factory=list)
    curves: list[list[RoundRow]] = field(default_factory=list)  # each seed's rows

    def figures(self, key: str) -> list[float]:
        """RunSummary field ``key`` of each seed that has it."""
        return [v for r in self.runs if (v := getattr(r, key)) is not None]

    def mean(self, key: str) -> float | None:
        xs = self.figures(key)
        return statistics.fmean(xs) if len(xs) == len(self.runs) else None  # None: not every seed has it

    def spread(self, key: str) -> float:
        """Sample standard deviation over seeds; 0 with one seed."""
        xs = self.figures(key)
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    def standard_error(self, key: str) -> float:
        """Of the mean over seeds: the spread over the square root of the seeds."""
        return self.spread(key) / math.sqrt(max(len(self.figures(key)), 1))

    def score_at_budget(self, budget: float) -> list[float]:
        """Each seed's score at its last evaluated round within ``budget`` bytes (down + up)."""
        return [next(r.score for r in reversed(curve) if r.score is not None and r.cum_bytes_down + r.cum_bytes_up <= budget)
                for curve in self.curves]

    @property
    def metric(self) -> str:
        return METRIC_NAMES[self.runs[0].metric]

    @property
    def total_bytes(self) -> float:
        return self.mean("total_bytes_down") + self.mean("total_bytes_up")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point beats: none costs no
    more and is no less accurate, and better in one. Sorted by cost."""
    front = [
        i for i, (c, a) in enumerate(points)
        if not any(c2 <= c and a2 >= a and (c2, a2) != (c, a) for c2, a2 in points)
    ]
    return sorted(front, key=lambda i: points[i])


@dataclass(frozen=True)
class Difference:
    """Of one figure between two groups: the mean of the first minus the second's,
    against two standard errors of that difference (unpaired, over seeds; NaN
    where a group has one seed)."""

    difference: float
    two_se: float

    @classmethod
    def of(cls, first: Group, second: Group, key: str) -> Difference | None:
        """None where either group lacks the figure or has fewer than two seeds (no spread to test against)."""
        if first.mean(key) is None or second.mean(key) is None or min(len(first.runs), len(second.runs)) < 2:
            return None
        return cls(first.mean(key) - second.mean(key),
                   2 * math.hypot(first.standard_error(key), second.standard_error(key)))

    def minus(self, other: Difference) -> Difference:
        """This difference less ``other``, of four independent groups: which of two changes is larger."""
        return Difference(self.difference - other.difference, math.hypot(self.two_se, other.two_se))

    @property
    def exceeds(self) -> bool:
        return abs(self.difference) > self.two_se


def verdict(groups: list[Group]) -> str:
    """Name the best group, and the groups its lead over is within two standard
    errors of the difference (over seeds): those are not beaten."""
    best = max(groups, key=lambda g: g.mean("final_score"))
    seeds = min(len(g.runs) for g in groups)
    text = f"Highest mean final {best.metric}: {best.name} ({_pm(best, 'final_score')})."
    if seeds < 2:
        which = "One seed per cell" if max(len(g.runs) for g in groups) < 2 else "A cell with one seed"
        return text + f" {which}: there is no spread to test differences against, so none is called a win."
    tied = [g.name for g in groups if g is not best and not Difference.of(best, g, "final_score").exceeds]
    if not tied:
        return text + " It leads every other cell by more than two standard errors of the difference."
    return text + f" Within two standard errors of the difference, so not beaten by it: {', '.join(tied)}."


def write_csv(groups: list[Group], axes: list[str], path: Path) -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["cell", *axes, *COLUMNS])
    for g in groups:
        for run, seed in zip(g.runs, g.seeds):
            values = {**g.values, **({"seed": seed} if "seed" in axes else {})}
            writer.writerow([g.name, *(values.get(a, "") for a in axes), *("" if (v := getattr(run, k)) is None else v for k in COLUMNS)])
    write_atomic(path, out.getvalue())


def markdown(groups: list[Group], failed: dict[str, str], refused: dict[str, str], budget: float = 0,
             pending: Sequence[str] = (), baseline: tuple[str, str] | None = None) -> str:
    seeds = max(len(g.runs) for g in groups)
    front = {groups[i].name for i in pareto_front([(g.total_bytes, g.mean("final_score")) for g in groups])}
    metric = groups[0].metric
    lines = [
        f"| cell | final {metric} | best {metric} | final loss | {metric} at {human_bytes(budget) if budget else 'a byte budget'} | bytes down | bytes up | per client-round down / up "
        "| rounds to target | bytes to target | simulated time to target | epsilon | wall time | Pareto |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for g in groups:
        lines.append("| " + " | ".join([
            g.name + (f" ({len(g.runs)} seed{'s' if len(g.runs) > 1 else ''})" if seeds > 1 else ""),
            _pm(g, "final_score"), _pm(g, "best_score"), _pm(g, "final_loss"),
            _spread_of(g.score_at_budget(budget)) if budget else "-",
            human_bytes(g.mean("total_bytes_down")), human_bytes(g.mean("total_bytes_up")),
            f"{human_bytes(g.mean('bytes_per_client_round_down'))} / {human_bytes(g.mean('bytes_per_client_round_up'))}",
            _target(g, "rounds_to_target", "{:.1f}"), _target(g, "bytes_to_target", None),
            _target(g, "sim_time_to_target_s", "{:.0f} s"),
            _optional(g, "epsilon", "{:.2f}"), f"{g.mean('wall_time_s'):.0f} s",
            "yes" if g.name in front else "",
        ]) + " |")
    if seeds > 1:
        lines += ["", "Each figure: mean ± standard deviation over seeds, (standard error of the mean)."]
    lines += ["", verdict(groups)]
    if min(len(g.runs) for g in groups) > 1 and len(groups) > 2:
        lines += ["", _differences_table(groups, metric)]
    if baseline:
        lines += ["", _changes_table(groups, baseline, metric)]
    lines += [f"\nFailed: {name}: {error}" for name, error in failed.items()]
    if pending:
        lines.append(f"\nNot run yet ({len(pending)}; `fedtune compare` runs them): {', '.join(pending)}.")
    if refused:
        lines.append(f"\nNot run, refused by the config check ({len(refused)}):")
        lines += [f"- {name}: {reason}" for name, reason in refused.items()]
    return "\n".join(lines) + "\n"


def _differences_table(groups: list[Group], metric: str) -> str:
    """Every pair of groups that differ in one axis (the others held equal, so the
    difference is that axis's), the higher-scoring first: the differences of their
    final score and final loss, each with two standard errors, in bold where it
    exceeds them."""
    ranked = sorted(groups, key=lambda g: g.mean("final_score"), reverse=True)
    lines = [f"| pair | final {metric}: difference (2 SE) | final loss: difference (2 SE) |", "|---|---:|---:|"]
    for i, a in enumerate(ranked):
        for b in ranked[i + 1:]:
            if sum(a.values.get(axis) != b.values.get(axis) for axis in a.values.keys() | b.values.keys()) > 1:
                continue
            cells = [_difference(Difference.of(a, b, key)) for key in ("final_score", "final_loss")]
            lines.append(f"| {a.name} − {b.name} | {cells[0]} | {cells[1]} |")
    return "\n".join([*lines, "", "A difference in bold exceeds two standard errors of the difference (unpaired, "
                       "over seeds); the others do not, and are not called a difference."])


def _changes_table(groups: list[Group], baseline: tuple[str, str], metric: str) -> str:
    """Each group's change of final score from its baseline group (the one with the
    baseline value on that axis and the same values on every other), then, among the
    groups that share a value of that axis, the differences of their changes, the
    one that changed more (lost less) first: e.g. which method degrades least under DP."""
    axis, value = baseline

    def others(g: Group) -> tuple:
        return tuple(sorted((a, v) for a, v in g.values.items() if a != axis))

    bases = {others(g): g for g in groups if g.values.get(axis) == value}
    changes = {g.name: Difference.of(g, base, "final_score") or Difference(g.mean("final_score") - base.mean("final_score"), math.nan)
               for g in groups if g.values.get(axis) != value and (base := bases.get(others(g)))}
    lines = [f"| cell | final {metric}: change from {axis} = {value} (2 SE) |", "|---|---:|"]
    lines += [f"| {name} | {_difference(d)} |" for name, d in changes.items()]
    lines += ["", f"| pair, at the same {axis} | difference of the changes (2 SE) |", "|---|---:|"]
    by_value: dict[str, list[Group]] = {}
    for g in groups:
        if g.name in changes:
            by_value.setdefault(g.values[axis], []).append(g)
    for same in by_value.values():
        same.sort(key=lambda g: changes[g.name].difference, reverse=True)
        for i, a in enumerate(same):
            for b in same[i + 1:]:
                lines.append(f"| {a.name} − {b.name} | {_difference(changes[a.name].minus(changes[b.name]))} |")
    return "\n".join([*lines, "", "Changes and their differences are unpaired over seeds; in bold where one exceeds its two standard errors."])


def _difference(d: Difference | None) -> str:
    if d is None:
        return "-"
    if math.isnan(d.two_se):  # a group of one seed: no spread to test against
        return f"{d.difference:+.3f} (one seed)"
    text = f"{d.difference:+.3f} ({d.two_se:.3f})"
    return f"**{text}**" if d.exceeds else text


def _pm(g: Group, key: str) -> str:
    return _spread_of(g.figures(key))


def _spread_of(xs: list[float]) -> str:
    """Mean, and over more than one seed: ± standard deviation (standard error)."""
    if len(xs) < 2:
        return f"{statistics.fmean(xs):.3f}" if xs else "-"
    std = statistics.stdev(xs)
    return f"{statistics.fmean(xs):.3f} ± {std:.3f} ({std / math.sqrt(len(xs)):.3f})"


def _target(g: Group, key: str, fmt: str | None) -> str:
    """Mean over seeds of a to-target figure; "-" when there is no target (or,
    for simulated time, no fleet)."""
    first = g.runs[0]
    if first.target_accuracy is None or (key == "sim_time_to_target_s" and first.sim_time_s is None):
        return "-"
    missed = sum(r.rounds_to_target is None for r in g.runs)
    if missed:
        return "not reached" + (f" ({missed}/{len(g.runs)})" if missed < len(g.runs) else "")
    mean = statistics.fmean(getattr(r, key) for r in g.runs)
    return human_bytes(mean) if fmt is None else fmt.format(mean)


def _optional(g: Group, key: str, fmt: str) -> str:
    value = g.mean(key)
    return "-" if value is None else fmt.format(value)
