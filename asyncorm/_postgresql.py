"""The PostgreSQL profile: asyncpg with pre-ping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["prepare"]


def _nothing(engine: AsyncEngine) -> None:
    """PostgreSQL needs no engine events (yet)."""


def prepare(
    url: URL, kwargs: dict[str, Any]
) -> tuple[URL, dict[str, Any], Callable[[AsyncEngine], None]]:
    """Apply the PostgreSQL profile: connections are pinged when checked out of the pool."""
    kwargs.setdefault("pool_pre_ping", True)
    return url, kwargs, _nothing
