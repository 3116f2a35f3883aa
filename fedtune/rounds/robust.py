"""The round's defences against updates that are well formed but harmful.

A norm screen, on by default: an update whose norm (its change against what the
client was sent; FedKSeed: its per-seed sums) exceeds federation.norm_multiple times
the round's lower-median norm, or federation.max_update_norm, is rejected. The
median of honest clients sets the scale, so it holds while fewer than half the
round's clients attack; the lower median makes it hold for two clients as well.
Under client-level DP the bound is privacy.clip instead: a fixed bound depends on
no other client's data, as the privacy analysis needs.

The aggregation rule: the weighted mean, or the coordinate-wise median or trimmed
mean (federation.aggregator) for the methods that average (not FLoRA, which stacks).
"""

from __future__ import annotations

import dataclasses
import math

from fedtune.config import FederationSection
from fedtune.methods.base import ClientUpdate, Method
from fedtune.rounds.release import Release
from fedtune.rounds.validation import Rejection

TOLERANCE = 1e-6  # relative: a norm clipped to exactly the bound may round above it


class Robustness:
    def __init__(self, federation: FederationSection, fixed_bound: float | None = None) -> None:
        """``fixed_bound``: a norm bound that replaces the median rule (client-level DP's clip)."""
        self.federation, self.fixed_bound = federation, fixed_bound

    def screen(self, method: Method, updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], list[Rejection]]:
        """The updates within the round's norm bound, and a rejection for each other."""
        if not updates:
            return [], []
        norms = [method.update_norm(u) for u in updates]
        bound, rule = self.bound(norms)
        kept, rejected = [], []
        for update, norm in zip(updates, norms):
            if norm <= bound * (1 + TOLERANCE):  # NaN fails too
                kept.append(update)
            else:
                rejected.append(Rejection(update.client, "norm", f"update norm {norm:.4g} exceeds {bound:.4g} ({rule})"))
        return kept, rejected

    def bound(self, norms: list[float]) -> tuple[float, str]:
        """The round's bound and the rule that set it."""
        fed = self.federation
        candidates = [(math.inf, "no bound")]
        if fed.max_update_norm:
            candidates.append((fed.max_update_norm, "federation.max_update_norm"))
        if self.fixed_bound is not None:
            candidates.append((self.fixed_bound, "privacy.clip"))
        elif fed.norm_multiple:
            finite = sorted(n for n in norms if math.isfinite(n))
            median = finite[(len(finite) - 1) // 2] if finite else 0.0  # the lower median
            if median > 0:  # no scale to judge by when the honest updates are empty
                candidates.append((fed.norm_multiple * median, f"{fed.norm_multiple:g} x the round's median {median:.4g}"))
        return min(candidates)

    def rule(self, release: Release) -> Release:
        """``release`` combined by the configured rule."""
        return dataclasses.replace(release, rule=self.federation.aggregator, trim=self.federation.trim_fraction)
