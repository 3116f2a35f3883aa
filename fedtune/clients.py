"""Clients are integer partition ids inside fedtune; their names ("client-3") appear
only at the edges: logs, files, the console and the wire header."""

from __future__ import annotations


def client_name(partition_id: int) -> str:
    return f"client-{partition_id}"
