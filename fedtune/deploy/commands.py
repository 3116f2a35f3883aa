"""`fedtune certs ...` and `fedtune deploy ...`: from parsed arguments to the
work in this package (the parsers are in fedtune/cli.py)."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedtune.config import RunConfig
from fedtune.deploy import certs, probe, services
from fedtune.deploy.flwr_cli import FlwrCli
from fedtune.deploy.local import LocalFederation
from fedtune.deploy.submit import run_to_end
from fedtune.deploy.topology import node_config, stop_on_sigterm
from fedtune.errors import FedtuneError
from fedtune.hardware.profiles import device_names


def certs_create(args: argparse.Namespace) -> int:
    if args.owner and not args.export:
        raise FedtuneError("--owner gives the exported files to a user: add --export DIR")
    written = certs.create(args.dir, [f"node-{i}" for i in range(args.nodes)], args.san, args.days)
    print("\n".join(f"wrote {path}" for path in written) or f"{args.dir} is complete; nothing written")
    if args.export:
        by_dir: dict[Path, list[str]] = {}
        for path in certs.export(args.dir, args.export, args.owner):
            by_dir.setdefault(path.parent, []).append(path.name)
        print("\n".join(f"exported {d}: {' '.join(names)}" for d, names in by_dir.items()))
    return 0


def certs_node(args: argparse.Namespace) -> int:
    for path in certs.create_node_key(args.key.parent, args.key.name):
        print(f"wrote {path}")
    print(f"give {args.key}.pub to the operator of the SuperLink to register; keep {args.key} here")
    return 0


def certs_register(args: argparse.Namespace) -> int:
    keys = [key for path in args.keys for key in _public_keys(path)]
    with _flwr(args) as flwr:
        for key in keys:
            flwr.register(key)
            print(f"registered {key}")
    return 0


def _public_keys(path: Path) -> list[Path]:
    """``path``, or every NAME.pub in the directory ``path``."""
    if not path.is_dir():
        return [path]
    if not (keys := sorted(path.glob("*.pub"))):
        raise FedtuneError(f"{path} holds no public key (NAME.pub) to register")
    return keys


def deploy_superlink(args: argparse.Namespace) -> int:
    services.run_superlink(args.certs, args.state, args.control_address, args.fleet_address,
                           "process" if args.separate_serverapp else "subprocess")
    return 0  # not reached: the SuperLink replaced this process


def deploy_node(args: argparse.Namespace) -> int:
    return services.run_node(args.superlink, args.ca, args.key, node_config(args.partition_id, args.device, args.torch_device, args.replica_dir),
                             args.port, args.flwr_home)


def run_job(args: argparse.Namespace, prepare: Callable[[], tuple[RunConfig, Path]]) -> tuple[dict, Path]:
    """`deploy submit` (to a running SuperLink, checked before ``prepare`` makes the
    run directory) or `deploy local` (start the topology here): (summary, run directory)."""
    stop_on_sigterm()
    if args.action == "submit":
        with _flwr(args) as flwr:
            config, run_dir = prepare()
            return run_to_end(flwr, run_dir, bool(args.resume)), run_dir
    config, run_dir = prepare()
    clients = config.partition.num_clients
    devices = device_names(config.hardware, clients, config.run.seed) if config.hardware.modelled else [""] * clients
    replicas = str((args.state / "replicas").resolve())  # the local nodes share one store, as a simulation's clients do
    node_configs = [node_config(i, device, replica_dir=replicas) for i, device in enumerate(devices)]
    federation = LocalFederation(args.state, node_configs, warm=not args.per_message_clientapp,
                                 threads=config.simulation.cpus_per_client)
    with federation:
        return federation.run(run_dir, bool(args.resume)), run_dir


@contextmanager
def _flwr(args: argparse.Namespace) -> Iterator[FlwrCli]:
    """`flwr` against --superlink, trusting --ca, with a throwaway FLWR_HOME; the SuperLink checked first."""
    certs.check_ca(args.ca)
    probe.check_tls_endpoint(args.superlink, args.ca)
    with tempfile.TemporaryDirectory(prefix="fedtune-flwr-") as home:
        yield FlwrCli(Path(home), args.superlink, args.ca)
