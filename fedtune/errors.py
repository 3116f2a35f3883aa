"""User-facing errors: one line, no traceback, a non-zero exit from the CLI."""

from __future__ import annotations

from typing import Any


class FedtuneError(Exception):
    """A mistake in the user's input (config, data, model path), not a bug.

    The CLI prints ``error: <message>`` and exits with status 2. The message names
    what is wrong and what to do about it.
    """


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """A one-line error naming config ``key`` unless ``ok``."""
    if not ok:
        raise FedtuneError(f"config key {key} must be {rule}, got {value!r}")
