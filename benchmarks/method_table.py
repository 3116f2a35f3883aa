"""Final accuracy and bytes per client-round of the adapter methods on one task.

    .venv/bin/python benchmarks/method_table.py simulations/default.toml --out runs/method-table

Each cell is a `fedtune run` of CONFIG with a few overrides, in its own process; a
cell whose summary.json exists is not run again (rerun after an interruption to
finish the table). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CELLS = {
    "FedIT (r=8)": [],
    "FFA-LoRA (r=8)": ["federation.method=ffa_lora"],
    "FLoRA (r=8 each)": ["federation.method=flora"],
    "FLoRA (r=2,4,8,16)": ["federation.method=flora", "lora.client_ranks=[2,4,8,16]"],
    "Fed-SB (r=16)": ["federation.method=fed_sb", "lora.rank=16", "lora.alpha=16"],
    "Fed-SB (r=48)": ["federation.method=fed_sb", "lora.rank=48", "lora.alpha=48"],
}


def run_cell(config: str, out: Path, label: str, overrides: list[str]) -> Path:
    cell_dir = out / label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "-").replace("=", "")
    done = list(cell_dir.glob("*/summary.json"))
    if not done:
        args = [f"run.output_dir={cell_dir}", *overrides]
        cmd = [sys.executable, "-m", "fedtune.cli", "run", config, *(a for o in args for a in ("--set", o))]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        done = list(cell_dir.glob("*/summary.json"))
    return done[0].parent


def first_and_later_downlink(run_dir: Path) -> tuple[float, float]:
    """Mean downlink payload per client in round 1 and in later rounds: some methods
    send a one-off setup (Fed-SB's bases) or a history that grows (FLoRA)."""
    down = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    down = [t for t in down if t["direction"] == "down"]
    first = [t["payload_bytes"] for t in down if t["round"] == 1]
    later = [t["payload_bytes"] for t in down if t["round"] > 1]
    return sum(first) / len(first), sum(later) / max(len(later), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", type=Path, default=Path("runs/method-table"))
    parser.add_argument("--only", nargs="*", help="labels of the cells to run (default: all)")
    args = parser.parse_args()
    cells = {k: v for k, v in CELLS.items() if not args.only or k in args.only}
    run_dirs = {label: run_cell(args.config, args.out, label, o) for label, o in cells.items()}

    print("\n| method | final accuracy | bytes up / client-round | bytes down / client-round | down, round 1 | down, later rounds |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, run_dir in run_dirs.items():
        s = json.loads((run_dir / "summary.json").read_text())
        first, later = first_and_later_downlink(run_dir)
        print(
            f"| {label} | {s['final_accuracy']:.3f} | {s['bytes_per_client_round_up']:,} "
            f"| {s['bytes_per_client_round_down']:,} | {first:,.0f} | {later:,.0f} |"
        )
    summary = json.loads((next(iter(run_dirs.values())) / "summary.json").read_text())
    print(f"\nzero-shot accuracy {summary['zero_shot_accuracy']:.3f}, majority class {summary['majority_accuracy']:.3f}")


if __name__ == "__main__":
    main()
