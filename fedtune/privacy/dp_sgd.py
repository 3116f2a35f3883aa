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
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed
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


class CPUNoiseDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with its Gaussian noise drawn by a CPU generator and then
    moved to each parameter's device (Opacus draws on the parameter's device, which
    would need a generator there): the same seed gives the same noise on any device."""

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            reference = torch.empty(p.summed_grad.shape, dtype=p.summed_grad.dtype)
            noise = _generate_noise(self.noise_multiplier * self.max_grad_norm, reference, self.generator, self.secure_mode)
            p.grad = (p.summed_grad + noise.to(p.summed_grad.device)).view_as(p)
            _mark_as_processed(p.summed_grad)


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPSGD, batch_size: int) -> tuple[GradSampleModule, DPOptimizer]:
    """``model`` with per-example gradient hooks, and ``optimizer`` clipping and
    noising them (noise seeded by ``dp.seed``, so that a kept secret reproduces a run)."""
    module = GradSampleModule(model, loss_reduction="mean", strict=False)
    private = CPUNoiseDPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.clip,
        expected_batch_size=batch_size,
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(dp.seed),
    )
    return module, private
