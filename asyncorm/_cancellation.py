"""Cancellation: roll back and keep the connection, instead of terminating it.

An asyncio task can be cancelled at any ``await``; inside a session that is usually an await
on the database driver. SQLAlchemy treats a cancellation there like a lost connection: the
connection is invalidated and closed, and the pool opens a new one for the next checkout.
This module makes cancellation cheap and clean, through SQLAlchemy's documented engine and
pool events:

* ``handle_error``: a cancellation during a statement, BEGIN, COMMIT or ROLLBACK is not a
  disconnect (``ExceptionContext.is_disconnect = False``). The connection stays with its
  owner, is rolled back when the session releases it, and goes back to the pool alive. It is
  marked *suspect* first.
* ``reset`` (a connection returning to the pool): a suspect asyncpg connection is repaired
  and checked before it is pooled again: pending cancellations settled, a transaction nobody
  tracks rolled back, a trial transaction run through SQLAlchemy's own adapter, nothing left
  open. A cancellation can interrupt asyncpg between its bookkeeping and the server (while it
  sends BEGIN, asyncpg keeps the failed transaction as the connection's top transaction, and
  the next BEGIN would become a SAVEPOINT of it); that one private asyncpg attribute is reset
  here. A connection that fails the check is discarded. aiosqlite needs no check: a cancelled
  call still completes on the connection's thread and the calls after it queue behind it.
* ``reset`` also does the pool's rollback-on-return (``pool_reset_on_return="rollback"``, the
  default) instead of SQLAlchemy's pool, which logs "Exception during reset or similar" and
  discards the connection when a cancellation lands in that rollback.

Cleanup that must not be abandoned halfway (``close()``, ``rollback()``, the checks above)
runs to completion: a cancellation arriving meanwhile is delivered once it has finished, with
:meth:`asyncio.Task.uncancel` keeping the task's cancellation count exact, so that
:func:`asyncio.timeout` and task groups still recognise their own cancellations.

A COMMIT on its way must not be interrupted either, but its caller must learn its outcome
rather than be told it was cancelled: :func:`hold_cancellations` awaits it in the caller's
own task (no task per commit) with cancellations held back, and :func:`deliver_later` hands
them back at the task's next suspension, unless their requester withdrew them meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool
from sqlalchemy.pool.base import PoolResetState
from sqlalchemy.util.concurrency import await_, greenlet_spawn

__all__ = [
    "CLEANUP_GRACE",
    "EngineHooks",
    "deliver_later",
    "ending_may_suspend",
    "hold_cancellations",
    "mark_cleanup_task",
    "raised_by_statement",
    "request_again",
    "run_to_completion",
    "wait_to_completion",
]

_T = TypeVar("_T")

CLEANUP_GRACE = 10.0
"""Seconds a cancelled task waits for cleanup (a ping, a connection check) to finish before
the cleanup itself is cancelled and the connection discarded."""

_SUSPECT = "asyncorm.cancelled"  # pool record info: a cancellation interrupted this connection

# Drivers whose connections survive a cancelled call (see the module docstring).
_KEEPS_CONNECTION = frozenset({"asyncpg", "aiosqlite"})


_IN_CLEANUP_TASK: ContextVar[bool] = ContextVar("asyncorm_in_cleanup_task", default=False)


def mark_cleanup_task() -> None:
    """Declare the current task a cleanup task that its creator already protects.

    Called first thing in a task that exists only to run cleanup and that nobody cancels
    (its creator awaits it through :func:`asyncio.shield`, or not at all): inside it,
    :func:`run_to_completion` awaits its coroutine directly instead of in one more task.
    The mark lives in the task's own context, so it never reaches the task's creator.
    """
    _IN_CLEANUP_TASK.set(True)


async def run_to_completion(coro: Coroutine[Any, Any, _T]) -> _T:
    """Await ``coro`` in a task of its own, and wait for it to finish even if the caller is
    cancelled meanwhile.

    The caller never returns while its cleanup still runs in the background. A cancellation
    of the caller is held back until ``coro`` has finished and then raised, whatever ``coro``
    ended with: an exception raised by ``coro`` is chained to it as ``__cause__``, so that the
    caller still ends cancelled (its task's cancellation count intact, for
    :func:`asyncio.timeout` and task groups). If ``coro`` has not finished
    :data:`CLEANUP_GRACE` seconds after the cancellation, ``coro`` is cancelled, waited for,
    and the cancellation raised.
    """
    if _IN_CLEANUP_TASK.get():
        return await coro  # already in a protected cleanup task (see mark_cleanup_task)
    loop = asyncio.get_running_loop()
    task = loop.create_task(coro)
    cancelled: asyncio.CancelledError | None = None
    deadline = 0.0
    while not task.done():
        try:
            if cancelled is None:
                await asyncio.wait((task,))
            elif loop.time() < deadline:
                await asyncio.wait((task,), timeout=deadline - loop.time())
            else:
                task.cancel()
                await asyncio.wait((task,))
        except asyncio.CancelledError as exc:
            if cancelled is None:
                deadline = loop.time() + CLEANUP_GRACE
                cancelled = exc
    if cancelled is None:
        return task.result()  # raises what ``coro`` raised (a CancelledError if it was)
    if not task.cancelled() and (error := task.exception()) is not None:
        raise cancelled from error
    raise cancelled


async def hold_cancellations(
    coro: Coroutine[Any, Any, _T],
    held: list[asyncio.CancelledError],
    holding: Callable[[], bool] | None = None,
) -> _T:
    """Await ``coro`` in the current task, holding back cancellations until it has finished.

    For work that must not be interrupted and whose outcome the caller must learn (a COMMIT
    on its way to the database): unlike :func:`run_to_completion` it creates no task and
    raises nothing of its own. ``coro`` is stepped here, in the current task (same context,
    same ``current_task()``), and each future it waits for is awaited through a future of
    this function's own, so that a cancellation of the task cancels that one and never
    reaches ``coro``. Cancellations that arrive meanwhile are appended to ``held``; the caller
    decides what to do with them (:func:`deliver_later`, or raise one). The count of
    cancellation requests is left as it is.

    If ``coro`` is still waiting :data:`CLEANUP_GRACE` seconds after the first cancellation,
    the future it waits for is cancelled, as the task's cancellation would have done, and
    ``coro`` goes on from there (it typically raises a ``CancelledError``).

    With ``holding``, cancellations are held only from the first time ``holding()`` returns
    true (it is asked each time ``coro`` waits): before that, ``coro`` is awaited as if
    directly, and a cancellation reaches it where it waits. So one coroutine can run a
    stretch that a cancellation may interrupt (a flush) and then one it may not (the COMMIT
    after it), without the cost of awaiting two.

    Example::

        held: list[asyncio.CancelledError] = []
        await hold_cancellations(session_commit(), held)
        deliver_later(held)
    """
    loop = asyncio.get_running_loop()
    gave_up = False
    deadline = 0.0
    throw: BaseException | None = None
    try:
        while True:
            try:
                yielded = coro.send(None) if throw is None else coro.throw(throw)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            throw = None
            if yielded is not None:  # a future (None: a bare yield, as asyncio.sleep(0)'s)
                if not getattr(yielded, "_asyncio_future_blocking", False):
                    throw = RuntimeError(f"hold_cancellations() cannot wait for {yielded!r}")
                    continue
                yielded._asyncio_future_blocking = False
            if holding is not None:
                if not holding():
                    # not holding yet: wait as the task would for ``coro`` itself (inline:
                    # no coroutine of its own, no frame, per wait)
                    if yielded is None:
                        try:
                            await asyncio.sleep(0)
                        except asyncio.CancelledError as exc:
                            throw = exc
                        continue
                    passed: asyncio.Future[Any] = yielded
                    try:
                        await passed  # the task's cancel() cancels this very future
                    except BaseException as exc:
                        if not passed.cancelled() and not (
                            passed.done() and passed.exception() is exc
                        ):
                            throw = exc  # the task was cancelled after the future was done
                        # else the future's own outcome: the coroutine reads it
                    continue
                holding = None  # from now on, until the end
            if yielded is None:  # let the loop run once
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError as exc:
                    held.append(exc)
                    deadline = deadline or loop.time() + CLEANUP_GRACE
                continue
            future: asyncio.Future[Any] = yielded
            while not future.done():
                waiter = loop.create_future()

                def wake(_: object, waiter: asyncio.Future[None] = waiter) -> None:
                    if not waiter.done():
                        waiter.set_result(None)

                future.add_done_callback(wake)
                timer = loop.call_at(deadline, wake, None) if held and not gave_up else None
                try:
                    await waiter
                except asyncio.CancelledError as exc:
                    if gave_up:
                        future.cancel()  # as the task's cancellation would have done
                    else:
                        held.append(exc)
                        deadline = deadline or loop.time() + CLEANUP_GRACE
                finally:
                    future.remove_done_callback(wake)
                    if timer is not None:
                        timer.cancel()
                if held and not gave_up and not future.done() and loop.time() >= deadline:
                    gave_up = True
                    future.cancel()
    finally:
        coro.close()  # a no-op once it has finished; otherwise what a dropped task does


def deliver_later(held: list[asyncio.CancelledError]) -> None:
    """Request the ``held`` cancellations again, at the current task's next suspension.

    Unless they were taken back by then: when the party that requested a cancellation
    withdraws it with :meth:`asyncio.Task.uncancel` before the task next waits (an
    :func:`asyncio.timeout` block or a task group exited meanwhile, having seen no
    ``CancelledError``), it is not delivered. That is what Python 3.13's ``uncancel()`` does
    with a pending request; on 3.11 and 3.12 a request made at once with
    :meth:`asyncio.Task.cancel` (as :func:`request_again` does) would stay pending after the
    ``asyncio.timeout`` block that withdrew it and cancel the task outside it with a bare
    ``CancelledError`` instead of ``TimeoutError``. So the request is made from a loop
    callback, once the task has suspended: the count of requests is checked then, and kept
    exact (``uncancel()`` before ``cancel()``).

    A task that finishes before it next suspends finishes normally.
    """
    if not held:
        return
    task = asyncio.current_task()
    assert task is not None
    count = len(held)
    message = held[0].args[0] if held[0].args else None

    def deliver() -> None:
        if task.done():
            return
        still = min(count, task.cancelling())
        for _ in range(still):
            task.uncancel()
        for _ in range(still):
            task.cancel(message)

    task.get_loop().call_soon(deliver)


def wait_to_completion(fn: Callable[..., _T], *args: Any) -> _T:
    """Run the sync ``fn(*args)`` (which may ``await_()``) to completion from greenlet code.

    Called where SQLAlchemy is mid-way through pool bookkeeping, in which an exception would
    cost the connection. A cancellation that arrives meanwhile is held back until ``fn`` has
    finished and then requested again, so that it lands at the caller's next await. If ``fn``
    has not finished :data:`CLEANUP_GRACE` seconds after the cancellation, ``fn`` is cancelled
    and the cancellation raised at once.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(greenlet_spawn(fn, *args))
    deferred: list[asyncio.CancelledError] = []
    deadline = 0.0
    while not task.done():
        try:
            if not deferred:
                await_(asyncio.wait((task,)))
            elif loop.time() < deadline:
                await_(asyncio.wait((task,), timeout=deadline - loop.time()))
            else:
                task.cancel()
                await_(asyncio.wait((task,)))
        except asyncio.CancelledError as exc:
            if not deferred:
                deadline = loop.time() + CLEANUP_GRACE
            deferred.append(exc)
    if deferred:
        if task.cancelled():  # given up on: the caller's cancellation goes on from here
            raise deferred[0]
        request_again(deferred)
    return task.result()


