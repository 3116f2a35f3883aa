"""Compression through the real stack: the ledger counts the compressed bytes in
both directions, every update is accepted, and the run still learns."""

import json

import pytest
from conftest import expected_payload_size, small_config

from fedtune.methods import get_method
from fedtune.report.run_dir import create_run_dir
from fedtune.simulation import run_simulation
from fedtune.task import load_model

pytestmark = pytest.mark.integration


def test_fedit_with_compressed_uplink_and_downlink(tmp_path):
    config = small_config(
        tmp_path, run={"rounds": 3}, compression={"up": ["topk:0.1", "int8", "zstd"], "down": ["float16"]}
    )
    run_dir = create_run_dir(config)
    summary = run_simulation(config, run_dir)
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    method = get_method(config)
    method.server_init(load_model(config))
    plain = expected_payload_size("fedit", 1, "client-0", method.server_downlink(0), 40)
    up = [t["payload_bytes"] for t in ledger if t["direction"] == "up"]
    down = [t["payload_bytes"] for t in ledger if t["direction"] == "down"]
    assert len(up) == 9 and all(b < plain * 0.12 for b in up)  # 10% of entries at ~5 bytes each, zstd on top
    assert all(plain * 0.45 < b < plain * 0.55 for b in down)  # float16
    assert [r["aggregated"] for r in rows[1:]] == [3, 3, 3]
    assert summary.final_score > summary.majority_score
