"""Temporary DuckDB relations: a frame or Arrow table visible to SQL for one block of code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["registered"]


@contextmanager
def registered(conn: Any, name: str, relation: Any) -> Iterator[None]:
    """``relation`` (a frame or Arrow table) visible to SQL on ``conn`` as ``name`` while the
    block runs, and released when it ends, also on an error (a relation left registered
    would keep its frame alive and shadow the next one of that name)."""
    conn.register(name, relation)
    try:
        yield
    finally:
        conn.unregister(name)
