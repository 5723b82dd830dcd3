"""transactional(): one transaction per call, re-run after a retryable error and nothing else.

Every failure here is a real one from the database: PostgreSQL serialization failures from
concurrent SERIALIZABLE / REPEATABLE READ transactions (or raised by the server with
SQLSTATE 40001), a real deadlock, SQLite's stale snapshot and "database is locked" from a
connection outside the engine, a backend terminated before COMMIT. Tasks meet on events.
"""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
from collections.abc import AsyncIterator
from contextlib import nullcontext
from typing import Any

import pytest
from sqlalchemy import event, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session as SyncSession
from sqlalchemy.util import await_

import asyncorm
from tests.conftest import Backend
from tests.models import Account, User
from tests.transaction_helpers import (
    SERIALIZATION_FAILURE,
    Registry,
    Retries,
    SessionFactory,
    another_process_writing,
    balances,
    open_engine,
    seed_accounts,
)

FAST = asyncorm.Backoff(initial=0.001, maximum=0.01)


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


@pytest.fixture
async def quick(backend: Backend) -> AsyncIterator[tuple[SessionFactory, Registry]]:
    """A factory and registry whose SQLite engine waits for locks only briefly."""
    async with open_engine(backend, short_timeout=True) as engine:
        Session = asyncorm.async_sessionmaker(engine)
        yield Session, asyncorm.async_scoped_session(Session)


# -- the counter: exact under contention ----------------------------------------------------


async def test_fifty_serializable_increments_end_exact_with_retries_counted(
    backend: Backend, db: Registry, Session: SessionFactory
) -> None:
    """50 tasks read-then-increment one row. PostgreSQL SERIALIZABLE fails most of them
    with 40001 and they run again; SQLite's units take turns (IMMEDIATE). Exactly 50."""
    await seed_accounts(Session, 0)
    retries = Retries()
    committed: list[int] = []

    @db.transactional(retries=200, isolation_level="SERIALIZABLE", on_retry=retries)
    async def increment(n: int) -> None:
        account = await db.get_one(Account, 1)
        account.balance += 1
        db.on_commit(lambda: committed.append(n))

    await asyncio.gather(*(increment(n) for n in range(50)))
    assert await balances(Session) == [50]
    assert sorted(committed) == list(range(50))  # each unit's side effect exactly once
    if backend.is_sqlite:
        assert retries.errors == []  # IMMEDIATE: the units never conflict
    else:
        assert len(retries.errors) > 0
        assert {e.orig.sqlstate for e in retries.errors} == {"40001"}  # type: ignore[attr-defined]
        assert all(asyncorm.is_retryable(e) for e in retries.errors)


async def test_deferred_sqlite_increments_conflict_retry_and_end_exact(
    backend: Backend, db: Registry, Session: SessionFactory
) -> None:
    """DEFERRED SQLite units read a snapshot: the first write after another unit's commit is
    refused (WriteConflictError), the unit runs again, and the count is still exact. On
    PostgreSQL the same with REPEATABLE READ (40001 on a concurrent update)."""
    await seed_accounts(Session, 0)
    retries = Retries()
    everyone_read = asyncio.Barrier(5)
    level = "DEFERRED" if backend.is_sqlite else "REPEATABLE READ"

    waited: set[int] = set()

    @db.transactional(retries=100, isolation_level=level, on_retry=retries, backoff=FAST)
    async def increment(n: int) -> None:
        account = await db.get_one(Account, 1)
        if n < 5 and n not in waited:  # the first 5, on their first attempt, all read
            waited.add(n)  # before any of them writes
            await everyone_read.wait()
        account.balance += 1

    await asyncio.gather(*(increment(n) for n in range(20)))
    assert await balances(Session) == [20]
    assert len(retries.errors) >= 4  # of the 5 that read together, one wins, four retry
    expected = asyncorm.WriteConflictError if backend.is_sqlite else DBAPIError
    assert all(isinstance(e, expected) for e in retries.errors)


