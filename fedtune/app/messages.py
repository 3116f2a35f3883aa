"""The Flower messages between ServerApp and ClientApp: their records and keys,
built and read in one place. Every fedtune message holds one ConfigRecord under
RECORD; a train reply also holds the client's MetricRecord under METRICS."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

RECORD = "fedtune"
METRICS = "metrics"


def enrollment(config_json: str, node_id: int) -> Message:
    """Server -> client: the run config."""
    return Message(RecordDict({RECORD: ConfigRecord({"config": config_json})}), dst_node_id=node_id,
                   message_type=MessageType.QUERY)


def enrollment_reply(msg: Message, client_name: str, partition_id: int, histogram: list[int], device_memory: int) -> Message:
    """Client -> server: who it is, its partition's examples per class, and the bytes
    free on the accelerator it trains on (0: it trains on the CPU)."""
    record = ConfigRecord({"client": client_name, "partition_id": partition_id, "histogram": histogram,
                           "device_memory": device_memory})
    return Message(RecordDict({RECORD: record}), reply_to=msg)


@dataclass(frozen=True)
class TrainRequest:
    payload: bytes
    round: int
    seed: int  # the client's job seed this round: its batches, dropout, FedKSeed's seed draws
    local_steps: int = 0  # > 0: fewer than train.local_steps (a partial straggler's share)


def train_content(request: TrainRequest) -> RecordDict:
    record = {"payload": request.payload, "round": request.round, "seed": request.seed}
    if request.local_steps:
        record["local_steps"] = request.local_steps
    return RecordDict({RECORD: ConfigRecord(record)})


def read_train(msg: Message) -> TrainRequest:
    record = msg.content[RECORD]
    return TrainRequest(record["payload"], int(record["round"]), int(record["seed"]), int(record.get("local_steps", 0)))


def train_reply(msg: Message, payload: bytes, metrics: dict[str, float]) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord({"payload": payload}), METRICS: MetricRecord(metrics)}), reply_to=msg)
