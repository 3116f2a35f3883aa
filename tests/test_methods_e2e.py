"""FLoRA, Fed-SB and FedKSeed through the real stack (Flower simulation, protobuf,
ledger), with one client whose uplink is malformed (a wrong rank, an out-of-range
seed): it is dropped with a logged reason and the rounds go on with the others."""

import json
import logging
import os
from pathlib import Path

import pytest
from conftest import small_config
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune import wire
from fedtune.app import client
from fedtune.app.messages import RECORD
from fedtune.report.run_dir import create_run_dir
from fedtune.simulation import run_simulation

pytestmark = pytest.mark.integration


def _corrupt(msg: Message, context, call_next) -> Message:
    """A Flower mod: client-1 sends its adapters cut to rank 1, or an out-of-range seed."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != "train" or int(context.node_config["partition-id"]) != 1:
        return reply
    up = wire.decode(reply.content[RECORD]["payload"])
    if up.method == "fedkseed":
        bad = {**up.tensors, "seeds": up.tensors["seeds"] + 10_000}
    else:
        bad = {n: (t[:1] if "lora_A" in n else t[:, :1]) if "lora" in n else t for n, t in up.tensors.items()}
    payload = wire.encode(wire.Payload(up.method, up.round, up.client, bad, up.num_examples))
    content = RecordDict({RECORD: ConfigRecord({"payload": payload}), "metrics": reply.content["metrics"]})
    return Message(content, reply_to=msg)


def _faulty_client_app() -> ClientApp:
    app = ClientApp(mods=[_corrupt])
    app.query()(client.enroll)
    app.train()(client.train)
    return app


@pytest.mark.parametrize(
    "method, sections",
    [
        ("flora", {"flora": {"client_ranks": [2, 4, 8]}}),
        ("fed_sb", {"lora": {"rank": 4}}),
        ("fedkseed", {"fedkseed": {"num_seeds": 256, "encoding": "paper"}, "train": {"local_steps": 10, "lr": 1e-5}}),
    ],
)
def test_bad_uplink_is_dropped_and_rounds_go_on(tmp_path, caplog, method, sections):
    config = small_config(tmp_path, federation={"method": method}, **sections)
    run_dir = create_run_dir(config)
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        summary = run_simulation(config, run_dir, client_app=_faulty_client_app())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["clients"], r["aggregated"]) for r in rows[1:]] == [(3, 2), (3, 2)]
    dropped = [r.getMessage() for r in caplog.records if "client-1 dropped" in r.getMessage()]
    reason = "seed index out of range [0, 256)" if method == "fedkseed" else "expected torch.float32"
    assert len(dropped) == 2 and all(reason in m for m in dropped)
    assert summary.final_score == rows[-1]["score"]
    info = json.loads((run_dir / "adapter" / "fedtune.json").read_text())
    if method == "fedkseed":  # a whole model, its own base: the directory can be moved
        assert info["base_model"] is None and (run_dir / "adapter" / "model.safetensors").is_file()

    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    down = {(t["round"], t["client"]): t["payload_bytes"] for t in ledger if t["direction"] == "down"}
    if method == "fed_sb":  # the bases go once, to clients that have not confirmed them
        assert down[1, "client-0"] > 10 * down[2, "client-0"]
        assert down[2, "client-1"] == down[1, "client-1"]  # its update was dropped: sent again
    elif method == "flora":  # round 2 carries round 1's stacked factors (rank 2 + 8 from the two accepted clients)
        assert down[2, "client-0"] > down[1, "client-0"]
    else:  # round 2 carries round 1's dense vector of 256 float32 scalars
        assert down[2, "client-0"] - down[1, "client-0"] > 256 * 4
        up = [t["payload_bytes"] for t in ledger if t["direction"] == "up" and t["client"] == "client-0"]
        assert all(b < 200 for b in up)  # 10 (int32, float32) pairs and a header


def _raise_once(msg: Message, context, call_next) -> Message:
    """A Flower mod: client-2's first training message raises (a crashing client).
    A marker file remembers it: a node's context is not saved when its app raises."""
    marker = Path(os.environ["FEDTUNE_TEST_CRASH_MARKER"])
    if msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 2 and not marker.exists():
        marker.touch()
        raise RuntimeError("simulated crash")
    return call_next(msg, context)


def _crashing_and_faulty_client_app() -> ClientApp:
    app = ClientApp(mods=[_raise_once, _corrupt])
    app.query()(client.enroll)
    app.train()(client.train)
    return app


@pytest.mark.parametrize("min_replies", [2, 3])
def test_too_few_valid_updates_retry_then_skip(tmp_path, caplog, monkeypatch, min_replies):
    """client-1 always sends a malformed update, client-2 crashes in its first round.
    With min_replies 2, round 1 is retried and then aggregates two updates; with 3,
    every round is retried and skipped, and the model stays the zero-shot one."""
    config = small_config(tmp_path, federation={"min_replies": min_replies, "round_retries": 1})
    run_dir = create_run_dir(config)
    monkeypatch.setenv("FEDTUNE_TEST_CRASH_MARKER", str(tmp_path / "crashed"))  # before Ray starts: its workers inherit it
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        summary = run_simulation(config, run_dir, client_app=_crashing_and_faulty_client_app())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    messages = [r.getMessage() for r in caplog.records]
    assert any("client-2 dropped" in m and "simulated crash" in m for m in messages)
    if min_replies == 2:
        # Round 1: two uplinks (client-2 crashed), one valid; the retry: three uplinks, two valid.
        assert [(r["clients"], r.get("aggregated"), r.get("skipped")) for r in rows[1:]] == [(5, 2, None), (3, 2, None)]
        assert rows[2]["score"] != rows[0]["score"] or rows[2]["loss"] != rows[0]["loss"]
    else:
        assert all(r["skipped"] == 1 and r["clients"] in (5, 6) for r in rows[1:])
        assert all((r["score"], r["loss"]) == (rows[0]["score"], rows[0]["loss"]) for r in rows[1:])
    assert summary.rounds == 2 and (run_dir / "adapter" / "adapter_config.json").is_file()