class EngineHooks:
    """The engine listeners of this module, and the pool option they take over.

    ``pool_reset_on_return="rollback"`` (SQLAlchemy's default) is done by the ``reset``
    listener here instead of by SQLAlchemy's pool, which treats a cancellation arriving in
    that rollback as a broken connection (discarded, and logged as "Exception during reset or
    similar"). Other ``pool_reset_on_return`` values are left to SQLAlchemy.
    """

    def __init__(self, engine_kwargs: dict[str, Any]) -> None:
        reset = engine_kwargs.pop("pool_reset_on_return", "rollback")
        self.rollback_on_return = reset in ("rollback", True)
        engine_kwargs["pool_reset_on_return"] = None if self.rollback_on_return else reset

    def install(self, engine: AsyncEngine) -> None:
        """Listen on ``engine``'s events."""
        sync_engine = engine.sync_engine
        dialect = sync_engine.dialect
        checks_suspects = dialect.driver == "asyncpg"
        rollback_on_return = self.rollback_on_return

        def reset(
            dbapi_connection: Any,
            record: ConnectionPoolEntry | None,
            reset_state: PoolResetState,
        ) -> None:
            if not reset_state.asyncio_safe or record is None:
                return  # garbage collected, or detached from the pool: being closed
            if record.info.pop(_SUSPECT, False) and checks_suspects:
                if not wait_to_completion(_asyncpg_is_clean, dbapi_connection):
                    record.invalidate()
                return
            if not rollback_on_return:
                return
            # even when SQLAlchemy says it reset the transaction: after a failed or cancelled
            # COMMIT it did not, and SQLite would keep the transaction (and its lock) open
            if not _transaction_open(dbapi_connection, record.driver_connection):
                return  # SQLAlchemy's reset would still cost a trip to aiosqlite's thread
            try:
                dialect.do_rollback(dbapi_connection)
            except asyncio.CancelledError as exc:
                # The connection is pooled only once its state is known. asyncpg's after a
                # cancelled ROLLBACK is settled and checked; aiosqlite's cancelled ROLLBACK
                # still runs on the connection's thread, but its adapter does not know when
                # it has (it would take the next checkout's first statement for one inside a
                # transaction and send no BEGIN): one more ROLLBACK, queued behind it and
                # waited for, ends what is left and settles the adapter's bookkeeping.
                check = _asyncpg_is_clean if checks_suspects else _rolled_back
                if not wait_to_completion(check, dbapi_connection):
                    record.invalidate()
                request_again([exc])

        if dialect.driver in _KEEPS_CONNECTION:
            event.listen(sync_engine, "handle_error", _keep_connection_on_cancel)
        event.listen(sync_engine, "handle_error", _note_statement_error)
        event.listen(sync_engine, "reset", reset)


