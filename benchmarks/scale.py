"""Does a federation's cost grow with the clients it registers, or only with those it
samples? Each method runs at 10, 100 and 1,000 registered clients with 10 sampled per
round (MiniLM, simulations/quick.toml's task), as `fedtune run` in its own process
tree, sampled every 0.2 s:

- server: peak resident memory of the `fedtune run` process (the ServerApp and the
  simulation driver);
- worker: the largest peak of any Ray client worker (ClientApp actor);
- tree: peak of the whole tree's summed proportional set size (server, Ray,
  workers; PSS: a page shared by k processes counts 1/k in each, so torch's
  libraries, mapped by every worker, count once, as the machine holds them);
- s/round: median wall time of the rounds after the first.

Printed as a table with each figure's ratio to 10 clients (the goal: at most 1.1).

    .venv/bin/python benchmarks/scale.py [--methods fedit fedkseed] [--clients 10 100 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from fedtune.report.rows import read_rows

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["fedit", "ffa_lora", "flora", "fed_sb", "fedkseed"]
SAMPLED = 10
MB = 2**20


@dataclass(frozen=True)
class Measured:
    server_mb: float
    worker_mb: float
    tree_mb: float
    round_s: float


def run(method: str, clients: int, rounds: int, out: Path) -> Measured:
    overrides = {
        "federation.method": method, "partition.num_clients": clients, "federation.clients_per_round": SAMPLED,
        "federation.min_replies": SAMPLED, "run.rounds": rounds, "run.output_dir": str(out),
        "train.local_steps": 5, "train.batch_size": 8, "data.test_size": 200,
    }
    if method == "fedkseed":
        overrides |= {"fedkseed.num_seeds": 1024, "train.lr": 1e-5}
    argv = [sys.executable, "-m", "fedtune.cli", "run", "simulations/quick.toml"]
    argv += [a for key, value in overrides.items() for a in ("--set", f"{key}={value}")]
    return measure(argv, out, worker_marks=("ClientAppActor", "ray::"))


def measure(argv: list[str], out: Path, worker_marks: tuple[str, ...], server_marks: tuple[str, ...] = ()) -> Measured:
    """Run ``argv`` (a fedtune command writing its run under ``out``) and sample its
    process tree. A worker is a process whose command line holds one of
    ``worker_marks``; the server is the root process, or the largest process whose
    command line holds one of ``server_marks``."""
    log = (out / "run.log").open("w")
    child = psutil.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    server = worker = tree = 0.0
    while child.poll() is None:
        try:
            family = [child, *child.children(recursive=True)]
            info = {p: p.memory_full_info() for p in family if p.is_running()}
            sizes = {p: i.rss for p, i in info.items()}
            names = {p: " ".join(p.cmdline()[:4]) for p in sizes}
        except psutil.Error:  # a process ended between listing and reading
            continue
        servers = [rss for p, rss in sizes.items() if any(m in names[p] for m in server_marks)] if server_marks else [sizes.get(child, 0)]
        server = max([server, *servers])
        worker = max([worker, *(rss for p, rss in sizes.items() if any(m in names[p] for m in worker_marks))])
        tree = max(tree, sum(i.pss for i in info.values()))
        time.sleep(0.2)
    if child.returncode:
        raise SystemExit(f"{' '.join(argv[2:5])} failed (exit {child.returncode}): see {out / 'run.log'}")
    run_dir = next(out.glob("**/metrics.jsonl")).parent
    walls = [row.wall_time_s for row in read_rows(run_dir)]
    per_round = [b - a for a, b in zip(walls[1:], walls[2:])] or [walls[-1] - walls[0]]
    return Measured(server / MB, worker / MB, tree / MB, statistics.median(per_round))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--clients", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{SAMPLED} clients sampled per round, {args.rounds} rounds; MB peak resident, ratio to {args.clients[0]} clients")
    print(f"{'method':<10}{'clients':>8}{'server MB':>16}{'worker MB':>16}{'tree MB':>16}{'s/round':>14}")
    with tempfile.TemporaryDirectory(prefix="fedtune-scale-") as tmp:
        for method in args.methods:
            base = None
            for clients in args.clients:
                out = Path(tmp) / f"{method}-{clients}"
                out.mkdir()
                m = run(method, clients, args.rounds, out)
                base = base or m
                cells = [(m.server_mb, base.server_mb), (m.worker_mb, base.worker_mb), (m.tree_mb, base.tree_mb),
                         (m.round_s, base.round_s)]
                shown = "".join(f"{v:>9.0f} {v / b:>5.2f}x" if i < 3 else f"{v:>8.1f} {v / b:>4.2f}x"
                                for i, (v, b) in enumerate(cells))
                print(f"{method:<10}{clients:>8}{shown}", flush=True)


if __name__ == "__main__":
    main()
