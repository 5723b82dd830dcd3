"""Cancellation inside a session: the caller is cancelled, the transaction rolled back, the
connection returned to the pool alive, and nothing logged.

Cancellation points are made deterministic with engine events: a hook fires at a known point
(before a statement is sent, at COMMIT, at ROLLBACK) and cancels the task there or a chosen
number of event-loop iterations later. No sleeps.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import Connection, event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool
from sqlalchemy.util.concurrency import await_, greenlet_spawn

import asyncorm
from asyncorm import _cancellation
from asyncorm._cancellation import run_to_completion, wait_to_completion
from tests.conftest import Backend, reset_schema, tasks_created
from tests.models import User

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]


# -- what must not happen -------------------------------------------------------------------


@dataclass
class Incidents:
    """Log records, asyncio exception-handler calls and warnings seen while watching."""

    logs: list[str] = field(default_factory=list)
    loop_errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def assert_none(self) -> None:
        assert (self.logs, self.loop_errors, self.warnings) == ([], [], [])


class _Recorder(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def watch() -> Iterator[Incidents]:
    """Record WARNING+ log records (SQLAlchemy's pool, asyncio), loop errors, warnings."""
    incidents = Incidents()
    with warnings.catch_warnings():  # what earlier tests left to the garbage collector
        warnings.simplefilter("ignore")  # is theirs, not this test's
        gc.collect()
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(
        lambda loop, context: incidents.loop_errors.append(str(context.get("message")))
    )
    recorder = _Recorder(incidents.logs)
    root = logging.getLogger()
    root.addHandler(recorder)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield incidents
            gc.collect()  # a connection nobody checked in is reported when collected
        incidents.warnings.extend(str(w.message) for w in caught)
    finally:
        root.removeHandler(recorder)
        loop.set_exception_handler(previous_handler)


# -- connection accounting -----------------------------------------------------------------


@dataclass
class PoolEvents:
    connects: int = 0
    invalidations: int = 0
    drivers: set[int] = field(default_factory=set)


@contextmanager
def count_pool_events(engine: AsyncEngine) -> Iterator[PoolEvents]:
    counts = PoolEvents()

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        counts.connects += 1

    def on_invalidate(dbapi_connection: Any, record: Any, exc: Any) -> None:
        counts.invalidations += 1

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        counts.drivers.add(id(dbapi_connection.driver_connection))

    listeners: list[tuple[str, Callable[..., None]]] = [
        ("connect", on_connect),
        ("invalidate", on_invalidate),
        ("checkout", on_checkout),
    ]
    for name, fn in listeners:
        event.listen(engine.sync_engine, name, fn)
    try:
        yield counts
    finally:
        for name, fn in listeners:
            event.remove(engine.sync_engine, name, fn)


async def idle_in_transaction(engine: AsyncEngine) -> int:
    """PostgreSQL backends of this database left inside a transaction; 0 on SQLite."""
    if engine.dialect.name != "postgresql":
        return 0
    async with engine.connect() as conn:
        count = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
            )
        )
    return int(count or 0)


async def user_names(Session: SessionFactory) -> list[str]:
    async with Session() as session:
        return list(await session.scalars(select(User.name).order_by(User.name)))


# -- deterministic cancellation points ------------------------------------------------------


def cancel_later(task: asyncio.Task[Any], iterations: int) -> None:
    """Cancel ``task`` now (0) or after that many event-loop iterations."""
    if iterations == 0:
        task.cancel()
        return
    loop = asyncio.get_running_loop()

    def tick(left: int) -> None:
        if task.done():
            return
        if left == 0:
            task.cancel()
        else:
            loop.call_soon(tick, left - 1)

    loop.call_soon(tick, iterations - 1)


