"""The one interface every federated method implements.

A method decides what a client trains and sends, how the server aggregates, and
what each client receives. It speaks only in named tensors (``TensorDict``); the app
turns them into protobuf payloads, counts their bytes and moves them with Flower.
Server and client halves live in one class, as in PEFT's tuners, but they never
share state: the server half runs in the ServerApp, the client half in a ClientApp.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fedtune.config import RunConfig
from fedtune.data import TextDataset
from fedtune.models import Classifier
from fedtune.wire import TensorDict


@dataclass(frozen=True)
class LocalResult:
    """What a client's local training produced: the tensors to send up and its stats."""

    tensors: TensorDict
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """One client's decoded uplink, as the server aggregates it."""

    client: str
    tensors: TensorDict
    num_examples: int


class Method(ABC):
    name: ClassVar[str]

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    # -- server half ---------------------------------------------------------
    @abstractmethod
    def server_init(self, classifier: Classifier) -> None:
        """Build the global state from the base model (loaded with the run seed)."""

    @abstractmethod
    def server_downlink(self, client: str) -> TensorDict:
        """What ``client`` receives at the start of a round (may differ per client)."""

    @abstractmethod
    def server_aggregate(self, updates: list[ClientUpdate]) -> None:
        """Fold one round's updates (sorted by client name) into the global state."""

    def server_check(self, update: ClientUpdate) -> str | None:
        """Why ``update`` must not be aggregated, or None if it may. By default an
        update holds exactly the tensors its client was sent, same shapes and dtypes,
        all finite, from at least one example; methods whose uplink differs override it."""
        expected = self.server_downlink(update.client)
        if update.tensors.keys() != expected.keys():
            return f"tensor names differ from the {len(expected)} sent (got {len(update.tensors)})"
        for name, t in update.tensors.items():
            if t.shape != expected[name].shape or t.dtype != expected[name].dtype:
                return f"{name}: {t.dtype} {tuple(t.shape)}, expected {expected[name].dtype} {tuple(expected[name].shape)}"
            if not torch.isfinite(t).all():
                return f"{name}: non-finite values"
        if update.num_examples < 1:
            return "num_examples is 0"
        return None

    @abstractmethod
    def server_model(self) -> nn.Module:
        """The current global model, ready to evaluate or export."""

    # -- client half ---------------------------------------------------------
    @abstractmethod
    def client_train(
        self, classifier: Classifier, downlink: TensorDict, data: TextDataset, seed: int
    ) -> LocalResult:
        """Start from ``downlink``, train locally on ``data``, return what to send up.

        ``classifier`` is a freshly loaded base model the method may modify; ``seed``
        is unique per (run, round, client) so that every run is reproducible.
        """
