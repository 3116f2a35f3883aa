"""What the aggregation rule costs and buys: final accuracy with 0 and 1 attacking
client, for the weighted mean and the Byzantine-robust rules (docs/security.md).

    .venv/bin/python benchmarks/robustness.py [CONFIG] [--rules mean median trimmed_mean] [--set ...]

The attacker (client 1, tests/hostile.py) sends, every round, the honest update
reversed: the change it trained, negated. It is well formed and its norm is an
honest one, so only the aggregation rule can stand against it. Each cell is one
run of CONFIG (default: the main job) in this process's simulation engine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hostile import hostile_app  # noqa: E402  (tests/hostile.py: a ClientApp that attacks)

from fedtune.config import load_config  # noqa: E402
from fedtune.report.run_dir import create_run_dir  # noqa: E402
from fedtune.simulation import run_simulation  # noqa: E402

ATTACKER = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="simulations/default.toml")
    parser.add_argument("--rules", nargs="+", default=["mean", "median", "trimmed_mean"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for rule in args.rules:
            for attackers in (0, 1):
                config = load_config(args.config, [*args.overrides, f"federation.aggregator={rule}",
                                                   f"run.output_dir={out}", f"run.name={rule}-{attackers}"])
                attack = (lambda c, r: "reversed" if c == ATTACKER else None) if attackers else (lambda c, r: None)
                print(f"{rule}, {attackers} attacker(s) of {config.partition.num_clients} ...", flush=True)
                summary = run_simulation(config, create_run_dir(config), client_app=hostile_app(attack))
                results[rule, attackers] = summary
    zero_shot = next(iter(results.values())).zero_shot_score
    print(f"\nzero-shot accuracy {zero_shot:.3f}; final (best) accuracy after {config.run.rounds} rounds\n")
    print("| aggregation | no attacker | 1 attacker (reversed update) |")
    print("|---|---:|---:|")
    for rule in args.rules:
        cells = [f"{results[rule, a].final_score:.3f} ({results[rule, a].best_score:.3f})" for a in (0, 1)]
        print(f"| {rule} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
