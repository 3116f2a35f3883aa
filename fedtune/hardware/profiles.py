"""The assignment of one device class of the catalogue to each client, by mix
ratios or explicitly."""

from __future__ import annotations

import numpy as np

from fedtune.config import HardwareSection
from fedtune.errors import FedtuneError
from fedtune.hardware.catalogue import DeviceProfile, load_catalogue


def assign_devices(cfg: HardwareSection, num_clients: int, seed: int) -> list[DeviceProfile]:
    """One profile per client, in partition order: ``cfg.devices`` as listed, or
    ``cfg.mix`` as shares (counts rounded by largest remainder, then shuffled by the
    run seed, so the same seed gives the same fleet)."""
    catalogue = load_catalogue(cfg.catalogue)
    names = device_names(cfg, num_clients, seed)
    if unknown := sorted(set(names) - catalogue.keys()):
        raise FedtuneError(f"unknown device profile {unknown[0]!r}; the catalogue has: {', '.join(catalogue)}")
    return [catalogue[n] for n in names]


def device_names(cfg: HardwareSection, num_clients: int, seed: int) -> list[str]:
    """The device class of each client, in partition order, without the catalogue."""
    return cfg.devices or _names_from_mix(cfg.mix, num_clients, seed)


def _names_from_mix(mix: dict[str, float], num_clients: int, seed: int) -> list[str]:
    shares = np.array(list(mix.values())) * num_clients
    counts = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - counts), kind="stable")[: num_clients - counts.sum()]:
        counts[i] += 1
    names = [name for name, count in zip(mix, counts) for _ in range(count)]
    return list(np.random.default_rng([seed, 0x4A7D]).permutation(names))
