"""Pool exhaustion: an error that states the pool's limits, on both backends."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

import asyncorm
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
