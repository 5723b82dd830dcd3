"""An engine used in another event loop than its pooled connections': EventLoopMismatchError."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

import asyncorm
from tests.conftest import Backend


async def select_one(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT 1")) or 0)


async def select_one_in_a_session(engine: AsyncEngine) -> int:
    async with asyncorm.async_sessionmaker(engine)() as session:
        return int(await session.scalar(text("SELECT 1")) or 0)


def test_a_second_loop_gets_the_error_and_dispose_fixes_it(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    engine = asyncorm.create_engine(backend.url)
    with asyncio.Runner() as first:
        assert first.run(select_one(engine)) == 1
        with asyncio.Runner() as second:
            for use in (select_one, select_one_in_a_session):
                with pytest.raises(
                    asyncorm.EventLoopMismatchError,
                    match=(
                        r"^Engine '.+' is used in a different event loop than the one its pooled "
                        r"connection was opened in \(that loop is not running now\), and a "
                        r"connection works only in the loop that opened it\. Call "
                        r"`await engine\.dispose\(\)` in the new loop before using the engine "
                        r"there \(or dispose of it before the first loop ends\), or create the "
                        r"engine with `poolclass=NullPool`\.$"
                    ),
                ):
                    second.run(use(engine))
                assert first.run(select_one(engine)) == 1  # a fresh pooled connection of loop 1
            second.run(engine.dispose())  # the fix: loop 1's connections are let go
            assert second.run(select_one(engine)) == 1
            assert second.run(select_one_in_a_session(engine)) == 1
            second.run(engine.dispose())
    gc.collect()  # a connection of either loop left open would warn here, when collected
    assert caplog.records == []  # nor is anything logged while closing loop 1's connections


def test_after_the_first_loop_closed(tmp_path: Path) -> None:
    """Two ``asyncio.run()`` calls (aiosqlite: its thread closes in any loop, nothing leaks)."""
    engine = asyncorm.create_engine(f"sqlite:///{tmp_path / 'loops.db'}")
    assert asyncio.run(select_one(engine)) == 1
    with pytest.raises(asyncorm.EventLoopMismatchError, match=r"\(that loop is closed now\)"):
        asyncio.run(select_one(engine))

    async def dispose_then_use() -> int:
        await engine.dispose()
        try:
            return await select_one(engine)
        finally:
            await engine.dispose()

    assert asyncio.run(dispose_then_use()) == 1
    gc.collect()


def test_null_pool_needs_nothing(backend: Backend) -> None:
    engine = asyncorm.create_engine(backend.url, poolclass=NullPool)
    assert asyncio.run(select_one(engine)) == 1
    assert asyncio.run(select_one(engine)) == 1
    asyncio.run(engine.dispose())


def test_the_error_is_a_runtime_error() -> None:
    assert issubclass(asyncorm.EventLoopMismatchError, RuntimeError)
    assert issubclass(asyncorm.EventLoopMismatchError, asyncorm.AsyncORMError)
