"""Privacy accounting with Opacus' accountants (RDP or PRV).

A history is Opacus' own form, a list of (noise multiplier, sample rate, steps)
entries, so the epsilon fedtune reports is the library's figure for it.

- Client-level DP (DP-FedAvg): one step per round for every client, sampled with
  rate clients_per_round / num_clients, whether or not it was picked.
- Sample-level DP (DP-SGD): train.local_steps steps per round the client takes
  part in, each example sampled with rate batch_size / its partition size.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedtune.clients import client_name
from fedtune.config import RunConfig
from fedtune.errors import FedtuneError

Step = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


def epsilon(history: list[Step], delta: float, mechanism: str) -> float:
    """Epsilon spent by ``history`` at ``delta``: Opacus' accountant's answer."""
    if not history:
        return 0.0
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(history)
    with _quiet():
        return float(accountant.get_epsilon(delta=delta))


@contextmanager
def _quiet() -> Iterator[None]:
    """Without RDP's hint that larger orders might tighten the bound: the figure stays a valid upper bound."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def add(history: list[Step], step: Step) -> None:
    """Append ``step``, merged into the last entry when the mechanism is the same,
    as Opacus' accountants do."""
    if history and history[-1][:2] == step[:2]:
        history[-1] = (*step[:2], history[-1][2] + step[2])
    else:
        history.append(step)


class Budget:
    """The privacy ledger of one run: each client's history, and the round that
    would overspend it. The server keeps one; a DP-SGD client keeps its own."""

    def __init__(self, config: RunConfig, partition_sizes: dict[int, int]) -> None:
        self.config, self.sizes = config, partition_sizes
        self.history: dict[int, list[Step]] = {c: [] for c in partition_sizes}
        rates = {c: self.sample_rate(c) for c in partition_sizes}
        by_rate = {q: self.noise_multiplier(q) for q in set(rates.values())}  # one calibration per rate
        self.noise = {c: by_rate[q] for c, q in rates.items()}

    def sample_rate(self, client: int) -> float:
        c = self.config
        if c.privacy.mode == "client":
            return (c.federation.clients_per_round or c.partition.num_clients) / c.partition.num_clients
        return min(1.0, c.train.batch_size / self.sizes[client])

    def steps_per_round(self) -> int:
        return 1 if self.config.privacy.mode == "client" else self.config.train.local_steps

    def noise_multiplier(self, sample_rate: float) -> float:
        """privacy.noise_multiplier, or the smallest one that lets a client sampled
        at ``sample_rate`` take part in every round of the run within the budget."""
        p = self.config.privacy
        if p.noise_multiplier > 0:
            return p.noise_multiplier
        steps = self.config.run.rounds * self.steps_per_round()
        try:
            with _quiet():
                return float(get_noise_multiplier(
                    target_epsilon=p.epsilon, target_delta=p.delta, sample_rate=sample_rate,
                    steps=steps, accountant=p.accountant,
                ))
        except ValueError:
            raise FedtuneError(
                f"privacy.epsilon={p.epsilon} cannot be met over {steps} steps at delta={p.delta} by any noise level"
            ) from None

    def step(self, client: int) -> Step:
        """What one round adds to ``client``'s history."""
        return (self.noise[client], self.sample_rate(client), self.steps_per_round())

    def charged(self, sampled: list[int]) -> list[int]:
        """Whose budget a round spends: every client's under client-level DP (the
        sampling is part of the guarantee), the sampled ones' under DP-SGD."""
        return list(self.history) if self.config.privacy.mode == "client" else sampled

    def epsilon(self, client: int, extra: list[Step] = ()) -> float:
        p = self.config.privacy
        return epsilon(self.history[client] + list(extra), p.delta, p.accountant)

    def overspending(self, sampled: list[int]) -> str | None:
        """Why running a round with ``sampled`` would exceed the budget, or None."""
        for client in self.charged(sampled):
            after = self.epsilon(client, [self.step(client)])
            if after > self.config.privacy.epsilon:
                return (
                    f"{client_name(client)} would reach epsilon {after:.3f} > privacy.epsilon={self.config.privacy.epsilon} "
                    f"(delta={self.config.privacy.delta})"
                )
        return None

    def check_first_round(self) -> None:
        """Refuse a run in which some client could not take part even once."""
        if reason := self.overspending(list(self.history)):
            raise FedtuneError(
                f"the privacy budget is spent before the first round: {reason}; "
                "raise privacy.noise_multiplier (or set it to 0 to calibrate) or privacy.epsilon"
            )

    def spend(self, sampled: list[int]) -> None:
        for client in self.charged(sampled):
            add(self.history[client], self.step(client))

    def max_epsilon(self) -> float:
        return max(self.epsilon(c) for c in self.history)
