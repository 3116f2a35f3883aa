"""The real stack end to end: Flower's simulation engine (Ray), ClientApps, protobuf
payloads, the ledger and the run directory."""

import json

import pytest
from conftest import assert_fedit_payload_sizes, small_config, small_overrides

from fedtune.cli import main
from fedtune.report.run_dir import create_run_dir
from fedtune.simulation import run_simulation

pytestmark = pytest.mark.integration


def _read(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return rows, ledger


def test_three_clients_two_rounds_twice(tmp_path, capsys):
    config = small_config(tmp_path, run={"name": "a"})
    run_dir = create_run_dir(config)
    summary = run_simulation(config, run_dir)
    rows, ledger = _read(run_dir)

    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 3 for r in rows[1:])
    assert summary.client_rounds == 6 and summary.final_score == rows[-1]["score"]
    assert (run_dir / "accuracy_vs_bytes.png").stat().st_size > 10_000
    assert (run_dir / "config.toml").is_file() and (run_dir / "summary.json").is_file()

    # Bytes: every transfer is the exact size of the payload holding the adapter.
    assert_fedit_payload_sizes(config, ledger)
    assert all(t["message_bytes"] > t["payload_bytes"] for t in ledger)
    assert rows[1]["bytes_down"] == sum(t["payload_bytes"] for t in ledger if t["round"] == 1 and t["direction"] == "down")
    assert rows[-1]["cum_bytes_up"] == summary.total_bytes_up == sum(t["payload_bytes"] for t in ledger if t["direction"] == "up")

    # Same config and seed, now through the command line with the centralized
    # baseline: identical metrics and ledger, timings aside.
    assert main(["run", *small_overrides(tmp_path), "--set", "run.name=b", "--set", "run.centralized_baseline=true"]) == 0
    out = capsys.readouterr().out
    assert "centralized baseline" in out and "final accuracy" in out
    (run_dir_b,) = (tmp_path / "runs").glob("b-*")
    rows_again, ledger_again = _read(run_dir_b)
    summary_b = json.loads((run_dir_b / "summary.json").read_text())
    assert 0 <= summary_b["centralized_score"] <= 1 and summary_b["centralized_steps"] == 2 * 3 * 3
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]  # noqa: E731
    assert strip(rows_again) == strip(rows)
    assert ledger_again == ledger