def request_again(cancellations: list[asyncio.CancelledError]) -> None:
    """Re-request cancellations that were caught, so they land at the task's next await.

    :meth:`asyncio.Task.uncancel` first, so the task's cancellation count stays what it was.
    """
    task = asyncio.current_task()
    assert task is not None
    for _ in cancellations:
        task.uncancel()
    message = cancellations[0].args[0] if cancellations[0].args else None
    for _ in cancellations:
        task.cancel(message)


def ending_may_suspend(connection: Connection) -> bool:
    """Whether ending ``connection``'s transaction and returning it to the pool may await IO.

    Not when it is closed, nor when the driver has no transaction open on it (counting calls
    still on their way) or only a SQLite read snapshot that ends on the loop, no cancellation
    interrupted it, it has no isolation level to reset and its queue pool will keep it: its
    rollback, the pool's reset and the checkin then run without a single await.
    """
    if connection.closed:
        return False
    if connection.invalidated or connection.info.get(_SUSPECT):
        return True
    if "isolation_level" in connection.get_execution_options():
        return True  # the pool resets it at checkin: a trip to aiosqlite's thread
    pooled = connection.connection
    dbapi_connection = pooled.dbapi_connection
    if _transaction_open(dbapi_connection, pooled.driver_connection) and not getattr(
        dbapi_connection, "ends_inline", False
    ):
        return True  # (a SQLite read snapshot ends on the loop: asyncorm._inline_end)
    # the pool keeps it rather than closing it (NullPool, an overflow connection)
    pool = connection.engine.pool
    return not (isinstance(pool, QueuePool) and pool.checkedin() < pool.size())


