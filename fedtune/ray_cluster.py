"""Simulation on an existing Ray cluster (docs/deploy.md, "Multi-node simulation").

The driver (`fedtune run`) joins the cluster and ships fedtune's own code to the
workers in Ray's runtime environment, with the process settings its clients need:
a worker node needs the same Python packages (torch, flwr, transformers, ...),
not a copy of fedtune at the same path.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fedtune
from fedtune.config import RAY_ADDRESS_RULE, RunConfig, valid_ray_address
from fedtune.environment import DEFAULTS
from fedtune.errors import FedtuneError
from fedtune.methods.replicas import REPLICA_DIR
from fedtune.privacy.secrets import CLIENT_SECRET

CONNECT_TIMEOUT_S = 5.0


def cluster_address(config: RunConfig) -> tuple[str, str]:
    """The cluster to run on and where that was said (config key or RAY_ADDRESS);
    ("", "") for a Ray instance of this process's own."""
    if config.simulation.ray_address:
        return config.simulation.ray_address, "simulation.ray_address"
    if address := os.environ.get("RAY_ADDRESS"):
        if not valid_ray_address(address):
            raise FedtuneError(f"RAY_ADDRESS={address}: fedtune joins a cluster at {RAY_ADDRESS_RULE}")
        if config.simulation.max_parallel_clients:
            raise FedtuneError(
                "simulation.max_parallel_clients must be 0 on a Ray cluster (RAY_ADDRESS is set): "
                "the cluster's CPUs / cpus_per_client set how many clients run at once"
            )
        return address, "RAY_ADDRESS"
    return "", ""


def runtime_env(code_dir: Path) -> dict:
    """The workers' working directory: ``code_dir`` (fedtune's package), and the
    environment fedtune's client processes expect. A working directory, not
    py_modules: without one, Ray puts the driver's own working directory first on
    every worker's path, where another machine may hold an older fedtune."""
    shared = [*DEFAULTS, CLIENT_SECRET, REPLICA_DIR]
    return {"working_dir": str(code_dir), "env_vars": {key: os.environ[key] for key in shared if key in os.environ}}


@contextmanager
def on_cluster(config: RunConfig, verbose: bool) -> Iterator[None]:
    """Within it, this process is joined to the run's Ray cluster, if it has one:
    Flower's backend then uses it rather than starting Ray. A one-line FedtuneError
    if none answers at the address."""
    address, source = cluster_address(config)
    if not address:
        yield
        return
    import ray

    if address != "auto":
        _check_reachable(address, source)
    with tempfile.TemporaryDirectory(prefix="fedtune-code-") as code_dir:
        package = Path(fedtune.__file__).parent
        shutil.copytree(package, Path(code_dir) / package.name, ignore=shutil.ignore_patterns("__pycache__"))
        try:
            ray.init(address=address, runtime_env=runtime_env(Path(code_dir)), log_to_driver=verbose)
        except ConnectionError as e:
            raise FedtuneError(f"{source}={address}: cannot join a Ray cluster ({_first_line(e)}); {_START_ONE}") from None
    try:
        yield
    finally:
        ray.shutdown()  # Flower's backend does too, unless it failed before starting


_START_ONE = "start one with `ray start --head` (docs/deploy.md) or fix the address"


def _check_reachable(address: str, source: str) -> None:
    """ray.init retries an address where nothing listens for minutes: fail fast."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise FedtuneError(f"{source}={address}: no Ray cluster answers there ({reason}); {_START_ONE}") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
