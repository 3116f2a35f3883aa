"""Clients that attack the server, through the real Flower stack (simulation): two of
four clients send, across six rounds, every attack of tests/hostile.py. The run
completes, each bad uplink is refused with its reason in metrics.jsonl, and the
model is exactly the one of a run in which those clients' rounds were dropped."""

import json

import pytest
import torch
from conftest import small_config
from hostile import hostile_app
from safetensors.torch import load_file

from fedtune.report.run_dir import create_run_dir
from fedtune.simulation import run_simulation

pytestmark = pytest.mark.integration
ATTACKERS = (1, 2)
SCHEDULE = [  # (client 1's, client 2's) attack in rounds 1, 2, ...
    ("overflow", "no-metrics"),
    ("payload-str", "no-payload"),
    ("zstd-bomb", "deflate-bomb"),
    ("reversed-2**62", "times-1e6"),
    ("nan-inf", "truncated"),
    ("random", "metrics-nan"),
]
STAGES = {  # where the server refuses each
    "overflow": "tensors", "no-metrics": "structure", "payload-str": "structure", "no-payload": "structure",
    "zstd-bomb": "size", "deflate-bomb": "codec", "reversed-2**62": "examples", "times-1e6": "norm",
    "nan-inf": "values", "truncated": "structure", "random": "structure", "metrics-nan": "structure",
}


def _run(tmp_path, name, attack_of):
    config = small_config(
        tmp_path, run={"name": name, "rounds": len(SCHEDULE)}, partition={"num_clients": 4},
        data={"test_size": 60, "train_size": 160}, train={"local_steps": 2}, compression={"up": ["zstd"]},
    )
    run_dir = create_run_dir(config)
    summary = run_simulation(config, run_dir, client_app=hostile_app(attack_of))
    return run_dir, summary, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_attack_is_refused_and_the_model_is_the_honest_clients(tmp_path):
    attacked, summary, rows = _run(tmp_path, "attacked", lambda c, r: SCHEDULE[r - 1][ATTACKERS.index(c)] if c in ATTACKERS else None)
    dropped, _, reference = _run(tmp_path, "dropped", lambda c, r: "crash" if c in ATTACKERS else None)

    assert summary.rounds == len(SCHEDULE)
    for row, attacks in zip(rows[1:], SCHEDULE):
        refused = {d["client"]: d["stage"] for d in row["dropped"]}
        assert refused == {f"client-{c}": STAGES[a] for c, a in zip(ATTACKERS, attacks)}, (row["round"], row["dropped"])
        assert row["aggregated"] == 2 and row["sampled"] == 4
    assert summary.dropped == {s: list(STAGES.values()).count(s) for s in sorted(set(STAGES.values()))}
    # The same model as when the attackers' rounds are simply lost.
    assert [(r["score"], r["loss"]) for r in rows] == [(r["score"], r["loss"]) for r in reference]
    ours, theirs = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (attacked, dropped))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(d["stage"] == "failed" for r in reference[1:] for d in r["dropped"])
