"""A cancellation around a commit: before COMMIT it rolls back, during COMMIT it waits.

Every commit path is covered (``async with Session.begin()``, ``async with session.begin()``,
``await session.commit()``, ``await transaction.commit()``) on both backends. The tests
assert what is in the database afterwards, not only which statements were sent.

Slow statements come from the database side, held by a :class:`Gate` the test opens:
PostgreSQL triggers wait for an advisory lock the test holds (a ``BEFORE INSERT`` trigger for
the INSERT, a deferred constraint trigger for the COMMIT); on SQLite a user function in a
trigger blocks aiosqlite's thread for the INSERT, and a progress handler blocks it inside
COMMIT. The cancellation is requested when the engine reaches the statement. No sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import greenlet  # type: ignore[import-untyped]
import pytest
from sqlalchemy import Connection, event, select, text
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_

import asyncorm
from asyncorm import _cancellation
from tests.conftest import Backend, reset_schema, tasks_created
from tests.models import User
from tests.test_cancellation import idle_in_transaction, next_iteration, watch

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]

GATE_LOCK = 4201  # the advisory lock PostgreSQL's gate triggers wait for
GATE_WAIT = 30.0  # seconds SQLite's gate blocks at most, should a test fail before opening it


@dataclass
class Gate:
    """Holds the slow statement (``"insert"`` or ``"commit"``) until :meth:`open`."""

    backend: Backend
    engine: AsyncEngine
    mode: str = "insert"
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    released: threading.Event = field(default_factory=threading.Event)
    holder: Any = None  # PostgreSQL: the connection holding the advisory lock

    @property
    def name(self) -> str:
        """The user name whose INSERT (or COMMIT) is slow."""
        return f"slow {self.mode}"

    async def open(self) -> None:
        """Let the held statement (and every later one) through."""
        self.released.set()
        self.mode = "open"
        if self.holder is not None:
            holder, self.holder = self.holder, None
            await holder.execute(text(f"SELECT pg_advisory_unlock({GATE_LOCK})"))
            await holder.close()

    # -- SQLite: blocking aiosqlite's thread --------------------------------------------

    def block_on_thread(self) -> int:
        """The SQLite user function of the INSERT trigger; runs on aiosqlite's thread."""
        self.released.wait(GATE_WAIT)
        return 0

    def progress_handler(self, armed: list[bool]) -> Callable[[], int]:
        def handler() -> int:  # on the connection's thread, inside every statement
            if armed and armed.pop():
                self.released.wait(GATE_WAIT)
            return 0

        return handler


