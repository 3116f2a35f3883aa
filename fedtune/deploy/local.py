"""`fedtune deploy local`: the docker-compose topology as processes on loopback,
for a machine without Docker. A SuperLink with TLS and SuperNode authentication,
N SuperNodes each with its own registered key, partition and ClientApp worker.

Files live in a state directory, reused between runs:

    certs/          the signer's: CA, server certificate, nodes/node-I key pairs (made once)
    export/         copied from certs/ at each start (`certs.export`), so each process
                    is pointed at its own files only: the SuperLink at superlink/,
                    SuperNode I at its key nodes/node-I/node-I, every CA check and the
                    registration at public/
    flwr-home/      FLWR_HOME of the SuperLink, its ServerApps and the flwr CLI
    nodes/node-I/   FLWR_HOME of SuperNode I
    logs/           one log per process

The SuperLink keeps its state in memory and the keys are registered at every
start: a database kept from the last start would still list that start's
SuperNodes as online for a minute, refuse the new ones their keys, and hand the
run to the old ones.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedtune.deploy import certs, probe
from fedtune.deploy.flwr_cli import FlwrCli, flower_env
from fedtune.deploy.submit import run_to_end
from fedtune.deploy.topology import Processes, free_port, superlink_command, supernode_command, wait_for, worker_command

SUPERLINK = "superlink"
READY_S = 180.0  # SuperNodes import Flower, workers torch and transformers: slow on a busy machine


class LocalFederation:
    """Start with ``with``; ``run`` jobs on it; leaving the block stops every process.

    ``node_configs[i]`` is SuperNode i's node config (partition-id at least);
    ``warm`` False leaves Flower's default of one ClientApp process per message;
    ``threads`` caps each client's torch threads (like simulation.cpus_per_client)."""

    def __init__(self, state: Path, node_configs: list[dict[str, int | str]], warm: bool = True, threads: int = 1) -> None:
        self.state, self.node_configs, self.warm = state.resolve(), node_configs, warm
        self.certs, self.export = self.state / "certs", self.state / "export"
        self.procs = Processes(self.state / "logs", flower_env(self.state / "flwr-home"))
        self.threads = str(threads)  # for the clients only; the ServerApp takes the machine's default, as in simulation
        self.fleet = f"127.0.0.1:{free_port()}"
        self.control = f"127.0.0.1:{free_port()}"
        self.public = self.export / certs.PUBLIC_BUNDLE
        self.flwr = FlwrCli(self.state / "flwr-home", self.control, self.public / certs.CA)
        self.workers: dict[str, int] = {}  # SuperNode name -> its Runtime API port

    def __enter__(self) -> LocalFederation:
        names = [f"node-{i}" for i in range(len(self.node_configs))]
        certs.create(self.certs, names)
        certs.export(self.certs, self.export)
        started = time.monotonic()
        try:
            self._start_superlink()
            print(f"SuperLink up: Fleet API {self.fleet} (gRPC, TLS, node authentication), Control API {self.control}",
                  flush=True)
            for name in names:
                self.flwr.register(self.public / certs.NODES / f"{name}.pub")
            for name, node_config in zip(names, self.node_configs):
                self.start_node(name, self.export / certs.NODES / name / name, node_config)
            print(f"waiting for {len(names)} SuperNodes to connect (logs: {self.procs.log_dir})", flush=True)
            # Each check is a `flwr` process: every 2 s, not to slow the starting nodes down.
            wait_for(lambda: self.flwr.online_nodes() >= len(names), READY_S, f"{len(names)} SuperNodes",
                     lambda: self.procs.check(SUPERLINK, *names), 2.0)
            print(f"{len(names)} SuperNodes online after {time.monotonic() - started:.0f} s", flush=True)
        except BaseException:
            self.procs.stop_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.procs.stop_all()

    def _start_superlink(self) -> None:
        command = superlink_command(self.export / certs.SUPERLINK_BUNDLE, None, self.control, self.fleet)
        self.procs.start(SUPERLINK, command)
        ca = self.public / certs.CA
        wait_for(lambda: _answers(self.control, ca) and _answers(self.fleet, ca), READY_S, "the SuperLink", self.alive)

    def start_node(self, name: str, key: Path, node_config: dict[str, int | str]) -> None:
        """SuperNode ``name`` (and its worker) authenticating with ``key``."""
        port = free_port()
        command = supernode_command(self.fleet, self.public / certs.CA, key, node_config, port, self.warm)
        self.procs.start(name, command, FLWR_HOME=str(self.state / "nodes" / name), OMP_NUM_THREADS=self.threads)
        if self.warm:
            self.workers[name] = port
            self._start_worker(name)

    def _start_worker(self, name: str, app: str | None = None, **env: str) -> None:
        self.procs.start(f"{name}-worker", worker_command(self.workers[name], app), FLWR_HOME=str(self.state / "nodes" / name),
                         OMP_NUM_THREADS=self.threads, **env)

    def replace_worker(self, name: str, app: str, **env: str) -> None:
        """Serve SuperNode ``name``'s tasks with another ClientApp (MODULE:NAME) from now on."""
        self.procs.stop(f"{name}-worker")
        self._start_worker(name, app, **env)

    def alive(self) -> None:
        """Raise if the SuperLink has died; start again a worker that died under a
        live SuperNode (else that node would hold its next task forever). A dead
        SuperNode is the run's business: the server drops its client and goes on
        while federation.min_replies allows."""
        self.procs.check(SUPERLINK)
        for name in self.workers:
            worker, node = self.procs.procs.get(f"{name}-worker"), self.procs.procs.get(name)
            if worker and worker.poll() is not None and node and node.poll() is None:
                self._start_worker(name)

    def run(self, run_dir: Path, resume: bool = False) -> dict:
        return run_to_end(self.flwr, run_dir, resume, self.alive)


def _answers(address: str, ca: Path) -> bool:
    try:
        probe.check_tls_endpoint(address, ca, timeout=2.0)
    except probe.Unreachable:
        return False
    return True
