"""Shared fixtures: a fast real model (MiniLM) and small configs that use it."""

from __future__ import annotations

import json

import pytest

from fedtune.config import RunConfig, from_dict
from fedtune.environment import configure_process
from fedtune.methods import get_method
from fedtune.rounds.release import by_examples
from fedtune.task import load_model

configure_process()  # what every fedtune entry point does first


SMALL = {  # MiniLM on 120 Rotten Tomatoes snippets, 3 clients: seconds per round
    "run": {"rounds": 2},
    "model": {"name": "minilm", "max_length": 64},
    "data": {"test_size": 60, "train_size": 120},
    "partition": {"num_clients": 3},
    "train": {"local_steps": 3, "batch_size": 4, "lr": 1e-3},
}


def small_config(tmp_path, **sections) -> RunConfig:
    raw = {name: dict(values) for name, values in SMALL.items()}
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


def small_overrides(tmp_path=None) -> list[str]:
    """SMALL as `fedtune run --set` arguments; runs go to TMP_PATH/runs, or without it
    to the default, "runs" in the working directory."""
    args = [f"run.output_dir={tmp_path / 'runs'}"] if tmp_path else []
    args += [f"{s}.{k}={json.dumps(v)}" for s, values in SMALL.items() for k, v in values.items()]
    return [a for arg in args for a in ("--set", arg)]


@pytest.fixture
def config(tmp_path) -> RunConfig:
    return small_config(tmp_path)


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _field_len(n: int) -> int:
    """Tag byte + length prefix + body for a length-delimited field (tags < 16)."""
    return 1 + _varint_len(n) + n


def expected_payload_size(method: str, rnd: int, client: str, tensors, num_examples: int = 0) -> int:
    """The protobuf wire size of a fedtune.Payload, computed by hand from the encoding
    rules, independently of the protobuf library."""
    header = _field_len(len(method)) + _field_len(len(client)) + (1 + _varint_len(rnd) if rnd else 0)
    size = _field_len(header)
    for name, t in tensors.items():
        shape_body = sum(_varint_len(d) for d in t.shape)
        body = (
            _field_len(len(name.encode()))
            + 2  # dtype enum: tag + one-byte value
            + (_field_len(shape_body) if t.dim() else 0)
            + _field_len(t.numel() * t.element_size())
        )
        size += _field_len(body)
    return size + (1 + _varint_len(num_examples) if num_examples else 0)


def assert_fedit_payload_sizes(config: RunConfig, ledger: list[dict]) -> None:
    """Every transfer of a FedIT run on SMALL is exactly the payload holding the
    adapter: downlinks carry no example count, each uplink its client's 40 of the 120."""
    method = get_method(config)
    method.server_init(load_model(config))
    adapter = method.server_downlink(0)
    for t in ledger:
        n = 40 if t["direction"] == "up" else 0
        assert t["payload_bytes"] == expected_payload_size("fedit", t["round"], t["client"], adapter, n)


def fedavg(method, updates) -> None:
    """The server half aggregates ``updates`` as plain FedAvg (no DP, no robust rule)."""
    method.server_aggregate(updates, by_examples(updates))
