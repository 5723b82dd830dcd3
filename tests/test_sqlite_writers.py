"""SQLite write units of work: what must stay exact around them, whatever makes them faster.

Written for issue 14 item 6 (SQLite writers), with an experiment that held a commit's flush
UPDATEs back and sent them with the COMMIT, one trip fewer (not shipped: its hostile review
found seven ways it differed from SQLAlchemy for a ~4% CPU gain; docs/performance.md, "W6").
They pin what any such change must keep: a unit of work's results and failures are
SQLAlchemy's general path's, in every UPDATE shape and around hooks, several engines, the test
plugin's outer transaction and a joined external transaction; readers are not blocked by a
writer (WAL); another process's writer is waited for (the busy timeout) instead of failing;
and a cancellation at any await of a write unit leaves no writer turn held and no transaction
open.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import event, func, insert, select, text, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.ext.asyncio import async_sessionmaker as sa_async_sessionmaker
from sqlalchemy.orm import Session as SyncSession
from sqlalchemy.orm.exc import StaleDataError

import asyncorm
from asyncorm._outer import OuterTransaction
from asyncorm._sqlite import _SQLiteProfile
from tests.conftest import another_process_writing, reset_schema
from tests.models import Account, Address, User

AnySessionmaker = Callable[[], Any]


class Trips:
    """Counts calls to aiosqlite's thread; can cancel a task when the n-th one is queued."""

    def __init__(self) -> None:
        self.count = 0
        self.cancel_at: tuple[int, asyncio.Task[Any]] | None = None
        self.on_the_way = asyncio.Event()

    def queued(self) -> None:
        self.count += 1
        self.on_the_way.set()
        if self.cancel_at is not None and self.cancel_at[0] == self.count:
            # lands while the task awaits this trip (it runs on the thread regardless)
            asyncio.get_running_loop().call_soon(self.cancel_at[1].cancel)
            self.cancel_at = None


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> Trips:
    counter = Trips()
    original: Any = aiosqlite.Connection._execute

    async def counting(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        counter.queued()
        return await original(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counting)
    return counter


async def _fill(engine: AsyncEngine) -> None:
    await reset_schema(engine)
    async with engine.begin() as conn:
        await conn.execute(insert(User), [{"id": 1, "name": "ann"}, {"id": 2, "name": "bo"}])
        await conn.execute(insert(Address), [{"id": 1, "email": "a@x", "user_id": 1}])
        await conn.execute(insert(Account), [{"id": i, "balance": 100} for i in range(1, 11)])


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = asyncorm.create_engine(f"sqlite:///{tmp_path / 'writers.db'}", pool_size=2)
    await _fill(engine)
    try:
        yield engine
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def _transfer(Session: Any, src: int, dst: int, amount: int) -> None:
    async with Session.begin() as session:
        a = await session.get(Account, src)
        b = await session.get(Account, dst)
        assert a is not None
        assert b is not None
        a.balance -= amount
        b.balance += amount


async def _total(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.sum(Account.balance))) or 0)


async def _nothing_held(engine: AsyncEngine) -> None:
    """No transaction open on an idle pooled connection, and the writer turn is free: a
    write unit with a lock timeout of its own gets it at once (it would wait otherwise)."""
    async with engine.connect() as conn:
        driver: Any = (await conn.get_raw_connection()).driver_connection
        assert not driver.in_transaction
    async with asyncio.timeout(5):
        await _transfer(asyncorm.async_sessionmaker(engine), 9, 10, 0)


# -- trips -------------------------------------------------------------------------------------


async def test_a_hooks_own_update_inside_the_flush_runs_as_sent(
    sqlite_engine: AsyncEngine,
) -> None:
    """A mapper hook's Core UPDATE (any row count) runs as sent, next to the flush's own."""

    def touch_users(mapper: Any, connection: Any, target: Account) -> None:
        connection.execute(update(User).values(fullname="touched"))  # two rows

    event.listen(Account, "before_update", touch_users)
    try:
        await _transfer(asyncorm.async_sessionmaker(sqlite_engine), 1, 2, 7)
    finally:
        event.remove(Account, "before_update", touch_users)
    async with sqlite_engine.connect() as conn:
        assert (await conn.scalars(select(User.fullname))).all() == ["touched", "touched"]
    assert await _total(sqlite_engine) == 1000


