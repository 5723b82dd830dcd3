"""SQLite: one trip to aiosqlite's thread per statement, BEGIN riding on the first one.

SQLAlchemy's aiosqlite adapter makes four trips per statement (open a cursor, execute, fetch,
close) and asyncorm's SQLite profile used to send ``BEGIN IMMEDIATE`` on a trip of its own.
The trips are counted at aiosqlite's ``Connection._execute``, through which every call to
the thread passes (instrumentation on the real driver: the statements still run).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import threading
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiosqlite
import pytest
from sqlalchemy import event, func, insert, select, text, update
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_dbapi
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.ext.asyncio import async_sessionmaker as sa_async_sessionmaker
from sqlalchemy.util import await_

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


async def test_a_read_costs_one_trip_where_sqlalchemy_costs_five(
    sqlite_engine: AsyncEngine, tmp_path: Path, trips: Trips
) -> None:
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    trips.count = 0
    async with Session() as session:
        assert (await session.get(User, 1)) is not None
        driver: Any = (await (await session.connection()).get_raw_connection()).driver_connection
        assert driver.in_transaction  # BEGIN (a WAL snapshot) went with the SELECT
    assert not driver.in_transaction  # ended on the event loop (asyncorm._inline_end)
    assert trips.count == 1  # BEGIN + SELECT; the ROLLBACK ran inline

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


# -- a read snapshot ends on the event loop (asyncorm/_inline_end.py) ------------------------


class Gate:
    """Holds a SQL function ``hold(x)`` on aiosqlite's thread until ``release`` is set;
    ``entered`` (an asyncio event) is set from the thread when it starts waiting."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.entered = asyncio.Event()
        self.release = threading.Event()

    def hold(self, value: Any) -> Any:
        self.loop.call_soon_threadsafe(self.entered.set)
        if not self.release.wait(30):
            raise RuntimeError("the test never released the gate")
        return value


async def gated_engine(path: Path, gate: Gate, **kwargs: Any) -> AsyncEngine:
    """A SQLite file engine (pool of one unless told) with ``hold()`` on every connection,
    the test tables, ann and one account of 100."""
    kwargs.setdefault("pool_size", 1)
    engine = asyncorm.create_engine(f"sqlite:///{path}", **kwargs)

    def add_hold(dbapi_connection: Any, record: Any) -> None:
        await_(dbapi_connection.driver_connection.create_function("hold", 1, gate.hold))

    event.listen(engine.sync_engine, "connect", add_hold)
    await reset_schema(engine)
    async with asyncorm.async_sessionmaker(engine).begin() as session:
        session.add_all([User(id=1, name="ann"), Account(id=1, balance=100)])
    return engine


def no_reader_left(path: Path) -> bool:
    """Whether a TRUNCATE checkpoint completes: no transaction holds a read mark (a snapshot
    left open would keep the WAL: SQLite reports the checkpoint busy)."""
    other = sqlite3.connect(path, timeout=5)
    try:
        busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return bool(busy == 0)
    finally:
        other.close()


async def driver_of(session: AsyncSession) -> Any:
    """The session's aiosqlite connection."""
    return (await (await session.connection()).get_raw_connection()).driver_connection


async def in_transaction(session: AsyncSession) -> bool:
    return bool((await driver_of(session)).in_transaction)


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "check_same_thread"])
async def test_a_read_snapshot_behaves_as_with_the_trip_and_costs_none_to_end(
    tmp_path: Path, trips: Trips, inline: bool
) -> None:
    """The same observations with the inline end and with the thread trip it replaces
    (``check_same_thread=True``: the general path); only the trips differ."""
    path = tmp_path / "same.db"
    kwargs: dict[str, Any] = {} if inline else {"connect_args": {"check_same_thread": True}}
    engine = await gated_engine(path, Gate(), **kwargs)
    try:
        Session = asyncorm.async_sessionmaker(engine)
        seen: list[int | None] = []
        trips.count = 0
        async with Session() as session:
            seen.append(await session.scalar(select(Account.balance)))
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("UPDATE accounts SET balance = 200")  # committed meanwhile
            other.close()
            seen.append(await session.scalar(select(Account.balance)))  # same snapshot
            await session.commit()  # a read transaction's COMMIT
            assert not await in_transaction(session)
            seen.append(await session.scalar(select(Account.balance)))  # a new snapshot
        assert seen == [100, 100, 200]
        # three reads; each end (COMMIT, then ROLLBACK at close) inline or a trip
        assert trips.count == (3 if inline else 5)
        assert no_reader_left(path)
        trips.count = 0
        async with Session(read_only=True) as session:
            assert [u.name for u in (await session.scalars(select(User)))] == ["ann"]
        assert trips.count == (1 if inline else 2)
        trips.count = 0
        async with Session() as session:
            result = await session.stream_scalars(select(User.name))  # aiosqlite's cursor
            assert [name async for name in result] == ["ann"]
        assert trips.count >= 3 if inline else trips.count >= 4
        assert no_reader_left(path)
    finally:
        await engine.dispose()


