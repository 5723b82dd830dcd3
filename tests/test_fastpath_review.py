"""Review of the fast paths: begin()/close() without a greenlet, the PostgreSQL pre-ping's
poll and deferred BEGIN's caches, hold_cancellations' inline wait.

Each test states what SQLAlchemy's general path does and checks asyncorm's does the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event, func, insert, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession
from sqlalchemy.orm import Session as SASession
from sqlalchemy.util import await_

import asyncorm
from asyncorm import _cancellation
from tests.conftest import postgres_url, reset_schema
from tests.models import User

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]


# -- begin() / close() without a greenlet: a replaced method that does IO -------------------


def closing_with_a_statement(original: Callable[..., None], seen: list[Any]) -> Any:
    """A close() that runs a statement first (IO: it needs the greenlet), then closes."""

    def close(self: SASession) -> None:
        seen.append(self.scalar(text("SELECT 1")))
        original(self)

    return close


def beginning_with_a_statement(original: Callable[..., Any], seen: list[Any]) -> Any:
    """A begin() that runs a statement in the transaction it began (IO)."""

    def begin(self: SASession, nested: bool = False) -> Any:
        transaction = original(self, nested)
        seen.append(self.scalar(text("SELECT 1")))
        return transaction

    return begin


async def close_and_begin(session: SAAsyncSession) -> None:
    await session.close()
    async with session.begin():
        pass
    await session.close()


@pytest.mark.parametrize("sqlalchemys", [False, True], ids=["asyncorm", "sqlalchemy"])
async def test_methods_replaced_on_the_sync_session_instance_run_in_a_greenlet(
    engine: AsyncEngine, sqlalchemys: bool
) -> None:
    """SQLAlchemy's close() and begin() call ``session.sync_session.close``/``.begin``: a
    function set on the instance (a test's wrapper, instrumentation) runs in a greenlet, so
    it may do IO. asyncorm's inline paths called it on the event loop: MissingGreenlet."""
    cls = SAAsyncSession if sqlalchemys else asyncorm.AsyncSession
    session = cls(engine)
    seen: list[Any] = []
    sync = session.sync_session
    sync.close = closing_with_a_statement(type(sync).close, seen).__get__(sync)  # type: ignore[method-assign]
    sync.begin = beginning_with_a_statement(type(sync).begin, seen).__get__(sync)  # type: ignore[method-assign]
    await close_and_begin(session)
    assert seen == [1, 1, 1]


@pytest.mark.parametrize("sqlalchemys", [False, True], ids=["asyncorm", "sqlalchemy"])
async def test_methods_patched_on_the_session_class_after_first_use_run_in_a_greenlet(
    engine: AsyncEngine, sqlalchemys: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync_session_class whose close()/begin() are replaced after its first session
    closed (a test's monkeypatch): the replacement runs in a greenlet, as in SQLAlchemy.
    asyncorm cached "SQLAlchemy's own" per class at first use and ran it inline."""
    base: type[SASession] = SASession if sqlalchemys else asyncorm.AsyncSession.sync_session_class
    sync_class = type("Custom", (base,), {})
    cls = SAAsyncSession if sqlalchemys else asyncorm.AsyncSession
    await close_and_begin(cls(engine, sync_session_class=sync_class))  # first use: plain
    seen: list[Any] = []
    monkeypatch.setattr(sync_class, "close", closing_with_a_statement(base.close, seen))
    monkeypatch.setattr(sync_class, "begin", beginning_with_a_statement(base.begin, seen))
    await close_and_begin(cls(engine, sync_session_class=sync_class))
    assert seen == [1, 1, 1]


@pytest.mark.parametrize("sqlalchemys", [False, True], ids=["asyncorm", "sqlalchemy"])
async def test_sqlalchemys_session_methods_patched_run_in_a_greenlet(
    engine: AsyncEngine, sqlalchemys: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Session.close``/``Session.begin`` themselves replaced (instrumentation patching
    SQLAlchemy): asyncorm compared the session class's methods with Session's *current*
    ones, so the replacement was "SQLAlchemy's own" and ran on the event loop."""
    cls = SAAsyncSession if sqlalchemys else asyncorm.AsyncSession
    seen: list[Any] = []
    monkeypatch.setattr(SASession, "close", closing_with_a_statement(SASession.close, seen))
    monkeypatch.setattr(SASession, "begin", beginning_with_a_statement(SASession.begin, seen))
    await close_and_begin(cls(engine))
    assert seen == [1, 1, 1]


# -- PostgreSQL deferred BEGIN: statements that change what the deferral relies on ---------


def pg_engine(sqlalchemys: bool, **kw: Any) -> AsyncEngine:
    """asyncorm's engine on PostgreSQL, or plain SQLAlchemy's (no deferred BEGIN)."""
    if sqlalchemys:
        url = make_url(postgres_url()).set(drivername="postgresql+asyncpg")
        return create_async_engine(url, **kw)
    return asyncorm.create_engine(postgres_url(), **kw)


def sessionmaker_for(engine: AsyncEngine, sqlalchemys: bool) -> Any:
    return async_sessionmaker(engine) if sqlalchemys else asyncorm.async_sessionmaker(engine)



@pytest.mark.parametrize("sqlalchemys", [False, True], ids=["asyncorm", "sqlalchemy"])
async def test_set_config_with_bound_arguments_changing_the_default_holds_for_the_next_session(
    sqlalchemys: bool,
) -> None:
    """``select(func.set_config("default_transaction_isolation", "repeatable read", False))``
    sends the setting's name as a bound parameter (``set_config($1::VARCHAR, ...)``): the
    text judge did not see it, the connection's known default stayed READ COMMITTED, and the
    next session's first read ran before its BEGIN: two snapshots in a REPEATABLE READ
    transaction."""
    engine = pg_engine(sqlalchemys, pool_size=1, max_overflow=0)
    writer = asyncorm.create_engine(postgres_url())
    try:
        await reset_schema(engine)
        Session = sessionmaker_for(engine, sqlalchemys)
        async with Session() as session:
            await session.get(User, 1)  # deferred: this connection's default is known
            await session.execute(
                select(func.set_config("default_transaction_isolation", "repeatable read", False))
            )
            await session.commit()
        async with Session() as session:  # the same (only) connection
            first = await session.scalar(select(func.count()).select_from(User))
            async with writer.begin() as conn:
                await conn.execute(insert(User).values(name="committed meanwhile"))
            second = await session.scalar(select(func.count()).select_from(User))
            level = await session.scalar(text("SHOW transaction_isolation"))
            assert (level, first, second) == ("repeatable read", 0, 0)
    finally:
        await engine.dispose()
        await writer.dispose()


SHADOWING_SCHEMA = (
    "DROP SCHEMA IF EXISTS review_shadow CASCADE",
    "CREATE SCHEMA review_shadow",
    "CREATE FUNCTION review_shadow.lower(bigint) RETURNS bigint LANGUAGE sql VOLATILE AS $$ "
    "INSERT INTO public.users (name) VALUES ('written by lower(bigint)'); SELECT $1 $$",
)


@pytest.mark.parametrize(
    "change",
    [
        "SET search_path TO review_shadow, public",
        "SELECT set_config('search_path', 'review_shadow, public', false)",
    ],
)
@pytest.mark.parametrize("sqlalchemys", [False, True], ids=["asyncorm", "sqlalchemy"])
async def test_a_search_path_changed_after_the_check_for_shadowing_functions_is_seen(
    change: str, sqlalchemys: bool
) -> None:
    """The deferral trusts ``lower()`` only when no function outside pg_catalog on the
    search path shadows it, checked once per connection. A later ``SET search_path`` (or
    ``set_config('search_path', ...)``) bringing in a writing ``lower(bigint)`` went
    unseen: a judged plain read then ran with no BEGIN before it, its write committed at
    once, and the session's rollback did not undo it (SQLAlchemy's path: rolled back)."""
    engine = pg_engine(sqlalchemys, pool_size=1, max_overflow=0)
    try:
        await reset_schema(engine)
        async with engine.begin() as conn:
            for statement in SHADOWING_SCHEMA:
                await conn.exec_driver_sql(statement)
        Session = sessionmaker_for(engine, sqlalchemys)
        async with Session() as session:
            await session.get(User, 1)  # deferred: no shadowing function on the path yet
            await session.execute(text(change))
            await session.commit()
        async with Session() as session:  # the same (only) connection, the new search path
            assert await session.scalar(select(func.lower(func.count(User.id)))) == 0
            await session.rollback()
        async with Session() as session:
            assert await session.scalar(select(func.count(User.id))) == 0
    finally:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("DROP SCHEMA IF EXISTS review_shadow CASCADE")
        await engine.dispose()


# -- hold_cancellations before it holds: as if the coroutine were awaited directly ----------


async def waits(step: str, future: asyncio.Future[int]) -> str:
    """The stepped coroutine: waits once (on ``future`` or a bare yield), says what it saw."""
    try:
        if step == "bare yield":
            await asyncio.sleep(0)
            return "resumed"
        return f"result {await future}"
    except asyncio.CancelledError:
        return "cancelled"
    except ValueError as exc:
        return f"raised {exc}"


async def run_scenario(scenario: str, through_hold: bool) -> tuple[str, int, list[int]]:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    held: list[asyncio.CancelledError] = []
    step = "bare yield" if scenario == "cancelled at a bare yield" else "future"
    coro = waits(step, future)
    awaited = (
        _cancellation.hold_cancellations(coro, held, holding=lambda: False)
        if through_hold
        else coro
    )
    task = asyncio.ensure_future(awaited)
    await asyncio.sleep(0)  # the task is now waiting
    if scenario == "future fails":
        future.set_exception(ValueError("boom"))
    elif scenario == "future done, then the task cancelled":
        future.set_result(1)
        task.cancel()
    elif scenario == "future done":
        future.set_result(2)
    else:
        task.cancel()
    outcome = await task
    return outcome, task.cancelling(), [len(held)]


@pytest.mark.parametrize(
    "scenario",
    [
        "cancelled while waiting",
        "cancelled at a bare yield",
        "future fails",
        "future done",
        "future done, then the task cancelled",
    ],
)
async def test_hold_cancellations_before_holding_is_awaiting_directly(scenario: str) -> None:
    """5894043 inlined the wait that _pass_through() did: what reaches the coroutine, the
    task's cancellation count and the held list match awaiting the coroutine directly."""
    direct = await run_scenario(scenario, through_hold=False)
    held = await run_scenario(scenario, through_hold=True)
    assert held == direct
    assert held[2] == [0]


# -- begin() / close() without a greenlet: what held up -------------------------------------


@pytest.mark.parametrize("target", ["instance", "Session", "sync_session_class"])
@pytest.mark.parametrize("sqlalchemys", [False, True], ids=["asyncorm", "sqlalchemy"])
async def test_awaiting_listeners_wherever_registered_run_in_a_greenlet(
    engine: AsyncEngine, target: str, sqlalchemys: bool
) -> None:
    """Listeners of every event begin() and a transactionless close() fire, registered on
    the session instance, on SQLAlchemy's Session (globally) or on the sync_session_class,
    each awaiting: all run, in a greenlet, on both paths; nothing is left checked out."""
    cls = SAAsyncSession if sqlalchemys else asyncorm.AsyncSession
    async with cls(engine, expire_on_commit=False) as setup:
        setup.add(User(name="ann"))
        await setup.commit()
    session = cls(engine)
    seen: list[str] = []

    def listener(name: str) -> Callable[..., None]:
        def listen(*args: Any) -> None:
            await_(asyncio.sleep(0))
            seen.append(name)

        return listen

    where: Any = {
        "instance": session.sync_session,
        "Session": SASession,
        "sync_session_class": type(session.sync_session),
    }[target]
    names = ("after_transaction_create", "persistent_to_detached")
    listeners = [(name, listener(name)) for name in names]
    for name, fn in listeners:
        event.listen(where, name, fn)
    try:
        async with session.begin():
            ann = (await session.scalars(select(User))).one()
        await session.close()
    finally:
        for name, fn in listeners:
            event.remove(where, name, fn)
    assert inspect(ann).detached
    assert sorted(set(seen)) == sorted(names), seen


@pytest.mark.parametrize("sqlalchemys", [False, True], ids=["asyncorm", "sqlalchemy"])
async def test_close_resets_only_false_is_final_on_both_paths(
    engine: AsyncEngine, sqlalchemys: bool
) -> None:
    cls = SAAsyncSession if sqlalchemys else asyncorm.AsyncSession
    session = cls(engine, close_resets_only=False)
    async with session.begin():
        await session.execute(select(User))
    await session.close()  # no transaction: asyncorm's inline close
    with pytest.raises(
        InvalidRequestError, match="This Session has been permanently closed and is unable"
    ):
        async with session.begin():  # asyncorm's inline begin
            pass
    await session.close()


@pytest.mark.parametrize("sqlalchemys", [False, True], ids=["asyncorm", "sqlalchemy"])
async def test_a_get_replaced_on_the_sync_session_instance_is_called(
    engine: AsyncEngine, sqlalchemys: bool
) -> None:
    """SQLAlchemy's ``AsyncSession.get()`` calls ``session.sync_session.get``: a function set
    on the instance (a test's wrapper, instrumentation) is called for every get(), an
    identity-map hit or a miss. asyncorm's identity-map shortcut and fast get() checked the
    session's class once and went around it (found in review)."""
    async with asyncorm.async_sessionmaker(engine).begin() as setup:
        setup.add_all([User(id=1, name="one"), User(id=2, name="two")])
    cls = SAAsyncSession if sqlalchemys else asyncorm.AsyncSession
    session = cls(engine)
    try:
        assert (await session.get(User, 1)) is not None  # in the identity map from now on
        seen: list[Any] = []
        sync = session.sync_session
        original = type(sync).get

        def counting_get(self: SASession, *args: Any, **kwargs: Any) -> Any:
            seen.append(args[1])
            return original(self, *args, **kwargs)

        sync.get = counting_get.__get__(sync)  # type: ignore[method-assign]
        hit = await session.get(User, 1)
        miss = await session.get(User, 2)
        assert seen == [1, 2]
        assert hit is not None
        assert miss is not None
        assert (hit.name, miss.name) == ("one", "two")
    finally:
        await session.close()
