"""Framework overhead of a round: its wall time against its clients' pure training time.

Runs the given config (default: simulations/default.toml, 2 rounds) in Flower's
simulation engine, then the same clients' local training in this process with no
Flower at all, and prints per round:

  round train wall / sum of clients' own training time   (< 1 when clients run in parallel)
  round train wall / (sum / parallel clients)            (1.0 = no overhead at all)
  round train wall / in-process sequential training      (what Flower + Ray cost or save)

Usage: python benchmarks/round_overhead.py [CONFIG] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fedtune.config import load_config
from fedtune.methods import ClientJob, get_method
from fedtune.report.rows import read_rows
from fedtune.report.run_dir import create_run_dir
from fedtune.simulation import run_simulation
from fedtune.task import client_data, derive_seed, load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default="simulations/default.toml")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    config = load_config(args.config, [f"run.rounds={args.rounds}", "run.output_dir=runs/bench"])
    parallel = config.simulation.max_parallel_clients or (os.cpu_count() or 1) // config.simulation.cpus_per_client

    run_dir = create_run_dir(config)
    run_simulation(config, run_dir)
    rows = read_rows(run_dir)[1:]

    # The same round-1 work with no framework: sequential, same threads per client as an actor.
    torch.set_num_threads(config.simulation.cpus_per_client)
    method = get_method(config)
    method.server_init(load_model(config))
    down = method.server_downlink(0)
    started = time.perf_counter()
    for pid in range(config.partition.num_clients):
        job = ClientJob(pid, client_data(config, pid), derive_seed(config.run.seed, 1, pid))
        method.client_train(load_model(config), down, job)
    sequential = time.perf_counter() - started

    print(f"config {args.config}: {config.partition.num_clients} clients, {parallel} in parallel, "
          f"{config.train.local_steps} steps x {config.train.batch_size} examples each")
    print(f"{'round':>5} {'wall s':>8} {'sum clients s':>14} {'wall/sum':>9} {'wall/(sum/par)':>15}")
    for r in rows:
        wall, total = r.round_train_time_s, r.client_train_time_s
        print(f"{r.round:>5} {wall:>8.1f} {total:>14.1f} {wall / total:>9.2f} {wall / (total / parallel):>15.2f}")
    median_wall = statistics.median(r.round_train_time_s for r in rows)
    print(f"in-process sequential training of one round (no Flower): {sequential:.1f} s")
    print(f"median round train wall / in-process sequential: {median_wall / sequential:.2f}")


if __name__ == "__main__":
    main()
