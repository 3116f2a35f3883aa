"""FLoRA's downlink per client and round against the number of clients, in bytes of
the real protobuf payload, on the real model's layer shapes.

    .venv/bin/python benchmarks/flora_downlink.py simulations/default.toml

Every client takes part in every round, each with rank lora.rank. Payload sizes
depend only on tensor shapes, so the clients' updates here are random: no training.
"""

from __future__ import annotations

import argparse

import torch

from fedtune import wire
from fedtune.clients import client_name
from fedtune.config import load_config
from fedtune.methods import ClientUpdate, get_method
from fedtune.rounds.release import by_examples
from fedtune.task import load_model


def downlink_bytes(method, client: int, rnd: int) -> int:
    return len(wire.encode(wire.Payload(method.name, rnd, client_name(client), method.server_downlink(client))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    print(f"| clients | {' | '.join(f'round {r}' for r in range(1, args.rounds + 1))} | FedIT, any round |")
    print(f"|---:|{'---:|' * (args.rounds + 1)}")
    for n in args.clients:
        overrides = [f"partition.num_clients={n}", "federation.method=flora"]
        config = load_config(args.config, overrides)
        method = get_method(config)
        method.server_init(load_model(config))
        clients = list(range(n))
        sizes = []
        for rnd in range(1, args.rounds + 1):
            sizes.append(downlink_bytes(method, clients[0], rnd))
            g = torch.Generator().manual_seed(rnd)
            updates = [
                ClientUpdate(c, {k: torch.randn(t.shape, generator=g) for k, t in method.uplink_template(c).items()}, 1)
                for c in clients
            ]
            method.server_aggregate(updates, by_examples(updates))
        fedit = get_method(load_config(args.config, [f"partition.num_clients={n}", "federation.method=fedit"]))
        fedit.server_init(load_model(config))
        print(f"| {n} | {' | '.join(f'{s:,}' for s in sizes)} | {downlink_bytes(fedit, clients[0], 1):,} |", flush=True)


if __name__ == "__main__":
    main()
