"""The per-task session registry, ``asyncorm.async_scoped_session``, on both backends.

Tasks synchronise with ``asyncio.Event``; background closes are waited for with
``db.wait_closed()`` under a timeout, never with a sleep.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import re
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, ExitStack, asynccontextmanager
from typing import Any, assert_type

import anyio
import pytest
from sqlalchemy import event, exc, func, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncorm
from asyncorm import (
    AsyncQuery,
    AsyncSession,
    NoSessionScopeError,
    ScopeError,
    async_scoped_session,
)
from tests.conftest import tasks_created
from tests.models import User

Registry = async_scoped_session[AsyncSession]
Factory = asyncorm.async_sessionmaker[AsyncSession]


@pytest.fixture
async def db(Session: Factory) -> AsyncIterator[Registry]:
    """A registry on the test's backend; fails the test if it leaves a session behind."""
    registry = async_scoped_session(Session)
    yield registry
    async with asyncio.timeout(10):
        await registry.wait_closed()
    assert registry.live_sessions == 0, f"{registry.live_sessions} session(s) left open"


async def count_users(Session: Factory) -> int:
    async with Session() as session:
        return await session.scalar(select(func.count(User.id))) or 0


async def user_names(Session: Factory) -> set[str]:
    async with Session() as session:
        return set(await session.scalars(select(User.name)))


# -- scopes ---------------------------------------------------------------------------------


async def test_scope_binds_one_session_to_the_task(db: Registry, engine: AsyncEngine) -> None:
    async with db.scope() as session:
        assert_type(session, AsyncSession)
        assert db() is session
        assert db() is db()
        db.add(User(name="ann"))
        await db.flush()
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        assert db.live_sessions == 1
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_leaving_a_scope_rolls_back_uncommitted_work(db: Registry, Session: Factory) -> None:
    async with db.scope():
        db.add(User(name="kept"))
        await db.commit()
        db.add(User(name="dropped"))
        await db.flush()
    assert await user_names(Session) == {"kept"}


async def test_leaving_a_scope_closes_its_session_in_one_task(db: Registry) -> None:
    """The registry's closing task protects the close; the session adds no task of its own."""
    with ExitStack() as counting:
        async with db.scope():
            db.add(User(name="ann"))
            await db.flush()  # IO: the close has a transaction to roll back
            created = counting.enter_context(tasks_created())  # counts through the exit
    assert created == ["async_scoped_session._close_now"]
    async with db.scope():
        assert await db.scalar(select(func.count()).select_from(User)) == 0


async def test_leaving_a_scope_rolls_back_when_the_body_raises(
    db: Registry,
    Session: Factory,
) -> None:
    async def failing_request() -> None:
        async with db.scope():
            db.add(User(name="ann"))
            await db.flush()
            raise LookupError("boom")

    with pytest.raises(LookupError, match="boom"):
        await failing_request()
    assert await count_users(Session) == 0


async def test_leaving_a_scope_detaches_objects_of_a_session_that_did_no_io(
    db: Registry,
) -> None:
    ann = User(name="ann")
    async with db.scope():
        db.add(ann)
        assert sa_inspect(ann).pending
    assert sa_inspect(ann).transient


async def test_scope_passes_session_arguments(db: Registry) -> None:
    async with db.scope(autoflush=False, info={"purpose": "report"}) as session:
        assert session.autoflush is False
        assert db.info == {"purpose": "report"}


async def test_a_session_closed_for_good_stays_closed(db: Registry) -> None:
    async with db.scope(close_resets_only=False) as session:
        pass
    with pytest.raises(exc.InvalidRequestError, match="permanently closed"):
        session.add(User(name="ann"))


async def test_a_scope_that_never_touches_the_database_takes_no_connection(
    db: Registry, engine: AsyncEngine
) -> None:
    async with db.scope():
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]

    @db.scoped
    async def idle() -> int:
        return db.live_sessions

    assert await idle() == 0