# -- the same results as SQLAlchemy's general path ---------------------------------------------


async def _work(Session: AnySessionmaker, begin: Callable[[], Any]) -> list[Any]:
    """Units of work whose flushes emit UPDATEs in every shape, then what the database holds."""
    seen: list[Any] = []
    async with begin() as s:  # two rows, same columns: one executemany
        a, b = await s.get(Account, 1), await s.get(Account, 2)
        a.balance, b.balance = 1, 2
    async with begin() as s:  # different columns: two UPDATEs, then an INSERT
        ann, bo = await s.get(User, 1), await s.get(User, 2)
        ann.name = "ann2"
        bo.fullname = "Bo B"
        s.add(Address(id=2, email="b@x", user_id=2))
    async with begin() as s:  # an SQL expression as the value (no executemany)
        c = await s.get(Account, 3)
        c.balance = Account.balance + 5
    async with begin() as s:  # an UPDATE, then a DELETE and a relationship change
        address = await s.get(Address, 1)
        address.email = "a2@x"
        d = await s.get(Account, 4)
        await s.delete(d)
        address.user_id = 2
    async with Session() as s:  # a plain session's commit()
        e = await s.get(Account, 5)
        e.balance = 55
        await s.commit()
        seen.append(await s.scalar(select(Account.balance).filter_by(id=5)))
    async with Session() as s:
        seen.append([tuple(r) for r in await s.execute(select(Account.id, Account.balance))])
        seen.append([tuple(r) for r in await s.execute(select(User.id, User.name, User.fullname))])
        seen.append([tuple(r) for r in await s.execute(select(Address.id, Address.email,
                                                               Address.user_id))])  # fmt: skip
    return seen


async def _failures(Session: AnySessionmaker, begin: Callable[[], Any]) -> list[str]:
    """Flushes whose UPDATE fails: what is raised, and that nothing was committed."""
    raised: list[str] = []

    async def bad_foreign_key() -> None:
        async with begin() as s:
            account = await s.get(Account, 6)
            account.balance = 0  # committed with the failing one, or not at all
            address = await s.get(Address, 2)
            address.user_id = 999

    async def row_gone() -> None:
        async with begin() as s:
            account = await s.get(Account, 7)
            await s.execute(text("DELETE FROM accounts WHERE id = 7"))  # behind its back
            account.balance = 0

    with pytest.raises(IntegrityError, match="FOREIGN KEY constraint failed") as info:
        await bad_foreign_key()
    raised.append(type(info.value.orig).__name__)
    stale = r"UPDATE statement on table 'accounts' expected to update 1 row\(s\); 0 were matched"
    with pytest.raises(StaleDataError, match=stale):
        await row_gone()
    async with Session() as s:  # the plain session's commit() fails the same way
        account = await s.get(Account, 8)
        await s.execute(text("DELETE FROM accounts WHERE id = 8"))
        account.balance = 0
        with pytest.raises(StaleDataError, match=stale):
            await s.commit()
        await s.rollback()
        raised.append(str(await s.scalar(select(func.count()).select_from(Account))))
    return raised