async def test_two_units_locking_each_other_out_resolve_through_a_retry(
    backend: Backend, db: Registry, Session: SessionFactory
) -> None:
    """PostgreSQL: two units lock two rows in opposite orders, a certain deadlock; the
    server aborts one (40P01), which runs again after the other committed. SQLite: two
    DEFERRED units read both rows, then both write; the second writer's snapshot is stale
    (WriteConflictError) and it runs again. Both transfers end applied exactly once."""
    await seed_accounts(Session, 100, 100)
    retries = Retries()
    first_step = {1: asyncio.Event(), 2: asyncio.Event()}
    attempts = {1: 0, 2: 0}
    level = "DEFERRED" if backend.is_sqlite else None

    @db.transactional(isolation_level=level, on_retry=retries, backoff=FAST)
    async def transfer(source: int, target: int) -> None:
        attempts[source] += 1
        if backend.is_sqlite:
            await db.get_one(Account, source)
            await db.get_one(Account, target)
        else:
            await db.execute(
                update(Account).where(Account.id == source).values(balance=Account.balance - 10)
            )
        first_step[source].set()
        await first_step[target].wait()  # each holds its first row, wants the other's
        if backend.is_sqlite:
            await db.execute(
                update(Account).where(Account.id == source).values(balance=Account.balance - 10)
            )
        await db.execute(
            update(Account).where(Account.id == target).values(balance=Account.balance + 10)
        )

    await asyncio.gather(transfer(1, 2), transfer(2, 1))
    assert await balances(Session) == [100, 100]  # both applied, once each
    assert sorted(attempts.values()) == [1, 2]
    assert len(retries.errors) == 1
    error = retries.errors[0]
    if backend.is_sqlite:
        assert isinstance(error, asyncorm.WriteConflictError)
    else:
        assert isinstance(error, DBAPIError)
        assert error.orig.sqlstate == "40P01"  # type: ignore[union-attr]
        assert "deadlock detected" in str(error)


# -- what is not retried --------------------------------------------------------------------


async def test_an_integrity_error_is_raised_at_once(db: Registry, Session: SessionFactory) -> None:
    async with Session.begin() as session:
        session.add(User(id=1, name="ann"))
    retries = Retries()
    calls = 0

    @db.transactional(retries=5, on_retry=retries)
    async def add_duplicate() -> None:
        nonlocal calls
        calls += 1
        db.add(User(id=1, name="bob"))

    with pytest.raises(IntegrityError) as raised:
        await add_duplicate()
    assert not asyncorm.is_retryable(raised.value)
    assert calls == 1
    assert retries.errors == []
    assert raised.value.asyncorm_attempts == 1  # type: ignore[attr-defined]
    assert not getattr(raised.value, "__notes__", None)


async def test_an_ordinary_exception_rolls_back_and_is_not_retried(
    db: Registry, Session: SessionFactory
) -> None:
    calls = 0

    @db.transactional(retries=5)
    async def fail() -> None:
        nonlocal calls
        calls += 1
        db.add(User(name="never"))
        await db.flush()
        raise ValueError("the job is invalid")

    with pytest.raises(ValueError, match="the job is invalid"):
        await fail()
    assert calls == 1
    async with Session() as session:
        assert await session.scalar(select(User.id)) is None


async def fail_retryably(db: Registry, backend: Backend) -> None:
    """Make the current unit fail with a real retryable error: PostgreSQL raises 40001;
    SQLite's write waits for the lock of a writer outside the engine (held with
    ``another_process_writing``) and fails with "database is locked" after the timeout."""
    if backend.is_sqlite:
        await db.execute(update(Account).values(balance=Account.balance + 1))
    else:
        await db.execute(SERIALIZATION_FAILURE)


def conflict() -> asyncorm.WriteConflictError:
    """A retryable error made by the test, for tests of the unit's machinery."""
    return asyncorm.WriteConflictError("stale (raised by the test)", None, None, OSError())


