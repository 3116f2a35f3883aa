"""docker-compose.yml and the Dockerfile, offline (no Docker engine here): the
compose file against the Compose Specification's JSON schema (tests/data), its
topology, who can read which secret and reach which API, and every command it
runs parsed by the program that will run it."""

import json
import os
import pwd
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
from conftest import ComposeFiles, mounts

from fedtune.cli import main
from fedtune.deploy import certs, commands
from fedtune.deploy.flwr_cli import BIN
from fedtune.deploy.probe import split_address
from fedtune.deploy.topology import node_config

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
    written = {source for source, _, _ in mounts(services["certs"])}  # certificates and keys
    for name, service in services.items():
        for source, target, read_only in mounts(service):
            assert source in declared, (name, source)
            if source in written:  # only the service that makes them may write them
                assert read_only == (name != "certs"), (name, source)
        assert service["restart"] in ("no", "on-failure", "unless-stopped"), name
        assert set(service.get("depends_on", {})) <= set(services), name
        if service["restart"] == "unless-stopped":  # long-running: checked while it runs
            assert service["healthcheck"]["test"][0] == "CMD", name
    nodes = _supernodes(compose)
    ids = sorted(int(s["environment"]["PARTITION_ID"]) for s in nodes.values())
    assert ids == list(range(len(nodes))) and len(nodes) >= 2
    assert all(s["environment"]["KEY"] == f"/certs/node-{s['environment']['PARTITION_ID']}" for s in nodes.values())
    assert len({tuple(s["volumes"]) for s in nodes.values()}) == len(nodes)  # each its own state volume
    # The submitted config federates exactly these nodes.
    config = services["submit"]["command"][0].replace("/app/", f"{ROOT}/")
    assert tomllib.loads(Path(config).read_text())["partition"]["num_clients"] == len(nodes)
    # The run directory `submit` prepares is where the ServerApp reads and writes it: one volume, one path.
    assert "results:/data" in services["submit"]["volumes"] and "results:/data" in services["serverapp"]["volumes"]
    assert services["submit"]["working_dir"] == "/data"


def _after_certs(compose, tmp_path):
    """Every volume as the `certs` service leaves it (run here, in this process): ComposeFiles."""
    files = ComposeFiles(compose, tmp_path)
    argv = [files.local("certs", arg) for arg in compose["services"]["certs"]["command"]]
    argv[argv.index("--owner") + 1] = pwd.getpwuid(os.geteuid()).pw_name  # not the image's user: this one
    assert main(argv[1:]) == 0
    return files


def _readable(files, service):
    """The contents of every file SERVICE can read in its volumes."""
    return {path.read_bytes() for source, _, _ in mounts(service) for path in files.volumes[source].rglob("*") if path.is_file()}


def _private_keys(directory):
    """{path: content} of each private key under DIRECTORY."""
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()}


def _arg(argv, flag):
    return argv[argv.index(flag) + 1]


def test_each_service_can_read_its_own_secrets_and_no_other(compose, tmp_path):
    """ca.key only in the signer's volume, server.key also with the SuperLink, node-I's
    key also with supernode-I, no private key with anyone else: a shared certificate
    volume fails this. Keys are told apart by content, wherever they were copied."""
    files, services, nodes = _after_certs(compose, tmp_path), compose["services"], _supernodes(compose)
    command = services["certs"]["command"]
    signer = Path(files.local("certs", _arg(command, "create")))
    keys = {p.relative_to(signer).as_posix(): data for p, data in _private_keys(signer).items()}
    assert set(keys) == {"ca.key", "server.key", *(f"nodes/node-{i}" for i in range(len(nodes)))}
    readable = {name: _readable(files, service) for name, service in services.items()}
    holders = {key: {name for name, contents in readable.items() if data in contents} for key, data in keys.items()}
    assert holders == {"ca.key": {"certs"}, "server.key": {"certs", "superlink"},
                       **{f"nodes/node-{s['environment']['PARTITION_ID']}": {"certs", name} for name, s in nodes.items()}}
    copies = {p: data for volume in files.volumes.values() for p, data in _private_keys(volume).items()}
    assert set(copies.values()) <= set(keys.values())  # no other private key anywhere
    assert {oct(p.stat().st_mode & 0o777) for p in copies} == {"0o600"}

    # Each service finds its files where its command points.
    certs.check_server(Path(files.local("superlink", _arg(services["superlink"]["command"], "--certs"))))
    for name, service in nodes.items():
        certs.check_node_key(Path(files.local(name, service["environment"]["KEY"])))
        certs.check_ca(Path(files.local(name, service["environment"]["CA"])))
    certs.check_ca(Path(files.local("serverapp", _arg(services["serverapp"]["command"], "--root-certificates"))))
    certs.check_ca(Path(files.local("submit", _arg(services["submit"]["entrypoint"], "--ca"))))
    certs.check_ca(Path(files.local("register", _arg(services["register"]["entrypoint"], "--ca"))))
    (key_dir,) = services["register"]["command"]
    assert sorted(p.name for p in Path(files.local("register", key_dir)).glob("*.pub")) == [f"node-{i}.pub" for i in range(len(nodes))]


