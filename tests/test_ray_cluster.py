"""Simulation on an existing Ray cluster: a real two-node cluster on this machine
(`ray start --head` and `ray start --address`, each node one CPU, started from its
own working directory without fedtune on its path), clients on both nodes running
fedtune's code as the runtime environment shipped it, and a ledger and metrics
equal to a single-node run's."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from conftest import small_config, small_overrides
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.app import client
from fedtune.cli import main
from fedtune.report.rows import RoundRow, read_rows, read_summary
from fedtune.report.run_dir import create_run_dir
from fedtune.simulation import run_simulation

RAY = Path(sys.executable).with_name("ray")
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_node(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`ray start ARGS --block` with one CPU and ports of its own, from ``cwd``, in a
    session of its own, with neither fedtune nor a Ray address on its path."""
    ports = {
        flag: str(_free_port())
        for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
                     "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")
    }
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    cwd.mkdir(parents=True)
    return subprocess.Popen(
        [str(RAY), "start", *args, "--num-cpus", "1", "--disable-usage-stats", "--block", *(a for p in ports.items() for a in p)],
        cwd=cwd, env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )


def _stop_node(node: subprocess.Popen) -> None:
    """SIGTERM makes `ray start --block` end its node's processes; whatever of its
    session is left after that is killed, by id (never `ray stop`: it ends every
    Ray on the machine)."""
    node.terminate()
    try:
        node.wait(60)
    except subprocess.TimeoutExpired:
        node.kill()
    for pid in _session_pids(node.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # after pid and (comm): state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def _wait_for_nodes(address: str, count: int, logs: list[Path]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    ray.init(address=address, log_to_driver=False)
    try:
        while sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray cluster did not reach {count} nodes: " + " | ".join(p.read_text()[-500:] for p in logs))
            time.sleep(0.5)
    finally:
        ray.shutdown()


@pytest.fixture
def two_node_cluster(tmp_path) -> Iterator[str]:
    """A head and a worker node on this machine; the head's address."""
    temp = Path(tempfile.mkdtemp(prefix="ftray", dir="/tmp"))  # short: Ray's socket paths must stay under 108 bytes
    port, nodes = _free_port(), []
    address, logs = f"127.0.0.1:{port}", [tmp_path / "head.log", tmp_path / "worker.log"]
    try:
        head_args = ["--head", "--port", str(port), "--ray-client-server-port", str(_free_port()), "--include-dashboard", "false"]
        nodes.append(_start_node([*head_args, "--temp-dir", str(temp / "head")], tmp_path / "head-cwd", logs[0]))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _listening(port) and nodes[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        nodes.append(_start_node(["--address", address, "--temp-dir", str(temp / "worker")], tmp_path / "worker-cwd", logs[1]))
        _wait_for_nodes(address, 2, logs)
        yield address
    finally:
        for node in reversed(nodes):
            _stop_node(node)
        shutil.rmtree(temp, ignore_errors=True)


def _recording(log: Path) -> ClientApp:
    """fedtune's ClientApp, writing to ``log`` where each training ran: the Ray node,
    and the fedtune package the worker imported."""
    app = ClientApp()

    @app.query()
    def enroll(msg: Message, context: Context) -> Message:
        return client.enroll(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = client.train(msg, context)
        where = {"node": ray.get_runtime_context().get_node_id(), "fedtune": sys.modules["fedtune"].__file__}
        with log.open("a") as f:
            f.write(json.dumps(where) + "\n")
        return reply

    return app


def _untimed(rows: list[RoundRow]) -> list[RoundRow]:
    return [dataclasses.replace(r, wall_time_s=0.0, round_train_time_s=None, client_train_time_s=None) for r in rows]


def _executions(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.integration
def test_two_node_cluster_runs_clients_on_both_nodes_with_a_single_node_run_s_results(tmp_path, two_node_cluster, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the single-node run starts a Ray of its own
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the recording ClientApp, for the workers
    runs = {}
    for name, address in (("single", ""), ("cluster", two_node_cluster)):
        config = small_config(tmp_path, run={"name": name}, simulation={"ray_address": address})
        runs[name] = create_run_dir(config)
        run_simulation(config, runs[name], client_app=_recording(tmp_path / f"{name}.where"))

    single, cluster = (_executions(tmp_path / f"{name}.where") for name in ("single", "cluster"))
    assert len(single) == len(cluster) == 2 * 3  # rounds x clients
    assert len({e["node"] for e in single}) == 1
    assert len({e["node"] for e in cluster}) == 2, "every client ran on one node"
    shipped = [e["fedtune"] for e in cluster]
    assert all("/runtime_resources/working_dir_files/" in path for path in shipped), shipped

    ledger = {name: (run_dir / "ledger.jsonl").read_text() for name, run_dir in runs.items()}
    assert ledger["cluster"] == ledger["single"] and ledger["single"]
    assert _untimed(read_rows(runs["cluster"])) == _untimed(read_rows(runs["single"]))
    summary = {name: dataclasses.replace(read_summary(run_dir), wall_time_s=0.0) for name, run_dir in runs.items()}
    assert summary["cluster"] == summary["single"]


def test_no_cluster_at_the_address_is_one_line(tmp_path, capsys):
    port = _free_port()  # nothing listens there
    assert main(["run", *small_overrides(tmp_path), "--set", f'simulation.ray_address="127.0.0.1:{port}"']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: simulation.ray_address=127.0.0.1:{port}: no Ray cluster answers there") and "\n" not in err


def test_ray_address_from_the_environment_is_honoured(tmp_path, capsys, monkeypatch):
    port = _free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert main(["run", *small_overrides(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there") and "\n" not in err