async def test_a_read_session_that_writes_ends_with_a_trip(tmp_path: Path, trips: Trips) -> None:
    path = tmp_path / "writes.db"
    engine = await gated_engine(path, Gate())
    try:
        Session = asyncorm.async_sessionmaker(engine)
        trips.count = 0
        async with Session() as session:
            account = await session.get(Account, 1)  # BEGIN (a snapshot) + SELECT
            assert account is not None
            account.balance = 0
            await session.flush()  # the writer turn, then the UPDATE
        assert trips.count == 3  # the ROLLBACK of a write transaction went to the thread
        async with Session() as session:
            assert await session.scalar(select(Account.balance)) == 100
            account = await session.get(Account, 1)
            assert account is not None
            account.balance = 150
            trips.count = 0
            await session.commit()
            assert trips.count == 2  # UPDATE, COMMIT: no inline COMMIT after a write
        async with Session() as session:
            assert await session.scalar(select(Account.balance)) == 150

        # a write asyncorm does not see (the raw driver, in the snapshot's transaction):
        # SQLite's count of changed rows differs, so the end goes to the thread too
        async with Session() as session:
            assert await session.scalar(select(User.name)) == "ann"
            driver = await driver_of(session)
            await driver.execute("INSERT INTO users (id, name) VALUES (2, 'raw')")
            trips.count = 0
        assert trips.count == 1  # the ROLLBACK
        async with Session() as session:
            assert (await session.scalars(select(User.name))).all() == ["ann"]
        assert no_reader_left(path)
    finally:
        await engine.dispose()


async def test_a_cancelled_statement_still_on_the_thread_makes_the_end_wait_for_it(
    tmp_path: Path, trips: Trips
) -> None:
    """Cancelled while its SELECT runs on aiosqlite's thread, the session closes with a
    ROLLBACK queued behind that SELECT, never on the loop beside it."""
    gate = Gate()
    path = tmp_path / "cancelled.db"
    engine = await gated_engine(path, gate)
    try:
        Session = asyncorm.async_sessionmaker(engine)

        async def read() -> None:
            async with Session() as session:
                await session.execute(select(func.hold(User.id)))

        task = asyncio.create_task(read())
        await gate.entered.wait()  # the SELECT (with its BEGIN) is running on the thread
        trips.count = 0
        trips.queued.clear()
        task.cancel()
        await trips.queued.wait()  # close() queued its ROLLBACK: it did not end inline
        assert not task.done()  # and waits for it, which waits for the SELECT
        task.cancel()  # a second cancellation, during the close: it runs to completion
        gate.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert trips.count == 1
        async with Session() as session:  # the same connection, clean
            assert not await in_transaction(session)
            assert await session.scalar(select(Account.balance)) == 100
        assert no_reader_left(path)
    finally:
        gate.release.set()
        await engine.dispose()


async def test_a_cancelled_raw_call_still_on_the_thread_makes_the_end_wait_for_it(
    tmp_path: Path, trips: Trips
) -> None:
    """A call SQLAlchemy does not see (the raw driver) cancelled mid-way: no error, no mark
    on the connection; the session's end still queues behind it."""
    gate = Gate()
    path = tmp_path / "raw.db"
    engine = await gated_engine(path, gate)
    try:
        Session = asyncorm.async_sessionmaker(engine)
        async with Session() as session:
            assert await session.scalar(select(Account.balance)) == 100
            driver = await driver_of(session)
            raw = asyncio.create_task(driver.execute_fetchall("SELECT hold(1)"))
            await gate.entered.wait()
            raw.cancel()
            with pytest.raises(asyncio.CancelledError):
                await raw  # the call goes on running on the thread
            trips.count = 0
            trips.queued.clear()
            closing = asyncio.create_task(session.close())
            await trips.queued.wait()  # a ROLLBACK trip, queued behind hold()
            assert not closing.done()
            gate.release.set()
            await closing
        assert trips.count == 1
        async with Session() as session:
            assert not await in_transaction(session)
            assert await session.scalar(select(User.name)) == "ann"
        assert no_reader_left(path)
    finally:
        gate.release.set()
        await engine.dispose()


