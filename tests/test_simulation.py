"""The real stack end to end: Flower's simulation engine (Ray), ClientApps, protobuf
payloads, the ledger and the run directory."""

import json

import pytest

from conftest import expected_payload_size, small_config
from fedtune import report
from fedtune.methods import get_method
from fedtune.simulation import run_simulation
from fedtune.task import load_model

pytestmark = pytest.mark.integration


def _run(tmp_path, name):
    config = small_config(tmp_path, run={"name": name})
    run_dir = report.create_run_dir(config)
    summary = run_simulation(config, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return config, run_dir, summary, rows, ledger


def test_three_clients_two_rounds_twice(tmp_path):
    config, run_dir, summary, rows, ledger = _run(tmp_path, "a")

    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 3 for r in rows[1:])
    assert summary["client_rounds"] == 6 and summary["final_accuracy"] == rows[-1]["accuracy"]
    assert (run_dir / "accuracy_vs_bytes.png").stat().st_size > 10_000
    assert (run_dir / "config.toml").is_file() and (run_dir / "summary.json").is_file()

    # Bytes: every transfer is the exact size of the payload holding the adapter.
    method = get_method(config)
    method.server_init(load_model(config))
    adapter = method.server_downlink("client-0")
    for t in ledger:
        n = 40 if t["direction"] == "up" else 0  # each client holds 40 of the 120 examples
        assert t["payload_bytes"] == expected_payload_size("fedit", t["round"], t["client"], adapter, n)
        assert t["message_bytes"] > t["payload_bytes"]
    assert rows[1]["bytes_down"] == sum(t["payload_bytes"] for t in ledger if t["round"] == 1 and t["direction"] == "down")
    assert rows[-1]["cum_bytes_up"] == summary["total_bytes_up"] == sum(t["payload_bytes"] for t in ledger if t["direction"] == "up")

    # Same config and seed: identical metrics, timings aside.
    *_, rows_again, ledger_again = _run(tmp_path, "b")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]  # noqa: E731
    assert strip(rows_again) == strip(rows)
    assert ledger_again == ledger
