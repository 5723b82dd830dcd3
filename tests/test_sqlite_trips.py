"""SQLite: one trip to aiosqlite's thread per statement, BEGIN riding on the first one.

SQLAlchemy's aiosqlite adapter makes four trips per statement (open a cursor, execute, fetch,
close) and asyncorm's SQLite profile used to send ``BEGIN IMMEDIATE`` on a trip of its own.
The trips are counted at aiosqlite's ``Connection._execute``, through which every call to
the thread passes (instrumentation on the real driver: the statements still run).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiosqlite
import pytest
from sqlalchemy import event, func, insert, select, text, update
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.ext.asyncio import async_sessionmaker as sa_async_sessionmaker

import asyncorm
from asyncorm._aiosqlite import OneTripConnection
from tests.conftest import reset_schema
from tests.models import Account, Base, User

users = Base.metadata.tables["users"]


class Trips:
    """Counts calls to aiosqlite's thread; ``queued`` is set at each one."""

    def __init__(self) -> None:
        self.count = 0
        self.queued = asyncio.Event()


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> Trips:
    counter = Trips()
    original: Any = aiosqlite.Connection._execute

    async def counting(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        counter.count += 1
        counter.queued.set()
        return await original(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counting)
    return counter


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = asyncorm.create_engine(f"sqlite:///{tmp_path / 'trips.db'}", pool_size=1)
    await reset_schema(engine)
    async with asyncorm.async_sessionmaker(engine).begin() as session:
        session.add_all([User(id=1, name="ann"), Account(id=1, balance=100)])
    try:
        yield engine
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_a_read_costs_two_trips_where_sqlalchemy_costs_five(
    sqlite_engine: AsyncEngine, tmp_path: Path, trips: Trips
) -> None:
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    trips.count = 0
    async with Session() as session:
        assert (await session.get(User, 1)) is not None
        driver: Any = (await (await session.connection()).get_raw_connection()).driver_connection
        assert driver.in_transaction  # BEGIN IMMEDIATE went with the SELECT
    assert trips.count == 2  # BEGIN IMMEDIATE + SELECT, then ROLLBACK

    stock = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'trips.db'}")
    try:
        async with sa_async_sessionmaker(stock)() as session:
            await session.execute(select(1))  # the connection's own setup, untimed
        trips.count = 0
        async with sa_async_sessionmaker(stock)() as session:
            assert (await session.get(User, 1)) is not None
        assert trips.count >= 5  # cursor, execute, fetch, close, rollback
    finally:
        await stock.dispose()


async def test_read_modify_write_costs_three_trips(
    sqlite_engine: AsyncEngine, trips: Trips
) -> None:
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    trips.count = 0
    async with Session() as session:
        account = await session.get(Account, 1)
        assert account is not None
        account.balance += 1
        await session.commit()
    assert trips.count == 3  # BEGIN IMMEDIATE + SELECT, UPDATE, COMMIT
    async with Session() as session:
        assert await session.scalar(select(Account.balance)) == 101


async def test_a_transaction_that_sends_nothing_costs_no_trip_and_frees_the_lock(
    sqlite_engine: AsyncEngine, trips: Trips
) -> None:
    trips.count = 0
    async with sqlite_engine.begin():
        pass
    async with asyncorm.async_sessionmaker(sqlite_engine)() as session:
        await session.connection()  # a transaction but no statement: no lock, no trip
        await session.rollback()
    assert trips.count == 0
    async with sqlite_engine.begin() as conn:  # the lock was released: no wait, no error
        await conn.execute(update(Account).values(balance=5))
    async with sqlite_engine.connect() as conn:
        assert await conn.scalar(select(Account.balance)) == 5


async def test_rows_rowcount_and_lastrowid_come_back_from_the_one_trip(
    sqlite_engine: AsyncEngine,
) -> None:
    async with sqlite_engine.begin() as conn:
        result = await conn.execute(insert(users).values(name="bo"))
        assert result.inserted_primary_key == (2,)  # cursor.lastrowid
        many = await conn.execute(insert(users), [{"name": "cy"}, {"name": "di"}])  # executemany
        assert many.rowcount == 2
        changed = await conn.execute(update(User).where(User.id > 1).values(fullname="x"))
        assert changed.rowcount == 3
        rows = (await conn.execute(select(User.id, User.name).order_by(User.id))).all()
        assert [tuple(r) for r in rows] == [(1, "ann"), (2, "bo"), (3, "cy"), (4, "di")]
        assert list((await conn.execute(select(User.id))).keys()) == ["id"]  # description