async def test_exhausted_retries_raise_the_last_error_with_the_attempt_count(
    backend: Backend, quick: tuple[SessionFactory, Registry]
) -> None:
    Session, db = quick
    await seed_accounts(Session, 0)
    retries = Retries()
    calls = 0

    @db.transactional(retries=2, on_retry=retries, backoff=FAST)
    async def doomed() -> None:
        nonlocal calls
        calls += 1
        await fail_retryably(db, backend)

    holding = another_process_writing(backend) if backend.is_sqlite else nullcontext()
    with holding, pytest.raises(DBAPIError) as raised:
        await doomed()
    assert calls == 3
    assert retries.attempts == [1, 2]
    assert all(0 < pause <= 0.01 for pause in retries.pauses)
    assert raised.value is not retries.errors[-1]  # the last error, not an earlier one
    assert asyncorm.is_retryable(raised.value)
    assert raised.value.asyncorm_attempts == 3  # type: ignore[attr-defined]
    assert raised.value.__notes__ == [
        "asyncorm: test_exhausted_retries_raise_the_last_error_with_the_attempt_count.<locals>"
        ".doomed() gave up after 3 attempt(s) (retries=2): each failed with a retryable error "
        "and was rolled back. Raise retries=, or make the transaction shorter so that it "
        "conflicts less."
    ]
    if backend.is_sqlite:
        assert "database is locked" in str(raised.value)
    else:
        assert "could not serialize access" in str(raised.value)
    assert await balances(Session) == [0]


async def test_a_retry_after_another_process_released_its_lock_succeeds(
    backend: Backend, quick: tuple[SessionFactory, Registry]
) -> None:
    """SQLite busy from another process is retryable; PostgreSQL's 40001 likewise. The
    second attempt, after the lock is gone, commits."""
    Session, db = quick
    await seed_accounts(Session, 0)
    holder = None

    def release(error: BaseException, attempt: int, pause: float) -> None:
        if holder is not None:
            holder.execute("ROLLBACK")

    calls = 0

    @db.transactional(on_retry=release, backoff=FAST)
    async def bump() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await fail_retryably(db, backend)
        await db.execute(update(Account).values(balance=Account.balance + 1))
        return calls

    if backend.is_sqlite:
        with another_process_writing(backend) as holder:
            assert await bump() == 2
    else:
        assert await bump() == 2
    assert await balances(Session) == [1]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # SQLite: no server to lose
async def test_a_connection_lost_during_commit_is_never_retried(
    db: Registry, Session: SessionFactory, tx_engine: AsyncEngine
) -> None:
    """The backend is terminated from another connection in ``before_commit``: COMMIT goes
    to a dead connection, the outcome is unknown, the unit is not run again and its
    on_commit callbacks do not run."""
    retries = Retries()
    ran: list[str] = []
    calls = 0
    other = await tx_engine.connect()
    await other.execution_options(isolation_level="AUTOCOMMIT")

    @db.transactional(retries=5, on_retry=retries)
    async def pay() -> None:
        nonlocal calls
        calls += 1
        pid = await db.scalar(text("SELECT pg_backend_pid()"))
        db.add(User(name="paid"))
        db.on_commit(lambda: ran.append("receipt"))

        def kill(session: SyncSession) -> None:
            await_(other.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid}))

        event.listen(db().sync_session, "before_commit", kill)

    try:
        with pytest.raises(
            asyncorm.TransactionOutcomeUnknownError, match="may or may not have been committed"
        ) as raised:
            await pay()
    finally:
        await other.close()
    assert not asyncorm.is_retryable(raised.value)
    assert calls == 1
    assert retries.errors == []
    assert ran == []
    assert raised.value.asyncorm_attempts == 1  # type: ignore[attr-defined]


async def test_a_cancelled_unit_is_rolled_back_not_retried_and_runs_no_callback(
    db: Registry, Session: SessionFactory
) -> None:
    inside = asyncio.Event()
    ran: list[str] = []
    calls = 0

    @db.transactional(retries=5)
    async def slow() -> None:
        nonlocal calls
        calls += 1
        db.add(User(name="cancelled"))
        await db.flush()
        db.on_commit(lambda: ran.append("never"))
        inside.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(slow())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1
    assert ran == []
    async with Session() as session:
        assert await session.scalar(select(User.id)) is None


async def test_a_cancellation_during_the_pause_ends_the_unit(
    backend: Backend, quick: tuple[SessionFactory, Registry]
) -> None:
    Session, db = quick
    await seed_accounts(Session, 0)
    pausing = asyncio.Event()
    calls = 0

    @db.transactional(
        retries=5, backoff=lambda n: 3600.0, on_retry=lambda *_: pausing.set()
    )
    async def doomed() -> None:
        nonlocal calls
        calls += 1
        await fail_retryably(db, backend)

    with another_process_writing(backend) if backend.is_sqlite else nullcontext():
        task = asyncio.create_task(doomed())
        await pausing.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert calls == 1


