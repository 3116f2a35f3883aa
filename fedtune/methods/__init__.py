"""Federated methods, one module each behind one interface (``base.Method``), and
their registry. The registry and the interface load on first use: importing this
package for the methods' config sections (``options``) loads no torch or PEFT."""

from __future__ import annotations

from typing import Any

_REGISTRY = {"METHODS", "get_method", "method_class"}
_INTERFACE = {"ClientJob", "ClientUpdate", "LocalResult", "Method"}
__all__ = sorted(_REGISTRY | _INTERFACE)


def __getattr__(name: str) -> Any:
    if name in _REGISTRY:
        from fedtune.methods import registry

        return getattr(registry, name)
    if name in _INTERFACE:
        from fedtune.methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
