"""docker-compose.yml's services run as local processes, the way Docker would run
them (there is no engine here): each service's own entrypoint, command,
environment and working directory, its named volumes as directories mounted where
its paths point (conftest.ComposeFiles), its depends_on conditions met first (a
one-shot service completed, a service healthy by its own health check), and the
SuperLink's host names ("superlink", its network aliases) as 127.0.0.1. Networks
are one loopback here, so this runs the services, not their isolation
(tests/test_compose.py checks that). Only the ports move, as processes on one
loopback cannot each have 9092-9098: the SuperLink's addresses get free ones and
each edge client PORT (the variable clients/entrypoint.sh reads); and the `certs`
service gives the exported files to the user running this test instead of the
image's. Then `docker compose run submit` runs 2 rounds."""

import json
import os
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import APP, REPO, ComposeFiles, small_overrides

from fedtune.deploy.flwr_cli import BIN
from fedtune.deploy.topology import Processes, free_port

pytestmark = pytest.mark.integration
READY_S = 240.0
COMPOSE_PORTS = (9092, 9093, 9098)  # Fleet API, Control/Runtime APIs, the ServerApp runner's health


class ComposeOnLoopback:
    def __init__(self, compose: dict, root: Path) -> None:
        self.services = compose["services"]
        self.files = ComposeFiles(compose, root)
        self.volumes = self.files.volumes
        aliases = [a for spec in self.services["superlink"]["networks"].values() for a in (spec or {}).get("aliases", [])]
        self.hosts = "|".join(sorted(map(re.escape, ["superlink", *aliases]), key=len, reverse=True))
        self.ports = {port: free_port() for port in COMPOSE_PORTS}
        self.runtime_ports: dict[str, int] = {}  # edge client -> its Runtime API (9094 in its container)
        self.procs = Processes(root / "logs", {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})

    def local(self, name: str, text: str) -> str:
        """TEXT of service NAME (an argument, a variable, a health check) as its process here must see it."""
        ports = {**self.ports, 9094: self.runtime_ports.get(name)}
        text = re.sub(r"\b(9092|9093|9094|9098)\b", lambda m: str(ports[int(m[1])]), text)
        text = re.sub(rf"(?<![\w/.-])({self.hosts})(?=:\d|')", "127.0.0.1", text)  # superlink:9092, ('superlink-control', ...)
        return self.files.local(name, text)

    def up(self) -> None:
        """`docker compose up`: every service outside a profile, in file order (which follows depends_on)."""
        for name, service in self.services.items():
            if service.get("profiles"):
                continue
            self._wait_for_dependencies(name)
            argv = [*service.get("entrypoint", []), *service["command"]]
            if "--owner" in argv:  # the image's user, which `certs` (root there) hands the files to
                argv[argv.index("--owner") + 1] = pwd.getpwuid(os.geteuid()).pw_name
            env = self._env(name)
            if "PARTITION_ID" in env:  # an edge client
                self.runtime_ports[name] = free_port()
                env["PORT"] = str(self.runtime_ports[name])
            self.procs.start(name, [self.local(name, arg) for arg in argv], cwd=self._cwd(name), **env)

    def run(self, name: str, *args: str) -> subprocess.CompletedProcess:
        """`docker compose run --rm NAME ARGS`: ARGS (container paths) replace its command."""
        service = self.services[name]
        self._wait_for_dependencies(name)
        argv = [self.local(name, arg) for arg in [*service.get("entrypoint", []), *(args or service["command"])]]
        return subprocess.run(argv, cwd=self._cwd(name), env={**self.procs.env, **self._env(name)},
                              capture_output=True, text=True, timeout=900)

    def healthy(self, name: str) -> bool:
        kind, program, *args = self.services[name]["healthcheck"]["test"]
        assert (kind, program) == ("CMD", "python")
        check = [sys.executable, *[self.local(name, arg) for arg in args]]
        return subprocess.run(check, capture_output=True).returncode == 0

    def _env(self, name: str) -> dict[str, str]:
        return {key: self.local(name, str(value)) for key, value in self.services[name].get("environment", {}).items()}

    def _cwd(self, name: str) -> Path:
        return Path(self.local(name, self.services[name].get("working_dir", APP)))

    def _wait_for_dependencies(self, name: str) -> None:
        for dependency, spec in self.services[name].get("depends_on", {}).items():
            if spec["condition"] == "service_completed_successfully":
                code = self.procs.procs[dependency].wait(READY_S)
                assert code == 0, f"{dependency} exited with {code}: {self._log(dependency)}"
            else:
                assert spec["condition"] == "service_healthy"
                deadline = time.monotonic() + READY_S
                while not self.healthy(dependency):
                    assert self.procs.procs[dependency].poll() is None, f"{dependency} died: {self._log(dependency)}"
                    assert time.monotonic() < deadline, f"{dependency} not healthy: {self._log(dependency)}"
                    time.sleep(1.0)

    def _log(self, name: str) -> str:
        return (self.procs.log_dir / f"{name}.log").read_text()[-2000:]


def test_the_compose_services_run_a_job_as_local_processes(tmp_path):
    stack = ComposeOnLoopback(yaml.safe_load((REPO / "docker-compose.yml").read_text()), tmp_path)
    with stack.procs:
        stack.up()
        out = stack.run("submit", f"{APP}/simulations/quick.toml", *small_overrides())
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert "round 2: accuracy" in out.stdout

        run_dir = stack.volumes["results"] / out.stdout.rsplit("results: ", 1)[1].strip()
        assert run_dir.parent == stack.volumes["results"] / "runs"  # "runs" in the shared results volume
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
        assert [(r["round"], r["clients"]) for r in rows[1:]] == [(1, 3), (2, 3)]
        uplinks = {(t["round"], t["client"]) for t in ledger if t["direction"] == "up"}
        assert uplinks == {(r, f"client-{i}") for r in (1, 2) for i in range(3)}
        assert json.loads((run_dir / "summary.json").read_text())["final_score"] == rows[-1]["score"]
        assert (stack.volumes["superlink"] / "superlink.db").is_file()  # state survives a restart
        assert [name for name, s in stack.services.items() if "healthcheck" in s and not stack.healthy(name)] == []
