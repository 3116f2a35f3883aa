"""Rounds that clients replay: for methods whose global model moves each round by a
delta every party can apply to its own copy (FLoRA's stacked factors, FedKSeed's
per-seed scalars), the server sends each client the deltas of the rounds it has not
applied, and the client keeps its caught-up weights as client state.

Server and client apply a delta with the same code in the same order, so their
models stay bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fedtune.wire import TensorDict

SYNCED = "synced_round"  # client state: the last round it has applied
_ROUND = re.compile(r"round(\d+)/(.+)$")


class RoundLog:
    """Server side: every round's delta, and the last round each client applied."""

    def __init__(self) -> None:
        self.deltas: list[TensorDict] = []
        self.synced: dict[int, int] = {}

    def missed(self, client: int) -> TensorDict:
        """The deltas ``client`` has not applied, as ``round<t>/<name>`` tensors."""
        return {
            f"round{t}/{name}": tensor
            for t in range(self.synced.get(client, 0) + 1, len(self.deltas) + 1)
            for name, tensor in self.deltas[t - 1].items()
        }

    def append(self, delta: TensorDict, clients: Iterable[int]) -> None:
        """Record a round's delta; ``clients`` sent updates, so they had applied every earlier one."""
        for client in clients:
            self.synced[client] = len(self.deltas)
        self.deltas.append(delta)


def catch_up(
    model: nn.Module, downlink: TensorDict, state: TensorDict, apply: Callable[[TensorDict], Iterable[str]]
) -> None:
    """Client side: restore the parameters kept in ``state``, apply the rounds of
    ``downlink`` after the last one applied (a resent round is skipped) with
    ``apply(delta)``, which returns the names of the parameters it changed, and keep
    those in ``state``."""
    params = dict(model.named_parameters())
    synced = int(state.pop(SYNCED, torch.tensor(0)))
    rounds: dict[int, TensorDict] = {}
    for name, tensor in downlink.items():
        if (m := _ROUND.match(name)) and int(m[1]) > synced:
            rounds.setdefault(int(m[1]), {})[m[2]] = tensor
    changed: set[str] = set()
    with torch.no_grad():
        for name, weights in state.items():
            params[name].copy_(weights)
        for rnd in sorted(rounds):
            changed.update(apply(rounds[rnd]))
    state.update({name: params[name].detach().clone() for name in changed})
    state[SYNCED] = torch.tensor(max([synced, *rounds]))
