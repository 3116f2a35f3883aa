"""Device profiles: the catalogue of device classes (a TOML file, one table per
class), every value checked. No config import: the config check uses it."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

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
