"""Resume after a crash: a run killed with SIGKILL in the middle of a round and
resumed ends with exactly the metrics and ledger of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import fedavg, small_config, small_overrides

from fedtune import checkpoint
from fedtune.cli import main
from fedtune.methods import ClientUpdate, get_method
from fedtune.report.run_dir import create_run_dir
from fedtune.simulation import run_simulation
from fedtune.task import load_model

STABLE = ("round", "accuracy", "loss", "train_loss", "aggregated", "bytes_down", "bytes_up", "cum_bytes_down", "cum_bytes_up", "clients")


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_for(condition, timeout=600):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.integration
def test_a_run_killed_mid_round_resumes_to_the_same_result(tmp_path, capsys):
    reference_dir = create_run_dir(small_config(tmp_path / "reference", run={"rounds": 3}))
    run_simulation(small_config(tmp_path / "reference", run={"rounds": 3}), reference_dir)

    args = [*small_overrides(tmp_path / "killed"), "--set", "run.rounds=3"]
    process = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "run", *args], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "killed" / "runs"
    _wait_for(lambda: runs.is_dir() and any(runs.iterdir()))
    (run_dir,) = runs.iterdir()
    ledger = run_dir / "ledger.jsonl"
    # Mid-round: round 1 checkpointed, round 2's downlinks sent, its uplinks not all back.
    _wait_for(lambda: (run_dir / "checkpoint.pt").exists() and ledger.exists()
              and any(t["round"] == 2 and t["direction"] == "down" for t in _records(ledger)))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "summary.json").exists()

    assert main(["run", "--resume", str(run_dir)]) == 0
    assert "resuming" in capsys.readouterr().out
    resumed, reference = _records(run_dir / "metrics.jsonl"), _records(reference_dir / "metrics.jsonl")
    assert [r["round"] for r in resumed] == [0, 1, 2, 3]
    for got, want in zip(resumed, reference):
        assert {k: got.get(k) for k in STABLE} == {k: want.get(k) for k in STABLE}
    assert _records(run_dir / "ledger.jsonl") == _records(reference_dir / "ledger.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_score"] == json.loads((reference_dir / "summary.json").read_text())["final_score"]
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


@pytest.mark.integration
def test_one_ctrl_c_ends_a_run_at_once_and_it_resumes(tmp_path, capsys):
    # As a terminal sends it: SIGINT to the whole process group, Ray's processes too. SIG_DFL in
    # the child: a shell without job control starts background jobs with SIGINT ignored.
    process = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "run", *small_overrides(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs = tmp_path / "runs"
    try:
        _wait_for(lambda: any(runs.glob("*/checkpoint.pt")) or process.poll() is not None)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=20)  # it used to hang for federation.timeout_s (an hour)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; finished rounds are in the run directory"
    (run_dir,) = runs.iterdir()
    kept = _records(run_dir / "metrics.jsonl")
    assert [r["round"] for r in kept] == [0, 1] and not (run_dir / "summary.json").exists()

    assert main(["run", "--resume", str(run_dir)]) == 0
    assert "resuming" in capsys.readouterr().out
    rows = _records(run_dir / "metrics.jsonl")
    assert rows[:2] == kept and [r["round"] for r in rows] == [0, 1, 2]
    assert (run_dir / "summary.json").is_file()


def test_resume_refuses_a_directory_without_checkpoint(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "has no checkpoint.pt: nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize("method_name", ["fedit", "ffa_lora", "fed_sb", "flora", "fedkseed"])
def test_server_state_through_a_checkpoint_rebuilds_the_same_model(tmp_path, method_name):
    config = small_config(tmp_path, federation={"method": method_name}, fedkseed={"num_seeds": 32})
    first = get_method(config)
    first.server_init(load_model(config))
    g = torch.Generator().manual_seed(0)
    for rnd in (1, 2):
        updates = []
        for k in range(3):
            client = f"client-{k}"
            if method_name == "fedkseed":
                tensors = first.encode_scalars(torch.zeros(32).index_add_(0, torch.randint(32, (4,), generator=g), torch.randn(4, generator=g)))
            else:
                tensors = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in first.uplink_template(client).items()}
            updates.append(ClientUpdate(client, tensors, 40))
        fedavg(first, updates)
    checkpoint.save(tmp_path, {"round": 2, "method": first.server_state()})

    second = get_method(config)
    second.server_init(load_model(config))
    second.load_server_state(checkpoint.load(tmp_path)["method"])
    want, got = dict(first.server_model().named_parameters()), dict(second.server_model().named_parameters())
    assert want.keys() == got.keys()
    assert all(torch.equal(want[n], got[n]) for n in want), method_name
