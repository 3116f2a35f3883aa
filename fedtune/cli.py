"""`fedtune` command line: parse, validate, run, and turn user mistakes into one line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.environment import configure_process
from fedtune.errors import FedtuneError

if TYPE_CHECKING:  # the CLI imports the heavy modules only for the command it runs
    from fedtune.config import RunConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated fine-tuning simulation")
    _job_arguments(run)
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    run.set_defaults(func=_run)
    compare = sub.add_parser("compare", help="run a grid of federated runs and compare accuracy against bytes")
    compare.add_argument("config", help="compare file: [compare], [grid] and friends (see simulations/compare.toml)")
    only_one = compare.add_mutually_exclusive_group()
    only_one.add_argument("--list", action="store_true", help="list the grid's cells and exit")
    only_one.add_argument("--report", action="store_true",
                          help="write the report from the cells finished so far and run nothing (a grid run in pieces)")
    only_one.add_argument("--only", action="append", metavar="TEXT",
                          help="run only the cells whose label contains TEXT (repeatable; --list shows the labels), "
                               "then report every cell finished")
    compare.set_defaults(func=_compare)
    _deploy_parsers(sub)
    args = parser.parse_args(argv)
    configure_process()
    try:
        return args.func(args)
    except FedtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished rounds are in the run directory", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # At once: a normal exit joins every thread, and Flower's that waited on the
        # ClientApp calls a Ctrl-C abandoned never return (fedtune/simulation.py).
        os._exit(130)


def _job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="TOML config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key; repeatable")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run after its last finished round")
    parser.add_argument("--reuse-secret", metavar="RUN_DIR", type=Path,
                        help="draw the sample and the DP noise from RUN_DIR's secret: repeat that run exactly")


def _run(args: argparse.Namespace) -> int:
    from fedtune.centralized import centralized_steps, run_centralized
    from fedtune.report.console import summary_table
    from fedtune.report.run_dir import add_centralized
    from fedtune.simulation import run_simulation

    config, run_dir = _prepare(args)
    summary = run_simulation(config, run_dir, verbose=args.verbose, resume=bool(args.resume))
    if config.run.centralized_baseline:
        steps = centralized_steps(config)
        print(f"centralized baseline: {steps} steps on the pooled data ...", flush=True)
        summary = add_centralized(run_dir, run_centralized(config), steps)
    print(summary_table(summary))
    print(f"results: {run_dir}")
    return 0


def _prepare(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """The validated config and its run directory (new, or --resume's)."""
    from fedtune import checkpoint
    from fedtune.config import load_config
    from fedtune.devices import resolve_device
    from fedtune.methods.registry import get_method
    from fedtune.privacy import secrets
    from fedtune.privacy.factory import server_privacy
    from fedtune.report.run_dir import create_run_dir
    from fedtune.task import client_partitions, load_model

    if args.resume:
        if args.config or args.overrides or args.reuse_secret:
            raise FedtuneError("--resume runs with the run directory's own config.toml and secret: drop CONFIG, --set "
                               "and --reuse-secret")
        run_dir = Path(args.resume)
        checkpoint.require(run_dir)
        config = load_config(run_dir / "config.toml")
    else:
        config = load_config(args.config, args.overrides)
    # Preflight in this process: every user mistake surfaces here as one line,
    # before Ray starts, and a GGUF model is converted once, not once per client.
    parts = client_partitions(config)
    get_method(config).check(load_model(config))
    resolve_device(config.model.server_device, "model.server_device")
    server_privacy(config, {i: len(p) for i, p in enumerate(parts)}, config.run.seed).check_first_round()

    if not args.resume:
        run_dir = create_run_dir(config)
        if args.reuse_secret:
            secrets.reuse(args.reuse_secret, run_dir)
    print(f"run directory: {run_dir}", flush=True)
    return config, run_dir


def _deploy_parsers(sub: argparse._SubParsersAction) -> None:
    """`fedtune certs ...` and `fedtune deploy ...` (docs/deploy.md); the work is in fedtune/deploy/."""
    certs = sub.add_parser("certs", help="TLS certificates and SuperNode keys").add_subparsers(dest="action", required=True)
    create = certs.add_parser("create", help="make what is missing of the CA, server certificate and node keys")
    create.add_argument("dir", type=Path)
    create.add_argument("--nodes", type=int, default=0, help="node key pairs node-0 ... node-(N-1)")
    create.add_argument("--san", action="append", default=[], help="a host name or address the SuperLink is reached by; repeatable")
    create.add_argument("--days", type=int, default=365, help="certificate lifetime")
    create.add_argument("--export", type=Path, metavar="OUT",
                        help="then copy each party's files (never ca.key) to OUT/superlink, OUT/public, OUT/nodes/NAME")
    create.add_argument("--owner", metavar="USER", help="give the exported files to USER (when running as root)")
    node = certs.add_parser("node", help="a node key pair, made on the node's own machine")
    node.add_argument("key", type=Path, help="private key file; the public key is written beside it as KEY.pub")
    register = certs.add_parser("register", help="register node public keys with a running SuperLink")
    register.add_argument("keys", type=Path, nargs="+", metavar="KEY.pub", help="a public key, or a directory of them")
    deploy = sub.add_parser("deploy", help="run on Flower's deployment runtime: gRPC, TLS, authenticated nodes")
    deploy = deploy.add_subparsers(dest="action", required=True)
    local = deploy.add_parser("local", help="start a SuperLink and N SuperNodes as local processes, run, report")
    _job_arguments(local)
    local.add_argument("--clients", type=int, help="SuperNodes, one per partition (sets partition.num_clients)")
    local.add_argument("--state", type=Path, default=Path(".fedtune/deploy"), help="certificates, logs, SuperLink state")
    local.add_argument("--per-message-clientapp", action="store_true",
                       help="Flower's default of a fresh ClientApp process per message (to measure its cost)")
    submit = deploy.add_parser("submit", help="run on a running SuperLink, e.g. docker compose's")
    _job_arguments(submit)
    superlink = deploy.add_parser("superlink", help="start the SuperLink (compose's superlink service)")
    superlink.add_argument("--certs", type=Path, required=True,
                           help="directory with ca.pem, server.pem, server.key (`fedtune certs create --export`: OUT/superlink)")
    superlink.add_argument("--state", type=Path, required=True, help="its database and FLWR_HOME")
    superlink.add_argument("--control-address", default="127.0.0.1:9093", metavar="HOST:PORT",
                           help="Control API (flwr, register, submit) and Runtime API (flower-superexec): one HTTPS "
                                "listener in Flower 1.39, without authentication, so loopback unless HOST is on a "
                                "private network (default %(default)s)")
    superlink.add_argument("--fleet-address", default="0.0.0.0:9092", metavar="HOST:PORT",
                           help="Fleet API (gRPC, TLS, node authentication) for SuperNodes (default %(default)s)")
    superlink.add_argument("--separate-serverapp", action="store_true",
                           help="a `flower-superexec` elsewhere runs the ServerApp (--isolation process)")
    edge = deploy.add_parser("node", help="start one edge client: a SuperNode and its ClientApp worker")
    edge.add_argument("--key", type=Path, required=True, help="this node's private key (`fedtune certs node`)")
    edge.add_argument("--partition-id", type=int, required=True)
    edge.add_argument("--device", default="", help="this node's device profile (hardware catalogue name)")
    edge.add_argument("--torch-device", default="", metavar="DEVICE",
                      help="where this node trains: auto, cpu, cuda or cuda:N (default: the run's model.device)")
    edge.add_argument("--replica-dir", default="", metavar="DIR",
                      help="where FLoRA and FedKSeed keep this node's copy of the global model between rounds "
                           "(default: $FEDTUNE_REPLICA_DIR, else the temporary directory)")
    edge.add_argument("--port", type=int, default=9094, help="the SuperNode's local Runtime API port")
    edge.add_argument("--flwr-home", type=Path, default=Path("~/.flwr").expanduser())
    for command in (register, submit, edge):  # they talk to a running SuperLink
        command.add_argument("--superlink", required=True, metavar="HOST:PORT",
                             help="its Fleet API (node) or Control API (register, submit)")
        command.add_argument("--ca", type=Path, required=True, help="the CA certificate (ca.pem)")
    for parser in (*certs.choices.values(), *deploy.choices.values()):
        parser.set_defaults(func=_deploy)


def _deploy(args: argparse.Namespace) -> int:
    from fedtune.deploy import commands
    from fedtune.report.console import summary_table

    if args.action not in ("local", "submit"):
        return getattr(commands, f"{args.command}_{args.action}")(args)
    if getattr(args, "clients", None):
        if args.resume:
            raise FedtuneError("--resume runs with the run directory's own config.toml: drop --clients")
        args.overrides.append(f"partition.num_clients={args.clients}")
    summary, run_dir = commands.run_job(args, lambda: _prepare(args))
    print(summary_table(summary))
    print(f"results: {run_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedtune.compare.grid import load_comparison
    from fedtune.compare.report import write_report
    from fedtune.compare.runner import cell_dir, finished_cells, run_cells

    comparison = load_comparison(args.config)
    print(f"{len(comparison.cells)} cells over {', '.join(comparison.axes) or 'no varying axis'}; "
          f"{len(comparison.refused)} refused by the config check; results: {comparison.output_dir}")
    for label, reason in comparison.refused.items():
        print(f"  not run: {label}: {reason}")
    if args.list:
        for cell in comparison.cells:
            print(f"  {cell.label}: {' '.join(cell.overrides)}  [{cell_dir(comparison, cell)}]")
        return 0
    if args.report or args.only:
        failed = {}
        if args.only:
            chosen = [cell for cell in comparison.cells if any(text in cell.label for text in args.only)]
            if not chosen:
                raise FedtuneError(f"--only {' / '.join(args.only)!r} matches no cell's label; --list shows them")
            failed = {r.cell.label: r for r in run_cells(dataclasses.replace(comparison, cells=chosen)) if r.run_dir is None}
        results = finished_cells(comparison)
        done = {r.cell.label for r in results} | set(failed)
        pending = [cell.label for cell in comparison.cells if cell.label not in done]
        print(f"{len(results)} of {len(comparison.cells)} cells finished")
        results += failed.values()
    else:
        results, pending = run_cells(comparison), []
    report = write_report(comparison, results, pending)
    print((comparison.output_dir / "table.md").read_text())
    print(f"report: {report}")
    return 1 if any(r.run_dir is None for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
