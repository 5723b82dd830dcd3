"""session.on_commit(fn): after the outermost commit only, in order; dropped on rollback."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

import asyncorm
from asyncorm import _cancellation
from tests.models import User

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]


async def user_count(Session: SessionFactory) -> int:
    async with Session() as session:
        return int(await session.scalar(select(func.count(User.id))) or 0)


async def test_callbacks_run_in_order_after_commit_sync_and_async(Session: SessionFactory) -> None:
    ran: list[object] = []

    async def notify(name: str) -> None:
        await asyncio.sleep(0)
        ran.append((name, await user_count(Session)))  # the data is visible to others

    async with Session() as session:
        session.add(User(name="ann"))
        session.on_commit(lambda: ran.append("first"))
        session.on_commit(lambda: notify("second"))
        session.on_commit(lambda: ran.append("third"))
        await session.flush()
        assert ran == []
        await session.commit()
        assert ran == ["first", ("second", 1), "third"]
        await session.commit()  # an empty commit: nothing runs twice
    assert ran == ["first", ("second", 1), "third"]


async def test_on_commit_returns_the_function_and_works_as_a_decorator(
    Session: SessionFactory,
) -> None:
    ran: list[str] = []
    async with Session.begin() as session:
        session.add(User(name="ann"))

        @session.on_commit
        async def sent() -> None:
            ran.append("sent")

        assert callable(sent)
    assert ran == ["sent"]


async def test_callbacks_are_dropped_on_rollback_and_on_close(Session: SessionFactory) -> None:
    ran: list[str] = []
    async with Session() as session:
        session.add(User(name="ann"))
        session.on_commit(lambda: ran.append("rolled back"))
        await session.rollback()
        await session.commit()
        session.add(User(name="bob"))
        session.on_commit(lambda: ran.append("closed"))
        await session.flush()
    assert ran == []
    async def failing_block() -> None:
        async with Session.begin() as session:
            session.on_commit(lambda: ran.append("failed block"))
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await failing_block()
    assert ran == []
    assert await user_count(Session) == 0


async def test_a_savepoint_release_runs_nothing_and_its_rollback_drops_its_callbacks(
    Session: SessionFactory,
) -> None:
    ran: list[str] = []
    async with Session() as session:
        session.on_commit(lambda: ran.append("outer"))
        async with session.begin_nested():
            session.on_commit(lambda: ran.append("released"))
            async with session.begin_nested():
                session.on_commit(lambda: ran.append("inner released"))
        assert ran == []

        async def rolled_back_savepoint() -> None:
            async with session.begin_nested():
                session.on_commit(lambda: ran.append("rolled back"))
                async with session.begin_nested():
                    session.on_commit(lambda: ran.append("inside the rolled back"))
                raise ValueError("inner")

        with pytest.raises(ValueError, match="inner"):
            await rolled_back_savepoint()
        session.on_commit(lambda: ran.append("after"))
        await session.commit()
    assert ran == ["outer", "released", "inner released", "after"]


async def test_a_callback_registered_outside_a_transaction_waits_for_the_next_commit(
    Session: SessionFactory,
) -> None:
    ran: list[str] = []
    async with Session() as session:
        session.on_commit(lambda: ran.append("next"))
        assert ran == []
        session.add(User(name="ann"))
        await session.commit()
    assert ran == ["next"]


async def test_a_failing_callback_lets_the_others_run_and_raises_after_the_commit(
    Session: SessionFactory,
) -> None:
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("mail server down")

    async def also_broken() -> None:
        raise LookupError("no such queue")

    async with Session() as session:
        session.add(User(name="ann"))
        session.on_commit(lambda: ran.append("first"))
        session.on_commit(broken)
        session.on_commit(also_broken)
        session.on_commit(lambda: ran.append("last"))
        with pytest.raises(
            asyncorm.OnCommitError,
            match=r"was committed, but 2 of its 4 on_commit callback\(s\) failed: .*broken\(\) "
            r"raised RuntimeError\('mail server down'\); .*also_broken\(\) raised "
            r"LookupError\('no such queue'\)\. The other callbacks ran\. The data is "
            r"committed: do not run the transaction again",
        ) as raised:
            await session.commit()
    assert ran == ["first", "last"]
    assert [type(e) for e in raised.value.errors] == [RuntimeError, LookupError]
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert not asyncorm.is_retryable(raised.value)
    assert await user_count(Session) == 1  # committed


async def test_a_failing_callback_of_a_unit_is_not_retried(Session: SessionFactory) -> None:
    db = asyncorm.async_scoped_session(Session)
    calls = 0

    @db.transactional(retries=5)
    async def job() -> None:
        nonlocal calls
        calls += 1
        db.add(User(name="ann"))
        db.on_commit(lambda: 1 / 0)

    with pytest.raises(asyncorm.OnCommitError, match="ZeroDivisionError") as raised:
        await job()
    assert calls == 1
    assert raised.value.asyncorm_attempts == 1  # type: ignore[attr-defined]
    assert await user_count(Session) == 1
    assert db.live_sessions == 0


async def test_the_registry_proxies_on_commit(Session: SessionFactory) -> None:
    db = asyncorm.async_scoped_session(Session)
    ran: list[str] = []
    async with db.scope():
        db.add(User(name="ann"))
        db.on_commit(lambda: ran.append("registry"))
        await db.commit()
    assert ran == ["registry"]


def test_on_commit_refuses_what_it_cannot_call(Session: SessionFactory) -> None:
    session = Session()
    with pytest.raises(TypeError, match=r"on_commit\(\) takes a callable .* got 'send'"):
        session.on_commit("send")  # type: ignore[type-var]


async def test_a_cancellation_waits_for_the_callbacks_then_gives_up_on_a_stuck_one(
    Session: SessionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while a callback runs: the callback is waited for (here no grace at all,
    so it is cancelled at once), the rest are dropped, the cancellation is raised once, and
    the data stays committed."""
    monkeypatch.setattr(_cancellation, "CLEANUP_GRACE", 0.0)
    ran: list[str] = []
    stuck = asyncio.Event()

    async def waits_forever() -> None:
        ran.append("started")
        stuck.set()
        await asyncio.Event().wait()

    async def commit_with_callbacks() -> None:
        async with Session() as session:
            session.add(User(name="ann"))
            session.on_commit(waits_forever)
            session.on_commit(lambda: ran.append("dropped"))
            await session.commit()

    task = asyncio.create_task(commit_with_callbacks())
    await stuck.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == ["started"]
    assert await user_count(Session) == 1
