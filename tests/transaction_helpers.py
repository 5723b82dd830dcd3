"""Helpers for the transactional() tests: real retryable failures on both backends."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncorm
from tests.conftest import Backend, reset_schema
from tests.models import Account

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]
Registry = asyncorm.async_scoped_session[asyncorm.AsyncSession]

SQLITE_BUSY_TIMEOUT = 0.2
"""The busy timeout of the tests' SQLite engines: how long a write waits for another
process's lock before SQLite says "database is locked"."""


@asynccontextmanager
async def open_engine(
    backend: Backend, *, short_timeout: bool = False
) -> AsyncIterator[AsyncEngine]:
    """An engine with fresh tables; fails if it leaks. ``short_timeout``: SQLite gives up
    waiting for a lock after :data:`SQLITE_BUSY_TIMEOUT` (another process's, and the
    engine's own writer turn)."""
    kwargs: dict[str, Any] = {}
    if short_timeout and backend.is_sqlite:
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT}
    engine = asyncorm.create_engine(backend.url, **kwargs)
    await reset_schema(engine)
    try:
        yield engine
        checked_out = engine.pool.checkedout()  # type: ignore[attr-defined]
        assert checked_out == 0, f"{checked_out} connection(s) still checked out"
    finally:
        await engine.dispose()


async def seed_accounts(Session: SessionFactory, *balances: int) -> None:
    async with Session.begin() as session:
        for number, balance in enumerate(balances, start=1):
            session.add(Account(id=number, balance=balance))


async def balances(Session: SessionFactory) -> list[int]:
    async with Session() as session:
        rows = await session.execute(text("SELECT balance FROM accounts ORDER BY id"))
        return list(rows.scalars())


@dataclass
class Retries:
    """An ``on_retry`` hook that records what it is told."""

    errors: list[BaseException] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    pauses: list[float] = field(default_factory=list)

    def __call__(self, error: BaseException, attempt: int, pause: float) -> None:
        self.errors.append(error)
        self.attempts.append(attempt)
        self.pauses.append(pause)


@contextmanager
def another_process_writing(backend: Backend) -> Iterator[sqlite3.Connection]:
    """SQLite: a connection outside the engine (as another process would be) holding the
    database's write lock until the block ends or the yielded connection rolls back."""
    path = make_url(backend.url).database
    assert path
    holder = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield holder
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()


SERIALIZATION_FAILURE = text(
    "DO $$ BEGIN RAISE EXCEPTION 'could not serialize access (raised by the test)' "
    "USING ERRCODE = 'serialization_failure'; END $$"
)
"""PostgreSQL: a statement the server fails with SQLSTATE 40001, as a conflict would."""
