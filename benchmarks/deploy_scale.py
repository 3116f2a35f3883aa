"""A deployment of many SuperNodes on one host: `fedtune deploy local` (TLS,
authenticated nodes, one warm ClientApp worker per SuperNode) at 4 and at 20
SuperNodes, every client training every round (MiniLM, simulations/quick.toml's
task). Prints the peak resident memory of the ServerApp and of the largest
ClientApp worker, the peak of the whole process tree's summed proportional set
size (shared library pages counted once, see scale.py) and its share per
SuperNode, and the median wall time of a round after the first, with each
figure's ratio to the smallest deployment.

    .venv/bin/python benchmarks/deploy_scale.py [--clients 4 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from scale import Measured, measure


def deploy(clients: int, rounds: int, out: Path) -> Measured:
    overrides = {"run.rounds": rounds, "run.output_dir": str(out / "runs"), "train.local_steps": 5,
                 "train.batch_size": 8, "data.test_size": 200}
    argv = [sys.executable, "-m", "fedtune.cli", "deploy", "local", "simulations/quick.toml",
            "--clients", str(clients), "--state", str(out / "state")]
    argv += [a for key, value in overrides.items() for a in ("--set", f"{key}={value}")]
    return measure(argv, out, worker_marks=("fedtune.deploy.worker",), server_marks=("flwr-serverapp",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", nargs="+", type=int, default=[4, 20])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"every client every round, {args.rounds} rounds; MB peak resident, ratio to {args.clients[0]} SuperNodes")
    print(f"{'SuperNodes':>10}{'ServerApp MB':>18}{'worker MB':>16}{'tree MB':>16}{'tree MB/node':>18}{'s/round':>14}")
    base = None
    with tempfile.TemporaryDirectory(prefix="fedtune-deploy-scale-") as tmp:
        for clients in args.clients:
            out = Path(tmp) / f"n{clients}"
            out.mkdir()
            m = deploy(clients, args.rounds, out)
            base = base or (m, args.clients[0])
            b, n0 = base
            per_node, base_per_node = m.tree_mb / clients, b.tree_mb / n0
            print(f"{clients:>10}{m.server_mb:>11.0f} {m.server_mb / b.server_mb:>5.2f}x{m.worker_mb:>9.0f} "
                  f"{m.worker_mb / b.worker_mb:>5.2f}x{m.tree_mb:>9.0f} {m.tree_mb / b.tree_mb:>5.2f}x"
                  f"{per_node:>11.0f} {per_node / base_per_node:>5.2f}x{m.round_s:>8.1f} {m.round_s / b.round_s:>4.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
