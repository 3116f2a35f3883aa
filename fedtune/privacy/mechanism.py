"""Client-level DP: clip a client's update, add Gaussian noise to what is released.

A client's update is the change of its float tensors during local training,
flattened into one vector; clipping scales it to L2 norm at most C. The noise on
every released sum of clipped updates has std z*C (sensitivity C). Averaging
methods release one sum, so with the noise on the clients each adds a share of
std z*C/sqrt(m); FLoRA releases each client's stacked factors on their own, so
each of those gets the whole z*C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedtune.wire import TensorDict


def clip_update(tensors: TensorDict, start: TensorDict, clip: float) -> tuple[TensorDict, float]:
    """``start`` plus the change ``tensors - start`` scaled to L2 norm <= ``clip``
    (over all float tensors jointly); also the change's norm before clipping."""
    floats = [n for n, t in tensors.items() if t.is_floating_point()]
    norm = math.sqrt(sum(float((tensors[n] - start[n]).double().square().sum()) for n in floats))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    clipped = dict(tensors)
    for n in floats:
        clipped[n] = start[n] + scale * (tensors[n] - start[n])
    return clipped, norm


@dataclass(frozen=True)
class Noise:
    """Gaussian noise of std ``std`` (= z * C) for a released sum of clipped updates."""

    std: float
    generator: torch.Generator

    def sample(self, shape: torch.Size, scale: float = 1.0) -> torch.Tensor:
        """Noise for a released value that is ``scale`` times a sum (e.g. 1/m for a mean)."""
        return torch.randn(shape, generator=self.generator) * (self.std * scale)

    def share(self, clients: int) -> "Noise":
        """One of ``clients`` independent shares that add up to this noise."""
        return Noise(self.std / math.sqrt(clients), self.generator)
