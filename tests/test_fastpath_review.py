"""Review of the fast paths: begin()/close() without a greenlet, the PostgreSQL pre-ping's
poll and deferred BEGIN's caches, hold_cancellations' inline wait.

Each test states what SQLAlchemy's general path does and checks asyncorm's does the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession
from sqlalchemy.orm import Session as SASession

import asyncorm

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]


# -- begin() / close() without a greenlet: a replaced method that does IO -------------------


def closing_with_a_statement(original: Callable[..., None], seen: list[Any]) -> Any:
    """A close() that runs a statement first (IO: it needs the greenlet), then closes."""

    def close(self: SASession) -> None:
        seen.append(self.scalar(text("SELECT 1")))
        original(self)

    return close


def beginning_with_a_statement(original: Callable[..., Any], seen: list[Any]) -> Any:
    """A begin() that runs a statement in the transaction it began (IO)."""

    def begin(self: SASession, nested: bool = False) -> Any:
        transaction = original(self, nested)
        seen.append(self.scalar(text("SELECT 1")))
        return transaction

    return begin


async def close_and_begin(session: SAAsyncSession) -> None:
    await session.close()
    async with session.begin():
        pass
    await session.close()


@pytest.mark.parametrize("sqlalchemys", [False, True], ids=["asyncorm", "sqlalchemy"])
async def test_methods_replaced_on_the_sync_session_instance_run_in_a_greenlet(
    engine: AsyncEngine, sqlalchemys: bool
) -> None:
    """SQLAlchemy's close() and begin() call ``session.sync_session.close``/``.begin``: a
    function set on the instance (a test's wrapper, instrumentation) runs in a greenlet, so
    it may do IO. asyncorm's inline paths called it on the event loop: MissingGreenlet."""
    cls = SAAsyncSession if sqlalchemys else asyncorm.AsyncSession
    session = cls(engine)
    seen: list[Any] = []
    sync = session.sync_session
    sync.close = closing_with_a_statement(type(sync).close, seen).__get__(sync)  # type: ignore[method-assign]
    sync.begin = beginning_with_a_statement(type(sync).begin, seen).__get__(sync)  # type: ignore[method-assign]
    await close_and_begin(session)
    assert seen == [1, 1, 1]


@pytest.mark.parametrize("sqlalchemys", [False, True], ids=["asyncorm", "sqlalchemy"])
async def test_methods_patched_on_the_session_class_after_first_use_run_in_a_greenlet(
    engine: AsyncEngine, sqlalchemys: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync_session_class whose close()/begin() are replaced after its first session
    closed (a test's monkeypatch): the replacement runs in a greenlet, as in SQLAlchemy.
    asyncorm cached "SQLAlchemy's own" per class at first use and ran it inline."""
    base: type[SASession] = SASession if sqlalchemys else asyncorm.AsyncSession.sync_session_class
    sync_class = type("Custom", (base,), {})
    cls = SAAsyncSession if sqlalchemys else asyncorm.AsyncSession
    await close_and_begin(cls(engine, sync_session_class=sync_class))  # first use: plain
    seen: list[Any] = []
    monkeypatch.setattr(sync_class, "close", closing_with_a_statement(base.close, seen))
    monkeypatch.setattr(sync_class, "begin", beginning_with_a_statement(base.begin, seen))
    await close_and_begin(cls(engine, sync_session_class=sync_class))
    assert seen == [1, 1, 1]


@pytest.mark.parametrize("sqlalchemys", [False, True], ids=["asyncorm", "sqlalchemy"])
async def test_sqlalchemys_session_methods_patched_run_in_a_greenlet(
    engine: AsyncEngine, sqlalchemys: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Session.close``/``Session.begin`` themselves replaced (instrumentation patching
    SQLAlchemy): asyncorm compared the session class's methods with Session's *current*
    ones, so the replacement was "SQLAlchemy's own" and ran on the event loop."""
    cls = SAAsyncSession if sqlalchemys else asyncorm.AsyncSession
    seen: list[Any] = []
    monkeypatch.setattr(SASession, "close", closing_with_a_statement(SASession.close, seen))
    monkeypatch.setattr(SASession, "begin", beginning_with_a_statement(SASession.begin, seen))
    await close_and_begin(cls(engine))
    assert seen == [1, 1, 1]


def noop(*args: Any) -> None:
    pass


def test_no_listener_left(engine: AsyncEngine) -> None:
    del engine
    assert not event.contains(SASession, "after_transaction_create", noop)