async def test_cancelling_a_read_session_at_each_await_leaves_the_connection_clean(
    tmp_path: Path,
) -> None:
    """A cancellation after 0, 1, 2, ... passes of the event loop lands at each await a read
    session makes (its SELECTs, its close): every time the pooled connection comes back with
    no transaction open, and the next session reads the data."""
    path = tmp_path / "sweep.db"
    engine = await gated_engine(path, Gate())
    try:
        Session = asyncorm.async_sessionmaker(engine)
        finished = 0

        async def read() -> None:
            nonlocal finished
            async with Session() as session:
                assert await session.get(User, 1) is not None
                assert await session.scalar(select(Account.balance)) == 100
            finished += 1

        # 40 passes at least, and on until one session got through (how many passes that
        # takes depends on how fast aiosqlite's thread is: a loaded machine needs more)
        passes = -1
        while passes < 40 or (finished == 0 and passes < 10_000):
            passes += 1
            task = asyncio.create_task(read())
            for _ in range(passes):
                await asyncio.sleep(0)  # one pass of the loop: where the cancellation lands
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            async with Session() as session:
                assert not await in_transaction(session)
                assert await session.scalar(select(User.name)) == "ann"
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert finished > 0  # the sweep reached past the end of a session
        assert no_reader_left(path)
    finally:
        await engine.dispose()


async def test_two_readers_and_a_writer_each_keep_their_snapshot(
    tmp_path: Path, trips: Trips
) -> None:
    path = tmp_path / "two.db"
    engine = await gated_engine(path, Gate(), pool_size=3)
    try:
        Session = asyncorm.async_sessionmaker(engine)
        both_read = asyncio.Event()
        written = asyncio.Event()
        ready: list[None] = []

        async def reader() -> tuple[int | None, int | None]:
            async with Session() as session:
                first = await session.scalar(select(Account.balance))
                ready.append(None)
                if len(ready) == 2:
                    both_read.set()
                await written.wait()
                return first, await session.scalar(select(Account.balance))

        async def writer() -> None:
            await both_read.wait()
            async with Session.begin() as session:
                await session.execute(update(Account).values(balance=300))
            written.set()

        async def warm(all_in: asyncio.Event, held: list[None]) -> None:
            async with Session() as session:  # opens the pool's three connections
                await session.scalar(select(1))
                held.append(None)
                if len(held) == 3:
                    all_in.set()
                await all_in.wait()

        warmed = asyncio.Event()
        held: list[None] = []
        await asyncio.gather(*(warm(warmed, held) for _ in range(3)))
        trips.count = 0
        results = await asyncio.gather(reader(), reader(), writer())
        assert list(results[:2]) == [(100, 100), (100, 100)]
        assert trips.count == 2 + 2 + 2  # two SELECTs each; BEGIN IMMEDIATE + UPDATE, COMMIT
        async with Session() as session:
            assert await session.scalar(select(Account.balance)) == 300
        assert no_reader_left(path)
    finally:
        await engine.dispose()


async def test_a_writer_in_another_process_while_a_read_session_is_open(
    tmp_path: Path, trips: Trips
) -> None:
    path = tmp_path / "process.db"
    engine = await gated_engine(path, Gate())
    try:
        Session = asyncorm.async_sessionmaker(engine)
        trips.count = 0
        async with Session() as session:
            assert await session.scalar(select(Account.balance)) == 100
            script = (
                "import sqlite3, sys\n"
                "c = sqlite3.connect(sys.argv[1], timeout=5, isolation_level=None)\n"
                "c.execute('UPDATE accounts SET balance = 400')\n"
                "print(c.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()[0])\n"
            )
            other = await asyncio.create_subprocess_exec(
                sys.executable, "-c", script, str(path), stdout=asyncio.subprocess.PIPE
            )
            out, _ = await other.communicate()
            assert other.returncode == 0
            assert out.strip() == b"1"  # the checkpoint is busy: this session's snapshot
            assert await session.scalar(select(Account.balance)) == 100
        assert trips.count == 2  # two SELECTs; the end inline
        async with Session() as session:
            assert await session.scalar(select(Account.balance)) == 400
        assert no_reader_left(path)
    finally:
        await engine.dispose()


