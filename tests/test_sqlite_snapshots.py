"""SQLite transactions: reads on a snapshot, writers take turns, declared units of work exact.

A session whose first statement reads begins deferred on a WAL database (a snapshot, no
writer turn) and takes the engine's writer turn at its first write; a transaction begun
explicitly (``session.begin()``, ``Session.begin()``) begins IMMEDIATE. Read-only sessions
refuse writes on both backends.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import asyncorm
from tests.conftest import Backend, another_process_writing, reset_schema
from tests.models import Account, Address, Base, User

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]


async def open_engine(url: str) -> AsyncEngine:
    # a short lock timeout: code that waits for the writer turn where it must not fails fast
    engine = asyncorm.create_engine(url, connect_args={"timeout": 2})
    await reset_schema(engine)
    async with engine.begin() as conn:
        await conn.execute(insert(Account), [{"id": i, "balance": 100} for i in range(1, 11)])
    return engine


@pytest.fixture(params=["file", "memory"])
async def sqlite_engine(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[AsyncEngine]:
    """A SQLite file (WAL: reads on a snapshot) and ``sqlite://`` (no WAL: reads outside a
    transaction, the first write checking that nobody wrote since the first read)."""
    url = f"sqlite:///{tmp_path / 'snap.db'}" if request.param == "file" else "sqlite://"
    engine = await open_engine(url)
    try:
        yield engine
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


@pytest.fixture
async def wal_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = await open_engine(f"sqlite:///{tmp_path / 'snap.db'}")
    try:
        yield engine
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def balances(Session: SessionFactory) -> int:
    async with Session() as session:
        return int(await session.scalar(select(func.sum(Account.balance))) or 0)


# -- sessions that only read never wait -------------------------------------------------------


async def test_sessions_that_only_read_never_wait_for_each_other(
    sqlite_engine: AsyncEngine,
) -> None:
    """20 request-shaped sessions read, then all wait until every one of them has read: with
    sessions taking turns on the writer lock this could never complete."""
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    n = 5  # the default pool holds 5 connections (+10 overflow): all open at once
    everyone_read = asyncio.Event()
    have_read: list[int] = []

    async def request(i: int) -> int:
        async with Session() as session:
            account = await session.get(Account, i)
            assert account is not None
            have_read.append(i)
            if len(have_read) == n:
                everyone_read.set()
            await everyone_read.wait()  # other awaited work, the session still open
            return account.balance

    async with asyncio.timeout(10):
        assert await asyncio.gather(*(request(i) for i in range(1, n + 1))) == [100] * n


async def test_a_reader_does_not_wait_for_a_writer_and_sees_its_snapshot(
    wal_engine: AsyncEngine,
) -> None:
    Session = asyncorm.async_sessionmaker(wal_engine)
    async with Session() as writer:
        account = await writer.get(Account, 1)
        assert account is not None
        account.balance = 0
        await writer.flush()  # holds the writer turn, uncommitted
        async with Session() as reader:  # same task, even: a reader never waits
            assert await reader.scalar(select(Account.balance).filter_by(id=1)) == 100
            await writer.commit()
            # the reader's snapshot began before the commit: still 100 inside it
            assert await reader.scalar(select(Account.balance).filter_by(id=1)) == 100
        async with Session() as later:
            assert await later.scalar(select(Account.balance).filter_by(id=1)) == 0


async def test_ddl_from_another_task_while_a_session_that_read_is_open(
    sqlite_engine: AsyncEngine,
) -> None:
    """Application test suites' fixture pattern: the test's session reads, then the teardown
    drops the tables from another task before that session is closed."""
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    async with Session() as session:
        assert await session.scalar(select(func.count(Account.id))) == 10

        async def teardown() -> None:
            async with sqlite_engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)

        await asyncio.wait_for(asyncio.create_task(teardown()), 10)
    async with sqlite_engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM sqlite_master"))).scalar() == 0


# -- writers never lose an update --------------------------------------------------------------


async def test_a_stale_snapshot_gets_a_write_conflict_never_a_lost_update(
    sqlite_engine: AsyncEngine,
) -> None:
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    async with Session() as slow:
        account = await slow.get(Account, 1)  # the snapshot begins: balance 100
        assert account is not None
        async with Session.begin() as fast:
            await fast.execute(update(Account).filter_by(id=1).values(balance=150))
        account.balance += 10  # based on a stale read: would overwrite the +50
        with pytest.raises(
            asyncorm.WriteConflictError,
            match=r"^Another transaction committed a write to the SQLite (in-memory database|"
            r"'.+snap\.db') after this transaction's first read, so (SQLite|asyncorm) refused "
            r"this transaction's first write.*: its reads may be stale.* Roll back and run the "
            r"whole unit of work again "
            r"\(safe to retry\), or declare it with `async with Session\.begin\(\)`",
        ) as caught:
            await slow.commit()
        assert isinstance(caught.value, asyncorm.AsyncORMError)
    async with Session() as session:
        assert await session.scalar(select(Account.balance).filter_by(id=1)) == 150


async def transfers(
    Session: SessionFactory, *, declared: bool, n: int = 60
) -> tuple[int, list[BaseException]]:
    rng = random.Random(15)
    plan = [(*rng.sample(range(1, 11), 2), rng.randint(1, 10)) for _ in range(n)]
    go = asyncio.Event()

    async def transfer(src: int, dst: int, amount: int) -> None:
        await go.wait()
        if declared:
            async with Session.begin() as session:
                a, b = await session.get(Account, src), await session.get(Account, dst)
                assert a is not None
                assert b is not None
                a.balance -= amount
                b.balance += amount
        else:
            async with Session() as session:
                a, b = await session.get(Account, src), await session.get(Account, dst)
                assert a is not None
                assert b is not None
                a.balance -= amount
                b.balance += amount
                await session.commit()

    tasks = [asyncio.create_task(transfer(*step)) for step in plan]
    go.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    return await balances(Session), [o for o in outcomes if isinstance(o, BaseException)]


async def test_declared_units_of_work_are_exact_under_contention(
    sqlite_engine: AsyncEngine,
) -> None:
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    total, errors = await transfers(Session, declared=True)
    assert errors == []
    assert total == 1000


async def test_plain_sessions_under_contention_refuse_stale_writes_and_lose_nothing(
    sqlite_engine: AsyncEngine,
) -> None:
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    total, errors = await transfers(Session, declared=False)
    assert total == 1000  # every transfer either applied whole or refused: no money lost
    assert errors, "60 concurrent read-then-write sessions: some snapshots must go stale"
    assert all(isinstance(e, asyncorm.WriteConflictError) for e in errors), errors[:3]


async def test_the_same_work_as_sqlalchemys_general_path(tmp_path: Path) -> None:
    """Deferred BEGIN and the writer turn change when things wait, never what is read or
    written: the same sequence of reads and writes, one session at a time, through asyncorm's
    engine and through plain SQLAlchemy with aiosqlite, gives the same results."""

    async def run(engine: AsyncEngine) -> list[Any]:
        await reset_schema(engine)
        Session = asyncorm.async_sessionmaker(engine)
        seen: list[Any] = []
        async with Session() as s:  # read, then write (upgrades)
            seen.append(await s.scalar(select(func.count(User.id))))
            s.add_all([User(id=1, name="ann"), User(id=2, name="bo")])
            await s.commit()
        async with Session() as s:  # read only, then rolled back
            seen.append((await s.scalars(select(User.name).order_by(User.id))).all())
        async with Session.begin() as s:  # declared
            user = await s.get(User, 1)
            assert user is not None
            (await user.awaitable_attrs.addresses).append(Address(email="ann@x"))
        async with Session() as s:  # a write first, then reads, rolled back
            await s.execute(update(User).values(name="zed"))
            seen.append((await s.scalars(select(User.name))).all())
            await s.rollback()
            seen.append((await s.scalars(select(User.name).order_by(User.id))).all())
        async with Session() as s:  # hand-written SQL: text() read and write
            seen.append((await s.execute(text("SELECT count(*) FROM addresses"))).scalar())
            await s.execute(text("UPDATE users SET fullname = 'x' WHERE id = 2"))
            await s.commit()
        async with Session() as s:
            rows = await s.execute(select(User.id, User.name, User.fullname).order_by(User.id))
            seen.append([tuple(r) for r in rows])
        await engine.dispose()
        return seen

    ours = await run(asyncorm.create_engine(f"sqlite:///{tmp_path / 'ours.db'}"))
    stock = await run(create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'stock.db'}"))
    assert ours == stock
    assert ours[-1] == [(1, "ann", None), (2, "bo", "x")]


# -- read-only sessions, both backends ---------------------------------------------------------


async def test_a_read_only_session_refuses_writes(engine: AsyncEngine, backend: Backend) -> None:
    Session = asyncorm.async_sessionmaker(engine)
    async with Session.begin() as session:
        session.add(User(id=1, name="ann"))
    shown = "SQLite" if backend.is_sqlite else "PostgreSQL"
    ReadOnly = asyncorm.async_sessionmaker(engine, read_only=True)

    def per_session() -> asyncorm.AsyncSession:
        return Session(read_only=True)

    makers: list[Callable[[], asyncorm.AsyncSession]] = [ReadOnly, per_session]
    for make in makers:
        async with make() as session:
            assert session.read_only
            user = await session.get(User, 1)  # reads work
            assert user is not None
            user.name = "changed"
            with pytest.raises(
                asyncorm.ReadOnlySessionError,
                match=r"read-only \(read_only=True\).*'UPDATE users SET name=.*writes.* Use a "
                r"session without read_only=True for work that writes\.",
            ) as caught:
                await session.commit()
            assert shown in str(caught.value)
        async with make() as session:
            with pytest.raises(asyncorm.ReadOnlySessionError):
                await session.execute(text("DELETE FROM users"))
    db = asyncorm.async_scoped_session(Session)
    async with db.scope(read_only=True):
        db.add(User(id=2, name="bo"))
        with pytest.raises(asyncorm.ReadOnlySessionError):
            await db.flush()
    async with Session() as session:
        assert (await session.scalars(select(User.name))).all() == ["ann"]


# -- foreign keys ------------------------------------------------------------------------------


async def test_foreign_keys_are_enforced_unless_switched_off(tmp_path: Path) -> None:
    for enforced in (True, False):
        engine = asyncorm.create_engine(
            f"sqlite:///{tmp_path / f'fk{enforced}.db'}", sqlite_foreign_keys=enforced
        )
        try:
            await reset_schema(engine)
            Session = asyncorm.async_sessionmaker(engine)
            orphan = Address(id=1, email="x@y", user_id=99)
            if enforced:
                with pytest.raises(IntegrityError, match="FOREIGN KEY constraint failed"):
                    async with Session.begin() as session:
                        session.add(orphan)
            else:
                async with Session.begin() as session:
                    session.add(orphan)
        finally:
            await engine.dispose()
    with pytest.raises(asyncorm.ConfigurationError, match=r"sqlite_foreign_keys must be True"):
        asyncorm.create_engine("sqlite://", sqlite_foreign_keys="off")


# -- found in review ---------------------------------------------------------------------------


async def test_a_core_connection_keeps_working_across_its_transactions(
    sqlite_engine: AsyncEngine,
) -> None:
    """A Core connection holds the writer turn until it is returned: its next transaction,
    reading first, must not wait for the turn it holds itself."""
    async with sqlite_engine.connect() as conn:
        await conn.execute(update(Account).filter_by(id=1).values(balance=1))
        await conn.commit()
        assert await conn.scalar(select(Account.balance).filter_by(id=1)) == 1
        await conn.execute(update(Account).filter_by(id=1).values(balance=2))
        await conn.commit()
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    async with Session() as session:  # retrying in the same session after a conflict
        await session.get(Account, 2)
        async with Session.begin() as other:
            await other.execute(update(Account).filter_by(id=2).values(balance=0))
        with pytest.raises(asyncorm.WriteConflictError):
            await session.execute(update(Account).filter_by(id=2).values(balance=5))
        await session.rollback()
        await session.get(Account, 2)
        await session.execute(update(Account).filter_by(id=2).values(balance=7))
        await session.commit()
    assert await balances(Session) == 100 * 8 + 2 + 7


async def test_a_snapshots_first_write_waits_for_another_process(
    wal_engine: AsyncEngine,
) -> None:
    """SQLite calls no busy handler when a read transaction starts writing: asyncorm waits for
    the other process (up to the engine's timeout) instead of failing at once."""
    sqlite_engine = wal_engine
    path = sqlite_engine.url.database
    assert path is not None
    other = await another_process_writing(
        path, "UPDATE accounts SET balance = balance WHERE id = 3", "ROLLBACK"
    )
    assert other.stdin is not None
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    async with Session() as session:
        account = await session.get(Account, 3)
        assert account is not None
        account.balance += 1
        flushing = asyncio.create_task(session.flush())
        done, _ = await asyncio.wait({flushing}, timeout=0.2)  # still waiting: not failed
        assert not done
        other.stdin.write(b"go\n")  # the other process rolls back
        await flushing
        await session.commit()
    assert await other.wait() == 0
    assert await balances(Session) == 1001


async def test_textual_select_and_compiled_constructs_are_judged_by_their_sql(
    sqlite_engine: AsyncEngine,
) -> None:
    update_returning = text("UPDATE accounts SET balance = 0 WHERE id = 4 RETURNING id").columns(
        Account.id
    )
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    async with Session(read_only=True) as session:
        with pytest.raises(asyncorm.ReadOnlySessionError, match="UPDATE accounts"):
            await session.execute(update_returning)
    async with Session() as session:
        await session.execute(update_returning)  # a write: takes the writer turn
        async with Session() as other:
            other.add(User(name="x"))
            with pytest.raises(asyncorm.SQLiteWriteLockError, match="would deadlock"):
                await other.flush()


@pytest.mark.parametrize("database", ["file", "memory"])
async def test_a_read_only_unit_of_work_refuses_writes_after_its_first_statement(
    tmp_path: Path, database: str
) -> None:
    url = f"sqlite:///{tmp_path / 'ro.db'}" if database == "file" else "sqlite://"
    engine = asyncorm.create_engine(url)
    try:
        await reset_schema(engine)
        Session = asyncorm.async_sessionmaker(engine, read_only=True)
        for begin in (False, True):
            async with Session() as session:
                if begin:
                    await session.begin()
                assert await session.scalar(select(func.count(User.id))) == 0
                with pytest.raises(asyncorm.ReadOnlySessionError):
                    await session.execute(insert(User).values(name="w"))
        async with asyncorm.async_sessionmaker(engine)() as session:
            assert await session.scalar(select(func.count(User.id))) == 0
    finally:
        await engine.dispose()


async def test_pooled_connections_forget_the_last_transactions_kind(tmp_path: Path) -> None:
    """A connection last used by a declared unit of work, or by a snapshot, does not make the
    next user's transaction IMMEDIATE or a snapshot: with one pooled connection, a Core read
    after a Session.begin() reads without the writer turn, and a user's own BEGIN after a
    snapshot session takes it."""
    engine = asyncorm.create_engine(f"sqlite:///{tmp_path / 'one.db'}", pool_size=1)
    try:
        await reset_schema(engine)
        Session = asyncorm.async_sessionmaker(engine)
        async with Session.begin() as session:
            session.add(User(id=1, name="a"))
        async with Session() as writer:
            writer.add(User(id=2, name="b"))
            await writer.flush()  # holds the writer turn (the pool's overflow connection)
            async with engine.connect() as conn:  # the declared unit's pooled connection
                assert await conn.scalar(select(func.count(User.id))) == 1
            await writer.rollback()
        async with Session(read_only=True) as session:
            await session.get(User, 1)
        async with engine.connect() as conn:  # the read-only session's pooled connection
            await conn.exec_driver_sql("BEGIN")
            await conn.exec_driver_sql("UPDATE users SET name = 'c' WHERE id = 1")
            await conn.commit()
    finally:
        await engine.dispose()


def test_incremental_vacuum_is_a_write_and_odd_sql_is_judged_at_once() -> None:
    from asyncorm._sqlite import _text_writes

    assert _text_writes("PRAGMA incremental_vacuum")
    assert _text_writes("PRAGMA optimize")
    assert not _text_writes("PRAGMA table_info(users)")
    assert not _text_writes("/* c */ -- x\n (SELECT 1)")
    assert _text_writes(" " * 5000 + ";")  # linear, not exponential, on no match
    assert _text_writes("/* unterminated" + " " * 5000)


async def test_a_session_whose_flush_failed_does_not_keep_the_writer_turn(
    sqlite_engine: AsyncEngine,
) -> None:
    """SQLAlchemy rolls the transaction back when a flush fails, but the session keeps its
    connection until it is rolled back or closed: another task's DDL (a test's teardown)
    must not wait for it."""
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    async with Session() as session:
        session.add(Address(id=1, email="x@y", user_id=99))  # no such user
        with pytest.raises(IntegrityError, match="FOREIGN KEY constraint failed"):
            await session.flush()

        async def teardown() -> None:
            async with sqlite_engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)

        await asyncio.wait_for(asyncio.create_task(teardown()), 10)


async def test_a_write_session_declares_every_transaction(sqlite_engine: AsyncEngine) -> None:
    """``write=True``: plain read-modify-write code, exact under contention like
    ``Session.begin()`` (each transaction takes the writer turn before its first read)."""
    Session = asyncorm.async_sessionmaker(sqlite_engine, write=True)
    total, errors = await transfers(Session, declared=False)
    assert errors == []
    assert total == 1000
    with pytest.raises(ValueError, match="both read_only=True and write=True"):
        asyncorm.AsyncSession(sqlite_engine, read_only=True, write=True)
