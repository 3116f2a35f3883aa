"""Sample-level DP: DP-SGD with Opacus inside a client's local training.

Opacus computes per-example gradients of the trainable (adapter) parameters,
clips each to ``clip`` and adds Gaussian noise of std noise_multiplier * clip to
their sum. Batches are Poisson samples (each example independently, with rate
batch_size / n), which is what the accountant's subsampling analysis assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn


@dataclass(frozen=True)
class DPSGD:
    noise_multiplier: float
    clip: float
    # Seeds the Poisson batches and the noise: from the client's own secret
    # (fedtune/privacy/secrets.py), so that no one else can recompute and remove them.
    seed: int = 0


def poisson_batches(num_examples: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Indices of ``steps`` Poisson-sampled batches of expected size ``batch_size``."""
    rng = np.random.default_rng(seed)
    rate = min(1.0, batch_size / num_examples)
    return [np.flatnonzero(rng.random(num_examples) < rate) for _ in range(steps)]


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPSGD, batch_size: int) -> tuple[GradSampleModule, DPOptimizer]:
    """``model`` with per-example gradient hooks, and ``optimizer`` clipping and
    noising them (noise seeded by ``dp.seed``, so that a kept secret reproduces a run)."""
    module = GradSampleModule(model, loss_reduction="mean", strict=False)
    private = DPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.clip,
        expected_batch_size=batch_size,
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(dp.seed),
    )
    return module, private
