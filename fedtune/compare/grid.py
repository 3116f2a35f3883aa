"""The `fedtune compare` file and its expansion into cells: each cell is one
`fedtune run` of the base config with a few ``section.key=value`` overrides.

    [compare]
    config = "default.toml"          # the base run config, relative to this file
    target_accuracy = 0.8             # rounds, bytes and time to reach it (0: none)
    byte_budget = 5e6                 # the score each cell had when it had sent this many bytes (0: none)
    set = ["run.rounds=3"]           # overrides for every cell
    baseline = {privacy = "none"}     # each cell's change from the cell with this value (0 or 1 axis)
    [grid]                            # axes; the cells are their product
    method = ['fedit', 'fed_sb']
    rank = [4, 8]                     # lora.rank (not for a method without an adapter)
    uplink = ["none", "topk:0.05,int8"]
    privacy = ["none", "sample:8"]   # MODE:EPSILON
    mix = ["none", "fleet"]          # names of [mixes] tables
    seed = [0, 1, 2]
    [methods]                         # overrides for the cells of one method
    fed_sb = ['lora.rank=16']
    [privacy_modes]                   # overrides for the cells of one privacy mode
    sample = ['train.batch_size=64']
    [mixes]
    fleet = {phone = 0.5, laptop = 0.3, consumer_gpu = 0.2}
    [axes.deadline]                   # any other axis: named override lists
    none = []
    "60 s" = ["hardware.deadline_s=60"]
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.config import check_override, load_config
from fedtune.errors import FedtuneError
from fedtune.methods.registry import METHODS, get_method
from fedtune.privacy.factory import grid_overrides

AXES = ("method", "rank", "uplink", "downlink", "privacy", "mix", "seed")
TABLES = ("compare", "grid", "methods", "privacy_modes", "mixes", "axes")
COMPARE_KEYS = ("config", "output_dir", "target_accuracy", "byte_budget", "parallel", "set", "baseline")


@dataclass(frozen=True)
class Cell:
    label: str  # unique and readable, e.g. "fed_sb r16 seed 1"
    group: str  # the label without the seed: a group's seeds are averaged
    values: dict[str, str]  # axis -> value, as shown in the table
    overrides: tuple[str, ...]  # `fedtune run --set` arguments

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._]+", "-", self.label).strip("-")


@dataclass(frozen=True)
class Comparison:
    source: Path  # the compare file
    base_config: Path
    output_dir: Path
    target_accuracy: float
    byte_budget: float
    parallel: int
    axes: list[str]  # the axes that vary, in table order
    cells: list[Cell]
    refused: dict[str, str]  # label -> why the config check refuses that combination
    baseline: tuple[str, str] | None = None  # (axis, value): the cells the others' changes are measured from


def load_comparison(path: str | Path) -> Comparison:
    """Read and expand a compare file; every mistake is one FedtuneError line."""
    path = Path(path)
    if not path.is_file():
        raise FedtuneError(f"compare file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise FedtuneError(f"compare file {path} is not valid TOML: {exc}") from None
    _only(raw, TABLES, "table", "")
    head = raw.get("compare", {})
    _only(head, COMPARE_KEYS, "key", "compare.")
    if "config" not in head:
        raise FedtuneError("compare.config is missing: name the base run config")
    base = (path.parent / head["config"]).resolve()
    target = head.get("target_accuracy", 0.0)
    if not isinstance(target, (int, float)) or not 0 <= target <= 1:
        raise FedtuneError(f"compare.target_accuracy must be in [0, 1], got {target!r}")
    budget = head.get("byte_budget", 0)
    if not isinstance(budget, (int, float)) or budget < 0:
        raise FedtuneError(f"compare.byte_budget must be a number of bytes >= 0, got {budget!r}")
    parallel = head.get("parallel", 1)
    if not isinstance(parallel, int) or parallel < 1:
        raise FedtuneError(f"compare.parallel must be an integer >= 1, got {parallel!r}")
    common = _strings(head.get("set", []), "compare.set")
    axes = _axes(raw)
    load_config(base)  # the base config's own mistakes, named as such
    for override in {o for values in axes.values() for overrides in values.values() for o in overrides} | set(common):
        try:  # a typo is an error; a combination the config check refuses is a refused cell
            check_override(override)
        except FedtuneError as exc:
            raise FedtuneError(f"grid override {override!r}: {exc}") from None
    varying = [a for a, values in axes.items() if len(values) > 1]
    baseline = _baseline(head.get("baseline"), axes, varying)
    cells, refused = _expand(base, common, axes, varying)
    out = Path(head.get("output_dir", f"runs/compare-{path.stem}"))
    return Comparison(path, base, out, float(target), float(budget), parallel, varying, cells, refused, baseline)


def _baseline(value: Any, axes: dict[str, dict[str, list[str]]], varying: list[str]) -> tuple[str, str] | None:
    """compare.baseline = {AXIS = VALUE}: one varying axis other than the seed, and one of its values."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) != 1:
        raise FedtuneError('compare.baseline must name one axis and its value, e.g. baseline = {privacy = "none"}')
    ((axis, chosen),) = value.items()
    if axis == "seed" or axis not in varying:
        raise FedtuneError(f"compare.baseline names {axis!r}: it must be a grid axis other than seed with more than one value")
    if str(chosen) not in axes[axis]:
        raise FedtuneError(f"compare.baseline: {chosen!r} is not one of grid.{axis}'s values ({', '.join(axes[axis])})")
    return axis, str(chosen)


