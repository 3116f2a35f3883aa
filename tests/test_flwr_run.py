"""`flwr run` on fedtune's Flower app, as the README shows it: Flower's own local
SuperLink (simulation), the run sized to the SuperNodes it starts, and a one-line
error when the overrides ask for more clients than there are."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _flwr_run(home: Path, overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "flwr"), "run", "fedtune/app/flower", "--stream", "--run-config", f'overrides="{overrides}"'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def flwr_home(tmp_path):
    home = tmp_path / "flwr-home"
    yield home
    # Flower leaves its local SuperLink running, detached: stop the one this test started.
    for line in subprocess.run(["pgrep", "-f", f"flower-superlink.*{home}"], capture_output=True, text=True).stdout.split():
        os.kill(int(line), signal.SIGTERM)


def test_flwr_run_sizes_the_run_to_the_supernodes(flwr_home, tmp_path):
    small = " ".join(f"{s}.{k}={v}" for s, values in SMALL.items() for k, v in values.items() if s != "partition")
    out = _flwr_run(flwr_home, f"{small} run.rounds=1 run.output_dir={tmp_path / 'runs'}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "federation: 2 SuperNodes, one client each (partition.num_clients=2)" in out.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["client_rounds"] == 2

    too_many = _flwr_run(flwr_home, f"{small} partition.num_clients=4 run.output_dir={tmp_path / 'none'}")
    errors = [line for line in too_many.stdout.splitlines() if "error:" in line]
    assert errors and "the federation has 2 SuperNodes but the overrides ask for partition.num_clients=4" in errors[0]
    assert "Traceback" not in too_many.stdout and not (tmp_path / "none").exists()