async def test_nested_scope_opens_an_independent_session(
    db: Registry,
    Session: Factory,
) -> None:
    """A nested scope is a new unit of work: its own session, committed or rolled back on
    its own; the outer session is db() again when it ends."""
    async with db.scope() as outer:
        ann = User(name="ann")
        db.add(ann)
        async with db.scope() as inner:
            assert inner is not outer
            assert db() is inner
            assert ann not in db
            db.add(User(name="audit"))
            await db.commit()
            async with db.scope() as innermost:
                assert db() is innermost
                db.add(User(name="discarded"))
                await db.flush()
            assert db() is inner
        assert db() is outer
        assert ann in db
    # the outer scope never committed: only the inner scope's commit persists
    assert await user_names(Session) == {"audit"}


# -- children and background tasks -----------------------------------------------------------

Spawn = Callable[[Coroutine[Any, Any, None]], None]


@asynccontextmanager
async def gather_children() -> AsyncIterator[Spawn]:
    futures: list[asyncio.Future[Any]] = []
    yield lambda coro: futures.append(asyncio.gather(coro))
    await asyncio.gather(*futures)


@asynccontextmanager
async def create_task_children() -> AsyncIterator[Spawn]:
    tasks: list[asyncio.Task[None]] = []
    yield lambda coro: tasks.append(asyncio.create_task(coro))
    await asyncio.gather(*tasks)


@asynccontextmanager
async def task_group_children() -> AsyncIterator[Spawn]:
    async with asyncio.TaskGroup() as group:

        def spawn(coro: Coroutine[Any, Any, None]) -> None:
            group.create_task(coro)

        yield spawn


@asynccontextmanager
async def anyio_children() -> AsyncIterator[Spawn]:
    async with anyio.create_task_group() as group:

        def spawn(coro: Coroutine[Any, Any, None]) -> None:
            group.start_soon(lambda: coro)

        yield spawn


SPAWNERS: dict[str, Callable[[], AbstractAsyncContextManager[Spawn]]] = {
    "gather": gather_children,
    "create_task": create_task_children,
    "TaskGroup": task_group_children,
    "anyio": anyio_children,
}


@pytest.mark.parametrize("spawner", SPAWNERS.values(), ids=SPAWNERS.keys())
async def test_children_get_their_own_sessions_and_outlive_the_parent_scope(
    db: Registry,
    Session: Factory,
    spawner: Callable[[], AbstractAsyncContextManager[Spawn]],
) -> None:
    """Children spawned inside a scope inherit it by copy, yet each gets its own session,
    never sees the parent's pending objects, and keeps working after the parent's scope
    closed; their sessions close when they end."""
    children, done_checking = 3, 0
    checked = asyncio.Event()
    parent_left = asyncio.Event()
    sessions: list[AsyncSession] = []
    parent_sessions: list[AsyncSession] = []
    pending: list[User] = []

    async def child(i: int) -> None:
        nonlocal done_checking
        try:
            mine = db()
            sessions.append(mine)
            assert mine is not parent_sessions[0]
            assert pending[0] not in db
            assert await db.query(User).count() == 0  # the parent's ann is not flushed
            await db.commit()  # ends the read transaction (SQLite's write lock)
        finally:
            done_checking += 1
            if done_checking == children:
                checked.set()
        await parent_left.wait()
        assert db() is mine
        db.add(User(name=f"child-{i}"))
        await db.commit()
        assert await db.query(User).filter_by(name=f"child-{i}").count() == 1

    async with spawner() as spawn:
        async with db.scope() as parent:
            parent_sessions.append(parent)
            ann = User(name="ann")
            db.add(ann)
            pending.append(ann)
            for i in range(children):
                spawn(child(i))
            async with asyncio.timeout(10):
                await checked.wait()
            assert db() is parent
            assert ann in db
        assert not parent.new  # closed: ann was expunged
        parent_left.set()

    assert len({id(session) for session in sessions}) == children
    assert await user_names(Session) == {"child-0", "child-1", "child-2"}


