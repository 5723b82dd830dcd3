"""The SQLite profile's write lock: whose it is, when it is released, and what runs outside it.

The lock belongs to the session or connection whose transaction took it, and its owner is the
task that opened that session or connection, not a helper task that happened to send the first
statement (``asyncio.wait_for`` on Python 3.11, the exit of ``async_sessionmaker.begin()``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import async_sessionmaker as sa_async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import asyncorm


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "counter"
    id: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int]


SCHEMA = [
    "CREATE TABLE parent (id INTEGER PRIMARY KEY, name TEXT)",
    "CREATE TABLE child (id INTEGER PRIMARY KEY, "
    "parent_id INTEGER NOT NULL REFERENCES parent(id) ON DELETE CASCADE)",
    "CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    "INSERT INTO parent VALUES (1, 'a'), (2, 'b')",
    "INSERT INTO child VALUES (10, 1), (11, 1), (12, 2)",
    "INSERT INTO counter VALUES (1, 0)",
]


async def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    engine = asyncorm.create_engine(url, **kwargs)
    async with engine.begin() as conn:
        for statement in SCHEMA:
            await conn.exec_driver_sql(statement)
    return engine


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = await make_engine(
        f"sqlite:///{tmp_path / 'lock.db'}", pool_size=2, connect_args={"timeout": 1.0}
    )
    try:
        yield engine
    finally:
        await engine.dispose()


BUMP = text("UPDATE counter SET n = n + 1")


# -- whose lock it is ---------------------------------------------------------------------


async def test_a_second_session_from_sessionmaker_begin_fails_fast_instead_of_deadlocking(
    engine: AsyncEngine,
) -> None:
    """SQLAlchemy's ``async_sessionmaker.begin()`` flushes on exit in a task of its own."""
    Session = sa_async_sessionmaker(engine, class_=asyncorm.AsyncSession)
    async with Session() as first:
        await first.execute(BUMP)
        with pytest.raises(
            asyncorm.SQLiteWriteLockError,
            match=r"through session <AsyncSession 0x[0-9a-f]+> \(begun at "
            r".*test_sqlite_lock\.py:\d+ in test_a_second_session.*would deadlock",
        ) as caught:
            async with Session.begin() as second:
                second.add(Counter(id=2, n=0))  # the INSERT is the exit's flush
        assert not isinstance(caught.value, asyncorm.SQLiteWriteLockTimeout)
    async with Session.begin() as session:  # both ended: the lock is free again
        await session.execute(BUMP)


async def test_a_first_statement_run_through_wait_for_leaves_the_lock_with_the_session_owner(
    engine: AsyncEngine,
) -> None:
    """On Python 3.11 ``asyncio.wait_for`` runs the statement in a helper task, which has
    finished by the time the owner opens a second session."""
    Session = asyncorm.async_sessionmaker(engine)
    async with Session() as first:
        await asyncio.wait_for(first.execute(BUMP), 5)
        async with Session() as second:
            with pytest.raises(asyncorm.SQLiteWriteLockError, match=r"would deadlock") as caught:
                await second.execute(BUMP)
        assert not isinstance(caught.value, asyncorm.SQLiteWriteLockTimeout)
        assert "finished" not in str(caught.value)


async def test_a_connection_used_through_wait_for_still_belongs_to_its_task(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as first:
        await asyncio.wait_for(first.execute(BUMP), 5)
        async with engine.connect() as second:
            with pytest.raises(
                asyncorm.SQLiteWriteLockError,
                match=r"through connection <Connection 0x[0-9a-f]+> .*would deadlock",
            ):
                await second.execute(BUMP)


async def test_the_lock_timeout_names_the_owner_task_and_where_it_began_not_a_helper(
    engine: AsyncEngine,
) -> None:
    holding, done = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with engine.connect() as conn:
            await asyncio.wait_for(conn.execute(BUMP), 5)
            holding.set()
            await done.wait()

    task = asyncio.create_task(holder(), name="slow-holder")
    await holding.wait()
    try:
        async with asyncorm.async_sessionmaker(engine)() as session:
            with pytest.raises(
                asyncorm.SQLiteWriteLockTimeout,
                match=r"Waited 1s for the write lock .*; task 'slow-holder' has held it for "
                r"[\d.]+s through connection <Connection 0x[0-9a-f]+>, begun at "
                r".*test_sqlite_lock\.py:\d+ in holder\(\)\.",
            ):
                await session.execute(BUMP)
    finally:
        done.set()
        await task


# -- detached connections -------------------------------------------------------------------


async def test_a_detached_connection_releases_the_lock_and_takes_turns_again(
    engine: AsyncEngine,
) -> None:
    Session = asyncorm.async_sessionmaker(engine)

    async def hold(holding: asyncio.Event, done: asyncio.Event) -> None:
        async with Session() as session:
            await session.execute(BUMP)
            holding.set()
            await done.wait()
            await session.commit()

    async def in_another_task_hold_the_lock_while(work: Any) -> None:
        holding, done = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold(holding, done))
        await holding.wait()
        try:
            await work
        finally:
            done.set()
            await holder

    detached = await engine.connect()
    try:
        await detached.run_sync(Connection.detach)
        holding, done = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold(holding, done))
        await holding.wait()
        write = asyncio.create_task(detached.execute(BUMP))  # waits for the holder's lock
        done.set()
        await holder
        await write
        await detached.commit()  # its transaction ends: the lock is released
        async with Session.begin() as session:
            await session.execute(BUMP)  # no SQLiteWriteLockTimeout
        # its next transaction takes turns again: it waits for another task's lock
        with pytest.raises(asyncorm.SQLiteWriteLockTimeout, match=r"Waited 1s"):
            await in_another_task_hold_the_lock_while(detached.execute(BUMP))
        await detached.rollback()
        await detached.execute(BUMP)
    finally:
        await detached.close()  # closed in a transaction: released too
    async with Session.begin() as session:
        assert (await session.execute(text("SELECT n FROM counter"))).scalar() == 4


