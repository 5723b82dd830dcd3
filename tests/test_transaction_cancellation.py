"""A transactional unit cancelled while its COMMIT is on its way: committed, its on_commit
callbacks run, it returns, and the cancellation lands at the caller's next await."""

from __future__ import annotations

import asyncio

import pytest

import asyncorm
from tests.models import User
from tests.test_cancellation import next_iteration
from tests.test_commit_cancellation import Gate, SessionFactory, gated, names

__all__ = ["gated"]  # the fixture, used by name below


async def test_a_unit_cancelled_during_commit_commits_runs_callbacks_and_is_not_retried(
    gated: tuple[SessionFactory, Gate],
) -> None:
    Session, gate = gated
    gate.mode = "commit"
    name = gate.name
    db = asyncorm.async_scoped_session(Session)
    ran: list[str] = []
    calls = 0

    @db.transactional(retries=5)
    async def unit() -> str:
        nonlocal calls
        calls += 1
        db.add(User(name=gate.name))
        db.on_commit(lambda: ran.append("after commit"))
        return "returned"

    async def caller() -> None:
        ran.append(await unit())
        await asyncio.sleep(0)  # the held cancellation is delivered here
        ran.append("not reached")

    task = asyncio.create_task(caller())
    await gate.entered.wait()
    task.cancel()
    await next_iteration()
    await gate.open()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == ["after commit", "returned"]
    assert calls == 1
    assert await names(Session) == [name]
    assert db.live_sessions == 0


async def test_a_unit_cancelled_before_commit_rolls_back_and_runs_nothing(
    gated: tuple[SessionFactory, Gate],
) -> None:
    Session, gate = gated
    gate.mode = "insert"
    db = asyncorm.async_scoped_session(Session)
    ran: list[str] = []

    @db.transactional(retries=5)
    async def unit() -> None:
        db.add(User(name=gate.name))
        db.on_commit(lambda: ran.append("never"))

    task = asyncio.create_task(unit())
    await gate.entered.wait()  # the flush of the commit is sending the INSERT
    task.cancel()
    await next_iteration()
    await gate.open()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == []
    assert await names(Session) == []
    assert db.live_sessions == 0
