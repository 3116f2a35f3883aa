"""Who takes part in a round. The default: every enrolled client is a candidate in
every round, no simulated hardware. The simulated fleet (fedtune/hardware/fleet.py)
overrides the hooks: availability, local steps within a deadline, failures and
stragglers, and the simulated clock. Who of the candidates is asked is the
sampler's choice, made by the privacy policy: a uniform draw of a fixed number, or
under client-level DP Poisson sampling, which its accountant analyses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.report.rows import HardwareRow


@dataclass(frozen=True)
class ClientReport:
    """What the server knows of one client's finished round: the bytes it moved and
    the work it reported (steps, token positions, sequences)."""

    down_bytes: int
    up_bytes: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class Uniform:
    """``count`` of the candidates, drawn uniformly without replacement (all if fewer)."""

    count: int
    root: int  # the run seed, or the server's secret

    def __call__(self, clients: list[int], candidates: list[int], rnd: int, attempt: int) -> list[int]:
        if self.count >= len(candidates):
            return candidates
        rng = np.random.default_rng([self.root, rnd, attempt] if attempt else [self.root, rnd])
        return sorted(rng.choice(candidates, size=self.count, replace=False).tolist())

    def expected(self, candidates: float) -> float:
        return min(self.count, candidates)


@dataclass(frozen=True)
class Poisson:
    """Each candidate independently with probability ``rate``: the cohort's size
    varies. Every client's draw is made, candidate or not, so whether one client
    is a candidate changes no other client's draw."""

    rate: float
    root: int  # the server's secret: the sample must be secret for amplification by sampling

    def __call__(self, clients: list[int], candidates: list[int], rnd: int, attempt: int) -> list[int]:
        draws = dict(zip(clients, np.random.default_rng([self.root, rnd, attempt, 0x5A4D]).random(len(clients))))
        return [c for c in candidates if draws[c] < self.rate]

    def expected(self, candidates: float) -> float:
        return self.rate * candidates


Sampler = Uniform | Poisson


class Participation:
    def __init__(self, clients: list[int], sampler: Sampler, local_steps: int) -> None:
        self.clients, self.sampler, self.local_steps = sorted(clients), sampler, local_steps

    def describe(self) -> str | None:
        """Lines for the console on the fleet, or None."""
        return None

    def candidates(self, rnd: int) -> list[int]:
        return self.clients

    def cohort(self, rnd: int, attempt: int) -> list[int]:
        """This round's (``attempt``-th try's) clients."""
        return self.sampler(self.clients, self.candidates(rnd), rnd, attempt)

    def expected_cohort(self) -> float:
        """The cohort's expected size: every client a candidate every round."""
        return self.sampler.expected(len(self.clients))

    def steps(self, client: int, down_bytes: int) -> int:
        """Local steps ``client`` is asked for (0: none fit, it sits the round out)."""
        return self.local_steps

    def settle(self, rnd: int, reports: dict[int, ClientReport]) -> tuple[list[int], HardwareRow | None]:
        """The clients whose updates count, of those that sent valid ones, and the
        round on the simulated hardware."""
        return sorted(reports), None

    def state(self) -> object:
        return None

    def load_state(self, state: object) -> None:
        pass
