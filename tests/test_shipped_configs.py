"""Every config and device catalogue shipped in simulations/ loads and passes the config check, so the
commands the docs quote do not fail on a renamed key."""

from pathlib import Path

import pytest

from fedtune.compare.grid import load_comparison
from fedtune.config import load_config
from fedtune.hardware.catalogue import load_catalogue

SIMULATIONS = sorted((Path(__file__).resolve().parents[1] / "simulations").glob("*.toml"))


@pytest.mark.parametrize("path", SIMULATIONS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    if path.name.endswith("_devices.toml"):  # a device catalogue a run names in hardware.catalogue
        assert load_catalogue(str(path))
    elif "[compare]" in path.read_text():
        assert load_comparison(path).cells
    else:
        load_config(path)