async def test_a_background_task_gets_its_own_session(db: Registry) -> None:
    async def background() -> AsyncSession:
        return db()

    async with db.scope() as request_session:
        task = asyncio.create_task(background())
    background_session = await task
    assert background_session is not request_session


@pytest.mark.parametrize("ending", ["return", "raise", "cancel"])
async def test_a_task_owned_session_is_closed_when_the_task_ends(
    db: Registry,
    engine: AsyncEngine,
    Session: Factory,
    ending: str,
) -> None:
    inside = asyncio.Event()

    async def job() -> None:
        db.add(User(name="ann"))
        await db.flush()  # holds a connection and a transaction
        inside.set()
        if ending == "raise":
            raise LookupError("boom")
        if ending == "cancel":
            await asyncio.Event().wait()

    task = asyncio.create_task(job())
    await inside.wait()
    assert db.live_sessions == 1
    assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    if ending == "cancel":
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    async with asyncio.timeout(10):
        await db.wait_closed()
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await count_users(Session) == 0


async def test_ten_thousand_tasks_leave_no_session_and_no_connection(
    db: Registry, engine: AsyncEngine
) -> None:
    """10,000 tasks each create a session with db() and add an object to it, so every one
    of the 10,000 sessions needs a real close. A third of the tasks return, a third raise
    and a third are cancelled while waiting. One task in 50 (200 of them) also does real
    IO: a flush, holding a connection and a transaction; the cancelled ones are cancelled
    mid-IO or while holding the connection. The other 9,800 do no IO, which keeps the test
    fast. Afterwards the registry holds no session and the pool no connection."""
    total, io_every = 10_000, 50
    ready = 0
    all_ready = asyncio.Event()
    to_cancel = len(range(2, total, 3))

    async def job(i: int) -> None:
        nonlocal ready
        db.add(User(name=f"user-{i}"))
        if i % 3 == 2:
            ready += 1
            if ready == to_cancel:
                all_ready.set()
        if i % io_every == 0:
            await db.flush()
        if i % 3 == 1:
            raise LookupError(i)
        if i % 3 == 2:
            await asyncio.Event().wait()

    finishing = [asyncio.create_task(job(i)) for i in range(total) if i % 3 != 2]
    results = await asyncio.gather(*finishing, return_exceptions=True)
    assert sum(isinstance(r, LookupError) for r in results) == len(range(1, total, 3))
    cancelled = [asyncio.create_task(job(i)) for i in range(2, total, 3)]
    async with asyncio.timeout(30):
        await all_ready.wait()
    for task in cancelled:
        task.cancel()
    results = await asyncio.gather(*cancelled, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    async with asyncio.timeout(30):
        await db.wait_closed()
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


# -- cancellation and cleanup ---------------------------------------------------------------


async def test_a_cancelled_task_still_closes_its_scope(
    db: Registry,
    engine: AsyncEngine,
    Session: Factory,
) -> None:
    inside = asyncio.Event()

    async def worker() -> None:
        async with db.scope():
            db.add(User(name="ann"))
            await db.flush()
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(worker())
    await inside.wait()
    assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await count_users(Session) == 0


async def test_the_close_completes_when_cancellation_repeats(
    db: Registry,
    engine: AsyncEngine,
    Session: Factory,
) -> None:
    """An anyio cancel scope cancels again at every await, including the scope's close;
    the close is shielded, so it still finishes (in the background)."""

    async def worker() -> bool:
        with anyio.CancelScope() as cancel_scope:
            async with db.scope():
                db.add(User(name="ann"))
                await db.flush()
                cancel_scope.cancel()
                await asyncio.Event().wait()
        return cancel_scope.cancelled_caught

    assert await asyncio.create_task(worker())
    async with asyncio.timeout(10):
        await db.wait_closed()
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await count_users(Session) == 0


async def test_the_contextvar_is_reset_even_if_closing_raises(
    db: Registry, engine: AsyncEngine
) -> None:
    def fail_after_close(*args: Any) -> None:
        raise RuntimeError("listener failed after the connection was returned")

    async def inner_scope() -> None:
        async with db.scope() as inner:
            await db.execute(select(1))
            event.listen(inner.sync_session, "after_transaction_end", fail_after_close)

    async with db.scope() as outer:
        with pytest.raises(RuntimeError, match="listener failed"):
            await inner_scope()
        assert db() is outer
        assert db.live_sessions == 1
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_failed_background_close_is_reported_to_the_loop(
    db: Registry, engine: AsyncEngine
) -> None:
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: reported.append(context))

    def fail_after_close(*args: Any) -> None:
        raise RuntimeError("listener failed after the connection was returned")

    async def job() -> None:
        await db.execute(select(1))
        event.listen(db().sync_session, "after_transaction_end", fail_after_close)

    try:
        await asyncio.create_task(job(), name="job-7")
        async with asyncio.timeout(10):
            await db.wait_closed()
    finally:
        loop.set_exception_handler(None)
    [context] = reported
    assert re.fullmatch(
        r"<async_scoped_session .*> failed to close a session in the background",
        context["message"],
    )
    assert isinstance(context["exception"], RuntimeError)
    assert context["task"].get_name() == "asyncorm: close the session of task 'job-7'"
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_session_never_closed_warns_where_it_was_created() -> None:
    db = async_scoped_session(asyncorm.async_sessionmaker())

    async def leaky() -> None:
        db.add(User(name="ann"))
        started.set()
        await asyncio.Event().wait()

    created_at = leaky.__code__.co_firstlineno + 1

    async def start() -> asyncio.Task[None]:
        return asyncio.create_task(leaky(), name="leaky-task")

    loop = asyncio.new_event_loop()
    started = asyncio.Event()
    task = loop.run_until_complete(start())
    loop.run_until_complete(started.wait())
    loop.close()  # torn down with the task still pending: nothing will close its session
    assert db.live_sessions == 1
    gc.disable()  # the task and its session go in the collection below, not earlier
    try:
        del task
        with pytest.warns(
            ResourceWarning,
            match=(
                rf"A session created by <async_scoped_session .*> at .*test_registry\.py:"
                rf"{created_at} in leaky\(\) for task 'leaky-task' was never closed, so its "
                rf"transaction and connection were abandoned: its scope was never left, or the "
                rf"event loop stopped before the scope or the task ended"
            ),
        ):
            gc.collect()
    finally:
        gc.enable()
    assert db.live_sessions == 0