# -- results, arguments, the plain factory --------------------------------------------------


async def test_the_unit_returns_the_functions_result_and_takes_its_arguments(
    db: Registry, Session: SessionFactory
) -> None:
    @db.transactional
    async def add_user(name: str, *, fullname: str) -> int:
        user = User(name=name, fullname=fullname)
        db.add(user)
        await db.flush()
        return user.id

    user_id = await add_user("ann", fullname="Ann A.")
    async with Session() as session:
        user = await session.get_one(User, user_id)
        assert (user.name, user.fullname) == ("ann", "Ann A.")
    assert add_user.__name__ == "add_user"


async def test_each_attempt_has_a_new_session_and_the_registry_is_left_clean(
    backend: Backend, db: Registry, Session: SessionFactory
) -> None:
    await seed_accounts(Session, 0)
    sessions: list[asyncorm.AsyncSession] = []

    @db.transactional(backoff=FAST)
    async def unit() -> None:
        sessions.append(db())
        await db.get(Account, 1)
        if len(sessions) == 1:
            raise conflict()

    await unit()
    assert len(sessions) == 2
    assert sessions[0] is not sessions[1]
    assert db.live_sessions == 0


async def test_the_plain_factory_variant_passes_the_session_first(
    backend: Backend, Session: SessionFactory
) -> None:
    await seed_accounts(Session, 0)
    retries = Retries()
    sessions: list[asyncorm.AsyncSession] = []
    ran: list[int] = []

    @asyncorm.transactional(Session, on_retry=retries, backoff=FAST)
    async def deposit(session: asyncorm.AsyncSession, amount: int) -> int:
        sessions.append(session)
        account = await session.get_one(Account, 1)
        account.balance += amount
        session.on_commit(lambda: ran.append(amount))
        if len(sessions) == 1:
            if backend.is_sqlite:
                raise conflict()
            await session.execute(SERIALIZATION_FAILURE)
        return account.balance

    assert await deposit(5) == 5
    assert await balances(Session) == [5]
    assert ran == [5]  # the first attempt's callback was dropped with it
    assert len(retries.errors) == 1
    assert sessions[0] is not sessions[1]


async def test_the_plain_factory_variant_nests_as_a_savepoint(Session: SessionFactory) -> None:
    inner_sessions: list[asyncorm.AsyncSession] = []

    @asyncorm.transactional(Session)
    async def inner(session: asyncorm.AsyncSession, name: str) -> None:
        inner_sessions.append(session)
        session.add(User(name=name))
        await session.flush()
        if name == "bad":
            raise ValueError("bad name")

    @asyncorm.transactional(Session)
    async def outer(session: asyncorm.AsyncSession) -> None:
        await inner("good")
        with pytest.raises(ValueError, match="bad name"):
            await inner("bad")
        assert inner_sessions == [session, session]

    await outer()
    async with Session() as session:
        assert list(await session.scalars(select(User.name))) == ["good"]


# -- nesting --------------------------------------------------------------------------------


async def test_a_unit_of_another_factory_inside_a_unit_is_refused(
    tx_engine: AsyncEngine, Session: SessionFactory, db: Registry
) -> None:
    """It would be a transaction of its own: committed by itself, applied twice when the
    outer unit retries. With the registry's own factory it is a savepoint instead."""
    await seed_accounts(Session, 0, 0)
    other = asyncorm.async_sessionmaker(tx_engine)  # another factory, same database
    calls = 0

    @asyncorm.transactional(other)
    async def credit_elsewhere(session: asyncorm.AsyncSession) -> None:
        await session.execute(update(Account).where(Account.id == 2).values(balance=99))

    @asyncorm.transactional(db.session_factory)
    async def credit_same(session: asyncorm.AsyncSession) -> None:
        assert session is db()  # nested in the outer unit's session
        await session.execute(
            update(Account).where(Account.id == 2).values(balance=Account.balance + 1)
        )

    @db.transactional(retries=1, backoff=FAST)
    async def outer(inner: Any) -> None:
        nonlocal calls
        calls += 1
        await db.execute(
            update(Account).where(Account.id == 1).values(balance=Account.balance + 1)
        )
        await inner()

    with pytest.raises(asyncorm.TransactionalUnitError, match=r"inside the transactional unit .*"
                       r"outer\(\), but not on its session.*apply that part twice"):
        await outer(credit_elsewhere)
    assert await balances(Session) == [0, 0]  # nothing committed, by either
    await outer(credit_same)
    assert await balances(Session) == [1, 1]