async def test_stream_sends_the_queued_begin_before_its_cursor(
    sqlite_engine: AsyncEngine,
) -> None:
    async with asyncorm.async_sessionmaker(sqlite_engine)() as session:
        result = await session.stream_scalars(select(User.name))  # first statement
        assert [name async for name in result] == ["ann"]
        driver: Any = (await (await session.connection()).get_raw_connection()).driver_connection
        assert driver.in_transaction


async def test_a_failing_first_statement_still_began_and_is_rolled_back(
    sqlite_engine: AsyncEngine,
) -> None:
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    async with Session() as session:
        session.add(User(id=1, name="duplicate"))
        with pytest.raises(IntegrityError, match=r"UNIQUE constraint failed: users\.id"):
            await session.flush()
        await session.rollback()
    async with Session() as session:
        with pytest.raises(OperationalError, match='near "SELEKT": syntax error'):
            await session.execute(text("SELEKT 1"))
    async with Session() as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 1


async def test_a_cancelled_first_statement_is_rolled_back_before_the_lock_is_released(
    sqlite_engine: AsyncEngine, trips: Trips
) -> None:
    """The cancelled trip still runs BEGIN IMMEDIATE and the UPDATE on the thread; the
    rollback queues behind it, so the connection returns clean and the lock is free."""
    Session = asyncorm.async_sessionmaker(sqlite_engine)

    async def write() -> None:
        async with Session() as session:
            await session.execute(update(Account).values(balance=0))
            await session.commit()

    trips.queued.clear()
    task = asyncio.create_task(write())
    await trips.queued.wait()  # BEGIN IMMEDIATE + UPDATE are on their way to the thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with Session() as session:  # same pooled connection (pool_size=1)
        driver: Any = (await (await session.connection()).get_raw_connection()).driver_connection
        assert not driver.in_transaction  # rolled back on return, nothing left open
        assert await session.scalar(select(Account.balance)) == 100
        await session.execute(update(Account).values(balance=7))
        await session.commit()
    async with Session() as session:
        assert await session.scalar(select(Account.balance)) == 7


async def test_a_closed_driver_connection_is_rolled_back_without_an_error(
    sqlite_engine: AsyncEngine,
) -> None:
    """After the driver connection is gone (closed underneath), ending the transaction must
    not fail on the adapter's own bookkeeping; the pool replaces the connection."""
    async with sqlite_engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        await driver.close()
        with pytest.raises(OperationalError, match="no active connection"):
            await conn.execute(select(1))
    async with asyncorm.async_sessionmaker(sqlite_engine)() as session:
        assert await session.scalar(select(Account.balance)) == 100


