"""What a run learns, behind one small interface: a Learner wraps the model with
its task's loss and evaluation, so training, the methods and the server loop never
ask which task they serve.

- classify (``models.Classifier`` on ``data.TextDataset``): a sequence classifier,
  scored by held-out accuracy (and macro-F1 with more than two classes);
- instruct (``tasks.instruct.LanguageModel`` on ``tasks.instruct.InstructDataset``):
  a causal LM fine-tuned on its responses, scored by Rouge-L of greedy generations
  and by the held-out response loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn


class Examples(Protocol):
    """A task's examples: every one has an integer label (a class, or an instruction's
    category) that partitions and baselines use."""

    labels: np.ndarray
    label_names: list[str]

    def __len__(self) -> int: ...

    def subset(self, indices: Sequence[int] | np.ndarray) -> Examples: ...


@dataclass(frozen=True)
class Generation:
    prompt: str
    reference: str
    output: str


@dataclass(frozen=True)
class EvalResult:
    score: float | None  # the task metric: accuracy (classify), Rouge-L (instruct); None where not measured
    loss: float  # mean held-out cross-entropy (instruct: per response token)
    macro_f1: float | None = None  # classify with more than two classes: the mean of per_class's F1
    per_class: dict[str, tuple[float, float, float]] | None = None  # class -> (precision, recall, F1)
    perplexity: float | None = None  # instruct: exp(loss)
    generations: tuple[Generation, ...] | None = None  # instruct: the greedy responses Rouge-L scored


class Learner(Protocol):
    model: nn.Module  # kept on the CPU; moved to ``device`` while it computes (fedtune.devices)
    device: torch.device  # where it trains, evaluates and generates
    dtype: torch.dtype  # of the frozen base weights; what is trained is float32
    head_name: str | None  # a top-level module trained in full beside the adapters (a classifier's head)
    metric: str  # the name of EvalResult.score: "accuracy" or "rouge_l"

    def loss(self, forward: nn.Module, data: Examples, idx: Sequence[int]) -> tuple[torch.Tensor, int]:
        """The batch ``idx``'s mean loss (a mean over examples, as DP-SGD clips them) and its token positions."""
        ...

    def evaluate(self, model: nn.Module, data: Examples, batch_size: int, generate: bool = True) -> EvalResult:
        """Held-out metrics of ``model``; ``generate`` False skips what needs generation."""
        ...

    def baseline(self, train: Examples, test: Examples) -> float | None:
        """The score of the trivial predictor (the majority class), where the task has one."""
        ...

    def export_info(self, directory: Path, base_model: str | None) -> None:
        """fedtune.json beside an exported model: what a loader needs besides the weights
        (``base_model`` None: the directory is a whole model)."""
        ...
