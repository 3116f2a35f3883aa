"""Device profiles: a catalogue of device classes (TOML), and the assignment of
one class to each client, by mix ratios or explicitly."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from fedtune.config import HardwareSection
from fedtune.errors import FedtuneError

BUILT_IN = Path(__file__).with_name("devices.toml")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    flops: float  # effective FLOP/s of the training workload
    memory: float  # bytes one process may use
    downlink: float  # bit/s
    uplink: float  # bit/s
    latency: float  # seconds per message
    availability: float  # probability of being available in a round
    failure: float  # probability of failing mid-round once started


POSITIVE = ("flops", "memory", "downlink", "uplink")


def load_catalogue(path: str = "") -> dict[str, DeviceProfile]:
    """The profiles of ``path`` (a TOML file, one table per device class), or the
    built-in catalogue; every value checked."""
    source = Path(path).expanduser() if path else BUILT_IN
    try:
        raw = tomllib.loads(source.read_text())
    except FileNotFoundError:
        raise FedtuneError(f"hardware.catalogue {source} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise FedtuneError(f"hardware.catalogue {source} is not valid TOML: {exc}") from None
    keys = [f.name for f in fields(DeviceProfile) if f.name != "name"]
    catalogue = {}
    for name, values in raw.items():
        if not isinstance(values, dict) or set(values) != set(keys):
            raise FedtuneError(f"device profile {name!r} in {source} must set exactly: {', '.join(keys)}")
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise FedtuneError(f"device profile {name}.{key} must be a finite number, got {value!r}")
        for key in POSITIVE:
            if values[key] <= 0:
                raise FedtuneError(f"device profile {name}.{key} must be > 0, got {values[key]!r}")
        if values["latency"] < 0:
            raise FedtuneError(f"device profile {name}.latency must be >= 0, got {values['latency']!r}")
        for key in ("availability", "failure"):
            if not 0 <= values[key] <= 1:
                raise FedtuneError(f"device profile {name}.{key} must be a probability in [0, 1], got {values[key]!r}")
        catalogue[name] = DeviceProfile(name, **{k: float(v) for k, v in values.items()})
    return catalogue


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
