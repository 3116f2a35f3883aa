"""The task a config describes: its data splits, a client's partition, its model.

Server, clients and the CLI's preflight all go through these functions, so every
party derives the same splits and partitions from the same config and seed."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from fedtune.config import RunConfig, from_dict
from fedtune.data import TextDataset, load_text_dataset, server_split, split_train_test
from fedtune.models import Classifier, load_classifier
from fedtune.partition import partition_indices


def config_to_json(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def config_from_json(text: str) -> RunConfig:
    return from_dict(json.loads(text))


def load_splits(config: RunConfig) -> tuple[TextDataset, TextDataset]:
    """(train pool, held-out test set) for this config."""
    return _splits(config_to_json(config))


@lru_cache(maxsize=2)
def _splits(config_json: str) -> tuple[TextDataset, TextDataset]:
    c = config_from_json(config_json)
    return split_train_test(load_text_dataset(c.data), c.data.test_size, c.data.train_size, c.run.seed)


def server_data(config: RunConfig, size: int) -> TextDataset:
    """Examples only the server holds (disjoint from clients and test), for methods that need them."""
    c = config.data
    return server_split(load_text_dataset(c), c.test_size, c.train_size, size, config.run.seed)


def client_partitions(config: RunConfig) -> list[np.ndarray]:
    train, _ = load_splits(config)
    p = config.partition
    return partition_indices(train.labels, p.num_clients, p.scheme, p.alpha, config.run.seed)


def client_data(config: RunConfig, partition_id: int) -> TextDataset:
    train, _ = load_splits(config)
    return train.subset(client_partitions(config)[partition_id])


def load_model(config: RunConfig) -> Classifier:
    """A fresh classifier: base weights from the (cached) model path, seeded head."""
    num_labels = len(load_splits(config)[0].label_names)
    return load_classifier(config.model, config.data, num_labels, config.run.seed)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed unique to a tuple such as (run seed, round, partition id)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
