"""Round time in deployment against simulation, for the same config.

Runs the config three times, each through the fedtune command line:

  simulation         fedtune run                                  (Flower's Ray engine)
  deploy, cold       fedtune deploy local --per-message-clientapp (Flower's default: each
                     message starts a fresh ClientApp process, which imports torch and
                     transformers and loads data and model again)
  deploy, warm       fedtune deploy local                         (SuperNodes with --isolation
                     process and one long-running ClientApp worker each)

and prints the median over rounds of a round's wall time (from one metrics row to
the next: downlinks, training, uplinks, aggregation, evaluation) and of its
training phase (first downlink sent to last uplink received), each as a ratio to
the simulation's, and every round's wall time. The deployments run with TLS and
node authentication on loopback. It also says whether the three runs' metrics agree.

Usage: python benchmarks/deploy_overhead.py [CONFIG] [--set SECTION.KEY=VALUE ...]
       (default: simulations/quick.toml, 5 rounds)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fedtune.report.rows import RoundRow, read_rows

MODES = {
    "simulation": ["run"],
    "deploy, cold ClientApp per message": ["deploy", "local", "--per-message-clientapp"],
    "deploy, warm ClientApp worker": ["deploy", "local"],
}
STABLE = ("round", "score", "loss", "bytes_down", "bytes_up")


def run(mode: list[str], config: str, overrides: list[str], work: Path, name: str) -> list[RoundRow]:
    args = [*mode, config, *[a for o in overrides for a in ("--set", o)],
            "--set", f"run.output_dir={work / 'runs'}", "--set", f"run.name={name}"]
    if mode[0] == "deploy":
        args += ["--state", str(work / "state")]
    out = subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"fedtune {' '.join(mode)} failed:\n{out.stderr[-2000:]}")
    (run_dir,) = (work / "runs").glob(f"{name}-*")
    return read_rows(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default="simulations/quick.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if not any(o.startswith("run.rounds=") for o in args.overrides):
        args.overrides.insert(0, "run.rounds=5")

    results = {}
    with tempfile.TemporaryDirectory(prefix="deploy-overhead-") as tmp:
        for i, (label, mode) in enumerate(MODES.items()):
            print(f"[{i + 1}/{len(MODES)}] {label}: fedtune {' '.join(mode)} ...", flush=True)
            rows = run(mode, args.config, args.overrides, Path(tmp), f"mode{i}")
            walls = [b.wall_time_s - a.wall_time_s for a, b in zip(rows, rows[1:])]
            results[label] = (rows, walls, [r.round_train_time_s for r in rows[1:]])

    print(f"config {args.config} {' '.join(args.overrides)}")
    print(f"{'mode':36}{'round s':>9}{'ratio':>7}{'training s':>12}{'ratio':>7}   each round's wall s")
    base_wall, base_train = (statistics.median(results["simulation"][i]) for i in (1, 2))
    for label, (rows, walls, trains) in results.items():
        wall, train = statistics.median(walls), statistics.median(trains)
        print(f"{label:36}{wall:9.1f}{wall / base_wall:7.2f}{train:12.1f}{train / base_train:7.2f}   "
              + " ".join(f"{w:.1f}" for w in walls))
    same = [[{k: getattr(r, k) for k in STABLE} for r in rows] for rows, _, _ in results.values()]
    print("metrics (accuracy, loss, bytes per round) identical in all three:", all(s == same[0] for s in same))


if __name__ == "__main__":
    main()
