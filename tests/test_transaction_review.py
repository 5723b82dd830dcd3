"""transactional(): paths found by review, each one a real database on both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncorm
from tests.conftest import Backend
from tests.models import Account
from tests.transaction_helpers import (
    Registry,
    SessionFactory,
    balances,
    open_engine,
    seed_accounts,
)


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