@pytest.fixture
async def gated(backend: Backend) -> AsyncIterator[tuple[SessionFactory, Gate]]:
    engine = asyncorm.create_engine(backend.url)
    gate = Gate(backend, engine)

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        armed: list[bool] = []
        record.info["gate"] = armed
        dbapi_connection.create_function("asyncorm_gate", 0, gate.block_on_thread)
        driver = dbapi_connection.driver_connection
        await_(driver.set_progress_handler(gate.progress_handler(armed), 1))

    def on_insert(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if gate.mode == "insert" and statement.startswith("INSERT INTO users"):
            gate.entered.set()

    def on_commit(conn: Connection) -> None:
        if gate.mode == "commit":
            if backend.is_sqlite:
                conn.info["gate"].append(True)  # the next statement on its thread: COMMIT
            gate.entered.set()

    if backend.is_sqlite:
        event.listen(engine.sync_engine, "connect", on_connect)
    await reset_schema(engine)
    async with engine.begin() as conn:
        if backend.is_sqlite:
            await conn.execute(
                text(
                    "CREATE TRIGGER slow_insert BEFORE INSERT ON users "
                    "WHEN NEW.name LIKE 'slow insert%' BEGIN SELECT asyncorm_gate(); END"
                )
            )
        else:
            await conn.execute(
                text(
                    "CREATE OR REPLACE FUNCTION asyncorm_gate() RETURNS trigger AS $$ BEGIN "
                    f"PERFORM pg_advisory_xact_lock_shared({GATE_LOCK}); RETURN NEW; END $$ "
                    "LANGUAGE plpgsql"
                )
            )
            await conn.execute(
                text(
                    "CREATE TRIGGER slow_insert BEFORE INSERT ON users FOR EACH ROW "
                    "WHEN (NEW.name LIKE 'slow insert%') EXECUTE FUNCTION asyncorm_gate()"
                )
            )
            await conn.execute(
                text(
                    "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON users "
                    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                    "WHEN (NEW.name LIKE 'slow commit%') EXECUTE FUNCTION asyncorm_gate()"
                )
            )
    if not backend.is_sqlite:
        holder_engine = asyncorm.create_engine(backend.url)
        holder = await holder_engine.connect()
        await holder.execution_options(isolation_level="AUTOCOMMIT")
        await holder.execute(text(f"SELECT pg_advisory_lock({GATE_LOCK})"))
        gate.holder = holder
    event.listen(engine.sync_engine, "before_cursor_execute", on_insert)
    event.listen(engine.sync_engine, "commit", on_commit)
    try:
        yield asyncorm.async_sessionmaker(engine), gate
        await gate.open()
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert await idle_in_transaction(engine) == 0
    finally:
        await gate.open()
        if not backend.is_sqlite:
            await holder_engine.dispose()
        await engine.dispose()


async def names(Session: SessionFactory) -> list[str]:
    async with Session() as session:
        return list(await session.scalars(select(User.name).order_by(User.name)))


# -- the four commit paths, each adding one user ---------------------------------------------


async def sessionmaker_begin(Session: SessionFactory, name: str) -> None:
    async with Session.begin() as session:
        session.add(User(name=name))


async def session_begin(Session: SessionFactory, name: str) -> None:
    async with Session() as session, session.begin():
        session.add(User(name=name))


async def session_commit(Session: SessionFactory, name: str) -> None:
    async with Session() as session:
        session.add(User(name=name))
        await session.commit()


async def transaction_commit(Session: SessionFactory, name: str) -> None:
    async with Session() as session:
        transaction = await session.begin()
        session.add(User(name=name))
        await transaction.commit()


PATHS: dict[str, Callable[[SessionFactory, str], Awaitable[None]]] = {
    "Session.begin()": sessionmaker_begin,
    "session.begin()": session_begin,
    "session.commit()": session_commit,
    "transaction.commit()": transaction_commit,
}


async def one_iteration() -> None:
    """Let the event loop run once; unlike ``next_iteration()``, it may be cancelled."""
    future = asyncio.get_running_loop().create_future()

    def resolve() -> None:
        if not future.done():
            future.set_result(None)

    future.get_loop().call_soon(resolve)
    await future


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await next_iteration()


# -- before COMMIT: rolled back ----------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
async def test_a_timeout_during_the_flush_at_commit_rolls_back(
    gated: tuple[SessionFactory, Gate], path: str
) -> None:
    """The issue's case: a block that only add()s, its INSERT slow, under asyncio.timeout.

    The timeout expires while the INSERT of the commit's flush is on its way: the caller
    gets TimeoutError and the row is absent. SQLAlchemy's ``Session.begin()`` ran that flush
    in a shielded task of its own, which the cancellation never reached: it committed.
    """
    Session, gate = gated
    timeouts: list[asyncio.Timeout] = []

    async def caller() -> None:
        async with asyncio.timeout(None) as timeout:
            timeouts.append(timeout)
            await PATHS[path](Session, gate.name)

    with watch() as incidents:
        task = asyncio.create_task(caller())
        await gate.entered.wait()  # the INSERT is on its way, held by the gate
        [timeout] = timeouts
        timeout.reschedule(asyncio.get_running_loop().time())
        await until(timeout.expired)
        await gate.open()
        with pytest.raises(TimeoutError):
            await task
        assert await names(Session) == []
    incidents.assert_none()


# -- during COMMIT: committed, and the caller is told so --------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("await_inside", [False, True], ids=["block-last", "await-after"])
async def test_a_timeout_expiring_during_commit_lets_the_commit_finish(
    gated: tuple[SessionFactory, Gate], path: str, await_inside: bool
) -> None:
    """asyncio.timeout expires while COMMIT is on its way: the COMMIT finishes and the block
    returns normally. The timeout's cancellation is not lost, nor does it escape the timeout
    block as a bare CancelledError (Python 3.11's uncancel() leaves a pending request in
    place): with nothing awaited after the block inside ``asyncio.timeout``, the timeout took
    its request back and nothing is raised; with an await after the block, that await
    raises and the timeout turns it into TimeoutError."""
    Session, gate = gated
    gate.mode = "commit"
    timeouts: list[asyncio.Timeout] = []
    reached: list[str] = []

    async def caller() -> None:
        async with asyncio.timeout(None) as timeout:
            timeouts.append(timeout)
            await PATHS[path](Session, gate.name)
            reached.append("block returned")
            if await_inside:
                await one_iteration()
                reached.append("not reached")
        await next_iteration()  # a leaked cancellation would land here
        task = asyncio.current_task()
        assert task is not None
        reached.append(f"after the timeout block, cancelling={task.cancelling()}")

    with watch() as incidents:
        task = asyncio.create_task(caller())
        await gate.entered.wait()  # COMMIT is on its way, held by the gate
        [timeout] = timeouts
        timeout.reschedule(asyncio.get_running_loop().time())
        await until(timeout.expired)
        await gate.open()
        if await_inside:
            with pytest.raises(TimeoutError):
                await task
            assert reached == ["block returned"]
        else:
            await task
            assert reached == ["block returned", "after the timeout block, cancelling=0"]
        assert await names(Session) == ["slow commit"]
    incidents.assert_none()


@pytest.mark.parametrize("path", list(PATHS))
async def test_a_cancellation_during_commit_is_delivered_after_the_block(
    gated: tuple[SessionFactory, Gate], path: str
) -> None:
    """task.cancel() while COMMIT is on its way: the block returns normally (committed), and
    the task is cancelled at its next await."""
    Session, gate = gated
    gate.mode = "commit"
    reached: list[str] = []

    async def caller() -> None:
        await PATHS[path](Session, gate.name)
        reached.append("block returned")
        await one_iteration()
        reached.append("not reached")

    with watch() as incidents:
        task = asyncio.create_task(caller())
        await gate.entered.wait()
        task.cancel()
        await next_iteration()
        await gate.open()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert reached == ["block returned"]
        assert await names(Session) == ["slow commit"]
    incidents.assert_none()


# -- the outcome cannot be known ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # SQLite: no server to lose
async def test_a_connection_lost_during_commit_reports_an_unknown_outcome(
    gated: tuple[SessionFactory, Gate], backend: Backend
) -> None:
    """The server ends the connection while COMMIT waits in a deferred trigger: whether it
    was applied cannot be known, and the error says so instead of a bare connection error."""
    Session, gate = gated
    gate.mode = "commit"
    pids: list[int] = []

    async def caller() -> None:
        async with Session.begin() as session:
            pids.append(int(await session.scalar(text("SELECT pg_backend_pid()")) or 0))
            session.add(User(name=gate.name))

    task = asyncio.create_task(caller())
    await gate.entered.wait()
    await gate.holder.execute(text(f"SELECT pg_terminate_backend({pids[0]})"))
    with pytest.raises(
        asyncorm.TransactionOutcomeUnknownError,
        match=r"may or may not have been committed: COMMIT was sent, but the connection "
        r"failed before the database answered .*Do not simply run it again",
    ) as raised:
        await task
    assert isinstance(raised.value.__cause__, Exception)
    await gate.open()


async def test_a_commit_given_up_on_after_the_grace_period_reports_an_unknown_outcome(
    gated: tuple[SessionFactory, Gate], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled task stops waiting for a COMMIT that does not answer within the grace
    period; the caller learns that the outcome is unknown, not that it was cancelled."""
    monkeypatch.setattr(_cancellation, "CLEANUP_GRACE", 0.0)
    Session, gate = gated
    gate.mode = "commit"
    task = asyncio.create_task(sessionmaker_begin(Session, gate.name))
    await gate.entered.wait()
    task.cancel()
    await next_iteration()
    await next_iteration()
    await gate.open()
    with pytest.raises(
        asyncorm.TransactionOutcomeUnknownError,
        match=r"the task was cancelled while COMMIT was on its way",
    ):
        await task


# -- the common path costs nothing ----------------------------------------------------------


async def test_a_commit_creates_no_task(Session: SessionFactory) -> None:
    """The commit runs in the caller's task: no task per commit on any path, when nothing
    is cancelled (SQLAlchemy's ``Session.begin()`` ran its exit in a task of its own)."""
    for index, (path, run) in enumerate(PATHS.items()):
        with tasks_created() as created:
            await run(Session, f"user {index}")
        assert created == [], path
    assert await names(Session) == [f"user {index}" for index in range(len(PATHS))]


@contextmanager
def greenlets_entered() -> Iterator[list[greenlet.greenlet]]:
    """The greenlets other than the event loop's that were switched into while the block
    ran (each once): one per ``greenlet_spawn`` of SQLAlchemy's bridge."""
    entered: list[greenlet.greenlet] = []
    loop_greenlet = greenlet.getcurrent()

    def trace(event: str, args: Any) -> None:
        _origin, target = args
        if target is not loop_greenlet and target not in entered:
            entered.append(target)

    previous = greenlet.settrace(trace)
    try:
        yield entered
    finally:
        greenlet.settrace(previous)


@pytest.mark.parametrize("path", list(PATHS))
async def test_a_commit_flushes_and_commits_in_one_greenlet_as_sqlalchemy_does(
    engine: AsyncEngine, path: str
) -> None:
    """The cancellable flush and the held COMMIT run in one greenlet, the trip count of
    SQLAlchemy's own commit: with 20 sessions suspended mid-statement, each greenlet switch
    costs more, and a second trip per commit made asyncorm's unit of work slower than
    SQLAlchemy's (docs/performance.md)."""
    Session = asyncorm.async_sessionmaker(engine)
    plain = sa_asyncio.async_sessionmaker(engine)
    counts: dict[str, int] = {}
    for name, factory in (("asyncorm", Session), ("sqlalchemy", plain)):
        session = factory()
        try:
            if path == "transaction.commit()":
                transaction = await session.begin()
                session.add(User(name=f"{name} user"))
                with greenlets_entered() as entered:
                    await transaction.commit()
            elif path == "session.commit()":
                session.add(User(name=f"{name} user"))
                with greenlets_entered() as entered:
                    await session.commit()
            elif path == "session.begin()":
                block = session.begin()
                await block.__aenter__()
                session.add(User(name=f"{name} user"))
                with greenlets_entered() as entered:
                    await block.__aexit__(None, None, None)
            else:  # Session.begin(): its exit commits, then closes the session
                context = factory.begin()
                begun = await context.__aenter__()
                begun.add(User(name=f"{name} user"))
                with greenlets_entered() as entered:
                    await context.__aexit__(None, None, None)
        finally:
            await session.close()
        counts[name] = len(entered)
    # SQLAlchemy's Session.begin() spawns one greenlet more, for the close; asyncorm's close
    # of a session without a transaction needs none (only expunging: asyncorm._commit)
    closed = path == "Session.begin()"
    assert counts == {"asyncorm": 1, "sqlalchemy": 1 + closed}
    assert await names(Session) == ["asyncorm user", "sqlalchemy user"]


async def test_a_commit_hook_that_fails_reports_the_error(Session: SessionFactory) -> None:
    """A commit refused before COMMIT (a before_commit hook failing) raises its error and
    commits nothing; the session's block rolls back."""

    def refuse(session: Any) -> None:
        raise LookupError("refused by before_commit")

    async def refused() -> None:
        async with Session.begin() as session:
            event.listen(session.sync_session, "before_commit", refuse)
            session.add(User(name="refused"))

    async with Session.begin() as session:
        session.add(User(name="kept"))
    with pytest.raises(LookupError, match="refused by before_commit"):
        await refused()
    assert await names(Session) == ["kept"]


# -- found in review -----------------------------------------------------------------------------


async def test_a_cancellation_pending_when_commit_starts_rolls_back(
    engine: AsyncEngine, backend: Backend
) -> None:
    """Requested before commit() began (a timeout or task group landing in the same loop
    iteration as the flush's result), not yet delivered: COMMIT must not be sent."""
    Session = asyncorm.async_sessionmaker(engine)

    async def work() -> None:
        async with Session() as session:
            session.add(User(name="pending"))
            await session.flush()  # nothing left to flush at commit
            current = asyncio.current_task()
            assert current is not None
            current.cancel()
            await session.commit()

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(work())
    async with Session() as session:
        assert (await session.scalars(select(User.name))).all() == []
