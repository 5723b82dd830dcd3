"""A session that wrote is freed by reference counting, not by the cyclic garbage collector.

A session kept in a reference cycle after it is closed (44 objects: the sync session, its
transaction, its connection, their dicts and weak dictionaries) waits for a collection; with
hundreds of sessions alive at once (W6: 500 concurrent transfers) those collections become
full ones, walking the whole heap inside the SQLite writer turn. The mark of a transaction
that wrote (:mod:`asyncorm._unsaved`) once made that cycle.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from sqlalchemy import select, update

import asyncorm
from asyncorm._unsaved import has_unsaved_writes
from tests.models import User

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cyclic collector off for the test: what is freed, refcounting freed."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def test_a_unit_of_work_that_wrote_is_freed_without_the_collector(
    Session: SessionFactory, no_collector: None
) -> None:
    async with Session.begin() as session:
        session.add(User(name="ann"))
    async with Session.begin() as session:
        user = await session.scalar(select(User).where(User.name == "ann"))
        assert user is not None
        user.name = "bea"
        sync_session = weakref.ref(session.sync_session)
    del session, user
    assert sync_session() is None


async def test_a_session_that_executed_a_write_is_freed_without_the_collector(
    Session: SessionFactory, no_collector: None
) -> None:
    async with Session() as session:
        session.add(User(name="cy"))
        await session.commit()
        await session.execute(update(User).values(name="dee"))
        assert has_unsaved_writes(session)
        await session.commit()
        assert not has_unsaved_writes(session)
        sync_session = weakref.ref(session.sync_session)
    del session
    assert sync_session() is None


async def test_the_write_mark_names_only_the_transaction_that_wrote(
    Session: SessionFactory,
) -> None:
    async with Session() as session:
        session.add(User(name="eve"))
        await session.flush()
        assert has_unsaved_writes(session)
        await session.rollback()
        assert not has_unsaved_writes(session)
        await session.scalar(select(User.id))  # a new transaction that only read
        assert not has_unsaved_writes(session)
        await session.execute(update(User).values(name="fay"))
        assert has_unsaved_writes(session)
        await session.commit()
        assert not has_unsaved_writes(session)