async def test_a_read_session_whose_connection_was_invalidated_closes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "invalid.db"
    engine = await gated_engine(path, Gate())
    try:
        Session = asyncorm.async_sessionmaker(engine)
        async with Session() as session:
            assert await session.scalar(select(Account.balance)) == 100
            await (await session.connection()).invalidate()
        async with Session() as session:  # a new connection
            assert not await in_transaction(session)
            assert await session.scalar(select(Account.balance)) == 100
        async with Session() as session:  # the driver closed underneath, mid-snapshot
            assert await session.scalar(select(Account.balance)) == 100
            raw = await (await session.connection()).get_raw_connection()
            await cast(Any, raw.driver_connection).close()
            assert not raw.dbapi_connection.ends_inline  # type: ignore[union-attr]
        async with Session() as session:  # as without the inline end: found on first use
            with pytest.raises(OperationalError, match="no active connection"):
                await session.scalar(select(User.name))
        async with Session() as session:  # and replaced
            assert await session.scalar(select(User.name)) == "ann"
        assert no_reader_left(path)
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_an_isolation_level_change_is_a_tracked_call(tmp_path: Path, trips: Trips) -> None:
    """SQLAlchemy's isolation-level setter puts its call on aiosqlite's queue directly; the
    inline end must know about it, so the adapter sends it through ``_execute``."""
    path = tmp_path / "isolation.db"
    engine = await gated_engine(path, Gate())
    try:
        serializable = engine.execution_options(isolation_level="SERIALIZABLE")
        Session = asyncorm.async_sessionmaker(serializable)
        trips.count = 0
        async with Session() as session:
            assert await session.scalar(select(Account.balance)) == 100
            setter_and_read = trips.count
            assert setter_and_read == 3  # the setter, its PRAGMA, then BEGIN + SELECT
        assert trips.count == 5  # at checkin the pool resets the level: the setter, PRAGMA
        async with asyncorm.async_sessionmaker(engine)() as session:
            assert not await in_transaction(session)
            assert await session.scalar(select(User.name)) == "ann"
        assert no_reader_left(path)
    finally:
        await engine.dispose()


# -- review: where the inline end must not apply ---------------------------------------------


async def test_check_same_thread_in_the_url_turns_the_inline_end_off(
    tmp_path: Path, trips: Trips
) -> None:
    """``?check_same_thread=true`` in the URL is the user's choice as much as connect_args:
    the profile's default must not override it."""
    path = tmp_path / "url.db"
    engine = await gated_engine(Path(f"{path}?check_same_thread=true"), Gate())
    try:
        Session = asyncorm.async_sessionmaker(engine)
        trips.count = 0
        async with Session() as session:
            assert await session.scalar(select(Account.balance)) == 100
            raw = await (await session.connection()).get_raw_connection()
            assert not raw.dbapi_connection.ends_inline  # type: ignore[union-attr]
            with pytest.raises(sqlite3.ProgrammingError, match="same thread"):
                cast(Any, raw.driver_connection)._conn.execute("SELECT 1")
        assert trips.count == 2  # BEGIN + SELECT, then the ROLLBACK as a trip
    finally:
        await engine.dispose()


class BusyGate(Gate):
    """A Gate that says when ``hold()`` is running on the thread."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False

    def hold(self, value: Any) -> Any:
        self.holding = True
        try:
            return super().hold(value)
        finally:
            self.holding = False


class Watched(sqlite3.Connection):
    """A sqlite3 connection (``connect_args={"factory": Watched}``) that records each read of
    ``total_changes`` made while a gate holds aiosqlite's thread busy on it."""

    gate: BusyGate | None = None
    busy_reads: list[str] = []  # noqa: RUF012 - set per test

    @property
    def total_changes(self) -> int:
        gate = Watched.gate
        if gate is not None and gate.holding:
            Watched.busy_reads.append(threading.current_thread().name)
        return sqlite3.Connection.total_changes.__get__(self)  # type: ignore[no-any-return]


