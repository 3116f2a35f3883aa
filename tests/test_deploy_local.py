"""The deployment topology as real processes on loopback: a SuperLink with TLS and
SuperNode authentication, three SuperNodes with registered keys, each served by a
long-running ClientApp worker; runs submitted with `flwr run`, 2 rounds each:
FedIT (equal to the simulation), Fed-SB, FedKSeed, and FLoRA with a node killed
mid-round. One federation serves every test of this module; the last kills a node."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_fedit_payload_sizes, small_config, small_overrides

from fedtune.cli import main
from fedtune.deploy import certs, services
from fedtune.deploy.local import LocalFederation
from fedtune.deploy.topology import node_config
from fedtune.report.run_dir import create_run_dir
from fedtune.simulation import run_simulation

pytestmark = pytest.mark.integration
CLIENTS = 3
STABLE = ("round", "accuracy", "loss", "train_loss", "aggregated", "bytes_down", "bytes_up", "cum_bytes_down", "cum_bytes_up", "clients")


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stable(rows):
    return [{k: r.get(k) for k in STABLE} for r in rows]


def _wait_for(condition, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    state = tmp_path_factory.mktemp("deploy")
    with LocalFederation(state, [node_config(i) for i in range(CLIENTS)]) as fed:
        yield fed


@pytest.fixture(scope="module")
def simulated_fedit(tmp_path_factory):
    """FedIT on SMALL in Flower's simulation engine: what a deployment must reproduce."""
    config = small_config(tmp_path_factory.mktemp("simulated"))
    run_dir = create_run_dir(config)
    run_simulation(config, run_dir)
    return run_dir


def test_fedit_through_fedtune_deploy_submit_gives_the_simulation_numbers(federation, simulated_fedit, tmp_path, capsys):
    ca = federation.certs / certs.CA
    assert main(["deploy", "submit", *small_overrides(tmp_path), "--superlink", federation.control, "--ca", str(ca)]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"results: {run_dir}" in out and "round 2: accuracy" in out
    rows, ledger = _records(run_dir / "metrics.jsonl"), _records(run_dir / "ledger.jsonl")
    assert [(r["round"], r["clients"], r.get("aggregated")) for r in rows] == [(0, 0, None), (1, 3, 3), (2, 3, 3)]
    assert json.loads((run_dir / "summary.json").read_text())["final_score"] == rows[-1]["score"]
    # The same code over gRPC and TLS: the same numbers, and the same exact bytes, as in simulation.
    assert _stable(rows) == _stable(_records(simulated_fedit / "metrics.jsonl"))
    assert ledger == _records(simulated_fedit / "ledger.jsonl")
    assert_fedit_payload_sizes(small_config(tmp_path), ledger)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_each_process_is_given_its_own_secrets_only(federation):
    """The SuperLink and each SuperNode are pointed at their copies (certs.export), never the signer's directory."""
    paths = {name: {a for a in proc.args if a.startswith(str(federation.state))} for name, proc in federation.procs.procs.items()}
    export = federation.export
    assert paths["superlink"] == {str(export / "superlink" / name) for name in ("ca.pem", "server.pem", "server.key")}
    for i in range(CLIENTS):
        assert paths[f"node-{i}"] == {str(export / "public" / "ca.pem"), str(export / "nodes" / f"node-{i}" / f"node-{i}")}


def test_fed_sb_deployed(federation, tmp_path):
    run_dir = create_run_dir(small_config(tmp_path, federation={"method": "fed_sb"}, lora={"rank": 4}))
    summary = federation.run(run_dir)
    rows, ledger = _records(run_dir / "metrics.jsonl"), _records(run_dir / "ledger.jsonl")
    assert [(r["round"], r["clients"], r.get("aggregated")) for r in rows[1:]] == [(1, 3, 3), (2, 3, 3)]
    down = {(t["round"], t["client"]): t["payload_bytes"] for t in ledger if t["direction"] == "down"}
    up = {(t["round"], t["client"]): t["payload_bytes"] for t in ledger if t["direction"] == "up"}
    assert set(up) == {(r, f"client-{i}") for r in (1, 2) for i in range(CLIENTS)}
    assert all(down[1, c] > 10 * down[2, c] for c in ("client-0", "client-1", "client-2"))  # the bases go once
    assert all(abs(b - down[2, c]) < 16 for (_, c), b in up.items())  # the r x r matrices, both ways
    assert summary.final_score == rows[-1]["score"]


def test_fedkseed_deployed(federation, tmp_path):
    config = small_config(tmp_path, federation={"method": "fedkseed"}, fedkseed={"num_seeds": 256},
                          train={"local_steps": 10, "lr": 1e-5})
    run_dir = create_run_dir(config)
    summary = federation.run(run_dir)
    rows, ledger = _records(run_dir / "metrics.jsonl"), _records(run_dir / "ledger.jsonl")
    assert [(r["round"], r["clients"], r.get("aggregated")) for r in rows[1:]] == [(1, 3, 3), (2, 3, 3)]
    assert all(t["payload_bytes"] < 200 for t in ledger if t["direction"] == "up")  # seeds and scalars, not tensors
    assert summary.final_score == rows[-1]["score"]
    assert (run_dir / "adapter" / "model.safetensors").is_file()


def test_an_unregistered_node_is_refused(federation):
    key = federation.state / "rogue"
    certs.create_node_key(federation.state, "rogue")  # a valid key the SuperLink never saw
    federation.start_node("rogue", key, node_config(0))
    assert federation.procs.procs["rogue"].wait(60) != 0
    assert services.REFUSED in (federation.procs.log_dir / "rogue.log").read_text()
    assert federation.flwr.online_nodes() == CLIENTS
    federation.procs.stop("rogue", "rogue-worker")


def test_an_interrupted_run_resumes_to_the_simulation_numbers(federation, simulated_fedit, tmp_path):
    # Ctrl-C on `fedtune deploy submit` after round 1: it stops the run on the SuperLink and exits.
    connection = ["--superlink", federation.control, "--ca", str(federation.certs / certs.CA)]
    # SIG_DFL in the child: a shell without job control starts background jobs (this suite, say) with
    # SIGINT ignored, which children inherit and Python then leaves ignored.
    submit = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "deploy", "submit", *small_overrides(tmp_path), *connection],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(lambda: any((tmp_path / "runs").glob("*/checkpoint.pt")) or submit.poll() is not None)
    submit.send_signal(signal.SIGINT)
    out, err = submit.communicate(timeout=120)
    assert submit.returncode == 130, out + err
    assert err.strip().splitlines()[-1] == "interrupted; finished rounds are in the run directory"
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "summary.json").exists()

    assert main(["deploy", "submit", "--resume", str(run_dir), *connection]) == 0
    assert _stable(_records(run_dir / "metrics.jsonl")) == _stable(_records(simulated_fedit / "metrics.jsonl"))
    assert _records(run_dir / "ledger.jsonl") == _records(simulated_fedit / "ledger.jsonl")


