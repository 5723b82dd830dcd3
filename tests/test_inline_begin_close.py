"""``begin()`` and a ``close()`` without a transaction run without a greenlet, same results.

SQLAlchemy's ``AsyncSessionTransaction.start()`` and ``AsyncSession.close()`` each spawn a
greenlet for sync code that does no IO when ``Session.begin()`` only creates the
SessionTransaction and a session without a transaction only expunges its objects. asyncorm
runs those inline, and falls back to the greenlet whenever a listener of the events they
fire is registered (it could await) or the methods are not SQLAlchemy's own. Each case runs
the same operations through both paths (a no-op listener forces the general one) and
compares the outcome: the SQL sent, the data, the session's and the objects' state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import delete, event, inspect, select
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session as SyncSession
from sqlalchemy.util import await_

import asyncorm
from asyncorm import _begin, _commit
from tests.conftest import capture_sql
from tests.models import User

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]


def noop(*args: Any) -> None:
    pass


@contextmanager
def general_path(forced: bool) -> Iterator[None]:
    """With ``forced``, a no-op listener on the events begin() and close() fire."""
    names = ("after_transaction_create", "persistent_to_detached")
    if forced:
        for name in names:
            event.listen(asyncorm.AsyncSession.sync_session_class, name, noop)
    try:
        yield
    finally:
        if forced:
            for name in names:
                event.remove(asyncorm.AsyncSession.sync_session_class, name, noop)


def counts() -> tuple[int, int]:
    return _begin.begun_inline, _commit.closed_inline


async def unit_of_work(Session: SessionFactory, engine: AsyncEngine, forced: bool) -> Any:
    ann = User(name="ann")
    async with Session.begin() as session:
        session.add(ann)
    before = counts()
    with general_path(forced), capture_sql(engine) as sql:
        async with Session.begin() as session:
            user = await session.get(User, ann.id)
            assert user is not None
            user.name = "bob"
            inside = session.in_transaction()
    begun, closed = (after - was for after, was in zip(counts(), before, strict=True))
    async with Session() as check:
        names = (await check.scalars(select(User.name))).all()
    return {
        "inline": (begun, closed),
        "sql": sql,
        "names": names,
        "inside": inside,
        "after": (session.in_transaction(), session.get_transaction(), list(session)),
        "detached": inspect(user).detached,
        "name": user.name,
    }


async def test_a_unit_of_work_gives_the_same_results_on_both_paths(
    engine: AsyncEngine, Session: SessionFactory
) -> None:
    inline = await unit_of_work(Session, engine, forced=False)
    async with engine.begin() as conn:
        await conn.execute(delete(User))
    general = await unit_of_work(Session, engine, forced=True)
    assert inline.pop("inline") == (1, 1)
    assert general.pop("inline") == (0, 0)
    assert inline == general
    assert inline["names"] == ["bob"]
    assert inline["detached"]
    assert inline["inside"]
    assert inline["after"] == (False, None, [])


@pytest.mark.parametrize("forced", [False, True])
async def test_the_transaction_object_is_the_sessions_on_both_paths(
    Session: SessionFactory, forced: bool
) -> None:
    with general_path(forced):
        session = Session()
        async with session.begin() as transaction:
            assert session.get_transaction() is transaction
            assert transaction.is_active
            async with session.begin_nested() as savepoint:  # always the general path
                assert session.get_nested_transaction() is savepoint
            with pytest.raises(
                InvalidRequestError, match="A transaction is already begun on this Session"
            ):
                await session.begin()
        assert session.get_transaction() is None
        await session.close()


async def test_listeners_that_await_run_in_a_greenlet(
    engine: AsyncEngine, Session: SessionFactory
) -> None:
    """A listener of after_transaction_create or persistent_to_detached may await: with one
    registered, begin() and close() take SQLAlchemy's path, in a greenlet."""
    seen: list[str] = []

    def created(session: SyncSession, transaction: Any) -> None:
        await_(asyncio.sleep(0))
        seen.append("created")

    def detached(session: SyncSession, instance: Any) -> None:
        await_(asyncio.sleep(0))
        seen.append("detached")

    sync_class = asyncorm.AsyncSession.sync_session_class
    event.listen(sync_class, "after_transaction_create", created)
    event.listen(sync_class, "persistent_to_detached", detached)
    try:
        before = counts()
        ann = User(name="ann")  # kept: the identity map holds unmodified objects weakly
        async with Session.begin() as session:
            session.add(ann)
        async with Session.begin() as session:
            assert await session.get(User, ann.id) is not None
        assert counts() == before
    finally:
        event.remove(sync_class, "after_transaction_create", created)
        event.remove(sync_class, "persistent_to_detached", detached)
    assert seen.count("created") >= 2, seen
    assert "detached" in seen, seen


async def test_an_inline_close_still_refuses_a_second_task(Session: SessionFactory) -> None:
    """close() of a session without a transaction while another task is inside an
    operation on it raises ConcurrentSessionUseError, as the general path does; the
    other task's operation finishes normally."""
    session = Session()
    inside, release = asyncio.Event(), asyncio.Event()

    def wait_in_session(sync: SyncSession) -> str:
        inside.set()
        await_(release.wait())
        return "done"

    first = asyncio.create_task(session.run_sync(wait_in_session), name="first")
    await inside.wait()
    assert session.sync_session.get_transaction() is None
    before = counts()
    with pytest.raises(
        asyncorm.ConcurrentSessionUseError,
        match=r"is in use by task 'first' \(run_sync\(\)\); task .* tried to call close\(\)",
    ):
        await session.close()
    release.set()
    assert await first == "done"
    assert counts() == (before[0], before[1] + 1)  # it was the inline path that refused
    await session.close()