@contextmanager
def cancel_at(
    engine: AsyncEngine, task_box: list[asyncio.Task[Any]], point: str, iterations: int = 0
) -> Iterator[None]:
    """Cancel the task in ``task_box`` when the engine reaches ``point``.

    ``point``: ``INSERT``/``SELECT`` (before that statement is sent), ``commit`` or
    ``rollback`` (before the driver's commit or rollback).
    """
    fired = False

    def fire() -> None:
        nonlocal fired
        if not fired and task_box:
            fired = True
            cancel_later(task_box[0], iterations)

    def before_execute(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith(point):
            fire()

    def on_transaction_end(conn: Connection) -> None:
        fire()

    if point in ("commit", "rollback"):
        name, fn = point, on_transaction_end
    else:
        name, fn = "before_cursor_execute", before_execute  # type: ignore[assignment]
    event.listen(engine.sync_engine, name, fn)
    try:
        yield
    finally:
        event.remove(engine.sync_engine, name, fn)


async def run_cancelled(coro: Any, task_box: list[asyncio.Task[Any]]) -> None:
    task = asyncio.create_task(coro)
    task_box.append(task)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def write_transaction(Session: SessionFactory, name: str) -> None:
    async with Session() as session, session.begin():
        session.add(User(name=name))
        await session.flush()
        await session.execute(select(User.id).where(User.name == name))


async def write_with_sessionmaker_begin(Session: SessionFactory, name: str) -> None:
    async with Session.begin() as session:
        session.add(User(name=name))
        await session.flush()
        await session.execute(select(User.id).where(User.name == name))


async def fail_and_roll_back(Session: SessionFactory, name: str) -> None:
    async with Session() as session:
        session.add(User(name=name))
        await session.flush()
        await session.rollback()


@pytest.fixture
async def warm(engine: AsyncEngine, Session: SessionFactory) -> None:
    """One connection in the pool, used once."""
    await write_transaction(Session, "warm-up")


SCENARIOS = {
    "async with Session(), session.begin()": write_transaction,
    "async with Session.begin()": write_with_sessionmaker_begin,
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize(("point", "iterations"), [("INSERT", 0), ("INSERT", 1), ("SELECT", 0)])
@pytest.mark.usefixtures("warm")
async def test_cancel_mid_transaction_rolls_back_and_keeps_the_connection(
    engine: AsyncEngine, Session: SessionFactory, scenario: str, point: str, iterations: int
) -> None:
    box: list[asyncio.Task[Any]] = []
    with watch() as incidents, count_pool_events(engine) as pool:
        with cancel_at(engine, box, point, iterations):
            await run_cancelled(SCENARIOS[scenario](Session, "cancelled"), box)
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert await user_names(Session) == ["warm-up"]  # rolled back
        assert await idle_in_transaction(engine) == 0
    incidents.assert_none()
    assert (pool.connects, pool.invalidations) == (0, 0)  # the same connection, alive
    assert len(pool.drivers) == 1


@pytest.mark.usefixtures("warm")
async def test_cancel_during_commit_keeps_the_connection(
    engine: AsyncEngine, Session: SessionFactory
) -> None:
    """A cancellation arriving with COMMIT on its way waits for it: the block commits, and
    says so by finishing normally (the cancellation is held for the next suspension, and
    this task has none left)."""
    box: list[asyncio.Task[Any]] = []
    with watch() as incidents, count_pool_events(engine) as pool:
        with cancel_at(engine, box, "commit"):
            task = asyncio.create_task(write_transaction(Session, "committed"))
            box.append(task)
            await task
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert await user_names(Session) == ["committed", "warm-up"]
        assert await idle_in_transaction(engine) == 0
    incidents.assert_none()
    assert (pool.connects, pool.invalidations) == (0, 0)


@pytest.mark.parametrize("second_cancel", [False, True])
@pytest.mark.usefixtures("warm")
async def test_cancel_during_the_rollback_lets_it_finish(
    engine: AsyncEngine, Session: SessionFactory, second_cancel: bool
) -> None:
    """A cancellation arriving in cleanup (alone, or a second one) waits for the rollback."""
    box: list[asyncio.Task[Any]] = []
    with watch() as incidents, count_pool_events(engine) as pool:
        with cancel_at(engine, box, "rollback"):
            if second_cancel:
                with cancel_at(engine, box, "INSERT"):
                    await run_cancelled(write_transaction(Session, "cancelled"), box)
            else:
                await run_cancelled(fail_and_roll_back(Session, "rolled back"), box)
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert await user_names(Session) == ["warm-up"]
        assert await idle_in_transaction(engine) == 0
    incidents.assert_none()
    assert (pool.connects, pool.invalidations) == (0, 0)


@pytest.mark.usefixtures("warm")
async def test_cancel_while_the_connection_returns_to_the_pool(
    engine: AsyncEngine, Session: SessionFactory
) -> None:
    """Cancelled while the connection goes back to the pool: it still goes back, alive.

    That happens after COMMIT, inside the commit: the block has committed and finishes
    normally."""
    box: list[asyncio.Task[Any]] = []

    def cancel_on_reset(dbapi_connection: Any, record: Any, state: Any) -> None:
        if box and not box[0].done():
            box[0].cancel()

    # inserted first: the cancellation arrives while the connection is rolled back on return
    event.listen(engine.sync_engine, "reset", cancel_on_reset, insert=True, once=True)
    with watch() as incidents, count_pool_events(engine) as pool:
        box.append(asyncio.create_task(write_transaction(Session, "committed")))
        await box[0]
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert await user_names(Session) == ["committed", "warm-up"]
    incidents.assert_none()
    assert (pool.connects, pool.invalidations) == (0, 0)


@pytest.mark.parametrize("point", ["INSERT", "rollback"])
@pytest.mark.usefixtures("warm")
async def test_a_timeout_still_raises_timeout_error(
    engine: AsyncEngine, Session: SessionFactory, point: str
) -> None:
    """Cleanup that defers a cancellation keeps the task's cancel count: asyncio.timeout works."""
    loop = asyncio.get_running_loop()

    async def with_timeout() -> None:
        async with asyncio.timeout(None) as timeout:

            def expire(*args: Any) -> None:
                timeout.reschedule(loop.time())

            name = "rollback" if point == "rollback" else "before_cursor_execute"
            event.listen(engine.sync_engine, name, expire, once=True)
            if point == "rollback":
                await fail_and_roll_back(Session, "timed out")
            else:
                await write_transaction(Session, "timed out")

    with watch() as incidents, count_pool_events(engine) as pool:
        with pytest.raises(TimeoutError):
            await with_timeout()
        assert await user_names(Session) == ["warm-up"]
    incidents.assert_none()
    assert (pool.connects, pool.invalidations) == (0, 0)


async def test_close_runs_to_completion(engine: AsyncEngine, Session: SessionFactory) -> None:
    """An explicit ``await session.close()`` cancelled mid-rollback still returns the connection."""
    box: list[asyncio.Task[Any]] = []

    session = Session()

    async def explicit_close() -> None:
        session.add(User(name="closed"))
        await session.flush()
        await session.close()

    with watch() as incidents, cancel_at(engine, box, "rollback"):
        await run_cancelled(explicit_close(), box)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    # the close finished: no transaction, no objects left in the session
    assert (session.get_transaction(), list(session)) == (None, [])
    assert await user_names(Session) == []
    incidents.assert_none()


# -- cleanup that holds a cancellation back -------------------------------------------------


async def next_iteration() -> None:
    """Let the event loop run once (a yield, not a sleep)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    loop.call_soon(future.set_result, None)
    await future


async def test_held_back_cancellation_keeps_the_tasks_cancel_count() -> None:
    """A cancellation (here asyncio.timeout's) waits for the cleanup, then still times out."""
    loop = asyncio.get_running_loop()
    release = asyncio.Event()
    results: list[str] = []

    def cleanup() -> str:
        await_(release.wait())
        return "finished"

    async def timed() -> None:
        async with asyncio.timeout(None) as timeout:

            def release_once_expired() -> None:
                if timeout.expired():
                    release.set()
                else:
                    loop.call_soon(release_once_expired)

            timeout.reschedule(loop.time())
            loop.call_soon(release_once_expired)
            results.append(await greenlet_spawn(wait_to_completion, cleanup))
            await next_iteration()  # the cancellation, requested again, lands here
            results.append("not reached")

    with pytest.raises(TimeoutError):
        await timed()
    assert results == ["finished"]
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_held_back_cancellation_gives_up_after_the_grace_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_cancellation, "CLEANUP_GRACE", 0.0)
    started = asyncio.Event()
    outcome: list[str] = []

    def cleanup() -> None:
        started.set()
        try:
            await_(asyncio.Event().wait())  # never finishes by itself
        except asyncio.CancelledError:
            outcome.append("cleanup cancelled")
            raise

    task = asyncio.create_task(greenlet_spawn(wait_to_completion, cleanup))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert outcome == ["cleanup cancelled"]


async def failing_cleanup(started: asyncio.Event, release: asyncio.Event) -> None:
    """Cleanup that fails once released, like a ROLLBACK on a connection that dropped."""
    started.set()
    await release.wait()
    raise RuntimeError("cleanup failed")


async def test_cleanup_error_after_a_cancellation_still_cancels_the_caller() -> None:
    """The cleanup's exception is chained to the cancellation instead of replacing it."""
    started, release = asyncio.Event(), asyncio.Event()
    caught: list[BaseException] = []

    async def caller() -> None:
        try:
            await run_to_completion(failing_cleanup(started, release))
        except BaseException as exc:
            caught.append(exc)
            raise

    task = asyncio.create_task(caller())
    await started.wait()
    task.cancel()
    release.set()  # the cleanup fails after the cancellation was requested
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    [exc] = caught
    assert isinstance(exc, asyncio.CancelledError)
    assert isinstance(exc.__cause__, RuntimeError)
    assert str(exc.__cause__) == "cleanup failed"


async def test_cleanup_error_after_a_timeout_still_times_out() -> None:
    """asyncio.timeout recognises its cancellation behind a failed cleanup: TimeoutError."""
    loop = asyncio.get_running_loop()
    started, release = asyncio.Event(), asyncio.Event()
    timeouts: list[asyncio.Timeout] = []
    reached: list[str] = []

    async def timed() -> None:
        async with asyncio.timeout(None) as timeout:
            timeouts.append(timeout)
            try:
                await run_to_completion(failing_cleanup(started, release))
            except Exception:  # what a caller catching Exception would do
                reached.append("caught as Exception")
            reached.append("not reached")

    task = asyncio.create_task(timed())
    await started.wait()
    [timeout] = timeouts
    timeout.reschedule(loop.time())
    while not timeout.expired():  # the timeout has cancelled the task
        await next_iteration()
    release.set()
    with pytest.raises(TimeoutError) as raised:
        await task
    assert reached == []
    cancelled = raised.value.__cause__
    assert isinstance(cancelled, asyncio.CancelledError)
    assert isinstance(cancelled.__cause__, RuntimeError)
    assert task.cancelling() == 0  # asyncio.timeout took its own cancellation back


async def test_run_to_completion_waits_for_the_cleanup() -> None:
    """Uncancelled: the cleanup's result or exception; cancelled: only once it finished."""
    started, release = asyncio.Event(), asyncio.Event()

    async def cleanup() -> str:
        started.set()
        await release.wait()
        return "finished"

    release.set()
    assert await run_to_completion(cleanup()) == "finished"
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await run_to_completion(failing_cleanup(asyncio.Event(), release))

    started.clear()
    release.clear()
    task = asyncio.create_task(run_to_completion(cleanup()))
    await started.wait()
    task.cancel()
    await next_iteration()
    await next_iteration()
    assert not task.done()  # held back while the cleanup still runs
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_to_completion_gives_up_after_the_grace_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_cancellation, "CLEANUP_GRACE", 0.0)
    started = asyncio.Event()
    outcome: list[str] = []

    async def cleanup() -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # never finishes by itself
        except asyncio.CancelledError:
            outcome.append("cleanup cancelled")
            raise

    task = asyncio.create_task(run_to_completion(cleanup()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert outcome == ["cleanup cancelled"]


# -- the storm ------------------------------------------------------------------------------

STORM_TASKS = 2000
STORM_CONCURRENCY = 50
STORM_POOL_SIZE = 10


@dataclass
class Plan:
    """Where one storm task gets cancelled, and what it got done."""

    index: int
    point: str  # "none", "start", "INSERT", "SELECT", "commit"
    iterations: int
    second: bool  # a second cancellation, in the cleanup's rollback
    task: asyncio.Task[Any] | None = None
    commit_sent: bool = False
    fired: set[str] = field(default_factory=set)


_PLAN: contextvars.ContextVar[Plan] = contextvars.ContextVar("storm_plan")

POINTS = ["none", "start", "INSERT", "SELECT", "commit"]


def make_plans(seed: int) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for index in range(STORM_TASKS):
        point = rng.choices(POINTS, weights=[1, 2, 3, 2, 2])[0]
        iterations = rng.randrange(0, 40) if point == "start" else rng.randrange(0, 6)
        plans.append(Plan(index, point, iterations, second=rng.random() < 0.3))
    return plans


def _fire(plan: Plan, point: str, iterations: int) -> None:
    if point in plan.fired or plan.task is None:
        return
    plan.fired.add(point)
    cancel_later(plan.task, iterations)


@contextmanager
def storm_hooks(engine: AsyncEngine) -> Iterator[None]:
    def before_execute(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        plan = _PLAN.get(None)
        if plan is not None and plan.point != "none" and statement.startswith(plan.point):
            _fire(plan, plan.point, plan.iterations)

    def on_commit(conn: Connection) -> None:
        plan = _PLAN.get(None)
        if plan is not None:
            plan.commit_sent = True
            if plan.point == "commit":
                _fire(plan, "commit", plan.iterations)

    def on_rollback(conn: Connection) -> None:
        plan = _PLAN.get(None)
        if plan is not None and plan.second and plan.fired:
            _fire(plan, "rollback", plan.iterations)

    listeners: list[tuple[str, Callable[..., None]]] = [
        ("before_cursor_execute", before_execute),
        ("commit", on_commit),
        ("rollback", on_rollback),
    ]
    for name, fn in listeners:
        event.listen(engine.sync_engine, name, fn)
    try:
        yield
    finally:
        for name, fn in listeners:
            event.remove(engine.sync_engine, name, fn)


async def storm_task(Session: SessionFactory, plan: Plan, gate: asyncio.Semaphore) -> None:
    async with gate:
        _PLAN.set(plan)
        plan.task = asyncio.current_task()
        if plan.point == "start":
            _fire(plan, "start", plan.iterations)
        name = f"storm-{plan.index}"
        if plan.index % 2:
            await write_transaction(Session, name)
        else:
            await write_with_sessionmaker_begin(Session, name)


@dataclass
class StormReport:
    tasks: int
    cancelled: int
    completed: int
    new_connections: int
    invalidations: int
    cancelled_after_commit_sent: int  # cancelled after COMMIT was sent (and rolled back)


async def run_storm(backend: Backend, seed: int) -> StormReport:
    engine = asyncorm.create_engine(backend.url, pool_size=STORM_POOL_SIZE, max_overflow=0)
    try:
        await reset_schema(engine)
        Session = asyncorm.async_sessionmaker(engine)
        # warm up: fill the pool, so that every later connect replaces a discarded connection
        connections = [await engine.connect() for _ in range(STORM_POOL_SIZE)]
        for connection in connections:
            await connection.close()

        plans = make_plans(seed)
        gate = asyncio.Semaphore(STORM_CONCURRENCY)
        with watch() as incidents, count_pool_events(engine) as pool, storm_hooks(engine):
            tasks = [
                asyncio.create_task(storm_task(Session, plan, gate), name=f"storm-{plan.index}")
                for plan in plans
            ]
            await asyncio.wait(tasks)
            outcomes = {}
            for plan, task in zip(plans, tasks, strict=True):
                if task.cancelled():
                    outcomes[plan.index] = "cancelled"
                else:
                    assert task.exception() is None, (plan, task.exception())
                    outcomes[plan.index] = "completed"
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            assert await idle_in_transaction(engine) == 0
            async with Session() as session:
                names = set(await session.scalars(select(User.name)))
                assert await session.scalar(select(func.count(User.id))) == len(names)
        incidents.assert_none()

        visible = {int(name.removeprefix("storm-")) for name in names}
        for plan in plans:
            if outcomes[plan.index] == "completed":
                assert plan.index in visible, plan
            else:
                # a task that ends cancelled committed nothing: a cancellation arriving
                # with COMMIT on its way waits for it, and the task learns it committed
                assert plan.index not in visible, plan
        assert all(outcomes[p.index] == "completed" for p in plans if p.point == "none")
        return StormReport(
            tasks=len(plans),
            cancelled=sum(1 for o in outcomes.values() if o == "cancelled"),
            completed=sum(1 for o in outcomes.values() if o == "completed"),
            new_connections=pool.connects,
            invalidations=pool.invalidations,
            cancelled_after_commit_sent=sum(
                1 for p in plans if outcomes[p.index] == "cancelled" and p.commit_sent
            ),
        )
    finally:
        await engine.dispose()


@pytest.mark.timeout(300)
async def test_cancellation_storm(backend: Backend, record_property: Any) -> None:
    report = await run_storm(backend, seed=int(os.environ.get("STORM_SEED", "4")))
    record_property("storm", report)
    print(f"\n{backend.name} storm: {report}")
    assert report.tasks == STORM_TASKS
    assert report.cancelled > STORM_TASKS // 2
    # the goal is under 20% of the tasks; measured: none, on both backends, for every seed
    assert report.new_connections < STORM_TASKS * 0.01


async def test_a_close_that_cannot_suspend_runs_inline(
    backend: Backend, engine: AsyncEngine
) -> None:
    """The run-to-completion task is only for a close that may await IO.

    A PostgreSQL session that only read never opened a transaction block (deferred BEGIN):
    its close awaits nothing and needs no task. On SQLite the read opened a WAL snapshot,
    which ends on the event loop (asyncorm._inline_end): no await, no task either. A flush
    opens a write transaction on both: that close runs in a task.
    """
    Session = asyncorm.async_sessionmaker(engine)
    async with Session.begin() as session:
        session.add(User(id=1, name="ann"))

    session = Session()
    assert await session.get(User, 1) is not None
    with tasks_created() as created:
        await session.close()
    assert created == []

    session = Session()
    session.add(User(id=2, name="bob"))
    await session.flush()
    with tasks_created() as created:
        await session.close()
    assert created == ["AsyncSession.close"]

    async with Session() as session:  # the flushed row was rolled back on both paths
        assert await session.scalar(select(func.count()).select_from(User)) == 1


@pytest.mark.parametrize("case", ["null-pool", "overflow", "isolation-level"])
async def test_a_close_whose_checkin_does_io_runs_in_a_task(backend: Backend, case: str) -> None:
    """Returning the connection may await even with no transaction open: NullPool and an
    overflow connection are closed (asyncpg's close), and an isolation level set for the
    session is reset (a trip to aiosqlite's thread). Those closes keep their task."""
    options: dict[str, Any] = {"poolclass": NullPool} if case == "null-pool" else {}
    if case == "overflow":
        options = {"pool_size": 1, "max_overflow": 1}
    engine = asyncorm.create_engine(backend.url, **options)
    try:
        await reset_schema(engine)
        bind = engine
        if case == "isolation-level":
            level = "SERIALIZABLE" if backend.is_sqlite else "READ COMMITTED"
            bind = engine.execution_options(isolation_level=level)
        Session = asyncorm.async_sessionmaker(bind)
        holder = Session()
        if case == "overflow":  # the pool's one connection, checked out first
            await holder.connection()
        session = Session()
        if backend.is_sqlite:
            await session.connection()  # on SQLite a read would open a transaction
        else:
            await session.scalar(select(func.count()).select_from(User))
        await holder.close()  # overflow: the pool is full again, the next return is closed
        with tasks_created() as created:
            await session.close()
        assert created == ["AsyncSession.close"]
    finally:
        await engine.dispose()