def test_a_hostile_node_is_refused_and_the_console_says_why(federation, tmp_path, capsys):
    """node-1's worker swapped for tests/hostile.py's app: a shape-overflow uplink,
    then replies of the wrong structure; the run goes on, and `deploy submit` shows each refusal."""
    attacks = {1: ("overflow", "tensors: "), 2: ("no-metrics", "structure: no 'metrics' record"),
               3: ("payload-str", "structure: no 'fedtune' record with bytes under 'payload'")}
    tests = str(Path(__file__).parent)
    federation.replace_worker("node-1", "hostile:app", PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
                              FEDTUNE_HOSTILE=",".join(a for a, _ in attacks.values()), FEDTUNE_HOSTILE_CLIENTS="1")
    connection = ["--superlink", federation.control, "--ca", str(federation.certs / certs.CA)]
    try:
        assert main(["deploy", "submit", *small_overrides(tmp_path), "--set", f"run.rounds={len(attacks)}", *connection]) == 0
    finally:
        federation.replace_worker("node-1", "fedtune.app.client:app")
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    for row in _records(run_dir / "metrics.jsonl")[1:]:
        attack, shown = attacks[row["round"]]
        assert [(d["client"], d["stage"]) for d in row["dropped"]] == [("client-1", shown.split(":")[0])], attack
        assert row["aggregated"] == 2
        assert f"client-1 {shown}" in out  # on the console of `fedtune deploy submit`
    assert "dropped: tensors 1" in out and "dropped: structure 1" in out


def test_a_node_killed_mid_round_does_not_stop_the_run(federation, tmp_path):
    # FLoRA, the stacking family: the two survivors' adapters are stacked each round.
    config = small_config(tmp_path, federation={"method": "flora", "timeout_s": 12.0}, flora={"client_ranks": [2, 4, 8]},
                          train={"local_steps": 5})
    run_dir = create_run_dir(config)
    log = federation.procs.log_dir / "node-2.log"
    seen = log.read_text().count("Receiving: train message")

    def kill_node_2_when_it_trains():  # the whole edge client vanishes: SuperNode and worker
        _wait_for(lambda: log.read_text().count("Receiving: train message") > seen)
        for name in ("node-2", "node-2-worker"):
            os.killpg(federation.procs.procs[name].pid, signal.SIGKILL)

    threading.Thread(target=kill_node_2_when_it_trains, daemon=True).start()
    summary = federation.run(run_dir)
    rows, ledger = _records(run_dir / "metrics.jsonl"), _records(run_dir / "ledger.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    uplinks = {r: {t["client"] for t in ledger if t["round"] == r and t["direction"] == "up"} for r in (1, 2)}
    assert uplinks == {1: {"client-0", "client-1"}, 2: {"client-0", "client-1"}}
    assert [r["aggregated"] for r in rows[1:]] == [2, 2] and summary.client_rounds == 4
    down = {(t["round"], t["client"]): t["payload_bytes"] for t in ledger if t["direction"] == "down"}
    assert down[2, "client-0"] > down[1, "client-0"]  # round 2 carries round 1's stacked factors (ranks 2 + 4)
