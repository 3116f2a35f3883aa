"""A user's own classification data: many classes, their own test file, the label-words defaults."""

import logging
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from conftest import small_config

from fedtune.config import DataSection, ModelSection
from fedtune.data import load_text_dataset
from fedtune.models import class_scores, load_classifier
from fedtune.task import load_model, load_splits

CLASSES = ["art", "food", "law", "music", "sport", "tech", "travel", "war"]


def _topics(path, rows: int, offset: int = 0):
    """A CSV of real review snippets (Rotten Tomatoes) labelled with 8 topics in turn."""
    texts = load_text_dataset(DataSection(labels=[])).texts[offset : offset + rows]
    pd.DataFrame({"text": texts, "topic": [CLASSES[i % 8] for i in range(rows)]}).to_csv(path, index=False)
    return path


def test_class_scores_against_hand_computed_values():
    # Class a: predicted 3 times, 2 right, 2 present: P 2/3, R 1, F1 0.8. Class b: 2
    # present, never predicted: all 0. Class c: predicted once, never present: all 0.
    scores = class_scores(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 2]), ["a", "b", "c"])
    assert scores == {"a": (0.6667, 1.0, 0.8), "b": (0.0, 0.0, 0.0), "c": (0.0, 0.0, 0.0)}


def test_an_eight_class_csv_runs_with_its_own_test_file(tmp_path):
    """labels = [] (keep every class) with the default label words: no refusal, and
    (on a causal LM) a head that starts from the seed, not from Rotten Tomatoes' words;
    data.test_source is the held-out set; evaluation reports macro-F1 and per-class scores."""
    train_csv, test_csv = _topics(tmp_path / "train.csv", 160), _topics(tmp_path / "test.csv", 40, offset=500)
    config = small_config(tmp_path, data={"source": str(train_csv), "test_source": str(test_csv), "label_column": "topic",
                                          "labels": [], "test_size": 0, "train_size": 0})
    train, test = load_splits(config)
    assert train.label_names == CLASSES == test.label_names and len(train) == 160 and len(test) == 40
    assert test.texts == pd.read_csv(test_csv)["text"].tolist()
    learner = load_model(config)
    result = learner.evaluate(learner.model, test, 16)
    assert set(result.per_class) == set(CLASSES)
    assert result.macro_f1 == pytest.approx(np.mean([f1 for _, _, f1 in result.per_class.values()]))


def test_default_label_words_apply_to_rotten_tomatoes_alone(tmp_path, tiny_lm):
    csv = _topics(tmp_path / "topics.csv", 40)
    model = ModelSection(name=str(tiny_lm))
    user = DataSection(source=str(csv), label_column="topic", labels=[])
    seeded = load_classifier(model, replace(user, label_words=[]), num_labels=8, seed=0)
    default = load_classifier(model, user, num_labels=8, seed=0)  # would fail "2 words for 8 labels" if applied
    assert (default.model.score.weight == seeded.model.score.weight).all()


def test_a_multi_token_label_word_is_said(tiny_lm, caplog):
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        load_classifier(ModelSection(name=str(tiny_lm)), DataSection(label_words=[" bad", " supercalifragilistic"]),
                        num_labels=2, seed=0)
    assert "' supercalifragilistic' is" in caplog.text and "the head starts from its first" in caplog.text
