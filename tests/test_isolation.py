"""Isolation levels of transactional units, as the database reports and enforces them."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncorm
from tests.conftest import Backend
from tests.models import Account, User
from tests.transaction_helpers import Registry, SessionFactory, open_engine, seed_accounts


@pytest.fixture
async def tx_engine(backend: Backend) -> AsyncIterator[AsyncEngine]:
    async with open_engine(backend) as engine:
        yield engine


@pytest.fixture
def Session(tx_engine: AsyncEngine) -> SessionFactory:
    return asyncorm.async_sessionmaker(tx_engine)


@pytest.fixture
def db(Session: SessionFactory) -> Registry:
    return asyncorm.async_scoped_session(Session)


# -- PostgreSQL ---------------------------------------------------------------------------

pg_only = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


async def characteristics(db: Registry) -> tuple[str, str, str]:
    row = (
        await db.execute(
            text(
                "SELECT current_setting('transaction_isolation'), "
                "current_setting('transaction_read_only'), "
                "current_setting('transaction_deferrable')"
            )
        )
    ).one()
    return row[0], row[1], row[2]


@pg_only
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ("read committed", "off", "off")),
        ({"isolation_level": "READ COMMITTED"}, ("read committed", "off", "off")),
        ({"isolation_level": "repeatable_read"}, ("repeatable read", "off", "off")),
        ({"isolation_level": "SERIALIZABLE"}, ("serializable", "off", "off")),
        ({"read_only": True}, ("read committed", "on", "off")),
        (
            {"isolation_level": "REPEATABLE READ", "read_only": True},
            ("repeatable read", "on", "off"),
        ),
        (
            {"isolation_level": "SERIALIZABLE", "read_only": True, "deferrable": True},
            ("serializable", "on", "on"),
        ),
    ],
)
async def test_postgresql_units_run_at_the_level_asked_for(
    db: Registry, kwargs: dict[str, Any], expected: tuple[str, str, str]
) -> None:
    @db.transactional(**kwargs)
    async def unit() -> tuple[str, str, str]:
        return await characteristics(db)

    assert await unit() == expected
    async with db.scope():  # the connection went back to the pool with its defaults
        assert await characteristics(db) == ("read committed", "off", "off")


@pg_only
async def test_a_repeatable_read_unit_begins_before_its_first_plain_read(
    db: Registry, Session: SessionFactory, tx_engine: AsyncEngine
) -> None:
    """The deferred BEGIN must not run the unit's first (plain) read outside the snapshot:
    a row changed by another transaction after that read is not seen by the second."""
    await seed_accounts(Session, 10)

    @db.transactional(isolation_level="REPEATABLE READ")
    async def reads_twice() -> tuple[int, int]:
        first = await db.scalar(select(Account.balance).where(Account.id == 1))
        async with tx_engine.begin() as other:
            await other.execute(update(Account).values(balance=99))
        second = await db.scalar(
            select(Account.balance).where(Account.id == 1).execution_options(
                populate_existing=True
            )
        )
        return int(first or 0), int(second or 0)

    assert await reads_twice() == (10, 10)


@pg_only
async def test_a_read_only_unit_cannot_write_and_is_not_retried(db: Registry) -> None:
    calls = 0

    @db.transactional(read_only=True, retries=5)
    async def writes() -> None:
        nonlocal calls
        calls += 1
        db.add(User(name="ann"))
        await db.flush()

    with pytest.raises(asyncorm.ReadOnlySessionError, match="PostgreSQL refused the statement"):
        await writes()
    assert calls == 1


# -- SQLite ---------------------------------------------------------------------------------

sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def write_lock_is_free(backend: Backend) -> bool:
    """Whether a connection outside the engine can take the database's write lock now."""
    path = make_url(backend.url).database
    assert path
    probe = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        probe.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
        return False
    else:
        probe.execute("ROLLBACK")
        return True
    finally:
        probe.close()


@sqlite_only
@pytest.mark.parametrize(
    ("level", "takes_the_lock"),
    [(None, True), ("IMMEDIATE", True), ("SERIALIZABLE", True), ("DEFERRED", False)],
)
async def test_sqlite_units_begin_immediate_unless_deferred(
    backend: Backend,
    db: Registry,
    Session: SessionFactory,
    level: str | None,
    takes_the_lock: bool,
) -> None:
    await seed_accounts(Session, 10)

    @db.transactional(isolation_level=level)
    async def reads() -> bool:
        await db.get_one(Account, 1)
        return write_lock_is_free(backend)

    assert await reads() is not takes_the_lock


@sqlite_only
async def test_a_read_only_sqlite_unit_reads_a_snapshot_and_cannot_write(
    backend: Backend, db: Registry, Session: SessionFactory
) -> None:
    await seed_accounts(Session, 10)
    calls = 0

    @db.transactional(read_only=True, retries=5)
    async def unit() -> None:
        nonlocal calls
        calls += 1
        assert (await db.get_one(Account, 1)).balance == 10
        assert write_lock_is_free(backend)
        db.add(User(name="ann"))
        await db.flush()

    with pytest.raises(asyncorm.ReadOnlySessionError, match="is read-only"):
        await unit()
    assert calls == 1
