"""Who takes part in a round and how long it takes, simulated from the device
profiles and deterministic by run seed and round."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.hardware.catalogue import DeviceProfile


def available(devices: dict[str, DeviceProfile], seed: int, rnd: int) -> list[str]:
    """The clients whose devices are available in round ``rnd`` (each with its
    profile's probability)."""
    draws = np.random.default_rng([seed, rnd, 0xA7A1]).random(len(devices))
    return [c for c, u in zip(sorted(devices), draws) if u < devices[c].availability]


def failures(devices: dict[str, DeviceProfile], clients: list[str], seed: int, rnd: int, attempt: int = 0) -> dict[str, float]:
    """The clients that fail mid-round (in the round's ``attempt``-th try), each
    with the fraction of its round done when it fails."""
    rng = np.random.default_rng([seed, rnd, 0xFA11, attempt] if attempt else [seed, rnd, 0xFA11])
    draws = rng.random((len(clients), 2))
    return {c: float(at) for c, (u, at) in zip(sorted(clients), draws) if u < devices[c].failure}


@dataclass(frozen=True)
class ClientTime:
    down_s: float
    compute_s: float
    up_s: float

    @property
    def total_s(self) -> float:
        return self.down_s + self.compute_s + self.up_s


def round_seconds(times: dict[str, ClientTime], deadline_s: float) -> tuple[float, list[str]]:
    """The round's simulated duration and the clients past the deadline: a
    synchronous round lasts as long as its slowest client; with a deadline, at most
    the deadline, and whoever is slower is a straggler."""
    if not times:
        return 0.0, []
    stragglers = sorted(c for c, t in times.items() if deadline_s and t.total_s > deadline_s)
    slowest = max(t.total_s for t in times.values())
    return (deadline_s if stragglers else slowest), stragglers
