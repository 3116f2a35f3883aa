"""Rounds that clients replay, with bounded history: for methods whose global model
moves each round by a delta every party can apply to its own copy (FLoRA's stacked
factors, FedKSeed's per-seed scalars), the server sends each client the deltas of
the rounds it has not applied, or, when it no longer holds them all or they would
cost more bytes, a snapshot of the current state instead.

Every downlink carries ``catchup = [base, latest]``: base >= 0, the deltas of rounds
base+1..latest follow, to apply to the copy synced at ``base`` (0: the base model);
base = -1, a snapshot of round ``latest`` follows, applied to the base model.

The server keeps the latest rounds' deltas only while they cost fewer bytes than a
snapshot (a client further behind gets the snapshot anyway) and, per client, the
last round it applied: a number. A client keeps its caught-up weights in a
`ReplicaStore` (on disk) and, in its node state, the round and the copy's digest;
a snapshot's rebuilt copy is noted in the store, so the clients sharing a store
rebuild each snapshot once.

Server and clients apply a delta with the same code in the same order, so their
copies stay bit-identical; a snapshot is exact for FLoRA (the weights themselves)
and within float rounding for FedKSeed (see its module).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fedtune.errors import FedtuneError
from fedtune.methods.replicas import ReplicaStore, content_digest, digest_tensor, tensor_digest
from fedtune.wire import TensorDict

CATCHUP = "catchup"
SNAPSHOT = "snapshot/"
SYNCED = "synced_round"  # client state: the last round its copy has applied
DIGEST = "replica_digest"  # client state: its copy's digest in the ReplicaStore
_ROUND = re.compile(r"round(\d+)/(.+)$")


def nbytes(tensors: TensorDict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class RoundLog:
    """Server side: the latest rounds' deltas, at most ``cap`` bytes of them (a
    snapshot's size), and the last round each client applied."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.deltas: dict[int, TensorDict] = {}  # round -> delta
        self.latest = 0
        self.synced: dict[int, int] = {}

    def downlink(self, client: int, snapshot: Callable[[], TensorDict]) -> TensorDict:
        """What ``client`` needs to reach the latest round: the rounds it missed if
        all are held and cost no more than ``snapshot()``, else that snapshot."""
        base = self.synced.get(client, 0)
        missed = range(base + 1, self.latest + 1)
        whole = snapshot()
        if all(t in self.deltas for t in missed) and sum(nbytes(self.deltas[t]) for t in missed) <= nbytes(whole):
            rounds = {f"round{t}/{name}": tensor for t in missed for name, tensor in self.deltas[t].items()}
            return {CATCHUP: torch.tensor([base, self.latest])} | rounds
        return {CATCHUP: torch.tensor([-1, self.latest])} | {SNAPSHOT + name: t for name, t in whole.items()}

    def append(self, delta: TensorDict, clients: Iterable[int]) -> None:
        """Record a round's delta; ``clients`` sent updates, so they had applied every
        earlier round. The oldest rounds go while the rest cost more than ``cap``."""
        for client in clients:
            self.synced[client] = self.latest
        self.latest += 1
        self.deltas[self.latest] = delta
        while sum(map(nbytes, self.deltas.values())) > self.cap:
            del self.deltas[min(self.deltas)]

    def forget(self, client: int) -> None:
        """``client`` may have lost its copy: start it again from the base model."""
        self.synced.pop(client, None)

    def state(self) -> dict[str, object]:
        # Clients' rounds are not kept: after a restart they may have lost their copies.
        return {"deltas": self.deltas, "latest": self.latest}

    def load(self, state: dict[str, object]) -> None:
        self.deltas, self.latest = dict(state["deltas"]), int(state["latest"])


def catch_up(
    model: nn.Module,
    downlink: TensorDict,
    state: TensorDict,
    replicas: ReplicaStore,
    owner: str,
    apply: Callable[[TensorDict], Iterable[str]],
    restore: Callable[[TensorDict], Iterable[str]],
) -> None:
    """Client side: bring ``model`` (freshly loaded base weights) to the latest round
    of ``downlink``, from a snapshot (``restore(snapshot)``) or from the copy kept in
    ``replicas`` and ``state`` plus the rounds after it (``apply(delta)`` each); both
    return the names of the parameters they set. Then keep the new copy."""
    if CATCHUP not in downlink:
        raise FedtuneError(f"the downlink has no {CATCHUP!r} tensor: the server runs another version of fedtune")
    base, latest = (int(v) for v in downlink[CATCHUP].tolist())
    params = dict(model.named_parameters())
    synced = int(state.get(SYNCED, torch.tensor(0)))
    changed: set[str] = set()
    snapshot_key = None
    with torch.no_grad():
        if base < 0:
            snapshot = {n.removeprefix(SNAPSHOT): t for n, t in downlink.items() if n.startswith(SNAPSHOT)}
            snapshot_key = content_digest(snapshot | {CATCHUP: downlink[CATCHUP]})
            if (built := replicas.recall(snapshot_key)) is not None:  # another client rebuilt it already
                changed.update(_set(params, built))
            else:
                changed.update(restore(snapshot))
            start = latest
        else:
            start, kept = _restore_copy(params, state, replicas, synced, base, latest)
            changed.update(kept)
        rounds: dict[int, TensorDict] = {}
        for name, tensor in downlink.items():
            if (m := _ROUND.match(name)) and int(m[1]) > start:
                rounds.setdefault(int(m[1]), {})[m[2]] = tensor
        for rnd in sorted(rounds):
            changed.update(apply(rounds[rnd]))
    if latest > synced or base < 0:
        digest = replicas.put(owner, {name: params[name] for name in sorted(changed)})
        state.update({SYNCED: torch.tensor(latest), DIGEST: digest_tensor(digest)})
        if snapshot_key is not None:
            replicas.remember(snapshot_key, digest)


def _restore_copy(params: dict[str, nn.Parameter], state: TensorDict, replicas: ReplicaStore,
                  synced: int, base: int, latest: int) -> tuple[int, list[str]]:
    """Set ``params`` to the kept copy when the rounds sent reach back to it; the
    round the model is then at (0: the base model) and the names set."""
    if synced > latest:
        raise FedtuneError(f"this client's copy is at round {synced}, past the server's {latest}: it belongs to another run")
    if synced == 0 or synced < base:
        if base > 0:
            raise FedtuneError(f"this client has no copy of round {base} to apply the server's rounds to "
                               f"(its node state is at round {synced}); the server sends a snapshot next time")
        return 0, []
    copy = replicas.get(tensor_digest(state[DIGEST]))
    if copy is None:
        if base > 0:
            raise FedtuneError(f"this client's copy of round {synced} is not in its replica store (cleared, or kept on "
                               "another host); the server sends a snapshot next time")
        return 0, []
    return synced, _set(params, copy)


def _set(params: dict[str, nn.Parameter], copy: TensorDict) -> list[str]:
    for name, tensor in copy.items():
        params[name].copy_(tensor)
    return list(copy)
