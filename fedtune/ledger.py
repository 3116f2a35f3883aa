"""Communication ledger: the exact bytes of every message, per round and client.

``payload`` is the serialized fedtune.Payload (what methods are compared on);
``message`` is the whole Flower message content around it (payload plus round
number and any config), serialized the way Flower puts it on the wire.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_to_proto

from fedtune.checkpoint import cut_back


@dataclass(frozen=True)
class Transfer:
    round: int
    client: str
    direction: str  # "down" (server -> client) or "up"
    payload_bytes: int
    message_bytes: int


def content_bytes(content: RecordDict) -> int:
    """Serialized size of a Flower message's content, as Flower encodes it."""
    return recorddict_to_proto(content).ByteSize()


class Ledger:
    """Append-only record of transfers, mirrored to ``ledger.jsonl`` when a path is given."""

    def __init__(self, path: Path | None = None) -> None:
        self.transfers: list[Transfer] = []
        self.path = path

    @classmethod
    def resume(cls, path: Path, last_round: int) -> "Ledger":
        """The ledger of a run resumed after ``last_round`` (its file cut back to it)."""
        ledger = cls(path)
        ledger.transfers = [Transfer(**record) for record in cut_back(path, last_round)]
        return ledger

    def record(self, transfer: Transfer) -> None:
        self.transfers.append(transfer)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(asdict(transfer)) + "\n")

    def total(self, direction: str, round: int | None = None, field: str = "payload_bytes") -> int:
        return sum(
            getattr(t, field)
            for t in self.transfers
            if t.direction == direction and (round is None or t.round == round)
        )

    def count(self, direction: str) -> int:
        """Messages sent in ``direction``: "up" counts the (round, client) pairs whose uplink arrived."""
        return sum(1 for t in self.transfers if t.direction == direction)
