"""Who takes part in a round. The default: every enrolled client is a candidate in
every round, no simulated hardware. The simulated fleet (fedtune/hardware/fleet.py)
overrides the hooks: availability, local steps within a deadline, failures and
stragglers, and the simulated clock."""

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


class Participation:
    def __init__(self, clients: list[int], per_round: int, seed: int, local_steps: int) -> None:
        self.clients, self.per_round, self.seed, self.local_steps = sorted(clients), per_round, seed, local_steps

    def describe(self) -> str | None:
        """Lines for the console on the fleet, or None."""
        return None

    def candidates(self, rnd: int) -> list[int]:
        return self.clients

    def cohort(self, rnd: int, attempt: int) -> list[int]:
        """This round's (``attempt``-th try's) clients: ``per_round`` of the candidates,
        drawn uniformly without replacement, or all of them."""
        return sample_clients(self.candidates(rnd), self.per_round, self.seed, rnd, attempt)

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


def sample_clients(clients: list[int], count: int, seed: int, rnd: int, attempt: int = 0) -> list[int]:
    if count >= len(clients):
        return clients
    rng = np.random.default_rng([seed, rnd, attempt] if attempt else [seed, rnd])
    return sorted(rng.choice(clients, size=count, replace=False).tolist())
