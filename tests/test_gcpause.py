"""The garbage collector paused while a session builds a large result's objects (_gcpause)."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, event, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import selectinload
from sqlalchemy.util import await_

import asyncorm
from asyncorm import _gcpause
from tests.conftest import Backend, reset_schema
from tests.models import Address, User

USERS = _gcpause.MIN_ROWS + 200


@pytest.fixture
async def filled(engine: AsyncEngine) -> AsyncEngine:
    """The test engine with USERS users, each with one address."""
    async with engine.begin() as conn:
        await conn.execute(insert(User), [{"id": i, "name": f"u{i}"} for i in range(1, USERS + 1)])
        await conn.execute(
            insert(Address),
            [{"id": i, "email": f"u{i}@example.com", "user_id": i} for i in range(1, USERS + 1)],
        )
    return engine


class Seen:
    """What the collector was doing while objects loaded and statements were sent."""

    def __init__(self) -> None:
        self.loads_enabled: list[bool] = []
        self.statements: list[tuple[str, bool]] = []


@pytest.fixture
def seen(engine: AsyncEngine) -> Iterator[Seen]:
    record = Seen()

    def loaded(target: Any, context: Any) -> None:
        record.loads_enabled.append(gc.isenabled())

    def sent(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        record.statements.append((statement.split()[0], gc.isenabled()))

    event.listen(User, "load", loaded)
    event.listen(engine.sync_engine, "before_cursor_execute", sent)
    try:
        yield record
    finally:
        event.remove(User, "load", loaded)
        event.remove(engine.sync_engine, "before_cursor_execute", sent)


def _collector_as_before() -> None:
    assert _gcpause.paused() == 0
    assert gc.isenabled()


async def test_a_large_result_builds_its_objects_with_the_collector_paused(
    filled: AsyncEngine, seen: Seen
) -> None:
    Session = asyncorm.async_sessionmaker(filled)
    assert gc.isenabled()
    async with Session() as session:
        users = (await session.scalars(select(User).order_by(User.id))).all()
    assert len(users) == USERS
    assert seen.loads_enabled == [False] * USERS  # every object built while paused
    assert seen.statements == [("SELECT", True)]  # never paused while a statement is sent
    _collector_as_before()


async def test_a_small_result_leaves_the_collector_alone(filled: AsyncEngine, seen: Seen) -> None:
    Session = asyncorm.async_sessionmaker(filled)
    async with Session() as session:
        users = (await session.scalars(select(User).limit(_gcpause.MIN_ROWS - 1))).all()
        assert await session.get(User, 5) is not None
    assert len(users) == _gcpause.MIN_ROWS - 1
    assert set(seen.loads_enabled) == {True}
    _collector_as_before()


async def test_the_objects_are_those_of_the_collector_left_alone(
    filled: AsyncEngine, backend: Backend
) -> None:
    """The same load on an engine made with pause_gc=False: same objects, same state."""
    plain = asyncorm.create_engine(backend.url, pause_gc=False)
    try:
        results = []
        for engine in (filled, plain):
            async with asyncorm.async_sessionmaker(engine)() as session:
                users = (
                    await session.scalars(
                        select(User).options(selectinload(User.addresses)).order_by(User.id)
                    )
                ).all()
                results.append(
                    (
                        [(u.id, u.name, u.fullname, [a.email for a in u.addresses]) for u in users],
                        len(session.identity_map),
                        sorted(session.sync_session.identity_map.keys(), key=repr),
                    )
                )
        assert results[0] == results[1]
        assert results[0][1] == 2 * USERS
    finally:
        await plain.dispose()
    _collector_as_before()


async def test_pause_gc_false_never_pauses(filled: AsyncEngine, backend: Backend) -> None:
    plain = asyncorm.create_engine(backend.url, pause_gc=False)
    states: list[bool] = []

    def loaded(target: Any, context: Any) -> None:
        states.append(gc.isenabled())

    event.listen(User, "load", loaded)
    try:
        async with asyncorm.async_sessionmaker(plain)() as session:
            assert len((await session.scalars(select(User))).all()) == USERS
    finally:
        event.remove(User, "load", loaded)
        await plain.dispose()
    assert set(states) == {True}


async def test_a_post_load_query_is_sent_with_the_collector_running(
    filled: AsyncEngine, seen: Seen
) -> None:
    """selectinload's own query waits on the database: the pause ends before it is sent."""
    Session = asyncorm.async_sessionmaker(filled)
    async with Session() as session:
        users = (
            await session.scalars(select(User).options(selectinload(User.addresses)))
        ).all()
        assert all(len(u.addresses) == 1 for u in users)
    # the users, then their addresses in batches of 500 (selectinload's default)
    assert len(seen.statements) == 1 + -(-USERS // 500)
    assert {enabled for _, enabled in seen.statements} == {True}
    assert set(seen.loads_enabled) == {False}
    _collector_as_before()


async def test_a_streamed_result_is_not_paused(filled: AsyncEngine, seen: Seen) -> None:
    """A server-side cursor's fetches wait on the network: never paused."""
    Session = asyncorm.async_sessionmaker(filled)
    async with Session() as session:
        result = await session.stream_scalars(select(User))
        count = 0
        async for _ in result:
            count += 1
    assert count == USERS
    assert set(seen.loads_enabled) == {True}
    _collector_as_before()


async def test_a_program_that_disabled_the_collector_keeps_it_disabled(
    filled: AsyncEngine, seen: Seen
) -> None:
    Session = asyncorm.async_sessionmaker(filled)
    gc.disable()
    try:
        async with Session() as session:
            assert len((await session.scalars(select(User))).all()) == USERS
        assert not gc.isenabled()
        assert _gcpause.paused() == 0
    finally:
        gc.enable()


async def test_an_error_while_loading_ends_the_pause(filled: AsyncEngine) -> None:
    Session = asyncorm.async_sessionmaker(filled)

    def fail(target: Any, context: Any) -> None:
        if target.id == 500:
            raise RuntimeError("a load listener failed")

    event.listen(User, "load", fail)
    try:
        async with Session() as session:
            with pytest.raises(RuntimeError, match="a load listener failed"):
                await session.scalars(select(User).order_by(User.id))
    finally:
        event.remove(User, "load", fail)
    _collector_as_before()


async def test_a_task_cancelled_in_a_post_load_query_leaves_no_pause(
    filled: AsyncEngine,
) -> None:
    Session = asyncorm.async_sessionmaker(filled)
    sending = asyncio.Event()
    loop = asyncio.get_running_loop()

    def sent(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if "addresses" in statement:
            loop.call_soon(sending.set)

    event.listen(filled.sync_engine, "before_cursor_execute", sent)

    async def load() -> None:
        async with Session() as session:
            await session.scalars(select(User).options(selectinload(User.addresses)))

    try:
        task = asyncio.create_task(load())
        await sending.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        event.remove(filled.sync_engine, "before_cursor_execute", sent)
    _collector_as_before()


def test_loads_in_several_threads_restore_the_collector(backend: Backend) -> None:
    """Pauses are counted process-wide: threads with loops of their own nest correctly."""
    engine = asyncorm.create_engine(backend.url)

    async def setup() -> None:
        await reset_schema(engine)
        async with engine.begin() as conn:
            await conn.execute(
                insert(User), [{"id": i, "name": f"u{i}"} for i in range(1, USERS + 1)]
            )
        await engine.dispose()

    asyncio.run(setup())
    errors: list[BaseException] = []

    def worker() -> None:
        async def run() -> None:
            own = asyncorm.create_engine(backend.url)
            try:
                for _ in range(3):
                    async with asyncorm.async_sessionmaker(own)() as session:
                        assert len((await session.scalars(select(User))).all()) == USERS
            finally:
                await own.dispose()

        try:
            asyncio.run(run())
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    _collector_as_before()


async def test_pause_gc_must_be_a_bool(backend: Backend) -> None:
    with pytest.raises(asyncorm.ConfigurationError, match=r"pause_gc='no' .*pass True .* or False"):
        asyncorm.create_engine(backend.url, pause_gc="no")


async def test_a_task_started_while_loading_leaves_no_pause_behind(filled: AsyncEngine) -> None:
    """A task created inside a session's execute() (here from a load listener) copies the
    context of that execute(); its own later loads must pause and resume on their own."""
    Session = asyncorm.async_sessionmaker(filled)
    started: list[asyncio.Task[int]] = []

    async def load_all() -> int:
        async with Session() as session:
            return len((await session.scalars(select(User))).all())

    def spawn(target: Any, context: Any) -> None:
        if not started:
            started.append(asyncio.get_running_loop().create_task(load_all()))

    event.listen(User, "load", spawn)
    try:
        async with Session() as session:
            await session.scalars(select(User).where(User.id <= 3))
        assert started
        assert await started[0] == USERS  # ran after the execute() that created it ended
    finally:
        event.remove(User, "load", spawn)
    _collector_as_before()


async def test_a_statement_a_load_listener_sends_is_sent_with_the_collector_running(
    filled: AsyncEngine, seen: Seen
) -> None:
    """A listener that queries through the session's connection (not a nested execute())
    waits on the database: the pause ends before its statement is sent."""
    Session = asyncorm.async_sessionmaker(filled)

    def lookup(target: Any, context: Any) -> None:
        if target.id == 500:
            context.session.connection().execute(text("SELECT 1"))

    event.listen(User, "load", lookup)
    try:
        async with Session() as session:
            assert len((await session.scalars(select(User))).all()) == USERS
    finally:
        event.remove(User, "load", lookup)
    assert seen.statements == [("SELECT", True), ("SELECT", True)]
    assert seen.loads_enabled[:499] == [False] * 499  # paused until the listener's query
    _collector_as_before()


async def test_a_task_started_while_loading_pauses_on_its_own_while_the_load_waits(
    filled: AsyncEngine,
) -> None:
    """The task a load listener creates runs its own large load while the creating
    execute() waits on a post-load query: its pause is its own, over when its load is."""
    Session = asyncorm.async_sessionmaker(filled)
    started: list[asyncio.Task[int]] = []
    after_own_load: list[int] = []
    finished = asyncio.Event()

    async def load_all() -> int:
        async with Session() as session:
            count = len((await session.scalars(select(User))).all())
            after_own_load.append(_gcpause.paused())
        finished.set()
        return count

    def spawn(target: Any, context: Any) -> None:
        if not started:
            started.append(asyncio.get_running_loop().create_task(load_all()))

    def hold(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if "addresses" in statement and not finished.is_set():
            await_(finished.wait())  # the post-load query waits until the task is done

    event.listen(User, "load", spawn)
    event.listen(filled.sync_engine, "before_cursor_execute", hold)
    try:
        async with Session() as session:
            await session.scalars(select(User).options(selectinload(User.addresses)))
        assert await started[0] == USERS
    finally:
        event.remove(User, "load", spawn)
        event.remove(filled.sync_engine, "before_cursor_execute", hold)
    assert after_own_load == [0]
    _collector_as_before()
