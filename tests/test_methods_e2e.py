"""FLoRA and Fed-SB through the real stack (Flower simulation, protobuf, ledger), with
one client whose uplink has the wrong rank: it is dropped with a logged reason and
the rounds go on with the others."""

import json
import logging

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from conftest import small_config
from fedtune import report, wire
from fedtune.app import client
from fedtune.app.server import RECORD
from fedtune.simulation import run_simulation

pytestmark = pytest.mark.integration


def _wrong_rank(msg: Message, context, call_next) -> Message:
    """A Flower mod: client-1 sends its adapters cut to rank 1."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != "train" or int(context.node_config["partition-id"]) != 1:
        return reply
    up = wire.decode(reply.content[RECORD]["payload"])
    cut = {n: (t[:1] if "lora_A" in n else t[:, :1]) if "lora" in n else t for n, t in up.tensors.items()}
    payload = wire.encode(wire.Payload(up.method, up.round, up.client, cut, up.num_examples))
    content = RecordDict({RECORD: ConfigRecord({"payload": payload}), "metrics": reply.content["metrics"]})
    return Message(content, reply_to=msg)


def _faulty_client_app() -> ClientApp:
    app = ClientApp(mods=[_wrong_rank])
    app.query()(client.enroll)
    app.train()(client.train)
    return app


@pytest.mark.parametrize(
    "method, lora",
    [("flora", {"client_ranks": [2, 4, 8]}), ("fed_sb", {"rank": 4})],
)
def test_bad_rank_is_dropped_and_rounds_go_on(tmp_path, caplog, method, lora):
    config = small_config(tmp_path, federation={"method": method}, lora=lora)
    run_dir = report.create_run_dir(config)
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        summary = run_simulation(config, run_dir, client_app=_faulty_client_app())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["clients"], r["aggregated"]) for r in rows[1:]] == [(3, 2), (3, 2)]
    dropped = [r.getMessage() for r in caplog.records if "client-1 dropped" in r.getMessage()]
    assert len(dropped) == 2 and all("expected torch.float32" in m for m in dropped)
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    down = {(t["round"], t["client"]): t["payload_bytes"] for t in ledger if t["direction"] == "down"}
    if method == "fed_sb":  # the bases go once, to clients that have not confirmed them
        assert down[1, "client-0"] > 10 * down[2, "client-0"]
        assert down[2, "client-1"] == down[1, "client-1"]  # its update was dropped: sent again
    else:  # round 2 carries round 1's stacked factors (rank 2 + 8 from the two accepted clients)
        assert down[2, "client-0"] > down[1, "client-0"]
