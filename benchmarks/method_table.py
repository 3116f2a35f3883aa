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


def run_cell(config: str, out: Path, label: str, overrides: list[str]) -> dict:
    cell_dir = out / label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "-").replace("=", "")
    done = list(cell_dir.glob("*/summary.json"))
    if not done:
        args = [f"run.output_dir={cell_dir}", *overrides]
        cmd = [sys.executable, "-m", "fedtune.cli", "run", config, *(a for o in args for a in ("--set", o))]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        done = list(cell_dir.glob("*/summary.json"))
    return json.loads(done[0].read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", type=Path, default=Path("runs/method-table"))
    parser.add_argument("--only", nargs="*", help="labels of the cells to run (default: all)")
    args = parser.parse_args()
    cells = {k: v for k, v in CELLS.items() if not args.only or k in args.only}
    summaries = {label: run_cell(args.config, args.out, label, o) for label, o in cells.items()}

    print(f"\n| method | final accuracy | bytes down / client-round | bytes up / client-round | wall |")
    print("|---|---:|---:|---:|---:|")
    for label, s in summaries.items():
        print(
            f"| {label} | {s['final_accuracy']:.3f} | {s['bytes_per_client_round_down']:,} "
            f"| {s['bytes_per_client_round_up']:,} | {s['wall_time_s'] / 60:.1f} min |"
        )
    zero_shot = next(iter(summaries.values()))["zero_shot_accuracy"]
    print(f"\nzero-shot accuracy {zero_shot:.3f}")


if __name__ == "__main__":
    main()
