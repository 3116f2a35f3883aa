"""Final accuracy and bytes per client-round of the adapter methods on one task.

    .venv/bin/python benchmarks/method_table.py simulations/default.toml
    .venv/bin/python benchmarks/method_table.py simulations/default.toml --grid codecs
    .venv/bin/python benchmarks/method_table.py simulations/default.toml --grid privacy

Each cell is a `fedtune run` of CONFIG with a few overrides, in its own process; a
cell whose summary.json exists is not run again (rerun after an interruption to
finish the table). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

CELLS = {
    "FedIT (r=8)": [],
    "FFA-LoRA (r=8)": ["federation.method=ffa_lora"],
    "FLoRA (r=8 each)": ["federation.method=flora"],
    "FLoRA (r=2,4,8,16)": ["federation.method=flora", "lora.client_ranks=[2,4,8,16]"],
    "Fed-SB (r=16)": ["federation.method=fed_sb", "lora.rank=16", "lora.alpha=16"],
    "Fed-SB (r=48)": ["federation.method=fed_sb", "lora.rank=48", "lora.alpha=48"],
}

# Uplink chains per method; each is compared with its method's uncompressed cell above.
CODECS = {
    "FedIT (r=8)": ["float16", "int8", "int4", "ternary", "topk:0.05,int8"],
    "Fed-SB (r=16)": ["int8", "int4", "ternary", "topk:0.25,int8"],
}
DOWNLINK = {"FedIT (r=8)": ("int8", "float16")}  # (up, down) cells with a compressed downlink too


# DP-SGD (sample-level DP) at each epsilon, delta 1e-5, noise calibrated to the run.
PRIVATE_METHODS = ["FedIT (r=8)", "FFA-LoRA (r=8)", "Fed-SB (r=16)"]
EPSILONS = [8.0, 3.0, 1.0]


def codec_cells() -> dict[str, tuple[str, list[str]]]:
    """label -> (label of the uncompressed cell, overrides)."""
    cells = {}
    for method, chains in CODECS.items():
        cells[method] = (method, CELLS[method])
        for chain in chains:
            up = ", ".join(f'"{c}"' for c in chain.split(","))
            cells[f"{method} up {chain}"] = (method, [*CELLS[method], f"compression.up=[{up}]"])
    for method, (up, down) in DOWNLINK.items():
        overrides = [*CELLS[method], f'compression.up=["{up}"]', f'compression.down=["{down}"]']
        cells[f"{method} up {up} down {down}"] = (method, overrides)
    return cells


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


def print_codec_table(config: str, out: Path) -> None:
    cells = codec_cells()
    run_dirs = {label: run_cell(config, out, label, o) for label, (_, o) in cells.items()}
    summaries = {label: json.loads((d / "summary.json").read_text()) for label, d in run_dirs.items()}
    chains = {label: tomllib.loads((d / "config.toml").read_text()).get("compression", {}) for label, d in run_dirs.items()}
    print("\n| method | uplink | downlink | bytes up / client-round | ratio | bytes down / client-round | final accuracy | change |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for label, (base, _) in cells.items():
        s, b = summaries[label], summaries[base]
        up, down = (" + ".join(chains[label].get(k, [])) or "float32" for k in ("up", "down"))
        print(
            f"| {base} | {up} | {down} | {s['bytes_per_client_round_up']:,} "
            f"| {b['bytes_per_client_round_up'] / s['bytes_per_client_round_up']:.1f}x "
            f"| {s['bytes_per_client_round_down']:,} | {s['final_accuracy']:.3f} "
            f"| {s['final_accuracy'] - b['final_accuracy']:+.3f} |"
        )


def print_privacy_table(config: str, out: Path) -> None:
    accuracy = {}
    for method in PRIVATE_METHODS:
        accuracy[method, None] = run_cell(config, out, method, CELLS[method])
        for eps in EPSILONS:
            dp = ["privacy.mode=sample", f"privacy.epsilon={eps}"]
            accuracy[method, eps] = run_cell(config, out, f"{method} DP-SGD eps {eps:g}", [*CELLS[method], *dp])
    accuracy = {k: json.loads((d / "summary.json").read_text()) for k, d in accuracy.items()}
    print("\n| method | no DP | " + " | ".join(f"epsilon {e:g}" for e in EPSILONS) + " |")
    print("|---|---:|" + "---:|" * len(EPSILONS))
    for method in PRIVATE_METHODS:
        cells = [f"{accuracy[method, None]['final_accuracy']:.3f}"]
        cells += [f"{accuracy[method, e]['final_accuracy']:.3f} (spent {accuracy[method, e]['epsilon']:.2f})" for e in EPSILONS]
        print(f"| {method} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", type=Path, default=Path("runs/method-table"))
    parser.add_argument("--grid", choices=("methods", "codecs", "privacy"), default="methods")
    parser.add_argument("--only", nargs="*", help="labels of the cells to run (default: all)")
    args = parser.parse_args()
    if args.grid != "methods":
        {"codecs": print_codec_table, "privacy": print_privacy_table}[args.grid](args.config, args.out)
        return
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
