"""Run directory, metrics.jsonl, summary.json, the accuracy-vs-bytes plot and the
console lines and tables a person reads."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedtune.config import RunConfig
from fedtune.ledger import Ledger
from fedtune.training import EvalResult


def create_run_dir(config: RunConfig) -> Path:
    """``<output_dir>/<name>-<timestamp>`` holding the resolved config, reusable as input."""
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


def round_row(rnd: int, result: EvalResult, ledger: Ledger, started: float, extra: dict[str, float]) -> dict:
    return {
        "round": rnd,
        "accuracy": result.accuracy,
        "loss": result.loss,
        **extra,
        "bytes_down": ledger.total("down", rnd),
        "bytes_up": ledger.total("up", rnd),
        "cum_bytes_down": ledger.total("down"),
        "cum_bytes_up": ledger.total("up"),
        "clients": sum(1 for t in ledger.transfers if t.round == rnd and t.direction == "up"),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }


def append_metrics(run_dir: Path, row: dict) -> None:
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def print_round(row: dict, baselines: dict[str, float]) -> None:
    head = "zero-shot" if row["round"] == 0 else f"round {row['round']}"
    reference = f"majority class {baselines['majority_accuracy']:.3f}"
    if "zero_shot_accuracy" in baselines:
        reference = f"zero-shot {baselines['zero_shot_accuracy']:.3f}, {reference}"
    privacy = f"  epsilon {row['epsilon']:.2f}" if "epsilon" in row else ""
    tqdm.write(
        f"{head:>9}: accuracy {row['accuracy']:.3f} ({reference})"
        f"  loss {row['loss']:.3f}  down {human_bytes(row['bytes_down'])}  up {human_bytes(row['bytes_up'])}{privacy}"
    )


def summarize(config: RunConfig, rows: list[dict], ledger: Ledger, baselines: dict, wall: float) -> dict:
    client_rounds = ledger.client_rounds()
    return {
        "method": config.federation.method,
        "model": config.model.name,
        "rounds": rows[-1]["round"],
        "final_accuracy": rows[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rows[1:]),
        "final_loss": rows[-1]["loss"],
        **baselines,
        "total_bytes_down": ledger.total("down"),
        "total_bytes_up": ledger.total("up"),
        "bytes_per_client_round_down": ledger.total("down") // max(client_rounds, 1),
        "bytes_per_client_round_up": ledger.total("up") // max(client_rounds, 1),
        "message_bytes_down": ledger.total("down", field="message_bytes"),
        "message_bytes_up": ledger.total("up", field="message_bytes"),
        "client_rounds": client_rounds,
        "wall_time_s": round(wall, 1),
    } | _privacy(config, rows) | _hardware(rows) | _target(config, rows)


def _hardware(rows: list[dict]) -> dict:
    if "sim_time_s" not in rows[-1]:
        return {}
    classes = sorted({k.removeprefix("took_part_") for r in rows for k in r if k.startswith("took_part_")})
    return {
        "sim_time_s": rows[-1]["sim_time_s"],
        "client_rounds_by_device": {c: sum(r.get(f"took_part_{c}", 0) for r in rows) for c in classes},
        "failed": sum(r.get("failed", 0) for r in rows),
        "stragglers": sum(r.get("stragglers", 0) for r in rows),
    }


def _target(config: RunConfig, rows: list[dict]) -> dict:
    """The first round at the target accuracy, with the bytes and simulated time spent by then."""
    target = config.run.target_accuracy
    if not target:
        return {}
    hit = next((r for r in rows[1:] if r["accuracy"] >= target), None)
    if hit is None:
        return {"target_accuracy": target, "rounds_to_target": None}
    return {
        "target_accuracy": target,
        "rounds_to_target": hit["round"],
        "bytes_to_target": hit["cum_bytes_down"] + hit["cum_bytes_up"],
        **({"sim_time_to_target_s": hit["sim_time_s"]} if "sim_time_s" in hit else {}),
    }


def _privacy(config: RunConfig, rows: list[dict]) -> dict:
    if config.privacy.mode == "none":
        return {}
    spent = [r["epsilon"] for r in rows if "epsilon" in r]
    return {"privacy": config.privacy.mode, "epsilon": spent[-1] if spent else 0.0, "delta": config.privacy.delta}


def finish(run_dir: Path, rows: list[dict], summary: dict) -> None:
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_accuracy_vs_bytes(rows, run_dir / "accuracy_vs_bytes.png", summary)


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as PNG atomically and free it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)
    pyplot().close(fig)


def plot_accuracy_vs_bytes(rows: list[dict], path: Path, summary: dict) -> None:
    plt = pyplot()
    total = [(r["cum_bytes_down"] + r["cum_bytes_up"]) / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(total, [r["accuracy"] for r in rows], marker="o", label=summary["method"])
    ax.axhline(summary["majority_accuracy"], color="grey", linestyle=":", label="majority class")
    if "centralized_accuracy" in summary:
        ax.axhline(summary["centralized_accuracy"], color="green", linestyle="--", label="centralized")
    for r, x in zip(rows, total):
        ax.annotate(f"r{r['round']}", (x, r["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("cumulative bytes, down + up (MB)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{summary['method']} on {summary['model']}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def summary_table(summary: dict) -> str:
    rows = [
        ("final accuracy", f"{summary['final_accuracy']:.3f}"),
        ("best accuracy", f"{summary['best_accuracy']:.3f}"),
        ("zero-shot accuracy", f"{summary['zero_shot_accuracy']:.3f}"),
        ("majority-class accuracy", f"{summary['majority_accuracy']:.3f}"),
    ]
    if "centralized_accuracy" in summary:
        rows.append(("centralized baseline", f"{summary['centralized_accuracy']:.3f}"))
    if "privacy" in summary:
        rows.append((f"{summary['privacy']}-level DP", f"epsilon {summary['epsilon']:.2f}, delta {summary['delta']:g}"))
    if "stopped" in summary:
        rows.append(("stopped", summary["stopped"]))
    if "sim_time_s" in summary:
        by_device = ", ".join(f"{d} {n}" for d, n in summary["client_rounds_by_device"].items())
        rows.append(("simulated time", f"{summary['sim_time_s']:.1f} s ({summary['failed']} failed, {summary['stragglers']} stragglers)"))
        rows.append(("client rounds by device", by_device))
    if "rounds_to_target" in summary:
        reached = summary["rounds_to_target"]
        text = "not reached" if reached is None else f"round {reached}, {human_bytes(summary['bytes_to_target'])}"
        if reached is not None and "sim_time_to_target_s" in summary:
            text += f", {summary['sim_time_to_target_s']:.1f} s simulated"
        rows.append((f"accuracy {summary['target_accuracy']:.2f}", text))
    rows += [
        ("bytes down / up", f"{human_bytes(summary['total_bytes_down'])} / {human_bytes(summary['total_bytes_up'])}"),
        ("per client-round down / up", f"{human_bytes(summary['bytes_per_client_round_down'])} / "
         f"{human_bytes(summary['bytes_per_client_round_up'])}"),
        ("client rounds", str(summary["client_rounds"])),
        ("wall time", f"{summary['wall_time_s']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def add_centralized(run_dir: Path, result: EvalResult, steps: int) -> dict:
    """Fold the centralized baseline into summary.json and the plot."""
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(centralized_accuracy=result.accuracy, centralized_loss=result.loss, centralized_steps=steps)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finish(run_dir, rows, summary)
    return summary