def _transaction_open(dbapi_connection: Any, driver: Any) -> bool:
    """Whether the driver says a transaction is open; both drivers know it without IO."""
    if _counts_queued(dbapi_connection.__class__):  # asyncorm's aiosqlite adapter
        return bool(dbapi_connection.may_be_in_transaction)
    if driver is None:
        return True
    if hasattr(driver, "is_in_transaction"):  # asyncpg
        return bool(driver.is_in_transaction())
    return bool(getattr(driver, "in_transaction", True))  # aiosqlite (sqlite3's attribute)


_FROM_STATEMENT = "_asyncorm_from_statement"


def _note_statement_error(context: ExceptionContext) -> None:
    """Mark an exception that a statement raised and SQLAlchemy does not wrap in a DBAPIError
    (a cancellation, an OSError such as SQLite's writer-turn timeout), as a DBAPIError's
    ``statement`` marks it: see :func:`raised_by_statement`. Not a COMMIT sent as a statement
    (two-phase ``COMMIT PREPARED``, a user's own ``COMMIT``)."""
    statement = context.statement
    if (
        statement is not None
        and context.sqlalchemy_exception is None
        and not statement.lstrip().upper().startswith("COMMIT")
    ):
        with contextlib.suppress(AttributeError, TypeError):  # a type without a __dict__
            setattr(context.original_exception, _FROM_STATEMENT, True)