# -- misuse ---------------------------------------------------------------------------------


async def test_a_scope_exited_in_another_task_raises(db: Registry) -> None:
    scope = db.scope()
    session = await scope.__aenter__()

    async def exit_elsewhere() -> None:
        await scope.__aexit__(None, None, None)

    with pytest.raises(
        ScopeError,
        match=(
            r"A scope entered in task '.+' was exited in task 'intruder'\. A scope must be "
            r"left by the task that entered it"
        ),
    ):
        await asyncio.create_task(exit_elsewhere(), name="intruder")
    assert db() is session  # the scope is untouched and still open
    await scope.__aexit__(None, None, None)


async def test_scopes_must_be_left_innermost_first(db: Registry) -> None:
    outer, inner = db.scope(), db.scope()
    await outer.__aenter__()
    inner_session = await inner.__aenter__()
    with pytest.raises(
        ScopeError,
        match=r"<scope open in task .*> was exited while a scope it encloses is still open",
    ):
        await outer.__aexit__(None, None, None)
    assert db() is inner_session
    await inner.__aexit__(None, None, None)
    await outer.__aexit__(None, None, None)


async def test_a_scope_is_single_use(db: Registry) -> None:
    scope = db.scope()
    async with scope:
        with pytest.raises(ScopeError, match=r"was already entered; a scope is single-use"):
            async with scope:
                pass
    with pytest.raises(
        ScopeError, match=r"<scope closed in task .+> cannot be exited: it is not open"
    ):
        await scope.__aexit__(None, None, None)
    with pytest.raises(ScopeError, match=r"<scope not entered> cannot be exited: it is not open"):
        await db.scope().__aexit__(None, None, None)


