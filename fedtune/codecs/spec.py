"""Codec chains as written in config, parsed and checked without touching a tensor.

A chain is a list such as ``["topk:0.05", "int8", "zstd"]``: at most one sparsifier
(``topk:F``, ``randk:F``, F the kept fraction), then at most one value codec
(``float16``, ``bfloat16``, ``int<B>`` for B in 2..8 bits, ``int<B>:row`` for one
scale per row, ``ternary``), then at most one lossless stage (``zstd``, ``deflate``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedtune.errors import FedtuneError

SPARSIFIERS = ("topk", "randk")
CASTS = ("float16", "bfloat16")
LOSSLESS = ("zstd", "deflate")
_INT = re.compile(r"int(\d+)(:row)?$")


@dataclass(frozen=True)
class Chain:
    specs: tuple[str, ...] = ()
    sparsifier: str | None = None  # "topk" | "randk"
    fraction: float = 1.0
    cast: str | None = None  # "float16" | "bfloat16"
    bits: int = 0  # int<B> quantization; 0 = none
    per_row: bool = False
    ternary: bool = False
    lossless: str | None = None  # "zstd" | "deflate"

    @property
    def lossy(self) -> bool:
        return bool(self.sparsifier or self.cast or self.bits or self.ternary)

    @property
    def biased(self) -> bool:
        """Whether the chain's error is systematic (so error feedback is needed)."""
        return bool(self.sparsifier or self.ternary)


def parse_chain(specs: list[str], key: str) -> Chain:
    """The chain ``specs`` describe; a FedtuneError naming ``key`` if it is not valid."""
    fields: dict = {"specs": tuple(specs)}
    stage = 0  # 0: sparsifier allowed, 1: value codec allowed, 2: lossless allowed, 3: done
    for spec in specs:
        name, _, arg = spec.partition(":")
        if name in SPARSIFIERS:
            _order(stage, 0, key, spec, "a sparsifier comes first")
            fields.update(sparsifier=name, fraction=_fraction(arg, key, spec))
            stage = 1
        elif name in CASTS or name == "ternary" or _INT.match(spec):
            _order(stage, 1, key, spec, "one value codec, after any sparsifier")
            if name in CASTS:
                fields["cast"] = name
            elif name == "ternary":
                fields["ternary"] = True
            else:
                m = _INT.match(spec)
                bits = int(m[1])
                if not 2 <= bits <= 8:
                    raise FedtuneError(f"config key {key}: codec {spec!r} has {bits} bits; use 2 to 8")
                fields.update(bits=bits, per_row=bool(m[2]))
            stage = 2
        elif name in LOSSLESS and not arg:
            _order(stage, 2, key, spec, "lossless compression comes last")
            fields["lossless"] = name
            stage = 3
        else:
            raise FedtuneError(
                f"config key {key}: unknown codec {spec!r}; known: topk:F, randk:F, float16, bfloat16, "
                "int<B>, int<B>:row, ternary, zstd, deflate"
            )
    return Chain(**fields)


def _order(stage: int, slot: int, key: str, spec: str, rule: str) -> None:
    if stage > slot:
        raise FedtuneError(f"config key {key}: codec {spec!r} is out of place ({rule})")


def _fraction(arg: str, key: str, spec: str) -> float:
    try:
        fraction = float(arg)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise FedtuneError(f"config key {key}: codec {spec!r} needs a kept fraction in (0, 1], e.g. topk:0.05")
    return fraction
