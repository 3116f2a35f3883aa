"""The task a config describes: its data splits, a client's partition, its model.

Server, clients and the CLI's preflight all go through these functions, so every
party derives the same splits and partitions from the same config and seed."""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

import numpy as np
import torch

from fedtune.config import RunConfig, from_dict
from fedtune.data import has_test_split, load_text_dataset, server_split, split_train_test
from fedtune.devices import resolve_device
from fedtune.models import load_classifier
from fedtune.partition import partition_indices
from fedtune.tasks import Examples, Learner
from fedtune.tasks.instruct import load_instruct_dataset, load_language_model


def config_to_json(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def config_from_json(text: str) -> RunConfig:
    return from_dict(json.loads(text))


def load_splits(config: RunConfig) -> tuple[Examples, Examples]:
    """(train pool, held-out test set) for this config."""
    return _splits(config_to_json(config))


@lru_cache(maxsize=2)
def _splits(config_json: str) -> tuple[Examples, Examples]:
    c = config_from_json(config_json)
    split_held_out = has_test_split(c.data.source)
    if not c.data.test_source and not split_held_out:
        return split_train_test(_examples(c, c.data.source), c.data.test_size, c.data.train_size, c.run.seed)
    # Held out by the user (data.test_source, or the source's own test split): the
    # source is all train pool (data.train_size caps it), the test set the first
    # data.test_size of the held-out examples (0: all of them).
    train = _examples(c, c.data.source)
    test = _examples(c, c.data.test_source or c.data.source, "train" if c.data.test_source else "test", train)
    train = train.subset(np.random.default_rng(c.run.seed).permutation(len(train))[: c.data.train_size or None])
    return train, test.subset(np.arange(min(c.data.test_size or len(test), len(test))))


def _examples(config: RunConfig, source: str, split: str = "train", train: Examples | None = None) -> Examples:
    """The examples of ``source``; a held-out set keeps the train pool's class order."""
    if config.task.kind == "instruct":
        return load_instruct_dataset(source, config.instruct, split)
    labels = train.label_names if train is not None else config.data.labels
    return load_text_dataset(dataclasses.replace(config.data, source=source, labels=labels), split)


def server_data(config: RunConfig, size: int) -> Examples:
    """Examples only the server holds (disjoint from clients and test), for methods that need them."""
    c = config.data
    return server_split(_examples(config, c.source), c.test_size, c.train_size, size, config.run.seed)


def client_partitions(config: RunConfig) -> list[np.ndarray]:
    train, _ = load_splits(config)
    p = config.partition
    return partition_indices(train.labels, p.num_clients, p.scheme, p.alpha, config.run.seed)


def client_data(config: RunConfig, partition_id: int) -> Examples:
    train, _ = load_splits(config)
    return train.subset(client_partitions(config)[partition_id])


def load_model(config: RunConfig, device: torch.device | None = None) -> Learner:
    """A fresh learner: base weights from the (cached) model path, on the CPU; a
    classifier's head seeded. It computes on ``device`` (None: ``model.device``)."""
    placed = device or resolve_device(config.model.device)
    if config.task.kind == "instruct":
        return load_language_model(config.model, config.instruct, placed)
    num_labels = len(load_splits(config)[0].label_names)
    return load_classifier(config.model, config.data, num_labels, config.run.seed, placed)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed unique to a tuple such as (run seed, round, partition id)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
