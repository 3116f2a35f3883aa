"""`fedtune run`: the ServerApp and ClientApp in Flower's simulation engine (Ray)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.config import RunConfig
from fedtune.environment import configure_process

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

    from fedtune.report.rows import RunSummary


def _not_a_deprecation_notice(record: logging.LogRecord) -> bool:
    return "DEPRECATED FEATURE" not in record.getMessage()


def quiet_flower(verbose: bool) -> None:
    """Flower logs every message at INFO, and warns that run_simulation will move to
    `flwr run` (which fedtune also supports); fedtune prints its own progress."""
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        flwr_log.removeFilter(_not_a_deprecation_notice)
    else:
        flwr_log.addFilter(_not_a_deprecation_notice)  # adding twice is a no-op


def run_simulation(
    config: RunConfig, run_dir: Path, verbose: bool = False, client_app: ClientApp | None = None, resume: bool = False
) -> RunSummary:
    """Run the federated job (``resume``: continue it from its checkpoint); returns
    its summary or raises what the ServerApp raised. ``client_app`` replaces
    fedtune's own (tests use it to plant a faulty client)."""
    from flwr.simulation import run_simulation as flower_run_simulation

    from fedtune.app import client
    from fedtune.app.server import make_server_app

    configure_process()  # before Ray starts: its workers inherit the environment
    quiet_flower(verbose)
    cores = os.cpu_count() or 1
    per_client = config.simulation.cpus_per_client
    parallel = config.simulation.max_parallel_clients or max(1, cores // per_client)
    backend_config = {
        # Ray schedules by CPU count: total CPUs / CPUs per client = clients in parallel.
        "client_resources": {"num_cpus": per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": parallel * per_client, "include_dashboard": False, "log_to_driver": verbose},
    }
    outcome: dict = {}
    flower_run_simulation(
        server_app=make_server_app(config, run_dir, outcome, resume),
        client_app=client_app or client.app,
        num_supernodes=config.partition.num_clients,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise RuntimeError("the simulation ended without a result; rerun with --verbose to see Flower's log")
    return outcome["summary"]