async def test_the_loop_leaves_the_sqlite3_connection_alone_while_the_thread_runs_on_it(
    tmp_path: Path, trips: Trips
) -> None:
    """A transaction begun while a cancelled raw call still runs on aiosqlite's thread: the
    loop must not call into the sqlite3 connection beside it (not even ``total_changes``),
    and that transaction's end is a trip."""
    gate = BusyGate()
    path = tmp_path / "busy.db"
    engine = await gated_engine(path, gate, connect_args={"factory": Watched})
    Watched.gate, Watched.busy_reads = gate, []
    try:
        Session = asyncorm.async_sessionmaker(engine)
        async with Session() as session:
            assert await session.scalar(select(Account.balance)) == 100
            await session.commit()  # inline
            driver = await driver_of(session)
            raw = asyncio.create_task(driver.execute_fetchall("SELECT hold(1)"))
            await gate.entered.wait()
            raw.cancel()
            with pytest.raises(asyncio.CancelledError):
                await raw  # hold() goes on running on the thread
            trips.queued.clear()
            read = asyncio.create_task(session.scalar(select(User.name)))  # a new BEGIN
            await trips.queued.wait()  # queued behind hold(): the BEGIN was prepared
            assert Watched.busy_reads == []
            gate.release.set()
            assert await read == "ann"
            trips.count = 0
        assert trips.count == 1  # the ROLLBACK: nothing vouched for this transaction
        assert no_reader_left(path)
    finally:
        Watched.gate = None
        gate.release.set()
        await engine.dispose()


async def test_a_trace_callback_sees_the_end_of_a_read_snapshot(
    tmp_path: Path, trips: Trips
) -> None:
    """The inline end still runs sqlite3's ROLLBACK/COMMIT (a statement: trace callbacks see
    it), on the event loop's thread. Documented behaviour, checked here."""
    path = tmp_path / "trace.db"
    engine = await gated_engine(path, Gate())
    try:
        Session = asyncorm.async_sessionmaker(engine)
        seen: list[tuple[str, str]] = []

        def trace(sql: str) -> None:
            seen.append((sql, threading.current_thread().name))

        async with Session() as session:
            driver = await driver_of(session)
            await driver.set_trace_callback(trace)
            assert await session.scalar(select(Account.balance)) == 100
        main = threading.current_thread().name
        assert ("ROLLBACK", main) in seen
        assert all(thread != main for sql, thread in seen if sql != "ROLLBACK")
    finally:
        await engine.dispose()


async def test_ddl_through_the_raw_driver_in_a_read_snapshot_commits_with_a_trip(
    tmp_path: Path, trips: Trips
) -> None:
    """SQLite's count of changed rows does not count DDL: a CREATE TABLE sent through the raw
    driver in a read snapshot leaves total_changes as it was. Any raw call in the
    transaction makes its end a trip (nor does a PRAGMA that sets a value count)."""
    path = tmp_path / "ddl.db"
    engine = await gated_engine(path, Gate())
    try:
        Session = asyncorm.async_sessionmaker(engine)
        async with Session() as session:
            assert await session.scalar(select(Account.balance)) == 100
            driver = await driver_of(session)
            await driver.execute("CREATE TABLE extra (x INTEGER)")
            trips.count = 0
            await session.commit()
            assert trips.count == 1  # a COMMIT that writes pages: on aiosqlite's thread
        async with Session() as session:
            assert await session.scalar(select(Account.balance)) == 100
            driver = await driver_of(session)
            await driver.execute("PRAGMA user_version = 7")
            trips.count = 0
            await session.commit()
            assert trips.count == 1
        async with Session() as session:  # a raw call before the BEGIN: the end is inline
            driver = await driver_of(session)
            assert await driver.execute_fetchall("PRAGMA user_version") == [(7,)]
            assert await session.scalar(select(Account.balance)) == 100
            trips.count = 0
        assert trips.count == 0
        check = sqlite3.connect(path)
        try:
            assert check.execute("SELECT count(*) FROM extra").fetchone() == (0,)
        finally:
            check.close()
    finally:
        await engine.dispose()


async def test_a_finished_call_is_not_kept_by_the_tracking(tmp_path: Path) -> None:
    """The tracking keeps the last call queued to the thread; once it has run, it must not
    keep what the call referred to (an aiosqlite method: a reference cycle through the
    connection; a large executemany's parameters) while the connection sits in the pool."""
    path = tmp_path / "kept.db"
    engine = await gated_engine(path, Gate())
    try:
        Session = asyncorm.async_sessionmaker(engine)

        class Marker:
            def __call__(self) -> int:
                return 1

        async with Session() as session:
            driver = await driver_of(session)
            marker = Marker()
            assert await driver._execute(marker) == 1
            kept = weakref.ref(marker)
            del marker
            assert kept() is None  # no gc.collect(): nothing holds it any more
    finally:
        await engine.dispose()
