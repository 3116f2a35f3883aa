"""Bad input: one line on stderr, exit code 2, no traceback, nothing started."""

import subprocess
import sys

import pytest
from conftest import small_config

from fedtune.cli import main
from fedtune.methods import get_method
from fedtune.task import load_model

SMALL = ["--set", "model.name=minilm", "--set", "data.test_size=60", "--set", "data.train_size=120"]


def _fails_cleanly(capsys, args, *expected):
    assert main(["run", *SMALL, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for text in expected:
        assert text in err, err


def test_missing_data_file(capsys, tmp_path):
    _fails_cleanly(capsys, ["--set", f"data.source={tmp_path}/nope.csv"], "data.source", "nope.csv")


def test_missing_text_and_label_columns(capsys, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("review,stars\ngood,pos\nbad,neg\n")
    _fails_cleanly(capsys, ["--set", f"data.source={path}"], "data.text_column", "review")
    _fails_cleanly(capsys, ["--set", f"data.source={path}", "--set", "data.text_column=review"],
                   "data.label_column", "stars")


def test_unknown_method(capsys):
    _fails_cleanly(capsys, ["--set", "federation.method=fedsgd"], "federation.method", "fedit")


@pytest.mark.parametrize("rank", ["0", "-4"])
def test_rank_not_positive(capsys, rank):
    _fails_cleanly(capsys, ["--set", f"lora.rank={rank}"], "lora.rank", ">= 1")


# MiniLM's adapted layers (query, value) are 384 x 384: no LoRA update there has a higher rank.
# (Fed-SB's own case: tests/test_fed_sb.py.)
FLORA = ["--set", "federation.method=flora"]
TOO_HIGH = [
    ("lora.rank", ["--set", "lora.rank=4096"]),
    ("flora.client_ranks", [*FLORA, "--set", "flora.client_ranks=[8, 4096, 8, 8]"]),
    ("hardware.rank_choices", [*FLORA, "--set", "hardware.mix={phone = 1.0}", "--set", "hardware.plan_ranks=true",
                               "--set", "hardware.rank_choices=[512, 8]"]),
]


@pytest.mark.parametrize(("key", "args"), TOO_HIGH, ids=[key for key, _ in TOO_HIGH])
def test_rank_above_the_adapted_layers_is_refused_before_ray_starts(capsys, monkeypatch, key, args):
    def start(*_, **__):
        raise AssertionError("the simulation started")

    monkeypatch.setattr("fedtune.simulation.run_simulation", start)
    _fails_cleanly(capsys, args, f"config key {key} must be at most 384", "query (384 x 384)")


@pytest.mark.parametrize("method", ["fedit", "flora"])
def test_rank_up_to_the_adapted_layers_is_accepted(tmp_path, method):
    config = small_config(tmp_path, federation={"method": method}, lora={"rank": 384})
    get_method(config).check(load_model(config))


def test_more_clients_than_examples(capsys):
    _fails_cleanly(capsys, ["--set", "data.train_size=5", "--set", "partition.num_clients=6"],
                   "partition.num_clients", "5 training examples")


def test_unreadable_model_path(capsys, tmp_path):
    _fails_cleanly(capsys, ["--set", f"model.name={tmp_path}/no-model"], "model.name")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    _fails_cleanly(capsys, ["--set", f"model.name={broken}"], "model")


def test_unknown_key_from_the_shell_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "run", "--set", "lora.rnak=8"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key lora.rnak; allowed: rank, alpha, dropout, target_modules"
    assert "Traceback" not in proc.stderr


def test_privacy_budget_spent_before_the_first_round(capsys):
    _fails_cleanly(
        capsys,
        ["--set", "privacy.mode=client", "--set", "privacy.noise_multiplier=0.3", "--set", "privacy.epsilon=1"],
        "spent before the first round", "epsilon 20.393 > privacy.epsilon=1.0",
    )