async def test_a_nested_unit_is_a_savepoint_and_the_outer_unit_retries_the_whole(
    backend: Backend, db: Registry, Session: SessionFactory
) -> None:
    """A failing nested unit rolls back its savepoint only and never retries by itself; a
    retryable error from it reaches the outer unit, which runs the whole again."""
    retries = Retries()
    calls = {"outer": 0, "inner": 0}
    ran: list[str] = []

    @db.transactional(retries=0)
    async def inner(name: str, fail: BaseException | None = None) -> None:
        calls["inner"] += 1
        db.add(User(name=name))
        db.on_commit(lambda: ran.append(name))
        await db.flush()
        if fail is not None:
            raise fail

    @db.transactional(on_retry=retries, backoff=FAST)
    async def outer() -> None:
        calls["outer"] += 1
        db.add(User(name=f"outer {calls['outer']}"))
        await inner("kept")
        with pytest.raises(ValueError, match="inner failed"):
            await inner("dropped", ValueError("inner failed"))
        assert ran == []  # a savepoint's release runs nothing
        if calls["outer"] == 1:
            await inner("retried", conflict())
        db.on_commit(lambda: ran.append("outer"))

    await outer()
    assert calls == {"outer": 2, "inner": 5}
    assert len(retries.errors) == 1
    async with Session() as session:
        names = list(await session.scalars(select(User.name).order_by(User.id)))
    assert names == ["outer 2", "kept"]
    assert ran == ["kept", "outer"]


async def test_a_unit_inside_a_scope_in_a_transaction_is_a_savepoint_of_it(
    db: Registry, Session: SessionFactory
) -> None:
    @db.transactional
    async def inner() -> None:
        db.add(User(name="inner"))

    async with db.scope() as session:
        session.add(User(name="outer"))
        await session.flush()
        await inner()
        assert session.in_transaction()
        await session.rollback()  # the scope's transaction decides: nothing was committed
    async with Session() as check:
        assert await check.scalar(select(User.id)) is None


async def test_a_unit_in_a_scope_without_a_transaction_commits_by_itself(
    db: Registry, Session: SessionFactory
) -> None:
    @db.transactional
    async def inner() -> asyncorm.AsyncSession:
        db.add(User(name="inner"))
        return db()

    async with db.scope() as session:
        assert await inner() is not session  # a scope of its own
        assert db() is session
    async with Session() as check:
        assert list(await check.scalars(select(User.name))) == ["inner"]


async def test_a_nested_unit_cannot_change_the_isolation_level(db: Registry) -> None:
    @db.transactional(isolation_level="SERIALIZABLE")
    async def inner() -> None:
        pass

    @db.transactional
    async def outer() -> None:
        await inner()

    with pytest.raises(
        ValueError,
        match=r"inner\(\) was called inside another transaction, so it runs in a savepoint "
        r"of it, which cannot change .* isolation_level='SERIALIZABLE' was asked for, and the "
        r"outer unit has None",
    ):
        await outer()


# -- mistakes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retries": -1}, r"retries must be an int >= 0"),
        ({"isolation_level": "CHAOS"}, r"Unknown isolation_level 'CHAOS': PostgreSQL takes"),
        ({"isolation_level": "autocommit"}, r"a transactional unit is one transaction"),
        ({"deferrable": True}, r"deferrable=True only means something for a SERIALIZABLE"),
        (
            {"isolation_level": "IMMEDIATE", "read_only": True},
            r"drop one of them",
        ),
    ],
)
def test_bad_arguments_are_refused_when_decorating(
    kwargs: dict[str, Any], message: str, Session: SessionFactory
) -> None:
    db = asyncorm.async_scoped_session(Session)
    with pytest.raises(ValueError, match=message):
        db.transactional(**kwargs)
    with pytest.raises(ValueError, match=message):
        asyncorm.transactional(Session, **kwargs)


