"""Split a training pool across simulated clients: iid, label skew or quantity skew."""

from __future__ import annotations

import numpy as np

from fedtune.config import PARTITION_SCHEMES
from fedtune.errors import FedtuneError

# Dirichlet label skew can leave a client empty; redraws are cheap, so allow many
# before calling the configuration infeasible.
_DIRICHLET_TRIES = 1000


def partition_indices(
    labels: np.ndarray, num_clients: int, scheme: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """One sorted int64 index array per client; disjoint, covering every example once."""
    if scheme not in PARTITION_SCHEMES:
        raise FedtuneError(
            f"partition.scheme '{scheme}' is unknown; use one of {', '.join(PARTITION_SCHEMES)}"
        )
    n = len(labels)
    if num_clients > n:
        raise FedtuneError(
            f"partition.num_clients={num_clients} exceeds the {n} training examples; "
            "lower it or raise data.train_size"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        parts = _dirichlet_label_skew(np.asarray(labels), num_clients, alpha, rng)
    else:
        parts = _quantity_skew(n, num_clients, alpha, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _split_by_proportions(indices: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(int)
    return np.split(indices, cuts)


def _dirichlet_label_skew(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    # Per class, draw client shares ~ Dir(alpha) and deal that class's shuffled examples.
    for _ in range(_DIRICHLET_TRIES):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            for client, piece in enumerate(_split_by_proportions(members, shares)):
                shards[client].append(piece)
        parts = [np.concatenate(s) for s in shards]
        if min(len(p) for p in parts) >= 1:
            return parts
    raise FedtuneError(
        f"partition.scheme=dirichlet with partition.alpha={alpha} left some of the "
        f"{num_clients} clients empty in {_DIRICHLET_TRIES} draws over {len(labels)} examples; "
        "raise partition.alpha, lower partition.num_clients or raise data.train_size"
    )


def _quantity_skew(
    n: int, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    # Give every client one example, then share the other n - k by Dir(alpha) proportions.
    order = rng.permutation(n)
    shares = rng.dirichlet(np.full(num_clients, alpha))
    extra = (np.cumsum(shares)[:-1] * (n - num_clients)).astype(int)
    return np.split(order, extra + np.arange(1, num_clients))


def partition_summary(parts: list[np.ndarray], labels: np.ndarray, label_names: list[str]) -> str:
    """Aligned table: one row per client with its example count and per-class counts, then a total."""
    header = ["client", "examples", *label_names]
    rows = []
    for client, part in enumerate(parts):
        counts = np.bincount(labels[part], minlength=len(label_names))
        rows.append([str(client), str(len(part)), *(str(c) for c in counts)])
    totals = np.bincount(labels[np.concatenate(parts)], minlength=len(label_names))
    rows.append(["total", str(sum(len(p) for p in parts)), *(str(c) for c in totals)])
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in table
    )
