"""`fedtune run`: the ServerApp and ClientApp in Flower's simulation engine (Ray)."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.config import RunConfig
from fedtune.environment import configure_process
from fedtune.errors import FedtuneError
from fedtune.methods.replicas import REPLICA_DIR
from fedtune.privacy import secrets
from fedtune.ray_cluster import on_cluster

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

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
    secrets.share_with_clients(run_dir, config)
    quiet_flower(verbose)
    cores = os.cpu_count() or 1
    per_client = config.simulation.cpus_per_client
    parallel = config.simulation.max_parallel_clients or max(1, cores // per_client)
    gpus = gpus_per_client(config, parallel)
    backend_config = {
        # Ray schedules by CPU count: total CPUs / CPUs per client = clients in parallel
        # (and by GPU share, where clients train on GPUs); on a cluster (on_cluster), by
        # the cluster's CPUs, and init_args goes unused.
        "client_resources": {"num_cpus": per_client, "num_gpus": gpus},
        "init_args": {"num_cpus": parallel * per_client, "include_dashboard": False, "log_to_driver": verbose},
    }
    outcome: dict = {}
    stop, stopped = threading.Event(), threading.Event()
    with _replica_dir(), on_cluster(config, verbose), _interruptible(stop, stopped):
        flower_run_simulation(
            server_app=_stoppable(make_server_app(config, run_dir, outcome, resume), stop, stopped),
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


@contextmanager
def _replica_dir() -> Iterator[None]:
    """The clients' replica store (`fedtune.methods.replicas`) in a directory that
    goes when the run ends (under a user's own $FEDTUNE_REPLICA_DIR, if set); Ray's
    workers, started inside, inherit where it is."""
    before = os.environ.get(REPLICA_DIR)
    with tempfile.TemporaryDirectory(prefix="fedtune-replicas-", dir=before) as directory:
        os.environ[REPLICA_DIR] = directory
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(REPLICA_DIR)
            else:
                os.environ[REPLICA_DIR] = before


def gpus_per_client(config: RunConfig, parallel: int) -> float:
    """Each client actor's GPU share: simulation.gpus_per_client, or where clients
    train on CUDA (model.device), the machine's GPUs split among the ``parallel``
    clients; 0 on the CPU. Ray points each actor's CUDA_VISIBLE_DEVICES at its share,
    so "cuda" (or "auto") is the one to use in simulation, not "cuda:N"."""
    import torch

    from fedtune.devices import resolve_device

    wanted = config.simulation.gpus_per_client
    if resolve_device(config.model.device).type != "cuda":
        if wanted:
            raise FedtuneError(f"simulation.gpus_per_client = {wanted} but clients train on the CPU "
                               f"(model.device = {config.model.device!r} on this machine); set it to 0")
        return 0.0
    return wanted or min(1.0, torch.cuda.device_count() / parallel)


# Ctrl-C. A KeyboardInterrupt raised in the main thread lands in Flower's
# simulation loop, which shuts Ray down and returns, but leaves the ServerApp
# thread polling the grid until federation.timeout_s (an hour by default), and
# the interpreter waits for it at exit. So the first Ctrl-C only sets ``stop``:
# the ServerApp's next use of the grid raises, and it ends after its last
# finished round with its files complete. Only then does the main thread get
# the KeyboardInterrupt, which takes it out of Flower's wait for the ClientApp
# calls in flight: Ray's workers block SIGINT, Flower cannot cancel them, and
# one client's local training can take minutes. Flower's threads that wait on
# those calls never return once Ray is shut down, so the CLI exits with os._exit.


@contextmanager
def _interruptible(stop: threading.Event, stopped: threading.Event) -> Iterator[None]:
    """Within it, Ctrl-C sets ``stop``, and once ``stopped`` is set raises
    KeyboardInterrupt (unless the caller handles or ignores SIGINT itself)."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def handle(signum: int, frame: object) -> None:
        if stopped.is_set():
            logging.getLogger("flwr").setLevel(logging.CRITICAL)  # the abandoned calls are no errors
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stoppable(app: ServerApp, stop: threading.Event, stopped: threading.Event) -> ServerApp:
    """``app``, but once ``stop`` is set its next use of the grid raises
    KeyboardInterrupt; when it has ended so, it interrupts the main thread."""
    from flwr.serverapp import ServerApp

    wrapper = ServerApp()

    @wrapper.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            app(_StoppableGrid(grid, stop), context)
        finally:
            if stop.is_set():
                stopped.set()
                # A signal, not _thread.interrupt_main(): only a signal wakes the main thread's wait.
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    return wrapper


class _StoppableGrid:
    """Flower's grid, until ``stop`` is set."""

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        self._grid, self._stop = grid, stop

    def __getattr__(self, name: str) -> Any:
        if self._stop.is_set():
            raise KeyboardInterrupt
        return getattr(self._grid, name)
