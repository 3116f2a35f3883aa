"""The `flwr` command line against one SuperLink: register node keys, list nodes,
submit, watch and stop runs. The same commands a person types, run with a
private FLWR_HOME whose config.toml names the SuperLink and its CA, and read
back as JSON; a failure becomes a one-line FedtuneError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fedtune.errors import FedtuneError

CONNECTION = "fedtune"  # the default connection of our FLWR_HOME
# Flower's own defaults would check PyPI for updates, send telemetry and install
# each app's dependencies (torch among them) into a fresh environment per run.
FLOWER_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
BIN = Path(sys.executable).parent  # flwr, flower-superlink, ... beside this Python


def flower_env(flwr_home: Path) -> dict[str, str]:
    """This process's environment for a Flower command: its binaries first on PATH
    (the SuperLink and SuperNode start flower-superexec by name), a private FLWR_HOME."""
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


class FlwrCli:
    """``flwr`` commands against the SuperLink whose Control API is at ``address``."""

    def __init__(self, flwr_home: Path, address: str, ca: Path) -> None:
        self.env = flower_env(flwr_home)
        flwr_home.mkdir(parents=True, exist_ok=True)
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {json.dumps(address)}\nroot-certificates = {json.dumps(str(ca.resolve()))}\n"
        )

    def register(self, public_key: Path) -> None:
        """Register a node's public key; one already registered is fine."""
        try:
            self._call(f"cannot register {public_key}", "supernode", "register", str(public_key))
        except FedtuneError as exc:
            if "already in use" not in str(exc):
                raise

    def online_nodes(self) -> int:
        nodes = self._call("cannot list the SuperNodes", "supernode", "list")["nodes"]
        return sum(n["status"] == "online" for n in nodes)

    def submit(self, app: Path, run_config: dict[str, str | bool]) -> int:
        """Start a run of the Flower app in directory ``app``; returns the run id."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        return int(self._call("cannot start the run", "run", str(app), "--run-config", overrides)["run-id"])

    def status(self, run_id: int) -> tuple[str, str]:
        """(status such as 'running' or 'finished:completed', its details)."""
        run = self._call(f"cannot read the status of run {run_id}", "list", "--run-id", str(run_id))["runs"][0]
        return run["status"], run["status-details"]

    def stop(self, run_id: int) -> None:
        self._call(f"cannot stop run {run_id}", "stop", str(run_id))

    def _call(self, doing: str, *args: str) -> dict:
        # The connection is the default one of this FLWR_HOME, so no command names it.
        proc = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=self.env, capture_output=True, text=True)
        try:
            result = json.loads(proc.stdout)
        except json.JSONDecodeError:
            result = {"error-message": proc.stderr or proc.stdout or f"flwr exited with code {proc.returncode}"}
        if not result.get("success"):
            raise FedtuneError(f"{doing}: {_one_line(result.get('error-message', ''))}")
        return result


def _one_line(text: str) -> str:
    """Flower's messages open with 'Using SuperLink: ...' and span lines; keep the substance."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Using SuperLink")]
    return " ".join(lines) or "flwr failed without a message"