def test_the_unauthenticated_apis_are_on_the_internal_network_alone(compose, parse):
    """The SuperLink's Control and Runtime APIs (one listener in Flower 1.39) bind the
    name it has on the internal network `control`, which holds no edge client and
    is not published; the Fleet API, authenticated, is published."""
    services, networks = compose["services"], compose["networks"]
    superlink = parse(services["superlink"]["command"])
    host, port = split_address(superlink.control_address)
    assert superlink.fleet_address == "0.0.0.0:9092" and services["superlink"]["ports"] == ["9092:9092"]
    (network,) = [n for n, spec in services["superlink"]["networks"].items() if host in (spec or {}).get("aliases", [])]
    assert networks[network]["internal"] is True
    assert {name for name, s in services.items() if network in s.get("networks", [])} == {"superlink", "register", "serverapp", "submit"}
    assert services["certs"]["network_mode"] == "none"  # the signer talks to no one
    # Whoever calls those APIs dials that name, which the server certificate names.
    assert parse(_argv(services["register"])).superlink == parse(_argv(services["submit"])).superlink == f"{host}:{port}"
    assert _arg(services["serverapp"]["command"], "--runtime-api-address") == f"{host}:{port}"
    assert {"superlink", host} <= set(parse(services["certs"]["command"]).san)


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
    signer = parse(services["certs"]["command"])
    assert signer.nodes == len(_supernodes(compose)) == len([t for _, t, _ in mounts(services["certs"]) if "/nodes/" in t])
    # The exported files go to the user the services run as (certs runs as root).
    assert services["certs"]["user"] == "root" and signer.owner == re.findall(r"^USER (\S+)", (ROOT / "Dockerfile").read_text(), re.M)[-1]
    superlink = parse(services["superlink"]["command"])
    assert superlink.separate_serverapp and superlink.control_address.endswith(":9093")
    submit = parse(_argv(services["submit"]))
    assert submit.action == "submit" and submit.superlink.endswith(":9093") and submit.config.endswith("quick.toml")
    assert [str(k) for k in parse(_argv(services["register"])).keys] == ["/certs/nodes"]

    for name, service in _supernodes(compose).items():
        node = _node_command(service, parse, tmp_path)
        assert (node.superlink, str(node.ca), str(node.flwr_home)) == ("superlink:9092", "/certs/ca.pem", "/data/flwr-home")
        # Its replicas on its own volume, not in the container's temporary directory.
        assert node.replica_dir == "/data/replicas" and "/data" in [t for _, t, _ in mounts(service)]
        assert (node.partition_id, node.device) == (int(service["environment"]["PARTITION_ID"]), service["environment"]["DEVICE"])
        assert node.torch_device == ""  # the run's model.device
        assert f"('127.0.0.1', {node.port})" in service["healthcheck"]["test"][-1]  # the health check probes its Runtime API


def _node_command(service, parse, tmp_path):
    """A supernode's `fedtune deploy node` arguments: clients/entrypoint.sh run with
    the service's environment and a stub `fedtune` that records its argv."""
    stub = tmp_path / "fedtune"
    stub.write_text('#!/bin/sh\nprintf "%s\\0" fedtune "$@" > "$ARGV_OUT"\n')
    stub.chmod(0o755)
    env = {**{k: str(v) for k, v in service["environment"].items()}, "PATH": f"{tmp_path}:{os.environ['PATH']}",
           "HOME": str(tmp_path), "ARGV_OUT": str(tmp_path / "argv")}
    subprocess.run([ROOT / service["command"][0].removeprefix("/app/")], env=env, check=True)
    return parse((tmp_path / "argv").read_text().split("\0")[:-1])


def _merge(base, override):
    """Compose's merge of an override file: mappings key by key, recursively; anything else replaced."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}


def test_the_gpu_override_gives_one_client_a_gpu_it_trains_on(compose, parse, tmp_path):
    override = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    merged = _merge(compose, {k: v for k, v in override.items() if not k.startswith("x-")})
    assert [e.message for e in jsonschema.Draft201909Validator(SCHEMA).iter_errors(merged)] == []
    gpu = merged["services"]["supernode-0"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # Its own image, built with a CUDA wheel of the pinned torch; the others keep the CPU one.
    assert gpu["image"] != compose["services"]["supernode-1"]["image"] == merged["services"]["supernode-1"]["image"]
    assert "ARG TORCH_INDEX=" in (ROOT / "Dockerfile").read_text() and "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX"]
    node = _node_command(gpu, parse, tmp_path)
    assert (node.partition_id, node.device, node.torch_device) == (0, compose["services"]["supernode-0"]["environment"]["DEVICE"], "cuda")
    assert node_config(node.partition_id, node.device, node.torch_device)["torch-device"] == "cuda"


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
    assert {"fedtune/hardware/devices.toml", "fedtune/app/flower/pyproject.toml"} <= names
