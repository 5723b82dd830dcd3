"""SQLite: a read transaction ends on the event loop, without a trip to aiosqlite's thread.

A session that only read holds a WAL snapshot (``BEGIN`` deferred, see :mod:`asyncorm._sqlite`)
until it ends; ending it is a ``ROLLBACK`` (``close()``) or a ``COMMIT`` (``commit()``), and
either only releases the snapshot's read mark: no write, no I/O, no lock to wait for, a few
microseconds inside SQLite. Sent to aiosqlite's thread it costs a whole trip (a queue put, a
thread wake-up, a future resolved back in the loop): about half of a one-row request's wait.
This adapter runs it on the event loop's thread instead, directly on the ``sqlite3``
connection, when all of these hold (otherwise the trip, as before):

* the connection allows it: opened with ``check_same_thread=False`` (the SQLite profile's
  default; ``connect_args={"check_same_thread": True}`` or ``?check_same_thread=true`` in
  the URL turns this off) by an SQLite library in serialized mode (``sqlite3.threadsafety``
  == 3: SQLite's own mutex guards the connection, should the thread still finalise an object
  of a finished call, such as a cursor left unclosed, while the loop ends the transaction);
* aiosqlite's thread is idle on this connection: the last call queued to it has finished
  running there. A cancelled call (a statement whose task was cancelled) still runs on the
  thread; while it does, the end queues behind it as a trip. Every call aiosqlite queues
  passes through its ``Connection._execute`` (the funnel :mod:`asyncorm._aiosqlite` already
  uses); :func:`_track` wraps it on each connection so that the thread marks each call done
  (SQLAlchemy's isolation-level setter, which puts its call on aiosqlite's queue directly,
  is sent through ``_execute`` here);
* the transaction is a read snapshot that never took the writer turn
  (``OneTripConnection.snapshot_only``: no write was sent through SQLAlchemy) and SQLite's
  count of changed rows (``total_changes``) is the one at its BEGIN (no row was written
  another way: a user-defined function, the raw driver), and no call but the adapter's own
  went to the thread since its BEGIN (the raw driver's ``execute()`` may have sent DDL or a
  PRAGMA, which ``total_changes`` does not count: ``_Calls.foreign``).

Two threads never use the ``sqlite3`` connection at once: the loop touches it only while
the thread has nothing of this connection's to run, and nothing can be queued meanwhile
(the end runs without an await).
"""

from __future__ import annotations

import functools
import sqlite3
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy.util import await_

from ._aiosqlite import OneTripConnection, OneTripDBAPI, _run

__all__ = ["InlineEndConnection", "InlineEndDBAPI"]