# -- statements SQLite refuses or ignores inside a transaction -------------------------------


@pytest.mark.parametrize("where", ["file", "memory"])
async def test_the_twelve_step_table_rebuild_recipe_keeps_every_child_row(
    tmp_path: Path, where: str
) -> None:
    """https://www.sqlite.org/lang_altertable.html#otheralter through an asyncorm engine:
    with PRAGMA foreign_keys=OFF wrapped in BEGIN IMMEDIATE, SQLite ignored it and DROP TABLE
    deleted every child row through ON DELETE CASCADE."""
    url = f"sqlite:///{tmp_path / 'rebuild.db'}" if where == "file" else "sqlite://"
    engine = await make_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # 1
            await conn.commit()
            async with conn.begin():  # 2
                await conn.exec_driver_sql(  # 4
                    "CREATE TABLE new_parent (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"
                )
                await conn.exec_driver_sql("INSERT INTO new_parent SELECT id, name FROM parent")
                await conn.exec_driver_sql("DROP TABLE parent")  # 6
                await conn.exec_driver_sql("ALTER TABLE new_parent RENAME TO parent")  # 7
                check = await conn.exec_driver_sql("PRAGMA foreign_key_check")  # 10
                assert check.all() == []
            await conn.exec_driver_sql("PRAGMA foreign_keys=ON")  # 12
            await conn.commit()
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
        async with engine.connect() as conn:
            children = await conn.exec_driver_sql("SELECT id FROM child ORDER BY id")
            assert children.scalars().all() == [10, 11, 12]
    finally:
        await engine.dispose()


async def test_vacuum_runs_outside_a_transaction_taking_turns_on_the_lock(
    engine: AsyncEngine,
) -> None:
    holding, done = asyncio.Event(), asyncio.Event()

    async def writer() -> None:
        async with asyncorm.async_sessionmaker(engine)() as session:
            await session.execute(BUMP)
            holding.set()
            await done.wait()
            await session.commit()

    async with engine.connect() as conn:
        await conn.exec_driver_sql("VACUUM")  # not "cannot VACUUM from within a transaction"
        task = asyncio.create_task(writer())  # gets the lock: the VACUUM released it
        await holding.wait()
        try:
            with pytest.raises(asyncorm.SQLiteWriteLockTimeout, match=r"Waited 1s"):
                await conn.exec_driver_sql("VACUUM")  # waits for the writer
            await conn.rollback()
        finally:
            done.set()
            await task
        await conn.exec_driver_sql("VACUUM")
        await conn.commit()


async def test_journal_mode_and_synchronous_change_when_no_transaction_is_open(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as conn:
        mode = await conn.exec_driver_sql("PRAGMA journal_mode=DELETE")
        assert mode.scalar() == "delete"  # not "cannot change out of wal mode ..."
        await conn.exec_driver_sql("PRAGMA synchronous=FULL")  # not "Safety level may not ..."
        assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 2
        await conn.commit()
        await conn.exec_driver_sql("UPDATE counter SET n = 5")  # a transaction: inside it,
        refused = await conn.exec_driver_sql("PRAGMA journal_mode=WAL")  # SQLite refuses
        assert refused.scalar() == "delete"
        await conn.rollback()
        assert (await conn.exec_driver_sql("PRAGMA journal_mode=WAL")).scalar() == "wal"
        await conn.commit()


async def test_a_users_own_begin_replaces_the_profiles(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.exec_driver_sql("BEGIN")  # not "cannot start a transaction within ..."
        await conn.execute(BUMP)
        await conn.rollback()
        assert (await conn.exec_driver_sql("SELECT n FROM counter")).scalar() == 0


# -- cancellation in the pool's reset-on-return ---------------------------------------------


async def test_a_reset_cancelled_in_its_rollback_leaves_no_stale_transaction_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine(f"sqlite:///{tmp_path / 'reset.db'}", pool_size=1)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "CREATE TABLE deferred (id INTEGER PRIMARY KEY, "
            "parent_id INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
        )
    victim: list[asyncio.Task[Any]] = []
    original: Any = aiosqlite.Connection._execute

    async def cancelling(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if victim:  # times the cancellation into the trip of the reset's ROLLBACK
            asyncio.get_running_loop().call_soon(victim.pop().cancel)
        return await original(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", cancelling)

    async def failing_commit_then_cancelled_close() -> None:
        conn = await engine.connect()
        await conn.exec_driver_sql("INSERT INTO deferred VALUES (1, 99)")
        with pytest.raises(Exception, match="FOREIGN KEY constraint failed"):
            await conn.commit()  # SQLite keeps the transaction open
        current = asyncio.current_task()
        assert current is not None
        victim.append(current)
        await conn.close()

    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(failing_commit_then_cancelled_close())
        async with engine.connect() as conn:  # the same pooled connection
            await conn.execute(BUMP)
            raw = await conn.get_raw_connection()
            assert raw.driver_connection.in_transaction  # type: ignore[union-attr]
            await conn.rollback()
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("SELECT n FROM counter")).scalar() == 0
    finally:
        await engine.dispose()
