"""docker-compose.yml and the Dockerfile, offline (no Docker engine here): the
compose file against the Compose Specification's JSON schema (tests/data), its
topology, and every command it runs parsed by the program that will run it."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from fedtune.cli import main
from fedtune.deploy import commands
from fedtune.deploy.flwr_cli import BIN

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_the_compose_file_validates_against_the_compose_specification(compose):
    validator = jsonschema.Draft201909Validator(SCHEMA)  # the schema's $schema, which it spells with a trailing '#'
    assert [e.message for e in validator.iter_errors(compose)] == []
    # The schema is strict enough to catch a slip.
    broken = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    broken["services"]["superlink"]["healthcheck"]["intervall"] = "10s"
    broken["services"]["superlink"]["depends_on"]["certs"]["condition"] = "service_done"
    assert len(list(validator.iter_errors(broken))) == 2
    durations = [v for s in compose["services"].values() for k, v in s.get("healthcheck", {}).items() if k != "test" and k != "retries"]
    assert durations and all(re.fullmatch(r"\d+(ms|s|m|h)", d) for d in durations)


def _supernodes(compose):
    return {name: s for name, s in compose["services"].items() if name.startswith("supernode-")}


def test_topology(compose):
    services, declared = compose["services"], set(compose["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            assert source in declared, (name, volume)
            if target == "/certs":  # only the service that makes them may write certificates and keys
                assert mode == (["ro"] if name != "certs" else []), (name, volume)
        assert service["restart"] in ("no", "on-failure", "unless-stopped"), name
        assert set(service.get("depends_on", {})) <= set(services), name
        if service["restart"] == "unless-stopped":  # long-running: checked while it runs
            assert service["healthcheck"]["test"][0] == "CMD", name
    nodes = _supernodes(compose)
    ids = sorted(int(s["environment"]["PARTITION_ID"]) for s in nodes.values())
    assert ids == list(range(len(nodes))) and len(nodes) >= 2
    assert all(s["environment"]["KEY"] == f"/certs/nodes/node-{s['environment']['PARTITION_ID']}" for s in nodes.values())
    assert len({tuple(s["volumes"]) for s in nodes.values()}) == len(nodes)  # each its own state volume
    certs_command = services["certs"]["command"]
    assert certs_command[certs_command.index("--nodes") + 1] == str(len(nodes))
    # The submitted config federates exactly these nodes.
    config = services["submit"]["command"][0].replace("/app/", f"{ROOT}/")
    assert tomllib.loads(Path(config).read_text())["partition"]["num_clients"] == len(nodes)
    # The run directory `submit` prepares is where the ServerApp reads and writes it: one volume, one path.
    assert "results:/data" in services["submit"]["volumes"] and "results:/data" in services["serverapp"]["volumes"]
    assert services["submit"]["working_dir"] == "/data"
    ports = services["superlink"]["ports"]
    assert "9092:9092" in ports and "127.0.0.1:9093:9093" in ports  # the unauthenticated Control API stays local


class Parsed(Exception):
    pass


@pytest.fixture
def parse(monkeypatch):
    """Parse a `fedtune ...` argv with fedtune's own CLI, stopping before any work: the parsed args."""

    def record(args, *_):
        raise Parsed(args)

    for name in ("certs_create", "certs_register", "deploy_superlink", "deploy_node", "run_job"):
        monkeypatch.setattr(commands, name, record)

    def run(argv):
        assert argv[0] == "fedtune", argv
        with pytest.raises(Parsed) as parsed:
            main(argv[1:])
        return parsed.value.args[0]

    return run


def _argv(service):
    return [*service.get("entrypoint", []), *service["command"]]


def test_every_fedtune_command_parses(compose, parse, tmp_path):
    services = compose["services"]
    assert parse(services["certs"]["command"]).nodes == len(_supernodes(compose))
    superlink = parse(services["superlink"]["command"])
    assert superlink.separate_serverapp and (superlink.port, superlink.fleet_port) == (9093, 9092)
    submit = parse(_argv(services["submit"]))
    assert submit.action == "submit" and submit.superlink == "superlink:9093" and submit.config.endswith("quick.toml")
    # register: a shell line whose glob the shell expands to every node's public key.
    line = services["register"]["command"][0].removeprefix("exec ").replace("/certs/nodes/*.pub", "/certs/nodes/node-0.pub /certs/nodes/node-1.pub")
    assert [str(k) for k in parse(line.split()).keys] == ["/certs/nodes/node-0.pub", "/certs/nodes/node-1.pub"]

    # Supernodes: run clients/entrypoint.sh with the service's environment, a stub `fedtune` recording its argv.
    stub = tmp_path / "fedtune"
    stub.write_text('#!/bin/sh\nprintf "%s\\0" fedtune "$@" > "$ARGV_OUT"\n')
    stub.chmod(0o755)
    for name, service in _supernodes(compose).items():
        env = {**{k: str(v) for k, v in service["environment"].items()}, "PATH": f"{tmp_path}:{os.environ['PATH']}",
               "HOME": str(tmp_path), "ARGV_OUT": str(tmp_path / "argv")}
        subprocess.run([ROOT / service["command"][0].removeprefix("/app/")], env=env, check=True)
        node = parse((tmp_path / "argv").read_text().split("\0")[:-1])
        assert (node.superlink, str(node.ca), str(node.flwr_home)) == ("superlink:9092", "/certs/ca.pem", "/data/flwr-home")
        assert (node.partition_id, node.device) == (int(service["environment"]["PARTITION_ID"]), service["environment"]["DEVICE"])
        assert f"('127.0.0.1', {node.port})" in service["healthcheck"]["test"][-1]  # the health check probes its Runtime API


def test_the_serverapp_runner_flags_exist(compose):
    command = compose["services"]["serverapp"]["command"]
    help_text = subprocess.run([BIN / command[0], "--help"], capture_output=True, text=True, check=True).stdout
    assert all(flag in help_text for flag in command if flag.startswith("--"))


def test_the_dockerfile_installs_the_pinned_stack_as_a_non_root_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert dockerfile.startswith("#") and "\nFROM python:3.11-slim\n" in dockerfile
    torch = next(d for d in project["dependencies"] if d.startswith("torch=="))
    assert f"{torch}\n" in dockerfile and torch in (ROOT / "setup.sh").read_text()
    assert f"--no-deps {' '.join(project['optional-dependencies']['embedded'])}" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, flags=re.M)
    assert users and users[-1] != "root" and 'VOLUME ["/data"]' in dockerfile


def test_a_non_editable_install_carries_the_data_files(tmp_path):
    """The image runs `pip install .`: the wheel must hold the device catalogue and the deploy app."""
    source = tmp_path / "source"  # built from a copy: an in-tree build would leave build/ and egg-info behind
    shutil.copytree(ROOT / "fedtune", source / "fedtune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (wheel,) = tmp_path.glob("fedtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"fedtune/hardware/devices.toml", "fedtune/deploy/flwr_app/pyproject.toml"} <= names
