"""aiosqlite, one trip to the connection's thread per statement.

aiosqlite runs each sqlite3 call on a thread of the connection's own, and every call is a
round trip between the event loop and that thread (a queue put, a thread wake-up, a future
resolved from the thread). SQLAlchemy's adapter makes four of them per statement: open a
cursor, execute, fetch the rows, close the cursor. This adapter, handed to SQLAlchemy through
``create_async_engine``'s documented ``module`` argument, subclasses SQLAlchemy's aiosqlite
adapter and does the same work in one trip: a function run on the connection's thread that
opens a sqlite3 cursor, executes, fetches the rows, keeps ``description``, ``rowcount`` and
``lastrowid``, and closes the cursor.

It also carries the transaction's ``BEGIN`` (which the SQLite profile only *queues*, see
:mod:`asyncorm._sqlite`) on the first statement's trip, and skips ``COMMIT``/``ROLLBACK`` for
a transaction that never sent anything. A request that reads one row costs two trips (BEGIN
with the SELECT, then ROLLBACK) instead of SQLAlchemy's five; one with the SQLite profile,
whose subclass (:mod:`asyncorm._inline_end`) ends a read snapshot on the event loop.

Calls that need more than one trip keep SQLAlchemy's behaviour: server-side cursors
(``stream()``) are SQLAlchemy's own, after sending a queued BEGIN.

The function is queued with aiosqlite's ``Connection._execute``, the one call aiosqlite
uses for each of its own methods; SQLAlchemy's adapter already reaches into the same
object's queue for its isolation-level setter.
"""

from __future__ import annotations

import collections
import sqlite3
from collections.abc import Callable
from typing import Any

import aiosqlite
from sqlalchemy.connectors.asyncio import AsyncAdapt_dbapi_connection
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
    AsyncAdapt_aiosqlite_ss_cursor,
)
from sqlalchemy.util import EMPTY_DICT

__all__ = ["OneTripConnection", "OneTripDBAPI"]

_Outcome = tuple[Any, int, int | None, list[Any], bool]
"""What one trip brings back: description, rowcount, lastrowid, rows, in_transaction."""


def _run(
    conn: sqlite3.Connection, begin: str | None, sql: str, params: Any, many: bool
) -> _Outcome:
    """Runs on the connection's thread: the whole statement, and a queued BEGIN before it."""
    if begin is not None:
        conn.execute(begin)
    cursor = conn.cursor()
    try:
        if many:
            cursor.executemany(sql, params)
        elif params is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, params)
        description = cursor.description
        rows = cursor.fetchall() if description is not None else []
        return description, cursor.rowcount, cursor.lastrowid, rows, conn.in_transaction
    finally:
        cursor.close()


class OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    """SQLAlchemy's aiosqlite cursor, one trip per execute; no aiosqlite cursor behind it."""

    __slots__ = ("_arraysize", "_description", "_lastrowid", "_rowcount")

    # nothing to close: each execute closes its sqlite3 cursor on the thread
    _awaitable_cursor_close = False

    def __init__(self, adapt_connection: AsyncAdapt_dbapi_connection) -> None:
        # SQLAlchemy's __init__ opens an aiosqlite cursor: a trip of its own, not needed here
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None  # type: ignore[assignment]
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None
        self._arraysize = 1

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> int:
        return self._lastrowid  # type: ignore[return-value]

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        await self._trip(operation, parameters, many=False)

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        await self._trip(operation, seq_of_parameters, many=True)

    async def _trip(self, sql: str, params: Any, *, many: bool) -> None:
        adapt = self._adapt_connection
        assert isinstance(adapt, OneTripConnection)
        async with adapt._execute_mutex:
            outcome = await adapt.call(adapt.take_queued_begin(), sql, params, many)
        self._description, self._rowcount, self._lastrowid, rows, _ = outcome
        self._rows = collections.deque(rows)


class OneTripSSCursor(AsyncAdapt_aiosqlite_ss_cursor):
    """SQLAlchemy's server-side cursor (``stream()``), sending a queued BEGIN first."""

    __slots__ = ()

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        adapt = self._adapt_connection
        assert isinstance(adapt, OneTripConnection)
        await adapt.send_queued_begin()
        return await super()._execute_async(operation, parameters)


