"""transactional(): paths found by review, each one a real database on both backends."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncorm
from tests.conftest import Backend, reset_schema
from tests.models import Account, User
from tests.transaction_helpers import (
    SERIALIZATION_FAILURE,
    Registry,
    SessionFactory,
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


async def test_a_unit_called_by_an_on_commit_callback_commits(
    db: Registry, Session: SessionFactory
) -> None:
    """The callback runs after the unit committed: a unit it calls is a transaction of its
    own, not a savepoint of the finished one (whose session then rolled it back, silently)."""
    await seed_accounts(Session, 0, 0)

    @db.transactional
    async def follow_up() -> None:
        (await db.get_one(Account, 2)).balance = 7

    @db.transactional
    async def job() -> None:
        (await db.get_one(Account, 1)).balance = 1
        db.on_commit(follow_up)

    await job()
    assert await balances(Session) == [1, 7]


async def test_a_factory_unit_called_by_an_on_commit_callback_commits(
    Session: SessionFactory,
) -> None:
    await seed_accounts(Session, 0, 0)

    @asyncorm.transactional(Session)
    async def follow_up(session: asyncorm.AsyncSession) -> None:
        (await session.get_one(Account, 2)).balance = 7

    @asyncorm.transactional(Session)
    async def job(session: asyncorm.AsyncSession) -> None:
        (await session.get_one(Account, 1)).balance = 1
        session.on_commit(follow_up)

    await job()
    assert await balances(Session) == [1, 7]


async def test_a_sync_commit_through_run_sync_is_refused_inside_a_unit(
    db: Registry, Session: SessionFactory
) -> None:
    """``run_sync(lambda s: s.commit())`` is a commit in the middle too: refused, nothing
    committed, as for ``await db.commit()``."""
    await seed_accounts(Session, 0)

    @db.transactional
    async def job() -> None:
        (await db.get_one(Account, 1)).balance = 1
        await db.run_sync(lambda session: session.commit())

    refused = r"inside the transactional unit .*job\(\)"
    with pytest.raises(asyncorm.TransactionalUnitError, match=refused):
        await job()
    assert await balances(Session) == [0]

    @db.transactional
    async def fine() -> None:
        (await db.get_one(Account, 1)).balance = 2

    await fine()  # the unit's own commit goes through
    assert await balances(Session) == [2]


async def _retryable_failure(backend: Backend, db: Registry | asyncorm.AsyncSession) -> None:
    if backend.is_sqlite:  # SQLite has none once the unit holds the write lock: made here
        raise asyncorm.WriteConflictError("stale (raised by the test)", None, None, OSError())
    await db.execute(SERIALIZATION_FAILURE)


async def test_an_object_from_outside_flushed_by_a_failed_attempt_is_inserted_by_the_retry(
    backend: Backend, db: Registry, Session: SessionFactory
) -> None:
    """Attempt 1 adds and flushes an object made by the caller, then fails retryably;
    attempt 2 adds it again and must INSERT it. Closing the failed attempt's session before
    rolling it back detached the object with its identity key: attempt 2 took it for an
    existing row, inserted nothing and committed (the row silently lost)."""
    user = User(name="ann")
    attempts = 0

    @db.transactional(backoff=FAST)
    async def create(new: User) -> None:
        nonlocal attempts
        attempts += 1
        db.add(new)
        await db.flush()
        if attempts == 1:
            await _retryable_failure(backend, db)

    await create(user)
    async with Session() as session:
        names = list(await session.scalars(select(User.name)))
    assert (attempts, names) == (2, ["ann"])


async def test_a_factory_unit_retry_inserts_an_object_a_failed_attempt_flushed(
    backend: Backend, Session: SessionFactory
) -> None:
    user = User(name="ann")
    attempts = 0

    @asyncorm.transactional(Session, backoff=FAST)
    async def create(session: asyncorm.AsyncSession, new: User) -> None:
        nonlocal attempts
        attempts += 1
        session.add(new)
        await session.flush()
        if attempts == 1:
            await _retryable_failure(backend, session)

    await create(user)
    async with Session() as session:
        names = list(await session.scalars(select(User.name)))
    assert (attempts, names) == (2, ["ann"])


async def test_an_object_from_outside_changed_by_a_failed_attempt_is_not_changed_twice(
    backend: Backend, db: Registry, Session: SessionFactory
) -> None:
    """Attempt 1 increments an object loaded by the caller and flushes, then fails: the
    value it flushed must not carry into attempt 2 (it did: one increment ended as 2).
    Rolled back, the object is expired, so attempt 2 reading it is told to load it."""
    await seed_accounts(Session, 0)
    async with Session() as session:
        account = await session.get_one(Account, 1)
    attempts = 0

    @db.transactional(backoff=FAST)
    async def deposit(acc: Account) -> None:
        nonlocal attempts
        attempts += 1
        db.add(acc)
        acc.balance += 1
        await db.flush()
        if attempts == 1:
            await _retryable_failure(backend, db)

    with pytest.raises(asyncorm.LazyLoadError, match="balance"):
        await deposit(account)
    assert (attempts, await balances(Session)) == (2, [0])


@pytest.mark.parametrize("where", ["create_engine", "execution_options"])
async def test_a_unit_refuses_an_autocommit_engine(backend: Backend, where: str) -> None:
    """On an AUTOCOMMIT engine each statement committed at once: a unit failing after an
    UPDATE was retried and applied the UPDATE twice. It is refused before the function runs."""
    if where == "create_engine":
        engine = asyncorm.create_engine(backend.url, isolation_level="AUTOCOMMIT")
        bind = engine
    else:
        engine = asyncorm.create_engine(backend.url)
        bind = engine.execution_options(isolation_level="AUTOCOMMIT")
    await reset_schema(engine)
    try:
        Session = asyncorm.async_sessionmaker(bind)
        await seed_accounts(Session, 0)
        attempts = 0

        @asyncorm.transactional(Session, backoff=FAST)
        async def deposit(session: asyncorm.AsyncSession) -> None:
            nonlocal attempts
            attempts += 1
            await session.execute(update(Account).values(balance=Account.balance + 1))
            if attempts == 1:
                await _retryable_failure(backend, session)

        with pytest.raises(asyncorm.TransactionalUnitError, match=r"deposit\(\).*AUTOCOMMIT"):
            await deposit()
        assert (attempts, await balances(Session)) == (0, [0])
        if backend.is_sqlite:
            return

        # PostgreSQL: a unit naming its isolation level is one transaction on that engine
        @asyncorm.transactional(Session, backoff=FAST, isolation_level="READ COMMITTED")
        async def named(session: asyncorm.AsyncSession) -> None:
            await deposit.__wrapped__(session)  # type: ignore[attr-defined]

        await named()
        assert (attempts, await balances(Session)) == (2, [1])
    finally:
        await engine.dispose()


@pytest.mark.parametrize("call", ["db.remove()", "close()", "reset()"])
async def test_closing_the_units_session_inside_it_is_refused(
    db: Registry, Session: SessionFactory, call: str
) -> None:
    """``await db.remove()`` (a habit from SQLAlchemy's scoped_session) or a close inside a
    unit rolled its work back, and the unit returned as if it had committed."""
    await seed_accounts(Session, 0)

    @db.transactional
    async def job() -> None:
        (await db.get_one(Account, 1)).balance = 5
        if call == "db.remove()":
            await db.remove()
        elif call == "close()":
            await db.close()
        else:
            await db().reset()

    with pytest.raises(asyncorm.TransactionalUnitError, match=rf"{re.escape(call)} was called"):
        await job()
    assert await balances(Session) == [0]

    @db.transactional
    async def fine() -> None:
        (await db.get_one(Account, 1)).balance = 6

    await fine()  # the unit's own close goes through, and so does a failed one's

    @db.transactional
    async def failing() -> None:
        (await db.get_one(Account, 1)).balance = 7
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await failing()
    assert await balances(Session) == [6]
    async with db.scope():
        await db.remove()  # outside a unit: as before