class _Call:
    """A call queued to aiosqlite's thread, which marks itself done there once it has run."""

    __slots__ = ("args", "done", "fn", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> None:
        self.fn: Callable[..., Any] | None = fn
        self.args: tuple[Any, ...] = args
        self.kwargs: Any = kwargs
        self.done = False

    def __call__(self) -> Any:
        fn, args, kwargs = self.fn, self.args, self.kwargs
        assert fn is not None
        # released here, on the thread, before the call counts as done: what it held (an
        # aiosqlite method, a cursor of the connection's) is not kept by ``_Calls.last``
        # while the connection sits in the pool, nor finalised beside an inline end
        self.fn, self.args, self.kwargs = None, (), None
        try:
            return fn(*args, **kwargs)
        finally:
            del fn, args, kwargs
            self.done = True  # on the thread: nothing of this call runs any more


_OWN_CALLS = frozenset({"cursor", "fetchone", "fetchmany", "fetchall", "close"})
"""Names of the sqlite3 methods queued for SQLAlchemy's server-side cursor and for closing,
which send no statement; with :func:`asyncorm._aiosqlite._run` and the isolation-level
setter, the only calls that do not make a transaction *foreign*."""


class _Calls:
    """The last call queued to one connection's thread (calls run in order, one at a time)."""

    __slots__ = ("foreign", "last")

    def __init__(self) -> None:
        self.last: _Call | None = None
        self.foreign = False
        """Whether a call other than the adapter's own (the raw driver: ``execute()``,
        ``executescript()``, a cursor of aiosqlite's, ...) was queued since the transaction's
        BEGIN was prepared: what it sent is unknown (DDL, a PRAGMA that sets a value: SQLite's
        ``total_changes`` does not count them), so the transaction ends with a trip."""

    @property
    def idle(self) -> bool:
        last = self.last
        return last is None or last.done


async def _tracked_execute(
    driver_ref: weakref.ref[Any], calls: _Calls, fn: Any, *args: Any, **kwargs: Any
) -> Any:
    driver = driver_ref()
    if driver is None:  # pragma: no cover - the bound caller keeps the connection alive
        raise ValueError("no active connection")
    call = _Call(fn, args, kwargs)
    calls.last = call
    own = fn is _run or fn is _set_isolation_level
    if not own and getattr(fn, "__name__", None) not in _OWN_CALLS:
        calls.foreign = True
    # looked up on the class at each call, as aiosqlite's own methods do
    return await type(driver)._execute(driver, call)


def _track(driver: Any) -> _Calls:
    """Wrap the aiosqlite connection's ``_execute`` so that each call marks itself done.

    Set on the instance (aiosqlite's methods and cursors call ``self._execute``), holding the
    connection weakly, so that no reference cycle delays its finalisation.
    """
    calls = _Calls()
    driver._execute = functools.partial(_tracked_execute, weakref.ref(driver), calls)
    return calls


def _set_isolation_level(connection: sqlite3.Connection, value: str | None) -> None:
    connection.isolation_level = value  # type: ignore[assignment]


class InlineEndConnection(OneTripConnection):
    """:class:`OneTripConnection` whose read transactions end on the event loop.

    ``rollback()`` and ``commit()`` of a read snapshot run on the loop's thread when the
    conditions in this module's docstring hold, and as a trip to aiosqlite's thread otherwise.
    """

    __slots__ = ("_calls", "_changes_at_begin")

    def __init__(self, dbapi: Any, connection: Any, *, inline: bool) -> None:
        super().__init__(dbapi, connection)
        self._calls: _Calls | None = _track(connection) if inline else None
        self._changes_at_begin = -1

    def queue_begin(self, sql: str) -> None:
        super().queue_begin(sql)
        self._changes_at_begin = -1
        # only while the thread is idle (a cancelled call may still run there): the loop
        # never calls into the sqlite3 connection beside the thread; otherwise no inline end
        if self._calls is not None and self._calls.idle:
            self._calls.foreign = False
            try:
                self._changes_at_begin = self._connection._conn.total_changes
            except (ValueError, sqlite3.ProgrammingError):  # closed
                self._changes_at_begin = -1

    @property
    def isolation_level(self) -> str | None:
        return self._connection.isolation_level  # type: ignore[no-any-return]

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        """As SQLAlchemy's adapter does (on the thread), through ``_execute`` so that the call
        is tracked: SQLAlchemy's own setter puts it on aiosqlite's queue directly."""
        if self._calls is None:
            OneTripConnection.isolation_level.fset(self, value)  # type: ignore[attr-defined]
            return
        try:
            await_(self._connection._execute(_set_isolation_level, self._connection._conn, value))
        except Exception as error:
            self._handle_exception(error)

    @property
    def ends_inline(self) -> bool:
        """Whether ending the transaction now would run on the loop, without an await."""
        calls = self._calls
        if calls is None or not self.snapshot_only or not calls.idle or calls.foreign:
            return False
        raw: sqlite3.Connection | None = self._connection._connection
        if raw is None:
            return False
        try:
            return raw.total_changes == self._changes_at_begin
        except sqlite3.ProgrammingError:  # closed
            return False

    # ends_inline alone decides, as in ending_may_suspend (asyncorm._cancellation): what it
    # promises there (no await) must hold here; with nothing begun sqlite3's end is a no-op
    def rollback(self) -> None:
        if self.ends_inline:
            self._end_inline(sqlite3.Connection.rollback)
        else:
            super().rollback()

    def commit(self) -> None:
        if self.ends_inline:
            self._end_inline(sqlite3.Connection.commit)
        else:
            super().commit()

    def _end_inline(self, end: Callable[[sqlite3.Connection], None]) -> None:
        self._queued_begin = None
        self.read_since = None
        try:
            end(self._connection._conn)
        except Exception:
            self.settle()
            raise
        self._begun = False
        self.snapshot_only = False
        if self.on_transaction_end is not None:
            self.on_transaction_end(self)


class InlineEndDBAPI(OneTripDBAPI):
    """:class:`OneTripDBAPI` whose connections are :class:`InlineEndConnection`."""

    def adapt(self, driver: Any, connect_kwargs: dict[str, Any]) -> OneTripConnection:
        inline = (
            connect_kwargs.get("check_same_thread", True) is False
            and sqlite3.threadsafety == 3
            and "async_creator_fn" not in connect_kwargs
        )
        return InlineEndConnection(self, driver, inline=inline)