async def test_a_begin_that_failed_is_sent_again_by_the_next_statement(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE rides on the first statement; when it fails ("database is locked" by
    another process), the retry in the same session must begin again, not autocommit."""
    path = tmp_path / "locked.db"
    engine = asyncorm.create_engine(f"sqlite:///{path}", pool_size=1, connect_args={"timeout": 0.1})
    try:
        await reset_schema(engine)
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process is writing
            async with asyncorm.async_sessionmaker(engine)() as session:
                with pytest.raises(OperationalError, match="database is locked"):
                    await session.execute(insert(users).values(id=1, name="first try"))
                other.execute("COMMIT")
                await session.execute(insert(users).values(id=2, name="retry"))
                await session.rollback()
            assert other.execute("SELECT count(*) FROM users").fetchone() == (0,)
        finally:
            other.close()
    finally:
        await engine.dispose()


async def test_a_commit_that_failed_leaves_nothing_open_for_the_next_checkout(
    tmp_path: Path,
) -> None:
    """SQLite keeps the transaction open when COMMIT fails (a deferred foreign key); the
    connection must go back to the pool rolled back, its file lock released."""
    path = tmp_path / "deferred.db"
    engine = asyncorm.create_engine(f"sqlite:///{path}", pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("CREATE TABLE p (id INTEGER PRIMARY KEY)")
            await conn.exec_driver_sql(
                "CREATE TABLE ch (id INTEGER PRIMARY KEY, "
                "pid INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED)"
            )
        Session = asyncorm.async_sessionmaker(engine)
        async with Session() as session:
            await session.execute(text("INSERT INTO ch VALUES (1, 99)"))
            with pytest.raises(IntegrityError, match="FOREIGN KEY constraint failed"):
                await session.commit()
        async with Session() as session:  # the same pooled connection
            raw = await (await session.connection()).get_raw_connection()
            assert not cast(Any, raw.driver_connection).in_transaction
            await session.execute(text("INSERT INTO p VALUES (5)"))
            await session.rollback()
        other = sqlite3.connect(path, timeout=0.1)
        try:
            assert other.execute("SELECT count(*) FROM p").fetchone() == (0,)
            assert other.execute("SELECT count(*) FROM ch").fetchone() == (0,)
            other.execute("INSERT INTO p VALUES (7)")  # no lock left behind
            other.commit()
        finally:
            other.close()
    finally:
        await engine.dispose()


async def test_a_cancelled_commit_does_not_leave_the_next_checkout_without_a_transaction(
    sqlite_engine: AsyncEngine,
) -> None:
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    loop = asyncio.get_running_loop()
    victim: list[asyncio.Task[Any]] = []

    def cancel_at_commit(conn: Any) -> None:  # times the cancellation into COMMIT's trip
        if victim:
            loop.call_soon(victim.pop().cancel)

    async def writer() -> None:
        # a Core connection: its commit() is cancellable (a session's COMMIT, once sent,
        # runs to its outcome: tests/test_commit_cancellation.py)
        async with sqlite_engine.connect() as conn:
            await conn.execute(insert(User).values(id=2, name="bo"))
            current = asyncio.current_task()
            assert current is not None
            victim.append(current)
            await conn.commit()

    event.listen(sqlite_engine.sync_engine, "commit", cancel_at_commit)
    try:
        task = asyncio.create_task(writer())
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        event.remove(sqlite_engine.sync_engine, "commit", cancel_at_commit)
    async with Session() as session:  # the same pooled connection
        session.add(User(id=3, name="cy"))
        await session.flush()
        await session.rollback()
    async with Session() as session:
        # the cancelled COMMIT still ran on the thread; the next session's work rolled back
        names = (await session.scalars(select(User.name).order_by(User.id))).all()
        assert names == ["ann", "bo"]


async def test_a_transaction_sqlite_rolled_back_by_itself_is_begun_again(
    sqlite_engine: AsyncEngine,
) -> None:
    """``INSERT OR ROLLBACK`` on a conflict makes SQLite end the transaction itself; the
    session's next statement must start a new one, not autocommit."""
    async with asyncorm.async_sessionmaker(sqlite_engine)() as session:
        await session.execute(text("INSERT INTO users (id, name) VALUES (2, 'bo')"))
        with pytest.raises(IntegrityError, match="UNIQUE constraint failed"):
            await session.execute(text("INSERT OR ROLLBACK INTO users (id, name) VALUES (1, 'x')"))
        await session.execute(text("INSERT INTO users (id, name) VALUES (3, 'cy')"))
        await session.rollback()
    async with asyncorm.async_sessionmaker(sqlite_engine)() as session:
        assert (await session.scalars(select(User.name).order_by(User.id))).all() == ["ann"]


async def test_a_dbapi_module_of_ones_own_still_gets_real_transactions(tmp_path: Path) -> None:
    """``create_engine(url, module=...)`` replaces the one-trip adapter; the profile then
    sends BEGIN IMMEDIATE on a trip of its own, before the first statement."""
    engine = asyncorm.create_engine(
        f"sqlite:///{tmp_path / 'own.db'}", module=AsyncAdapt_aiosqlite_dbapi(aiosqlite, sqlite3)
    )
    try:
        await reset_schema(engine)
        Session = asyncorm.async_sessionmaker(engine)
        async with Session() as session:
            assert await session.scalar(select(func.count()).select_from(User)) == 0
            raw = await (await session.connection()).get_raw_connection()
            assert not isinstance(raw.dbapi_connection, OneTripConnection)
            assert cast(Any, raw.driver_connection).in_transaction  # the read began
            session.add(User(id=1, name="ann"))
            await session.flush()
            await session.rollback()
        async with Session() as session:
            assert await session.scalar(select(func.count()).select_from(User)) == 0
    finally:
        await engine.dispose()