def raised_by_statement(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by a statement (its execution, or what the engine's
    listeners do before it) of an engine of asyncorm's. During a commit, that is the flush
    of objects a ``before_commit`` hook added: COMMIT had not been sent."""
    return getattr(exc, _FROM_STATEMENT, False) is True


@functools.cache
def _counts_queued(adapter_class: type) -> bool:
    """Whether DBAPI adapters of ``adapter_class`` have asyncorm's ``may_be_in_transaction``
    (counting calls still queued). Asked of the class, once: on SQLAlchemy's adapters, which
    forward unknown attributes to the driver through ``__getattr__``, a missing attribute
    costs a raised AttributeError."""
    return hasattr(adapter_class, "may_be_in_transaction")


def _keep_connection_on_cancel(context: ExceptionContext) -> None:
    connection = context.connection
    if (
        context.is_disconnect
        and not context.is_pre_ping
        and isinstance(context.original_exception, asyncio.CancelledError)
        and connection is not None
        and not connection.closed
        and not connection.invalidated
    ):
        try:
            info = connection.info
        except NotImplementedError:
            return  # the engine's first connect (SQLAlchemy's ad-hoc proxy): let it go
        context.is_disconnect = False
        info[_SUSPECT] = True


def _rolled_back(dbapi_connection: Any) -> bool:
    """Roll back (again) to completion; whether nothing is left open."""
    try:
        dbapi_connection.rollback()
    except Exception:
        return False
    return not _transaction_open(dbapi_connection, dbapi_connection.driver_connection)


def _asyncpg_is_clean(dbapi_connection: Any) -> bool:
    """Repair a cancelled asyncpg connection; whether it can serve the next checkout."""
    driver = dbapi_connection.driver_connection
    autocommit = dbapi_connection.autocommit
    try:
        dbapi_connection.rollback()  # the transaction SQLAlchemy's adapter knows about
        await_(driver.execute("SELECT 1"))  # waits until asyncpg has settled a pending cancel
        if driver.is_in_transaction():
            # a transaction nobody tracks: BEGIN was interrupted after it was sent
            await_(driver.execute("ROLLBACK"))
        if getattr(driver, "_top_xact", None) is not None:
            # asyncpg keeps a transaction whose start() was interrupted as the connection's
            # top transaction (state "failed"), which would make the next BEGIN a SAVEPOINT;
            # nothing else can hold it here (the adapter's transaction has ended)
            driver._top_xact = None
        dbapi_connection.autocommit = False
        cursor = dbapi_connection.cursor()  # a trial transaction, begun as the next user's
        try:
            cursor.execute("SELECT 1")
        finally:
            cursor.close()
        dbapi_connection.rollback()
        return not driver.is_in_transaction()
    except Exception:
        return False
    finally:
        dbapi_connection.autocommit = autocommit
