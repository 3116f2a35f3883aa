"""How one round's client updates combine into what the server releases: each
update's weight, the rule that combines them (the weighted mean, or a
coordinate-wise median or trimmed mean), and the noise of client-level DP. The
server's policies decide them; the methods apply them to their own tensors."""

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
    rule: str = "mean"  # "median", "trimmed_mean": Byzantine-robust, unweighted, per coordinate
    trim: float = 0.0  # trimmed_mean: the fraction of clients dropped at each end, per coordinate
    # The weight left on the value the clients started from when the weights sum to
    # less than one (client-level DP divides by the expected, not the actual, cohort).
    keep: float = 0.0

    def average(self, updates: list[ClientUpdate], name: str, current: torch.Tensor) -> torch.Tensor:
        """Tensor ``name`` combined over the updates, in update order; ``current`` is
        its value before the round. For the mean, changes against a reference (lossy
        codecs) are added as they come, sparse ones straight into the one dense
        accumulator: no client's update is densified."""
        if self.rule != "mean":
            return self.combine([u.dense(name) for u in updates])
        acc = current * self.keep if self.keep else torch.zeros(current.shape)
        for u, weight in zip(updates, self.weights):
            acc.add_(u.tensors[name], alpha=weight)
            if has_reference(name, u.tensors[name], u.reference):
                acc.add_(u.reference[name], alpha=weight)
        return self._noised(acc)

    def combine(self, values: list[torch.Tensor], shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Dense values (changes: nothing is kept) combined by the rule: sum_k w_k x_k,
        or the robust statistic. ``shape``: theirs, when there may be none."""
        if self.rule == "mean":
            acc = torch.zeros(shape or values[0].shape)
            for value, weight in zip(values, self.weights):
                acc += weight * value
            return self._noised(acc)
        ordered = torch.stack(values).sort(dim=0).values
        m = len(values)
        if self.rule == "median":
            return ordered[m // 2] if m % 2 else (ordered[m // 2 - 1] + ordered[m // 2]) / 2
        cut = min(int(self.trim * m), (m - 1) // 2)  # at least one value is kept
        return ordered[cut : m - cut].mean(dim=0)

    def _noised(self, acc: torch.Tensor) -> torch.Tensor:
        if self.noise is not None:
            acc.add_(self.noise.sample(acc.shape, self.noise_scale))
        return acc


def by_examples(updates: list[ClientUpdate], noise: Noise | None = None) -> Release:
    """FedAvg: each update weighted by its client's share of the examples."""
    total = sum(u.num_examples for u in updates)
    weights = [u.num_examples / total for u in updates]
    return Release(weights, noise, max(weights) if noise is not None else 1.0)
