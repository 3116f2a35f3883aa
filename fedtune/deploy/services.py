"""Long-running services of a deployment, one per container (docker-compose) or
machine: the SuperLink, and an edge client (a SuperNode with its ClientApp
worker). Each checks its certificates and keys first, so a mistake is one line
from fedtune instead of a Flower retry loop."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fedtune.deploy import certs, probe
from fedtune.deploy.flwr_cli import flower_env
from fedtune.deploy.topology import Processes, stop_on_sigterm, superlink_command, supernode_command, worker_command
from fedtune.errors import FedtuneError

REFUSED = "Failed to activate SuperNode"  # Flower's log line when the SuperLink rejects a node's key


def run_superlink(certs_dir: Path, state: Path, control: str, fleet: str, isolation: str) -> None:
    """Check the server's certificates and the HOST:PORT addresses of its Control
    (and Runtime) API and Fleet API, then become the SuperLink (exec: signals from
    the container runtime reach it directly)."""
    certs.check_server(certs_dir)
    command = superlink_command(certs_dir, state / "superlink.db", control, fleet, isolation)
    state.mkdir(parents=True, exist_ok=True)
    os.execve(command[0], command, flower_env(state / "flwr-home"))


def run_node(superlink: str, ca: Path, key: Path, node_config: dict[str, int | str], port: int, flwr_home: Path) -> int:
    """An edge client until it stops: the SuperNode and its ClientApp worker, each
    ended if the other ends (a restart policy then starts both again), both
    logging to this process's output. Returns the SuperNode's exit code."""
    certs.check_ca(ca)
    certs.check_node_key(key)
    probe.check_tls_endpoint(superlink, ca)
    stop_on_sigterm()
    with Processes(None, flower_env(flwr_home)) as procs:
        node = procs.start("supernode", supernode_command(superlink, ca, key, node_config, port))
        worker = procs.start("worker", worker_command(port))
        print(f"SuperNode {node.pid} and its ClientApp worker {worker.pid} started", flush=True)
        try:
            while node.poll() is None and worker.poll() is None:
                time.sleep(1.0)
        except KeyboardInterrupt:  # Ctrl-C, docker stop
            print("stopping the SuperNode and its worker", flush=True)
            return 130
        print(f"the {'SuperNode' if node.poll() is not None else 'ClientApp worker'} exited; stopping the other", flush=True)
        time.sleep(0.5)  # let the relay catch the last lines
        if any(REFUSED in line for line in procs.tail["supernode"]):
            raise FedtuneError(f"the SuperLink at {superlink} refused this node: register {key}.pub with it "
                               "(`fedtune certs register`), or wait a minute if a node with this key just stopped")
        return node.returncode if node.returncode is not None else 1
