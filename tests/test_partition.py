import numpy as np
import pytest

from fedtune.errors import FedtuneError
from fedtune.partition import partition_indices, partition_summary

SCHEMES = ["iid", "dirichlet", "quantity"]


def _labels(n: int = 2000, classes: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n).astype(np.int64)


def _max_class_share(parts, labels, classes) -> float:
    return float(np.mean([np.bincount(labels[p], minlength=classes).max() / len(p) for p in parts]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_disjoint_cover_sorted(scheme):
    labels = _labels()
    parts = partition_indices(labels, 7, scheme, alpha=0.5, seed=1)
    assert len(parts) == 7
    assert all(p.dtype == np.int64 and len(p) >= 1 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic(scheme):
    labels = _labels()
    first = partition_indices(labels, 5, scheme, alpha=0.3, seed=42)
    second = partition_indices(labels, 5, scheme, alpha=0.3, seed=42)
    other = partition_indices(labels, 5, scheme, alpha=0.3, seed=43)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_near_equal_sizes():
    parts = partition_indices(_labels(1003), 4, "iid", alpha=0.5, seed=0)
    assert sorted(len(p) for p in parts) == [250, 251, 251, 251]


def test_dirichlet_small_alpha_is_label_skewed():
    labels = _labels(classes=4)
    iid = partition_indices(labels, 10, "iid", alpha=0.1, seed=0)
    skewed = partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=0)
    assert _max_class_share(iid, labels, 4) < 0.35
    assert _max_class_share(skewed, labels, 4) > 0.6
    assert min(len(p) for p in skewed) >= 1


def test_quantity_skew_unequal_sizes_but_balanced_labels():
    labels = _labels()
    parts = partition_indices(labels, 5, "quantity", alpha=0.3, seed=0)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 1
    assert max(sizes) > 3 * min(sizes)
    big = max(parts, key=len)
    assert abs(labels[big].mean() - labels.mean()) < 0.1


def test_quantity_every_client_gets_one_even_with_tiny_alpha():
    parts = partition_indices(_labels(10), 10, "quantity", alpha=0.01, seed=0)
    assert [len(p) for p in parts] == [1] * 10


def test_too_many_clients():
    with pytest.raises(
        FedtuneError, match=r"partition\.num_clients=10 exceeds the 6 training examples.*data\.train_size"
    ):
        partition_indices(_labels(6), 10, "iid", alpha=0.5, seed=0)


def test_unknown_scheme():
    with pytest.raises(FedtuneError, match=r"partition\.scheme 'shards'.*iid, dirichlet, quantity"):
        partition_indices(_labels(), 4, "shards", alpha=0.5, seed=0)


def test_dirichlet_infeasible_raises():
    # One class, three examples, near-degenerate shares: some client always ends up empty.
    with pytest.raises(FedtuneError, match=r"partition\.alpha=0\.001.*empty"):
        partition_indices(np.zeros(3, dtype=np.int64), 3, "dirichlet", alpha=0.001, seed=0)


def test_summary_table():
    labels = np.array([0, 1, 1, 0, 1, 1], dtype=np.int64)
    parts = [np.array([0, 1, 2]), np.array([3]), np.array([4, 5])]
    lines = partition_summary(parts, labels, ["rotten", "fresh"]).splitlines()
    assert [line.split() for line in lines] == [
        ["client", "examples", "rotten", "fresh"],
        ["0", "3", "1", "2"],
        ["1", "1", "1", "0"],
        ["2", "2", "0", "2"],
        ["total", "6", "2", "4"],
    ]
    assert len({len(line) for line in lines}) == 1