def test_a_plain_function_or_a_registry_is_refused(Session: SessionFactory) -> None:
    db = asyncorm.async_scoped_session(Session)

    def not_async() -> None:
        pass

    with pytest.raises(TypeError, match=r"@db.transactional decorates coroutine functions"):
        db.transactional(not_async)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"for a registry, decorate with @db.transactional"):
        asyncorm.transactional(db)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_sqlite_modes_are_refused_on_postgresql(db: Registry) -> None:
    @db.transactional(isolation_level="deferred")
    async def unit() -> None:
        pass

    with pytest.raises(ValueError, match=r"'DEFERRED' is one of SQLite's transaction modes"):
        await unit()
    assert db.live_sessions == 0


async def test_backoff_grows_is_bounded_and_jittered() -> None:
    backoff = asyncorm.Backoff(initial=0.01, maximum=0.1)
    for retry in range(1, 20):
        ceiling = min(0.1, 0.01 * 2 ** (retry - 1))
        assert ceiling / 2 <= backoff(retry) <= ceiling
    assert len({backoff(10) for _ in range(20)}) > 1
    assert asyncorm.Backoff(jitter=False)(3) == 0.04
    with pytest.raises(ValueError, match="Backoff needs 0 <= initial <= maximum"):
        asyncorm.Backoff(initial=2, maximum=1)


async def test_a_commit_inside_a_unit_is_refused_and_nothing_is_committed(
    db: Registry, Session: SessionFactory
) -> None:
    calls = 0

    @db.transactional(retries=5)
    async def commits_midway() -> None:
        nonlocal calls
        calls += 1
        db.add(User(name="first part"))
        await db.commit()

    with pytest.raises(
        asyncorm.TransactionalUnitError,
        match=r"A commit was requested inside the transactional unit .*commits_midway\(\), "
        r"which commits when .*commits_midway\(\) returns\. A commit in the middle would make "
        r"a retry apply the committed part twice; nothing was committed",
    ):
        await commits_midway()
    assert calls == 1

    @db.transactional
    async def begins_a_block() -> None:
        async with db.begin():
            db.add(User(name="in a block"))

    with pytest.raises(asyncorm.TransactionalUnitError, match="begins_a_block"):
        await begins_a_block()
    async with Session() as session:
        assert await session.scalar(select(User.id)) is None
    assert db.live_sessions == 0


async def test_is_retryable_reads_the_drivers_own_errors(backend: Backend) -> None:
    """The drivers' exceptions, not wrapped by SQLAlchemy, are judged the same way."""
    if backend.is_sqlite:
        path = make_url(backend.url).database
        assert path
        first = sqlite3.connect(path, isolation_level=None, timeout=0)
        second = sqlite3.connect(path, isolation_level=None, timeout=0)
        try:
            first.execute("BEGIN IMMEDIATE")
            with pytest.raises(sqlite3.OperationalError, match="database is locked") as raised:
                second.execute("BEGIN IMMEDIATE")
            with pytest.raises(sqlite3.OperationalError, match="no such table") as other:
                second.execute("SELECT * FROM missing")
        finally:
            first.close()
            second.close()
    else:
        import asyncpg  # type: ignore[import-not-found,unused-ignore]

        url = make_url(backend.url)
        conn = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, database=url.database
        )
        try:
            with pytest.raises(asyncpg.SerializationError) as raised:
                await conn.execute(str(SERIALIZATION_FAILURE))
            with pytest.raises(asyncpg.UndefinedTableError) as other:
                await conn.execute("SELECT * FROM missing")
        finally:
            await conn.close()
    assert asyncorm.is_retryable(raised.value)
    assert not asyncorm.is_retryable(other.value)
    assert not asyncorm.is_retryable(ValueError("nothing to do with a database"))
    assert not asyncorm.is_retryable(asyncorm.TransactionOutcomeUnknownError("unknown"))
    assert not asyncorm.is_retryable(asyncorm.SQLiteWriteLockTimeout("waited too long"))
    assert not asyncorm.is_retryable(asyncio.CancelledError())
    assert asyncorm.is_retryable(conflict())


def test_the_plain_factory_variant_shows_the_signature_callers_use() -> None:
    @asyncorm.transactional(asyncorm.async_sessionmaker())
    async def deposit(session: asyncorm.AsyncSession, amount: int, *, note: str = "") -> int:
        return amount

    assert str(inspect.signature(deposit)) == "(amount: 'int', *, note: 'str' = '') -> 'int'"
    assert deposit.__name__ == "deposit"
