"""`fedtune` command line: parse, validate, run, and turn user mistakes into one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtune.errors import FedtuneError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated fine-tuning simulation")
    run.add_argument("config", nargs="?", help="TOML config (default: built-in defaults)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config key; repeatable")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run after its last finished round")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    compare = sub.add_parser("compare", help="run a grid of federated runs and compare accuracy against bytes")
    compare.add_argument("config", help="compare file: [compare], [grid] and friends (see simulations/compare.toml)")
    compare.add_argument("--list", action="store_true", help="list the grid's cells and exit")
    args = parser.parse_args(argv)
    try:
        return _compare(args) if args.command == "compare" else _run(args)
    except FedtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished rounds are in the run directory", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from fedtune import checkpoint, report
    from fedtune.centralized import centralized_steps, run_centralized
    from fedtune.config import load_config
    from fedtune.methods import get_method
    from fedtune.simulation import run_simulation
    from fedtune.privacy.accounting import Budget
    from fedtune.task import client_name, client_partitions, load_model

    if args.resume:
        if args.config or args.overrides:
            raise FedtuneError("--resume runs with the run directory's own config.toml: drop CONFIG and --set")
        run_dir = Path(args.resume)
        checkpoint.require(run_dir)
        config = load_config(run_dir / "config.toml")
    else:
        config = load_config(args.config, args.overrides)
    # Preflight in this process: every user mistake surfaces here as one line,
    # before Ray starts, and a GGUF model is converted once, not once per client.
    parts = client_partitions(config)
    get_method(config).server_init(load_model(config))
    if config.privacy.mode != "none":
        Budget(config, {client_name(i): len(p) for i, p in enumerate(parts)}).check_first_round()

    if not args.resume:
        run_dir = report.create_run_dir(config)
    print(f"run directory: {run_dir}", flush=True)
    summary = run_simulation(config, run_dir, verbose=args.verbose, resume=bool(args.resume))
    if config.run.centralized_baseline:
        steps = centralized_steps(config)
        print(f"centralized baseline: {steps} steps on the pooled data ...", flush=True)
        summary = report.add_centralized(run_dir, run_centralized(config), steps)
    print(report.summary_table(summary))
    print(f"results: {run_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedtune.compare.grid import load_comparison
    from fedtune.compare.report import write_report
    from fedtune.compare.runner import cell_dir, run_cells

    comparison = load_comparison(args.config)
    print(f"{len(comparison.cells)} cells over {', '.join(comparison.axes) or 'no varying axis'}; "
          f"{len(comparison.refused)} refused by the config check; results: {comparison.output_dir}")
    for label, reason in comparison.refused.items():
        print(f"  not run: {label}: {reason}")
    if args.list:
        for cell in comparison.cells:
            print(f"  {cell.label}: {' '.join(cell.overrides)}  [{cell_dir(comparison, cell)}]")
        return 0
    results = run_cells(comparison)
    report = write_report(comparison, results)
    print((comparison.output_dir / "table.md").read_text())
    print(f"report: {report}")
    return 1 if any(r.run_dir is None for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
