"""Enrollment: hand every node the run config and learn which client (partition)
each node serves and how many examples it holds."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from flwr.serverapp import Grid

from fedtune.app.exchange import collect
from fedtune.app.messages import RECORD, enrollment
from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.partition import partition_summary
from fedtune.task import config_to_json


@dataclass(frozen=True)
class Enrollment:
    nodes: dict[int, int]  # client (partition id) -> Flower node id
    sizes: dict[int, int]  # client -> examples in its partition


def enroll(grid: Grid, config: RunConfig, label_names: list[str]) -> Enrollment:
    wanted, timeout = config.partition.num_clients, config.federation.timeout_s
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise FedtuneError(f"only {len(node_ids)} of {wanted} clients connected within federation.timeout_s")
        time.sleep(1.0)
    config_json = config_to_json(config)
    replies = collect(grid, [enrollment(config_json, n) for n in node_ids], timeout)
    if failed := next((r for _, r in replies if r.has_error()), None):
        raise FedtuneError(f"a client failed to enroll: {failed.error.reason}")
    nodes, histograms = {}, {}
    for node, reply in replies:
        record = reply.content[RECORD]
        client = int(record["partition_id"])
        nodes[client], histograms[client] = node, np.asarray(record["histogram"], dtype=np.int64)
    if len(nodes) < wanted:
        raise FedtuneError(f"only {len(nodes)} of {wanted} clients enrolled within federation.timeout_s")
    print(_summary(histograms, label_names), flush=True)
    return Enrollment(nodes, {c: int(h.sum()) for c, h in sorted(histograms.items())})


def _summary(histograms: dict[int, np.ndarray], label_names: list[str]) -> str:
    """The partition table, in partition order, from the clients' class counts."""
    parts, labels = [], []
    for client in sorted(histograms):
        histogram = histograms[client]
        parts.append(np.arange(len(labels), len(labels) + histogram.sum()))
        labels.extend(np.repeat(np.arange(len(histogram)), histogram))
    return partition_summary(parts, np.asarray(labels, dtype=np.int64), label_names)

