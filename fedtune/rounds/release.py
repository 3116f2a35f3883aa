"""How one round's client updates combine into what the server releases: each
update's weight in the sum, and the noise of client-level DP. The server's
policies decide them; the methods apply them to their own tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.codecs.delta import has_reference
from fedtune.methods.base import ClientUpdate
from fedtune.privacy.mechanism import Noise


@dataclass(frozen=True)
class Release:
    weights: list[float]  # per update, in the order of the round's updates
    noise: Noise | None = None  # client-level DP: std z*C, the noise on a released sum of clipped updates
    # A released sum's noise is scaled like the sum: by one client's (largest) weight in it.
    noise_scale: float = 1.0

    def average(self, updates: list[ClientUpdate], name: str) -> torch.Tensor:
        """sum_k w_k x_k of tensor ``name``, in update order. Changes against a reference
        (lossy codecs) are added as they come, sparse ones straight into the one dense
        accumulator: no client's update is densified."""
        acc = torch.zeros(updates[0].tensors[name].shape)
        for u, weight in zip(updates, self.weights):
            acc.add_(u.tensors[name], alpha=weight)
            if has_reference(name, u.tensors[name], u.reference):
                acc.add_(u.reference[name], alpha=weight)
        if self.noise is not None:
            acc.add_(self.noise.sample(acc.shape, self.noise_scale))
        return acc

    def alone(self, value: torch.Tensor) -> torch.Tensor:
        """A client's value released on its own, not in a sum: noise of the full std."""
        return value if self.noise is None else value + self.noise.sample(value.shape)


def by_examples(updates: list[ClientUpdate], noise: Noise | None = None) -> Release:
    """FedAvg: each update weighted by its client's share of the examples."""
    total = sum(u.num_examples for u in updates)
    weights = [u.num_examples / total for u in updates]
    return Release(weights, noise, max(weights) if noise is not None else 1.0)
