"""Pool exhaustion: an error that states the pool's limits, on both backends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

import asyncorm
from asyncorm import _pool as asyncorm_pool
from tests.conftest import Backend


async def test_pool_exhaustion_states_size_overflow_checked_out_and_timeout(
    backend: Backend,
) -> None:
    engine = asyncorm.create_engine(backend.url, pool_size=2, max_overflow=1, pool_timeout=0.2)
    Session = asyncorm.async_sessionmaker(engine)
    release = asyncio.Event()
    holding = 0
    all_held = asyncio.Event()

    async def hold() -> None:
        nonlocal holding
        async with Session() as session:
            await session.execute(text("SELECT 1"))  # takes a connection and keeps it
            holding += 1
            if holding == 3:
                all_held.set()
            await release.wait()

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(3):
                group.create_task(hold())
            await all_held.wait()
            try:
                async with Session() as session:
                    with pytest.raises(asyncorm.PoolTimeoutError) as info:
                        await session.execute(text("SELECT 1"))
            finally:
                release.set()
        message = str(info.value)
        assert "3 connections are checked out" in message
        assert "pool_size=2 + max_overflow=1" in message
        assert "pool_timeout=0.2 s" in message
        assert "close them sooner, or raise pool_size, max_overflow or pool_timeout" in message
        assert repr(asyncorm.redact_url(backend.url)) in message
        assert isinstance(info.value, sa_exc.TimeoutError)  # existing handlers still catch it
        # the pool is whole again once the holders are done, also after dispose()
        await engine.dispose()
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT 1")) == 1
        assert engine.pool.label == repr(asyncorm.redact_url(backend.url))  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_a_pool_the_user_chose_is_kept(backend: Backend) -> None:
    from sqlalchemy.pool import NullPool

    engine = asyncorm.create_engine(backend.url, poolclass=NullPool)
    try:
        assert type(engine.pool) is NullPool
    finally:
        await engine.dispose()


async def _until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until ``condition`` holds (no timed sleep)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def test_waiting_tasks_are_served_first_come_first_served(backend: Backend) -> None:
    """A task returning its connection and asking again at once queues behind the waiters.

    SQLAlchemy's asyncio pool hands the returned connection back to the returning task
    (it takes an idle one without looking at the waiters), so under a steady load a waiter
    can be passed over until its pool_timeout.
    """
    engine = asyncorm.create_engine(backend.url, pool_size=1, max_overflow=0, pool_timeout=30)
    pool = engine.pool
    assert isinstance(pool.__dict__["_pool"], asyncorm_pool.FairQueue)
    queue: asyncorm_pool.FairQueue = pool.__dict__["_pool"]
    order: list[str] = []
    done = {name: asyncio.Event() for name in ("b", "c")}

    async def take(name: str) -> None:
        async with engine.connect() as conn:
            order.append(name)
            await conn.scalar(text("SELECT 1"))
        done[name].set()

    try:
        first = await engine.connect()
        await first.scalar(text("SELECT 1"))
        b = asyncio.create_task(take("b"))
        await _until(lambda: queue.waiting() == 1)
        c = asyncio.create_task(take("c"))
        await _until(lambda: queue.waiting() == 2)
        await first.close()
        async with engine.connect() as again:  # straight back: must wait for b and c
            order.append("a again")
            assert await again.scalar(text("SELECT 2")) == 2
        await asyncio.gather(b, c)
        assert order == ["b", "c", "a again"]
        assert pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_a_waiter_that_gives_up_passes_its_connection_on(backend: Backend) -> None:
    """A waiter cancelled or timed out leaves the line; a connection handed to it goes on."""
    engine = asyncorm.create_engine(backend.url, pool_size=1, max_overflow=0, pool_timeout=0.05)
    queue: asyncorm_pool.FairQueue = engine.pool.__dict__["_pool"]
    try:
        holder = await engine.connect()
        await holder.scalar(text("SELECT 1"))
        # timed out: an error that says what to do, and the line is empty again
        with pytest.raises(asyncorm.PoolTimeoutError, match="came free within pool_timeout"):
            await engine.connect()
        assert queue.waiting() == 0
        engine.pool._timeout = 30  # type: ignore[attr-defined]  # the rest wait as long as needed

        async def wait_for_one() -> int:
            async with engine.connect() as conn:
                return int(await conn.scalar(text("SELECT 3")))

        cancelled = asyncio.create_task(wait_for_one())
        await _until(lambda: queue.waiting() == 1)
        served = asyncio.create_task(wait_for_one())
        await _until(lambda: queue.waiting() == 2)
        # the connection is handed to the first waiter, which is cancelled before it runs:
        # the connection must reach the second waiter, not get lost
        await holder.close()
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await served == 3
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert queue.waiting() == 0
    finally:
        await engine.dispose()


async def test_a_waiter_cancelled_with_an_overflow_connection_in_hand_closes_it(
    backend: Backend,
) -> None:
    """The overflow connection handed to a waiter that is cancelled before it runs, as the
    pooled one comes back too, has no one to go to and no room in the queue: it is closed
    and its overflow slot freed, and the waiter ends cancelled (not with queue.Full)."""
    # no reset on return: both returns and the cancellation happen in the same loop turn
    engine = asyncorm.create_engine(
        backend.url, pool_size=1, max_overflow=1, pool_timeout=30, pool_reset_on_return=None
    )
    pool: Any = engine.pool
    queue: asyncorm_pool.FairQueue = pool.__dict__["_pool"]

    async def wait_for_one() -> int:
        async with engine.connect() as conn:
            return int(await conn.scalar(text("SELECT 3")))

    try:
        pooled = await engine.connect()
        overflow = await engine.connect()
        assert (pool.checkedout(), pool.overflow()) == (2, 1)
        waiter = asyncio.create_task(wait_for_one())
        await _until(lambda: queue.waiting() == 1)
        await overflow.close()  # handed to the waiter, which has not run yet
        await pooled.close()  # no one waits: back to the queue, which is now full
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (pool.checkedout(), pool.overflow(), pool.checkedin()) == (0, 0, 1)
        both = list(await asyncio.gather(wait_for_one(), wait_for_one()))  # both slots usable
        assert both == [3, 3]
        assert pool.checkedout() == 0
    finally:
        await engine.dispose()