def test_db_needs_a_running_task() -> None:
    db = async_scoped_session(asyncorm.async_sessionmaker())
    with pytest.raises(ScopeError, match=r"db\(\) needs a running asyncio task"):
        db()
    # coroutines driven by hand, outside any event loop
    with pytest.raises(ScopeError, match=r"db\.scope\(\) needs a running asyncio task"):
        db.scope().__aenter__().send(None)
    with pytest.raises(ScopeError, match=r"db\.remove\(\) needs a running asyncio task"):
        db.remove().send(None)


async def test_db_from_a_thread_raises(db: Registry) -> None:
    with pytest.raises(ScopeError, match=r"db\(\) needs a running asyncio task, and was called"):
        await asyncio.to_thread(db)


async def test_the_registry_is_not_a_context_manager(db: Registry) -> None:
    with pytest.raises(TypeError, match=r"open a scope with `async with db\.scope\(\)"):
        async with db:
            pass


def test_scoped_only_decorates_coroutine_functions() -> None:
    db = async_scoped_session(asyncorm.async_sessionmaker())

    def sync() -> None:
        pass

    with pytest.raises(TypeError, match=r"@db\.scoped decorates coroutine functions"):
        db.scoped(sync)  # type: ignore[arg-type]


# -- strict mode ----------------------------------------------------------------------------


async def test_strict_registry_raises_outside_a_scope(Session: Factory) -> None:
    db = async_scoped_session(Session, strict=True)

    async def job() -> None:
        db.add(User(name="ann"))

    with pytest.raises(
        NoSessionScopeError,
        match=(
            r"db\(\) was called in task 'job-1', outside any scope, and the registry is "
            r"strict\. Open a scope in this task: `async with db\.scope\(\):`, decorate the "
            r"coroutine with `@db\.scoped`"
        ),
    ):
        await asyncio.create_task(job(), name="job-1")
    assert db.live_sessions == 0


async def test_strict_registry_does_not_share_a_scope_with_children(
    Session: Factory,
) -> None:
    db = async_scoped_session(Session, strict=True)

    async def child() -> None:
        db()

    @db.scoped
    async def child_with_scope() -> AsyncSession:
        return db()

    async with db.scope():
        with pytest.raises(
            NoSessionScopeError,
            match=(
                r"db\(\) was called in task 'child', inside a scope of task '.+'; scopes "
                r"are not shared with child tasks, and the registry is strict"
            ),
        ):
            await asyncio.create_task(child(), name="child")
        assert await asyncio.create_task(child_with_scope()) is not db()


# -- @db.scoped -----------------------------------------------------------------------------


async def test_scoped_runs_each_call_in_its_own_scope(
    db: Registry,
    Session: Factory,
) -> None:
    seen: list[AsyncSession] = []
    both_inside = asyncio.Event()

    @db.scoped
    async def register(name: str, *, fullname: str | None = None) -> int:
        """Register a user."""
        seen.append(db())
        if len(seen) == 2:
            both_inside.set()
        await both_inside.wait()  # both calls hold a session at the same time
        user = User(name=name, fullname=fullname)
        db.add(user)
        await db.commit()
        return user.id

    ids = await asyncio.gather(register("ann"), register("bob", fullname="Bob"))
    assert_type(ids[0], int)
    assert seen[0] is not seen[1]
    assert db.live_sessions == 0
    assert await user_names(Session) == {"ann", "bob"}
    assert register.__name__ == "register"
    assert register.__doc__ == "Register a user."
    assert inspect.signature(register) == inspect.signature(inspect.unwrap(register))
    assert inspect.unwrap(register) is not register
    assert str(inspect.signature(register)).startswith("(name: 'str', *, fullname: ")


