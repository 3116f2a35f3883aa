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
from fedtune.app.messages import RECORD, TrainRequest, train_content
from fedtune.clients import client_name
from fedtune.codecs.link import Codecs
from fedtune.config import RunConfig
from fedtune.ledger import Ledger, Transfer, content_bytes
from fedtune.methods.base import ClientUpdate, Method
from fedtune.report.rows import HardwareRow
from fedtune.rounds.participation import ClientReport, Participation
from fedtune.rounds.robust import Robustness
from fedtune.rounds.validation import Expected, Rejection, validate_reply
from fedtune.task import derive_seed

log = logging.getLogger("fedtune")


@dataclass(frozen=True)
class RoundOutcome:
    updates: list[ClientUpdate]  # the ones that count, in client order
    losses: list[float]  # reported by every client whose uplink was valid
    client_train_time_s: float  # the clients' own training time, summed
    round_train_time_s: float  # wall time of the exchange
    hardware: HardwareRow | None
    sampled: int  # clients sent a downlink
    rejections: list[Rejection]  # every uplink refused and every client lost, with why


@dataclass(frozen=True)
class Exchange:
    """What a round's exchange works with, fixed for the run."""

    grid: Grid
    config: RunConfig
    method: Method
    nodes: dict[int, int]  # client -> node id
    sizes: dict[int, int]  # client -> examples in its partition, as the server knows it
    root: int  # the seed of the clients' job seeds: the run seed, or under DP the server's secret
    codecs: Codecs
    participation: Participation
    robustness: Robustness
    ledger: Ledger

    def train_round(self, rnd: int, cohort: list[int], on_reply: Callable[[], None]) -> RoundOutcome:
        expected, messages, down_bytes = self._downlinks(rnd, cohort)
        started = time.perf_counter()
        replies = dict(collect(self.grid, messages, self.config.federation.timeout_s, on_reply))
        updates, losses, train_times, reports, rejections = [], [], [], {}, []
        for client in sorted(expected):  # replies arrive in any order: everything after sees client order
            update, metrics, rejection = self._read(rnd, expected[client], replies.get(self.nodes[client]))
            if rejection:
                log.warning("round %d: %s dropped: %s", rnd, client_name(client), rejection.reason)
                rejections.append(rejection)
                if rejection.stage == "failed":
                    self.method.client_failed(client)
                continue
            reports[client] = ClientReport(down_bytes[client], content_bytes(replies[self.nodes[client]].content), metrics)
            updates.append(update)
            losses.append(metrics["train_loss"])
            train_times.append(metrics["train_time_s"])
        kept, hardware = self.participation.settle(rnd, reports)
        updates, screened = self.robustness.screen(self.method, [u for u in updates if u.client in kept])
        for rejection in screened:
            log.warning("round %d: %s dropped: %s", rnd, client_name(rejection.client), rejection.reason)
        return RoundOutcome(updates, losses, round(float(np.sum(train_times)), 3), round(time.perf_counter() - started, 3),
                            hardware, len(expected), rejections + screened)

    def _downlinks(self, rnd: int, cohort: list[int]) -> tuple[dict[int, Expected], list[Message], dict[int, int]]:
        """A train message for each client of ``cohort`` that can take part, each in
        the ledger; (what each client's uplink must be, the messages, their bytes)."""
        expected, messages, down_bytes = {}, [], {}
        for client in cohort:
            down = wire.Payload(self.method.name, rnd, client_name(client), self.method.server_downlink(client))
            payload = self.codecs.downlink(down, derive_seed(self.config.run.seed, rnd, client))
            steps = self.participation.steps(client, len(payload))
            if not steps:
                log.warning("round %d: %s skipped: not one local step fits before the deadline (simulated)", rnd, client_name(client))
                continue
            seed = derive_seed(self.root, rnd, client)
            content = train_content(TrainRequest(payload, rnd, seed, steps if steps < self.config.train.local_steps else 0))
            down_bytes[client] = content_bytes(content)
            self.ledger.record(Transfer(rnd, client_name(client), "down", len(payload), down_bytes[client]))
            messages.append(Message(content, dst_node_id=self.nodes[client], message_type=MessageType.TRAIN, group_id=str(rnd)))
            expected[client] = Expected.of(self.method, self.codecs.up, rnd, client, self.sizes[client], steps)
        return expected, messages, down_bytes

    def _read(self, rnd: int, expected: Expected, reply: Message | None) -> tuple[ClientUpdate | None, dict, Rejection | None]:
        """The reply's update and metrics, its uplink counted in the ledger; or why not."""
        if reply is None:
            return None, {}, Rejection(expected.client, "failed", f"no reply within federation.timeout_s={self.config.federation.timeout_s:g}")
        if reply.has_error():
            return None, {}, Rejection(expected.client, "failed", reply.error.reason)
        payload = reply.content[RECORD].get("payload") if RECORD in reply.content else None
        size = len(payload) if isinstance(payload, bytes) else 0
        self.ledger.record(Transfer(rnd, client_name(expected.client), "up", size, content_bytes(reply.content)))
        return validate_reply(reply, expected)


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