async def test_the_same_results_and_failures_as_sqlalchemys_general_path(tmp_path: Path) -> None:
    async def run(engine: AsyncEngine, Session: Any) -> tuple[list[Any], list[str], list[Any]]:
        await _fill(engine)
        try:
            work = await _work(Session, Session.begin)
            failures = await _failures(Session, Session.begin)
            async with Session() as s:
                after = [tuple(r) for r in await s.execute(select(Account.id, Account.balance))]
                after += [tuple(r) for r in await s.execute(select(Address.id, Address.user_id))]
            return work, failures, after
        finally:
            await engine.dispose()

    ours_engine = asyncorm.create_engine(f"sqlite:///{tmp_path / 'ours.db'}")
    ours = await run(ours_engine, asyncorm.async_sessionmaker(ours_engine))
    stock_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'stock.db'}")

    @event.listens_for(stock_engine.sync_engine, "connect")
    def foreign_keys(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    stock = await run(stock_engine, sa_async_sessionmaker(stock_engine, class_=AsyncSession))
    assert ours == stock
    work, failures, _ = ours
    assert work[0] == 55
    assert work[1][:5] == [(1, 1), (2, 2), (3, 105), (5, 55), (6, 100)]
    assert failures == ["IntegrityError", "9"]


async def test_a_failing_update_leaves_nothing_held(sqlite_engine: AsyncEngine) -> None:
    Session = asyncorm.async_sessionmaker(sqlite_engine)

    async def bad_foreign_key() -> None:
        async with Session.begin() as s:
            address = await s.get(Address, 1)
            assert address is not None
            address.user_id = 999

    with pytest.raises(IntegrityError, match="FOREIGN KEY constraint failed"):
        await bad_foreign_key()
    await _nothing_held(sqlite_engine)
    async with sqlite_engine.connect() as conn:
        assert await conn.scalar(select(Address.user_id)) == 1


# -- readers, other processes, cancellation ----------------------------------------------------


async def test_a_reader_reads_while_a_writer_holds_its_transaction_open(
    sqlite_engine: AsyncEngine,
) -> None:
    """WAL: a reader in another task reads (the last committed values) while a declared unit
    of work holds the writer turn with its UPDATE not committed yet."""
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    wrote = asyncio.Event()
    finish = asyncio.Event()

    async def writer() -> None:
        async with Session.begin() as s:
            account = await s.get(Account, 1)
            assert account is not None
            account.balance = 0
            await s.flush()  # the UPDATE is sent (an explicit flush: no COMMIT follows it)
            wrote.set()
            await finish.wait()

    task = asyncio.create_task(writer())
    await wrote.wait()
    async with asyncio.timeout(5):  # a reader that waited for the writer would time out
        async with Session() as reader:
            assert await reader.scalar(select(Account.balance).filter_by(id=1)) == 100
            assert (await reader.get(Account, 2)) is not None
        async with Session(read_only=True) as reader:
            assert await reader.scalar(select(func.sum(Account.balance))) == 1000
    finish.set()
    await task
    assert await _total(sqlite_engine) == 900


async def test_a_declared_unit_waits_for_another_processs_writer(
    sqlite_engine: AsyncEngine, trips: Trips
) -> None:
    """Another process holds SQLite's write lock (BEGIN IMMEDIATE) until told to commit: the
    unit's BEGIN IMMEDIATE waits in SQLite's busy handler (the engine's timeout), then
    succeeds, reading what the other process committed."""
    path = sqlite_engine.url.database
    assert path is not None
    other = await another_process_writing(
        path, "UPDATE accounts SET balance = balance + 10 WHERE id = 1", "COMMIT"
    )
    assert other.stdin is not None
    trips.on_the_way.clear()
    unit = asyncio.create_task(_transfer(asyncorm.async_sessionmaker(sqlite_engine), 1, 2, 10))
    await trips.on_the_way.wait()  # BEGIN IMMEDIATE + SELECT are on their way
    # not failed ("database is locked") meanwhile: it waits
    done, _ = await asyncio.wait({unit}, timeout=0.3)
    assert not done
    other.stdin.write(b"go\n")
    await unit
    assert await other.wait() == 0
    async with sqlite_engine.connect() as conn:
        rows = (await conn.execute(select(Account.balance).where(Account.id < 3))).all()
    assert [r[0] for r in rows] == [100, 110]  # 100 + 10 (the other process) - 10, 100 + 10
    await _nothing_held(sqlite_engine)


@pytest.mark.parametrize(
    "at", [1, 2, 3, 4], ids=["first-select", "second-select", "update", "commit"]
)
async def test_a_cancellation_during_each_trip_of_a_write_unit(
    sqlite_engine: AsyncEngine, trips: Trips, at: int
) -> None:
    """Cancelled while a trip is in flight (BEGIN IMMEDIATE + SELECT, SELECT, UPDATE,
    COMMIT): before COMMIT the unit rolls back; once COMMIT is on its way the unit commits
    and exits normally (the cancellation is delivered at the task's next await, here none).
    Either way the sum is exact and nothing is left held or open."""
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    await _transfer(Session, 1, 2, 0)  # the connections' setup
    trips.count = 0

    async def unit() -> None:
        await _transfer(Session, 1, 2, 30)

    task = asyncio.create_task(unit())
    trips.cancel_at = (at, task)
    if at == 4:
        await task  # committed: the block exits normally (the cancellation comes after)
    else:
        with pytest.raises(asyncio.CancelledError):
            await task
    async with sqlite_engine.connect() as conn:
        moved = await conn.scalar(select(Account.balance).filter_by(id=1)) == 70
    assert moved == (at == 4)  # only a COMMIT on its way completes
    assert await _total(sqlite_engine) == 1000
    await _nothing_held(sqlite_engine)


async def test_a_cancellation_while_waiting_for_the_writer_turn(
    sqlite_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = asyncio.Event()
    original: Any = _SQLiteProfile._wait

    async def observed(self: _SQLiteProfile, slot: Any) -> None:  # the real wait, observed
        waiting.set()
        await original(self, slot)

    monkeypatch.setattr(_SQLiteProfile, "_wait", observed)
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    holding = asyncio.Event()
    finish = asyncio.Event()

    async def holder() -> None:
        async with Session.begin() as s:
            await s.get(Account, 1)  # BEGIN IMMEDIATE: the writer turn is this unit's
            holding.set()
            await finish.wait()

    first = asyncio.create_task(holder())
    await holding.wait()
    waiting.clear()
    waiter = asyncio.create_task(_transfer(Session, 1, 2, 30))
    await waiting.wait()  # the waiter waits for the turn the holder has
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    finish.set()
    await first
    assert await _total(sqlite_engine) == 1000
    await _nothing_held(sqlite_engine)


async def test_concurrent_transfers_stay_exact(sqlite_engine: AsyncEngine) -> None:
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    steps = [(1 + i % 10, 1 + (i * 7 + 3) % 10, 1 + i % 9) for i in range(200)]
    runs: list[Awaitable[None]] = [
        _transfer(Session, *step) for step in steps if step[0] != step[1]
    ]
    await asyncio.gather(*runs)
    assert await _total(sqlite_engine) == 1000
    with sqlite3.connect(sqlite_engine.url.database or "") as check:  # another connection
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_a_before_flush_hooks_bulk_update_keeps_its_own_row_count(
    sqlite_engine: AsyncEngine, trips: Trips
) -> None:
    """An ORM bulk UPDATE by primary key with a WHERE of its own, run by a ``before_flush``
    hook, may match no row (SQLAlchemy does not check it): a session with such a hook flushes
    as in SQLAlchemy, nothing held back."""

    def bulk(session: SyncSession, flush_context: Any, instances: Any) -> None:
        session.execute(
            update(Account).where(Account.balance > 1_000_000),
            [{"id": 2, "balance": 0}],
            execution_options={"synchronize_session": None},
        )

    Session = asyncorm.async_sessionmaker(sqlite_engine)
    async with Session.begin() as s:
        event.listen(s.sync_session, "before_flush", bulk)
        account = await s.get(Account, 1)
        assert account is not None
        trips.count = 0
        account.balance = 50
    assert trips.count == 3  # the hook's UPDATE, the flush's UPDATE, COMMIT
    async with sqlite_engine.connect() as conn:
        rows = (await conn.execute(select(Account.balance).where(Account.id < 3))).all()
    assert [r[0] for r in rows] == [50, 100]


async def test_a_session_over_several_engines_flushes_as_in_sqlalchemy(
    tmp_path: Path, trips: Trips
) -> None:
    """With ``binds`` a flush may write through several connections, committed one after the
    other: an UPDATE failing at the second COMMIT would leave the first committed. Nothing is
    held back there: the failing UPDATE fails the flush, before any COMMIT."""
    accounts = asyncorm.create_engine(f"sqlite:///{tmp_path / 'accounts.db'}")
    users = asyncorm.create_engine(f"sqlite:///{tmp_path / 'users.db'}")
    try:
        await _fill(accounts)
        await _fill(users)
        Session = asyncorm.async_sessionmaker(binds={Account: accounts, User: users})

        async def both() -> None:
            async with Session.begin() as s:
                account = await s.get(Account, 1)
                user = await s.get(User, 1)
                assert account is not None
                assert user is not None
                account.balance = 0
                user.name = None  # type: ignore[assignment]  # NOT NULL: fails

        trips.count = 0
        with pytest.raises(IntegrityError, match=r"NOT NULL constraint failed: users\.name"):
            await both()
        async with accounts.connect() as conn:
            assert await conn.scalar(select(Account.balance).filter_by(id=1)) == 100
    finally:
        await accounts.dispose()
        await users.dispose()


async def test_a_unit_that_also_wrote_through_another_engine_flushes_as_in_sqlalchemy(
    tmp_path: Path,
) -> None:
    """A second connection in the transaction (a statement given another bind): nothing is
    held back, so the failing UPDATE fails the flush before either COMMIT."""
    main = asyncorm.create_engine(f"sqlite:///{tmp_path / 'main.db'}")
    other = asyncorm.create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        await _fill(main)
        await _fill(other)
        Session = asyncorm.async_sessionmaker(main)

        async def unit() -> None:
            async with Session.begin() as s:
                await s.execute(
                    insert(User).values(id=3, name="cy"),
                    bind_arguments={"bind": other.sync_engine},
                )
                address = await s.get(Address, 1)
                assert address is not None
                address.user_id = 999  # FOREIGN KEY: fails

        with pytest.raises(IntegrityError, match="FOREIGN KEY constraint failed"):
            await unit()
        async with other.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(User)) == 2
    finally:
        await main.dispose()
        await other.dispose()


# -- commits in shapes that must end exactly as SQLAlchemy's -------------------------------


async def _partly_failing_commit(session: asyncorm.AsyncSession) -> None:
    """A change that would be applied, then an UPDATE that fails (FOREIGN KEY), committed."""
    account = await session.get(Account, 1)
    address = await session.get(Address, 1)
    assert account is not None
    assert address is not None
    account.balance = 5
    address.user_id = 999
    await session.commit()


async def test_a_session_joined_to_the_tests_outer_transaction_fails_its_commit_cleanly(
    sqlite_engine: AsyncEngine,
) -> None:
    """The pytest plugin's outer transaction: a session's commit() releases a savepoint. Its
    failing UPDATE must fail the flush, whose rollback goes back to the savepoint; sent with
    the RELEASE instead, it failed after the first UPDATE ran, and SQLAlchemy forgot the
    savepoint without rolling back to it: the test then saw the half-committed balance."""
    outer = await OuterTransaction.begin(sqlite_engine)
    try:
        async with outer.sessionmaker() as s:
            with pytest.raises(IntegrityError, match="FOREIGN KEY constraint failed"):
                await _partly_failing_commit(s)
            await s.rollback()
        assert await outer.connection.scalar(select(Account.balance).filter_by(id=1)) == 100
    finally:
        await outer.end()


async def test_a_session_joined_to_an_external_transaction_fails_its_commit(
    sqlite_engine: AsyncEngine,
) -> None:
    """SQLAlchemy's "join a session into an external transaction": the session's commit()
    sends no COMMIT. Its failing UPDATE must fail that commit(); held back, commit() returned
    normally and the error surfaced at the connection's next statement, the first UPDATE
    applied."""
    async with sqlite_engine.connect() as conn:
        await conn.begin()
        await conn.execute(update(User).values(fullname="x"))  # a write: the writer turn
        s = asyncorm.AsyncSession(bind=conn)
        with pytest.raises(IntegrityError, match="FOREIGN KEY constraint failed"):
            await _partly_failing_commit(s)
        await s.close()
        assert await conn.scalar(select(Account.balance).filter_by(id=1)) == 100
        await conn.rollback()


async def test_a_task_created_during_the_commits_flush_flushes_as_in_sqlalchemy(
    sqlite_engine: AsyncEngine,
) -> None:
    """A task created in a mapper hook during the commit's flush copies the context: its own
    later ``flush()`` of that session (followed by no COMMIT) must raise its failing UPDATE's
    error, as in SQLAlchemy; with the commit's mark still in the copy, the UPDATE was held back
    and ``flush()`` returned normally."""
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    go = asyncio.Event()
    children: list[asyncio.Task[None]] = []
    raised: list[str] = []
    async with Session(write=True) as s:

        async def child() -> None:
            await go.wait()
            address = await s.get(Address, 1)
            assert address is not None
            address.user_id = 999
            try:
                await s.flush()
            except IntegrityError as exc:
                raised.append(str(exc.orig))
            await s.rollback()

        def spawn(mapper: Any, connection: Any, target: Account) -> None:
            children.append(asyncio.get_running_loop().create_task(child()))

        event.listen(Account, "after_update", spawn)
        try:
            account = await s.get(Account, 1)
            assert account is not None
            account.balance = 5
            await s.commit()
        finally:
            event.remove(Account, "after_update", spawn)
        go.set()
        await children[0]
    assert raised == ["FOREIGN KEY constraint failed"]


async def test_a_hook_that_swallows_its_own_errors_does_not_swallow_a_held_back_update(
    sqlite_engine: AsyncEngine,
) -> None:
    """An audit hook that must never break the flush (``except Exception`` around its own
    statement) ran the held-back UPDATEs in its statement's trip: their error was raised
    there and swallowed, the UPDATEs after the failing one were never sent, and COMMIT
    committed the rest. In SQLAlchemy the UPDATE fails the flush: nothing is committed."""
    swallowed: list[str] = []

    def audit(mapper: Any, connection: Any, target: Address) -> None:
        try:
            connection.execute(select(func.count()).select_from(User))  # e.g. an audit row
        except Exception as exc:  # the application's: never break the flush over an audit
            swallowed.append(type(exc).__name__)

    Session = asyncorm.async_sessionmaker(sqlite_engine)

    async def unit() -> None:
        async with Session.begin() as s:
            account = await s.get(Account, 1)
            address = await s.get(Address, 1)
            assert account is not None
            assert address is not None
            account.balance = 5
            address.user_id = 999

    event.listen(Address, "after_update", audit)
    try:
        with pytest.raises(IntegrityError, match="FOREIGN KEY constraint failed"):
            await unit()
        assert swallowed in ([], ["IntegrityError"])  # where the hold-back let it be raised
    finally:
        event.remove(Address, "after_update", audit)
    async with sqlite_engine.connect() as conn:
        assert await conn.scalar(select(Account.balance).filter_by(id=1)) == 100
        assert await conn.scalar(select(Address.user_id).filter_by(id=1)) == 1
    await _nothing_held(sqlite_engine)


async def test_objects_of_a_commit_that_failed_are_new_again_without_a_rollback(
    sqlite_engine: AsyncEngine,
) -> None:
    """A commit() failing on its flush's UPDATE, the session then closed without rollback():
    SQLAlchemy rolled back inside the failing flush, so an object it INSERTed is new again and
    another session INSERTs it. With the UPDATE failing at COMMIT instead, the object kept
    its identity key: the second session took it for an existing row and INSERTed nothing."""
    Session = asyncorm.async_sessionmaker(sqlite_engine)
    user = User(id=3, name="cy")
    async with Session() as s:
        s.add(user)
        address = await s.get(Address, 1)
        assert address is not None
        address.user_id = 999
        with pytest.raises(IntegrityError, match="FOREIGN KEY constraint failed"):
            await s.commit()
    assert sa_inspect(user).transient
    async with Session() as s:  # again, without the failing change
        s.add(user)
        await s.commit()
    async with sqlite_engine.connect() as conn:
        assert await conn.scalar(select(User.name).filter_by(id=3)) == "cy"
    await _nothing_held(sqlite_engine)
