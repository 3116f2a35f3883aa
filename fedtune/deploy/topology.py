"""The processes of a deployment and the Flower commands that start them, shared by
`fedtune deploy local` (all on loopback) and the docker-compose services (one per
container), so both run the very same flags:

    SuperLink   Fleet API over gRPC with TLS and SuperNode authentication, its
                Control and Runtime APIs over HTTPS (no authentication: never
                on a public address), state in a SQLite file
    SuperNode   per edge client: its node key, node config (partition-id, device),
                and `--isolation process`, served by
    worker      a long-running ClientApp process (fedtune.deploy.worker)
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from fedtune.deploy import certs, probe
from fedtune.deploy.flwr_cli import BIN
from fedtune.errors import FedtuneError

PR_SET_PDEATHSIG = 1  # prctl(2)


def superlink_command(certs_dir: Path, database: Path | None, control: str, fleet: str,
                      isolation: str = "subprocess") -> list[str]:
    """``control``: HOST:PORT of the Control and Runtime APIs, which Flower 1.39
    serves on one unauthenticated HTTPS listener (its --host/--port; its
    --control-api-address is a deprecated gRPC leftover); ``fleet``: the Fleet API's.
    ``isolation`` 'subprocess': the SuperLink starts each run's ServerApp itself;
    'process': a separate `flower-superexec` does (compose's serverapp service).
    ``database`` None: state in memory, gone with the process."""
    host, port = probe.split_address(control)
    probe.split_address(fleet)  # a malformed address is one line here, not Flower's traceback
    return [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(certs_dir / certs.CA),
        "--ssl-certfile", str(certs_dir / certs.SERVER),
        "--ssl-keyfile", str(certs_dir / certs.SERVER_KEY),
        "--enable-supernode-auth",
        "--isolation", isolation,
        "--disable-runtime-dependency-installation",
        *(["--database", str(database)] if database else []),
        "--host", host, "--port", str(port),
        "--fleet-api-address", fleet,
    ]


def supernode_command(superlink: str, ca: Path, key: Path, node_config: dict[str, int | str], port: int,
                      warm: bool = True) -> list[str]:
    """``warm``: leave ClientApp tasks to a long-running worker on ``port``
    (`--isolation process`); else Flower starts one process per message."""
    return [
        str(BIN / "flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key),
        "--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in node_config.items()),
        "--port", str(port),
        "--isolation", "process" if warm else "subprocess",
    ]


def node_config(partition_id: int, device: str = "", torch_device: str = "", replica_dir: str = "") -> dict[str, int | str]:
    """A SuperNode's node config: its data partition and, if it declares them, its
    device profile (hardware model), the torch device it trains on and where it
    keeps its replicas (`fedtune.methods.replicas`)."""
    declared = {"device": device, "torch-device": torch_device, "replica-dir": replica_dir}
    return {"partition-id": partition_id, **{k: v for k, v in declared.items() if v}}


def worker_command(port: int, app: str | None = None) -> list[str]:
    """The ClientApp worker of the SuperNode whose Runtime API is on ``port``;
    ``app``: another ClientApp than fedtune's (MODULE:NAME)."""
    return [sys.executable, "-m", "fedtune.deploy.worker", "--runtime-api-address", f"127.0.0.1:{port}",
            *(["--app", app] if app else [])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Child processes started and stopped together. NAME logs to LOG_DIR/NAME.log,
    or without LOG_DIR its lines are relayed to this process's output as
    "[NAME] ..." (a container's log) and the last ones kept in ``tail[NAME]``.
    Each leads its own process group, so stopping it also stops what it started
    (a SuperNode's SuperExec and ClientApps)."""

    def __init__(self, log_dir: Path | None, env: dict[str, str]) -> None:
        self.log_dir, self.env = log_dir, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.tail: dict[str, deque[str]] = {}
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: list[str], cwd: Path | None = None, **env: str) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("ab") if self.log_dir else subprocess.PIPE
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                    env={**self.env, **env}, start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            if self.log_dir:
                log.close()  # the child holds its own copy
        self.procs[name] = proc
        if not self.log_dir:
            self.tail[name] = deque(maxlen=50)
            threading.Thread(target=self._relay, args=(name, proc), daemon=True).start()
        return proc

    def _relay(self, name: str, proc: subprocess.Popen) -> None:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail[name].append(line)
            print(f"[{name}] {line}", flush=True)

    def check(self, *names: str) -> None:
        """A one-line error if one of these processes has ended."""
        for name in names:
            if (code := self.procs[name].poll()) is not None:
                raise FedtuneError(f"{name} exited with code {code}" + (f"; see {self.log_dir / name}.log" if self.log_dir else ""))

    def stop(self, *names: str, grace_s: float = 10.0) -> None:
        """SIGTERM to each (at once, their shutdowns overlap), SIGKILL to any left after ``grace_s``."""
        procs = [self.procs.pop(name) for name in names]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            for proc in procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    continue
            procs = [proc for proc in procs if proc.poll() is None]

    def stop_all(self) -> None:
        self.stop(*self.procs)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _die_with_parent() -> None:
    """In the child (Linux): SIGTERM when the process that started it dies, even by
    SIGKILL, so no SuperLink or SuperNode outlives a killed `fedtune deploy local`."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: stop_all and signal handlers must do
        pass


def stop_on_sigterm() -> None:
    """Make SIGTERM (docker stop, kill) raise KeyboardInterrupt like Ctrl-C, so the
    ``with`` blocks around child processes stop them instead of orphaning them."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def wait_for(ready: Callable[[], bool], timeout_s: float, what: str, alive: Callable[[], None] = lambda: None,
             every_s: float = 0.5) -> None:
    """Poll ``ready`` until true; ``alive`` raises if a process it needs has died."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        alive()
        if time.monotonic() > deadline:
            raise FedtuneError(f"{what} not ready within {timeout_s:.0f} s")
        time.sleep(every_s)