def _expand(
    base: Path, common: list[str], axes: dict[str, dict[str, list[str]]], varying: list[str]
) -> tuple[list[Cell], dict[str, str]]:
    """The product of the axes as cells, without duplicates, and the refused ones."""
    cells, refused, seen = [], {}, set()
    for combo in _product(axes):
        values = {axis: name for axis, (name, _) in combo.items()}
        if "rank" in values and not _trains_adapter(values.get("method")):
            values["rank"] = "-"  # no adapter: the rank axis does not apply
        overrides = tuple(common) + tuple(
            o for axis, (_, axis_overrides) in combo.items() if values[axis] != "-" for o in axis_overrides
        )
        if overrides in seen:
            continue
        seen.add(overrides)
        shown = {a: _display(a, values[a]) for a in varying if values[a] != "-"}
        label = " ".join(shown.values()) or "base"
        group = " ".join(t for a, t in shown.items() if a != "seed") or "base"
        try:
            get_method(load_config(base, list(overrides)))  # the methods refuse some combinations themselves
        except FedtuneError as exc:
            refused[label] = str(exc)
            continue
        cells.append(Cell(label, group, values, overrides))
    if not cells:
        raise FedtuneError(f"no cell of the grid is a valid run config; for example {next(iter(refused.values()))}")
    return cells, refused


def _trains_adapter(method: str | None) -> bool:
    known = METHODS.get(method)
    return known is None or known.kind == "adapter"


def _axes(raw: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """axis -> {value name -> overrides}, in AXES order, custom axes next, seed last."""
    grid = raw.get("grid", {})
    _only(grid, AXES, "axis", "grid.", hint="; other axes go in [axes.NAME]")
    methods = raw.get("methods", {})
    modes = raw.get("privacy_modes", {})
    mixes = raw.get("mixes", {})
    axes: dict[str, dict[str, list[str]]] = {}
    for axis in grid:
        values = grid[axis]
        if not isinstance(values, list) or not values:
            raise FedtuneError(f"grid.{axis} must be a non-empty list")
        per_value = methods if axis == "method" else modes
        axes[axis] = {str(v): _axis_overrides(axis, v, per_value, mixes) for v in values}
    for name, options in raw.get("axes", {}).items():
        if not isinstance(options, dict) or not options:
            raise FedtuneError(f"[axes.{name}] must map value names to override lists")
        axes[name] = {str(k): _strings(v, f"axes.{name}.{k}") for k, v in options.items()}
    order = [*(a for a in AXES if a in axes and a != "seed"), *raw.get("axes", {}), *(["seed"] if "seed" in axes else [])]
    axes = {a: axes[a] for a in order}
    if not axes:
        raise FedtuneError("the grid is empty: give [grid] at least one axis, e.g. method = [\"fedit\", \"fed_sb\"]")
    unknown = set(methods) - set(map(str, grid.get("method", [])))
    if unknown:
        raise FedtuneError(f"[methods] names {sorted(unknown)}, which grid.method does not list")
    unknown = set(modes) - {str(v).partition(":")[0] for v in grid.get("privacy", [])}
    if unknown:
        raise FedtuneError(f"[privacy_modes] names {sorted(unknown)}, which no grid.privacy value uses")
    return axes


def _axis_overrides(axis: str, value: Any, per_value: dict, mixes: dict) -> list[str]:
    """``per_value``: [methods] for the method axis, [privacy_modes] for privacy."""
    if axis == "method":
        return [f"federation.method={value}", *_strings(per_value.get(value, []), f"methods.{value}")]
    if axis == "rank":
        return [f"lora.rank={value}"]
    if axis == "seed":
        return [f"run.seed={value}"]
    if axis in ("uplink", "downlink"):
        chain = [] if value == "none" else str(value).split(",")
        return [f"compression.{axis.removesuffix('link')}={json.dumps(chain)}"]
    if axis == "privacy":
        mode = str(value).partition(":")[0]
        extra = [] if value == "none" else _strings(per_value.get(mode, []), f"privacy_modes.{mode}")
        return [*grid_overrides(str(value)), *extra]
    # mix
    if value == "none":
        return ["hardware.mix={}"]
    if value not in mixes:
        raise FedtuneError(f"grid.mix names {value!r}, which is not a [mixes] table")
    shares = ", ".join(f"{k} = {v}" for k, v in mixes[value].items())
    return [f"hardware.mix={{{shares}}}"]


def _display(axis: str, value: str) -> str:
    if axis == "rank":
        return f"r{value}"
    if axis in ("uplink", "downlink"):
        return f"{axis.removesuffix('link')} {'float32' if value == 'none' else value}"
    if axis == "privacy":
        return "no DP" if value == "none" else f"{value.partition(':')[0]} DP eps {value.partition(':')[2]}"
    if axis == "mix":
        return "no fleet" if value == "none" else value
    if axis == "method":
        return value
    return f"{axis} {value}"  # seed and the custom axes


def _product(axes: dict[str, dict[str, list[str]]]) -> list[dict[str, tuple[str, list[str]]]]:
    combos: list[dict[str, tuple[str, list[str]]]] = [{}]
    for axis, options in axes.items():
        combos = [{**c, axis: item} for c in combos for item in options.items()]
    return combos


def _only(table: dict, allowed: tuple[str, ...], what: str, prefix: str, hint: str = "") -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise FedtuneError(f"unknown {what} {prefix}{unknown[0]} in the compare file; allowed: {', '.join(allowed)}{hint}")


def _strings(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FedtuneError(f"{key} must be a list of \"section.key=value\" strings")
    return list(value)
