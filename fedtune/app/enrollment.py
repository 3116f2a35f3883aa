"""Enrollment: hand every node the run config and learn which client (partition)
each node serves. How many examples each holds the server derives itself, as
every party derives the partitions from the config: what a client reports is
only checked against it, never used to weigh its updates."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from flwr.serverapp import Grid

from fedtune.app.exchange import collect
from fedtune.app.messages import RECORD, enrollment
from fedtune.clients import client_name
from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.partition import partition_summary
from fedtune.task import config_to_json

log = logging.getLogger("fedtune")
MAX_DEVICE_MEMORY = 2**50  # a PiB: above it a report is nonsense, not a device


@dataclass(frozen=True)
class Enrollment:
    nodes: dict[int, int]  # client (partition id) -> Flower node id
    device_memory: dict[int, int]  # client -> bytes free on its accelerator, as it measured them; absent: its CPU


def enroll(grid: Grid, config: RunConfig, label_names: list[str], examples: dict[int, int], announce: bool = True) -> Enrollment:
    """Send every node ``config`` and learn which client each serves; ``examples``:
    each partition's size, as the server derives it, against which what the clients
    report is checked. ``announce``: print the partition table."""
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
    nodes, histograms, memory = {}, {}, {}
    for node, reply in replies:
        record = reply.content[RECORD]
        client = int(record["partition_id"])
        nodes[client], histograms[client] = node, np.asarray(record["histogram"], dtype=np.int64)
        free = record.get("device_memory", 0)
        if isinstance(free, int) and 0 < free < MAX_DEVICE_MEMORY:
            memory[client] = free
        elif free:
            log.warning("%s reports %r bytes free on its accelerator: ignored", client_name(client), free)
    if len(nodes) < wanted:
        raise FedtuneError(f"only {len(nodes)} of {wanted} clients enrolled within federation.timeout_s")
    if announce:
        print(_summary(histograms, label_names), flush=True)
    for client, histogram in sorted(histograms.items()):
        if int(histogram.sum()) != examples[client]:
            log.warning("%s reports %d examples; its partition holds %d: weighing it by the latter",
                        client_name(client), int(histogram.sum()), examples[client])
    return Enrollment(nodes, memory)


def _summary(histograms: dict[int, np.ndarray], label_names: list[str]) -> str:
    """The partition table, in partition order, from the clients' class counts."""
    parts, labels = [], []
    for client in sorted(histograms):
        histogram = histograms[client]
        parts.append(np.arange(len(labels), len(labels) + histogram.sum()))
        labels.extend(np.repeat(np.arange(len(histogram)), histogram))
    return partition_summary(parts, np.asarray(labels, dtype=np.int64), label_names)

