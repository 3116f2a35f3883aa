"""Everything `fedtune compare` writes into its output folder: table.csv, table.md,
pareto.png, score_vs_bytes.png, score_vs_time.png and report.html, which
holds them all (images inline) with the config that produced them."""

from __future__ import annotations

import base64
import dataclasses
import html
import re
from collections.abc import Sequence
from pathlib import Path

from fedtune.compare.grid import Comparison
from fedtune.compare.runner import CellResult
from fedtune.compare.table import Group, markdown, pareto_front, write_csv
from fedtune.errors import FedtuneError
from fedtune.report.plots import pyplot, save_figure
from fedtune.report.rows import read_rows, read_summary
from fedtune.report.run_dir import write_atomic
from fedtune.report.summary import target_figures

PLOTS = {
    "pareto.png": "Final score against total bytes (down + up)",
    "score_vs_bytes.png": "Score after each round against cumulative bytes",
    "score_vs_time.png": "Score after each round against time",
}
MIN_SPAN = 0.1  # the score axis spans at least this much: a gap inside the error bars must not fill the plot


def collect(results: list[CellResult], target: float) -> list[Group]:
    """Finished runs, grouped over seeds, in grid order; their to-target figures
    from their rows at the comparison's ``target``, so a target set after the runs
    finished applies to them too."""
    groups: dict[str, Group] = {}
    for result in results:
        if result.run_dir is None:
            continue
        cell = result.cell
        group = groups.setdefault(cell.group, Group(cell.group, {a: v for a, v in cell.values.items() if a != "seed"}))
        rows = read_rows(result.run_dir)
        group.runs.append(dataclasses.replace(read_summary(result.run_dir), **target_figures(target, rows)))
        group.seeds.append(cell.values.get("seed", ""))
        group.curves.append(rows)
    return list(groups.values())


def write_report(comparison: Comparison, results: list[CellResult], pending: Sequence[str] = ()) -> Path:
    """Write every output; returns the HTML report's path. ``pending``: the labels
    of cells not run yet, when the report is of a grid still being finished."""
    out = comparison.output_dir
    groups = collect(results, comparison.target_accuracy)
    failed = {r.cell.label: r.error for r in results if r.run_dir is None}
    if not groups:
        raise FedtuneError(f"no cell of the comparison has finished; see the run.log files under {out / 'cells'}")
    axes = list(dict.fromkeys(a for r in results for a in r.cell.values))  # one-valued ones too
    write_csv(groups, axes, out / "table.csv")
    table = markdown(groups, failed, comparison.refused, comparison.byte_budget, pending, comparison.baseline)
    write_atomic(out / "table.md", table)
    plot_pareto(groups, out / "pareto.png")
    plot_curves(groups, out / "score_vs_bytes.png", out / "score_vs_time.png")
    write_atomic(out / "report.html", _html(comparison, table))
    return out / "report.html"


def plot_pareto(groups: list[Group], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    points = [(g.total_bytes, g.mean("final_score")) for g in groups]
    errors = [2 * g.standard_error("final_score") for g in groups]
    for g, (x, y), err in zip(groups, points, errors):
        ax.errorbar(x, y, yerr=err or None, fmt="o", capsize=3)
        ax.annotate(g.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    shown = _baselines(ax, groups) + [y - e for (_, y), e in zip(points, errors)] + [y + e for (_, y), e in zip(points, errors)]
    front = [points[i] for i in pareto_front(points)]
    # The front as a staircase: from each point, what that many bytes buys at best.
    ax.step([x for x, _ in front], [y for _, y in front], where="post", color="black", linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("total bytes, down + up (log scale)")
    seeds = max(len(g.runs) for g in groups) > 1
    ax.set_ylabel(f"final {groups[0].metric}" + (" (mean over seeds ± 2 standard errors)" if seeds else ""))
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.08)  # room for the labels
    _score_axis(ax, shown)
    ax.legend(loc="best")
    save_figure(fig, path)


def plot_curves(groups: list[Group], bytes_path: Path, time_path: Path) -> None:
    """Accuracy per round, averaged over seeds, against cumulative bytes and time;
    time is the simulated clock when every run models a fleet, else wall time."""
    simulated = all(row.hardware is not None for g in groups for curve in g.curves for row in curve[1:])
    for path, x_of, label, log in (
        (bytes_path, lambda r: r.cum_bytes_down + r.cum_bytes_up, "cumulative bytes, down + up (log scale)", True),
        (time_path, lambda r: (r.hardware.sim_time_s if r.hardware else 0.0) if simulated else r.wall_time_s,
         "simulated time (s)" if simulated else "wall time (s), no fleet modelled", False),
    ):
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 5))
        shown = _baselines(ax, groups)
        for g in groups:
            rounds = min(len(c) for c in g.curves)
            xs = [sum(x_of(c[i]) for c in g.curves) / len(g.curves) for i in range(rounds)]
            start = 1 if log else 0  # round 0 (zero-shot) has spent no bytes
            scored = [i for i in range(start, rounds) if all(c[i].score is not None for c in g.curves)]
            ys = [sum(c[i].score for c in g.curves) / len(g.curves) for i in scored]
            ax.plot([xs[i] for i in scored], ys, marker="o", markersize=3, label=g.name)
            shown += ys
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"held-out {groups[0].metric}")
        _score_axis(ax, shown)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, path)


def _baselines(ax, groups: list[Group]) -> list[float]:
    """Draw the zero-shot score (the mean over the runs) and, where the task has one,
    the majority-class score; returns their values."""
    values = []
    for key, label, style in (("zero_shot_score", "zero-shot", "--"), ("majority_score", "majority class", ":")):
        figures = [v for g in groups for v in g.figures(key)]
        if figures:
            values.append(sum(figures) / len(figures))
            ax.axhline(values[-1], color="grey", linestyle=style, linewidth=1, label=label)
    return values


def _score_axis(ax, shown: list[float]) -> None:
    """Limits that hold every value shown, spanning at least MIN_SPAN."""
    low, high = min(shown), max(shown)
    pad = max(MIN_SPAN - (high - low), 0) / 2 + 0.05 * (high - low)
    ax.set_ylim(low - pad, high + pad)


def _html(comparison: Comparison, table: str) -> str:
    out = comparison.output_dir
    images = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{name}' src='data:image/png;base64,"
        f"{base64.b64encode((out / name).read_bytes()).decode()}'>"
        for name, title in PLOTS.items()
    )
    configs = "".join(
        f"<h3>{html.escape(str(p))}</h3><pre>{html.escape(p.read_text())}</pre>"
        for p in (comparison.source, comparison.base_config)
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>fedtune compare</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}pre{background:#f4f4f4;padding:1em;overflow:auto}"
        "img{max-width:100%}table{border-collapse:collapse;font-size:90%}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child{text-align:left}</style></head><body>"
        f"<h1>fedtune compare: {html.escape(comparison.source.name)}</h1>"
        f"<h2>Table</h2>{_table_html(table)}{images}<h2>Configs</h2>{configs}</body></html>\n"
    )


_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _table_html(markdown: str) -> str:
    """table.md as HTML: its pipe table as a <table>, every other line a paragraph."""
    parts, rows = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):  # skip the alignment row
                rows.append([_BOLD.sub(r"<b>\1</b>", html.escape(c.strip())) for c in line.strip("|").split("|")])
            continue
        if rows:
            head, *body = rows
            parts.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            rows = []
        if line.strip():
            parts.append(f"<p>{html.escape(line.lstrip('- '))}</p>")
    return "".join(parts)
