"""One round's exchange with the clients: a downlink to each client of the cohort,
the replies as they come, and each uplink checked before it may count."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedtune import wire
from fedtune.app.messages import METRICS, RECORD, TrainRequest, train_content
from fedtune.clients import client_name
from fedtune.codecs.link import Codecs
from fedtune.codecs.spec import Chain
from fedtune.config import RunConfig
from fedtune.ledger import Ledger, Transfer, content_bytes
from fedtune.methods.base import ClientUpdate, Method
from fedtune.report.rows import HardwareRow
from fedtune.rounds.participation import ClientReport, Participation
from fedtune.task import derive_seed

log = logging.getLogger("fedtune")


@dataclass(frozen=True)
class RoundOutcome:
    updates: list[ClientUpdate]  # valid ones that count, in client order
    losses: list[float]  # of every valid uplink
    client_train_time_s: float  # the clients' own training time, summed
    round_train_time_s: float  # wall time of the exchange
    hardware: HardwareRow | None


@dataclass(frozen=True)
class Exchange:
    """What a round's exchange works with, fixed for the run."""

    grid: Grid
    config: RunConfig
    method: Method
    nodes: dict[int, int]  # client -> node id
    codecs: Codecs
    participation: Participation
    ledger: Ledger

    def train_round(self, rnd: int, cohort: list[int], on_reply: Callable[[], None]) -> RoundOutcome:
        messages, down_bytes = self._downlinks(rnd, cohort)
        started = time.perf_counter()
        replies = collect(self.grid, messages, self.config.federation.timeout_s, on_reply)
        client_of = {self.nodes[c]: c for c in down_bytes}
        updates, losses, train_times, reports = [], [], [], {}
        # Arrival order varies from run to run; everything downstream sees client order.
        for node, reply in sorted(replies, key=lambda r: client_of[r[0]]):
            client = client_of[node]
            if update := self._read(rnd, client, reply):
                metrics = reply.content[METRICS]
                reports[client] = ClientReport(down_bytes[client], content_bytes(reply.content), dict(metrics))
                updates.append(update)
                losses.append(float(metrics["train_loss"]))
                train_times.append(float(metrics["train_time_s"]))
        kept, hardware = self.participation.settle(rnd, reports)
        return RoundOutcome([u for u in updates if u.client in kept], losses, round(float(np.sum(train_times)), 3),
                            round(time.perf_counter() - started, 3), hardware)

    def _downlinks(self, rnd: int, cohort: list[int]) -> tuple[list[Message], dict[int, int]]:
        """A train message for each client of ``cohort`` that can take part, each in
        the ledger; (the messages, each client's message bytes)."""
        messages, down_bytes = [], {}
        for client in cohort:
            down = wire.Payload(self.method.name, rnd, client_name(client), self.method.server_downlink(client))
            payload = self.codecs.downlink(down, derive_seed(self.config.run.seed, rnd, client))
            steps = self.participation.steps(client, len(payload))
            if not steps:
                log.warning("round %d: %s skipped: not one local step fits before the deadline (simulated)", rnd, client_name(client))
                continue
            content = train_content(TrainRequest(payload, rnd, steps if steps < self.config.train.local_steps else 0))
            down_bytes[client] = content_bytes(content)
            self.ledger.record(Transfer(rnd, client_name(client), "down", len(payload), down_bytes[client]))
            messages.append(Message(content, dst_node_id=self.nodes[client], message_type=MessageType.TRAIN, group_id=str(rnd)))
        return messages, down_bytes

    def _read(self, rnd: int, client: int, reply: Message) -> ClientUpdate | None:
        """The reply's update, counted in the ledger, or None with the reason logged."""
        if reply.has_error():
            log.warning("round %d: %s dropped: %s", rnd, client_name(client), reply.error.reason)
            return None
        data = reply.content[RECORD]["payload"]
        self.ledger.record(Transfer(rnd, client_name(client), "up", len(data), content_bytes(reply.content)))
        update, reason = check_uplink(self.method, self.codecs.up, rnd, client, data)
        if reason:
            log.warning("round %d: %s dropped: %s", rnd, client_name(client), reason)
        return update


def check_uplink(method: Method, chain: Chain, rnd: int, client: int, data: bytes) -> tuple[ClientUpdate | None, str]:
    """Decode and validate one client's uplink before it may touch the global
    state: (the update, "") or (None, why it is rejected)."""
    try:
        up = wire.decode(data, keep_sparse=True)
    except wire.PayloadError as exc:
        return None, f"malformed payload: {exc}"
    if (up.method, up.round, up.client) != (method.name, rnd, client_name(client)):
        return None, f"header says {up.method} round {up.round} from {up.client!r}"
    if up.codec != chain.specs:
        return None, f"codec chain {list(up.codec)}, configured {list(chain.specs)}"
    # A lossy uplink holds changes against what the client was sent.
    reference = method.server_downlink(client) if chain.lossy else {}
    update = ClientUpdate(client, up.tensors, up.num_examples, reference)
    reason = method.server_check(update)
    return (None, reason) if reason else (update, "")


def collect(grid: Grid, messages: list[Message], timeout: float, on_reply: Callable[[], None] = lambda: None
            ) -> list[tuple[int, Message]]:
    """Push messages, pull replies as they arrive (so progress shows per client):
    (node the message went to, its reply) pairs. Replies are matched by message
    id, since the error reply for a node that went offline comes from the SuperLink."""
    sent = {i: m.metadata.dst_node_id for i, m in zip(grid.push_messages(messages), messages) if i}
    pending = set(sent)
    deadline = time.monotonic() + timeout
    replies = []
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append((sent[reply.metadata.reply_to_message_id], reply))
            on_reply()
        time.sleep(0.05)
    if pending:
        log.warning("%d client(s) did not reply within %.0f s", len(pending), timeout)
    return replies