async def test_scoped_closes_the_session_when_the_call_raises(
    db: Registry,
    engine: AsyncEngine,
    Session: Factory,
) -> None:
    @db.scoped
    async def failing() -> None:
        db.add(User(name="ann"))
        await db.flush()
        raise LookupError("boom")

    with pytest.raises(LookupError, match="boom"):
        await failing()
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await count_users(Session) == 0


async def test_scoped_inside_a_scope_gets_a_new_session(db: Registry) -> None:
    @db.scoped
    async def nested() -> AsyncSession:
        return db()

    async with db.scope() as outer:
        assert await nested() is not outer
        assert db() is outer


# -- remove() -------------------------------------------------------------------------------


async def test_remove_closes_and_forgets_the_scope_session(
    db: Registry, engine: AsyncEngine
) -> None:
    async with db.scope() as first:
        await db.execute(select(1))
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        await db.remove()
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert db.live_sessions == 0
        second = db()
        assert second is not first
        assert db() is second
        assert db.live_sessions == 1
    assert db.live_sessions == 0


async def test_remove_closes_a_task_owned_session(db: Registry, engine: AsyncEngine) -> None:
    async def job() -> None:
        first = db()
        await db.execute(select(1))
        await db.remove()
        assert db.live_sessions == 0
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert db() is not first
        await db.remove()
        await db.remove()  # nothing left: a no-op

    await asyncio.create_task(job())


async def test_remove_in_a_child_leaves_the_parent_session_alone(db: Registry) -> None:
    async with db.scope() as parent:
        ann = User(name="ann")
        db.add(ann)
        await asyncio.create_task(db.remove())
        assert db() is parent
        assert ann in db


# -- the proxied AsyncSession API -----------------------------------------------------------


def public_session_members() -> set[str]:
    """Every public member of asyncorm.AsyncSession, as a user sees it."""
    names = {name for name in dir(AsyncSession) if not name.startswith("_")}
    names |= {
        name
        for klass in AsyncSession.__mro__
        for name in vars(klass).get("__annotations__", {})
        if not name.startswith("_")
    }
    return names | {"__contains__", "__iter__"}


def test_every_public_session_member_is_proxied() -> None:
    """Fails when asyncorm.AsyncSession has a public member the registry does not proxy."""
    registry_members = vars(async_scoped_session)
    missing = sorted(public_session_members() - set(registry_members))
    assert not missing, f"not proxied: {missing}"
    for name in public_session_members():
        proxy = registry_members[name]
        if isinstance(proxy, property):
            assert proxy.__doc__ is not None
            assert proxy.__doc__.startswith(f"Proxy for the current session's ``{name}``")
            continue
        original = inspect.getattr_static(AsyncSession, name)
        assert proxy.__wrapped__ is getattr(original, "__func__", original), name
        assert proxy.__qualname__ == f"async_scoped_session.{name}"
        if sys.version_info >= (3, 12):  # inspect.markcoroutinefunction
            assert inspect.iscoroutinefunction(proxy) == inspect.iscoroutinefunction(original)


async def test_a_proxy_call_acts_on_the_session_where_it_is_written(db: Registry) -> None:
    """``db.flush()`` is ``db().flush()``: the session is looked up where the call is
    written, so a coroutine handed to another task (``create_task``, or ``wait_for``, which
    runs it in a new task on Python 3.11) still acts on the caller's session."""
    async with db.scope() as session:
        ann = User(name="ann")
        db.add(ann)
        await asyncio.create_task(db.flush())
        assert ann.id is not None
        assert ann in session
        result = await asyncio.wait_for(db.scalars(select(User.name)), 10)
        assert result.all() == ["ann"]
        assert db.live_sessions == 1