class OneTripConnection(AsyncAdapt_aiosqlite_connection):
    """SQLAlchemy's aiosqlite connection adapter with one-trip cursors and a queued BEGIN."""

    __slots__ = ("_begun", "_queued_begin", "on_transaction_end", "read_since", "snapshot_only")

    _cursor_cls = OneTripCursor
    _ss_cursor_cls = OneTripSSCursor

    def __init__(self, dbapi: Any, connection: Any) -> None:
        super().__init__(dbapi, connection)
        self._queued_begin: str | None = None
        # whether a BEGIN may have reached the thread since the last COMMIT/ROLLBACK:
        # unlike sqlite3's in_transaction, it counts a call still queued or running
        self._begun = False
        self.on_transaction_end: Callable[[OneTripConnection], None] | None = None
        """Called after each COMMIT or ROLLBACK that completed (or had nothing to end); the
        SQLite profile sets it on a detached connection, which no pool checkin ends."""
        self.read_since: int | None = None
        """Set by the SQLite profile on an in-memory database, whose reads run outside a
        transaction: the engine's write generation at the transaction's first read."""
        self.snapshot_only = False
        """Set by the SQLite profile for a transaction begun deferred (a read snapshot) that
        has not taken the engine's writer turn yet; meaningful while a transaction is on."""

    def queue_begin(self, sql: str) -> None:
        """Send ``sql`` (a BEGIN) with the next statement, in the same trip."""
        self._queued_begin = sql

    def take_queued_begin(self) -> str | None:
        """The queued BEGIN, now on its way to the thread (the caller sends it)."""
        begin = self._queued_begin
        if begin is not None:
            self._queued_begin = None
            self._begun = True
        return begin

    async def send_queued_begin(self) -> None:
        begin = self.take_queued_begin()
        if begin is not None:
            await self.call(None, begin, None, False)

    async def call(self, begin: str | None, sql: str, params: Any, many: bool) -> _Outcome:
        """One trip to the thread: ``begin`` (if any), then ``sql``; track the transaction."""
        driver: Any = self._connection
        try:
            outcome: _Outcome = await driver._execute(_run, driver._conn, begin, sql, params, many)
        except Exception:
            self.settle()  # the call has finished: the BEGIN, or the statement, failed
            raise
        self._begun = outcome[4]
        return outcome

    def settle(self) -> None:
        """After a call that finished (not one cancelled on its way): the thread's own state.

        A BEGIN that failed ("database is locked" from another process), or a statement
        that made SQLite roll back by itself, leaves no transaction: the next statement must
        begin again.
        """
        try:
            self._begun = bool(self._connection.in_transaction)
        except ValueError:  # closed
            self._begun = False

    @property
    def may_be_in_transaction(self) -> bool:
        """Whether a transaction may be open on the thread, including calls still queued."""
        if self._begun:
            return True
        try:
            return bool(self._connection.in_transaction)
        except ValueError:  # aiosqlite's "no active connection": closed, nothing is open
            return False

    @property
    def transaction_started(self) -> bool:
        """Whether a BEGIN is queued, on its way, or done."""
        return self._queued_begin is not None or self.may_be_in_transaction

    def discard_queued_begin(self) -> None:
        """Forget a BEGIN that was never sent (the connection goes back to the pool)."""
        self._queued_begin = None

    def rollback(self) -> None:
        self._queued_begin = None
        self.read_since = None
        # no BEGIN sent: nothing to roll back, and no trip for sqlite3's no-op
        if self.may_be_in_transaction:
            self._end(super().rollback)
        if self.on_transaction_end is not None:
            self.on_transaction_end(self)

    def commit(self) -> None:
        self._queued_begin = None
        self.read_since = None
        if self.may_be_in_transaction:
            self._end(super().commit)
        if self.on_transaction_end is not None:
            self.on_transaction_end(self)

    def _end(self, call: Any) -> None:
        try:
            call()
        except Exception:
            self.settle()  # a failed COMMIT (a deferred constraint) leaves it open
            raise
        # a cancellation leaves _begun set: the COMMIT/ROLLBACK still runs on the thread,
        # and the pool's reset rolls back (queued behind it) before the next checkout
        self._begun = False


class OneTripDBAPI(AsyncAdapt_aiosqlite_dbapi):
    """SQLAlchemy's aiosqlite DBAPI shim, whose connections are :class:`OneTripConnection`.

    Passed to ``create_async_engine(url, module=OneTripDBAPI())``.
    """

    def __init__(self) -> None:
        super().__init__(aiosqlite, sqlite3)

    def connect(self, *arg: Any, **kw: Any) -> OneTripConnection:
        adapted = super().connect(*arg, **kw)
        return self.adapt(adapted._connection, kw)

    def adapt(self, driver: Any, connect_kwargs: dict[str, Any]) -> OneTripConnection:
        """The adapter for a connection ``connect(**connect_kwargs)`` opened: a subclass may
        choose another :class:`OneTripConnection`."""
        return OneTripConnection(self, driver)