async def test_proxied_attributes_read_the_current_session(db: Registry) -> None:
    def read(obj: object, name: str) -> object:
        try:
            return getattr(obj, name)
        except AttributeError as error:
            return type(error)

    async with db.scope() as session:
        db.add(User(name="ann"))
        for name, proxy in vars(async_scoped_session).items():
            if isinstance(proxy, property) and name in public_session_members():
                mine, theirs = read(db, name), read(session, name)
                assert mine is theirs or mine == theirs or type(mine) is type(theirs), name


async def test_proxies_act_on_the_current_session(db: Registry, engine: AsyncEngine) -> None:
    async with db.scope() as session:
        ann, bob = User(name="ann"), User(name="bob")
        db.add(ann)
        db.add_all([bob])
        assert ann in db
        assert set(db) == {ann, bob}
        assert db.new == session.new
        await db.flush()
        assert db.in_transaction()
        query = db.query(User)
        assert_type(query, AsyncQuery[User])
        assert [u.name for u in await query.order_by(User.id).all()] == ["ann", "bob"]
        result = await db.execute(select(User).where(User.name == "bob"))
        assert_type(result, Result[User])
        assert result.scalar_one() is bob
        assert await db.get(User, ann.id) is ann
        assert await db.scalar(select(func.count(User.id))) == 2
        db.autoflush = False
        assert session.autoflush is False
        db.autoflush = True
        db.info["request"] = 7
        assert session.info == {"request": 7}
        assert db.sync_session is session.sync_session
        assert db.bind is engine
        assert db.identity_key(User, ann.id) == session.identity_key(User, ann.id)
        await db.delete(bob)
        await db.commit()
        assert not db.in_transaction()
        async with db.begin():
            db.add(User(name="cy"))
        assert await db.query(User).count() == 2
        db.expire(ann)
        await db.refresh(ann)
        assert ann.name == "ann"
        assert await db.merge(ann) is ann
        db.expunge(ann)
        assert ann not in session


async def test_identity_key_needs_no_session(db: Registry) -> None:
    assert db.identity_key(User, 5) == (User, (5,), None)
    assert db.live_sessions == 0


# -- introspection and configuration --------------------------------------------------------


async def test_live_sessions_counts_sessions_of_all_tasks(db: Registry) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def job() -> None:
        db()
        if db.live_sessions == 3:
            started.set()
        await release.wait()

    async with db.scope():
        tasks = [asyncio.create_task(job()) for _ in range(2)]
        await started.wait()
        assert db.live_sessions == 3
        release.set()
        await asyncio.gather(*tasks)
        assert db.live_sessions == 1
    assert db.live_sessions == 0


async def test_configure_binds_the_factory_after_import(engine: AsyncEngine) -> None:
    db = async_scoped_session(asyncorm.async_sessionmaker())
    db.configure(bind=engine)
    async with db.scope() as session:
        assert await db.scalar(select(1)) == 1
        with pytest.warns(
            exc.SAWarning,
            match=r"1 session\(s\) of <async_scoped_session .*> already exist; configure\(\) "
            r"affects only the sessions created after it",
        ):
            db.configure(autoflush=False)
        assert session.autoflush is True


def test_configure_needs_a_sessionmaker() -> None:
    db = async_scoped_session(lambda: AsyncSession())
    with pytest.raises(TypeError, match=r"configure\(\) needs the registry's factory to be"):
        db.configure(autoflush=False)


def test_repr_names_the_factory() -> None:
    db = async_scoped_session(asyncorm.async_sessionmaker(), strict=True)
    assert repr(db) == (
        "<async_scoped_session of async_sessionmaker(class_='AsyncSession', bind=None, "
        "autoflush=True, expire_on_commit=False), strict=True>"
    )
