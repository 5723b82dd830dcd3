"""The SQLite profile: pragmas, real transactions and in-process writer serialisation.

pysqlite (and so aiosqlite) emits no BEGIN before a SELECT, so with SQLAlchemy's defaults a
read-modify-write transaction reads outside its transaction and concurrent ones lose updates.
Emitting plain ``BEGIN`` fixes the reads, but two deferred transactions that both read and
then write fail with "database is locked" when the second tries to upgrade its lock.

This profile follows the idea of SQLAlchemy's documented recipe for pysqlite transactions
(the driver's own transaction handling off, BEGIN emitted by SQLAlchemy's side), with three
changes:

* every transaction starts with ``BEGIN IMMEDIATE``, so it holds SQLite's write lock from its
  first read and no later write can fail or see a stale read;
* BEGIN is emitted before the transaction's first statement, from the dialect's
  ``do_execute`` events rather than the connection's ``begin`` event (a connection event
  makes every execute, commit and rollback of the engine dispatch events), and travels with
  that statement in the same trip to aiosqlite's thread (see :mod:`asyncorm._aiosqlite`). A
  transaction that sends no statement sends no BEGIN, COMMIT or ROLLBACK and takes no lock;
* the engine's transactions take turns on an :class:`asyncio.Lock` before they send BEGIN, so
  a waiting transaction awaits in the event loop instead of spinning in SQLite's busy
  handler. The lock is held from BEGIN until the connection returns to the pool, which a
  Session does when its transaction ends.

Other processes writing the same file are still handled by SQLite's busy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, ExecutionContext
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.util import await_

from ._aiosqlite import OneTripConnection, OneTripDBAPI
from ._errors import ConfigurationError, SQLiteWriteLockError, SQLiteWriteLockTimeout

__all__ = ["prepare"]

DEFAULT_TIMEOUT = 30.0
"""Seconds to wait for the write lock: SQLite's busy timeout and asyncorm's lock wait."""

_InstallHook = Callable[[AsyncEngine], None]


def _is_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def prepare(url: URL, kwargs: dict[str, Any]) -> tuple[URL, dict[str, Any], _InstallHook]:
    """Apply the SQLite profile to the URL and engine arguments."""
    connect_args = dict(kwargs.pop("connect_args", None) or {})
    raw_timeout = connect_args.get("timeout", url.query.get("timeout", DEFAULT_TIMEOUT))
    try:
        timeout = float(raw_timeout)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"SQLite timeout must be a number of seconds, got {raw_timeout!r}."
        ) from None
    connect_args["timeout"] = timeout
    # the driver's own implicit BEGIN handling off: the profile emits BEGIN itself
    connect_args.setdefault("isolation_level", None)
    kwargs["connect_args"] = connect_args
    # SQLAlchemy's aiosqlite adapter, one trip to the driver's thread per statement
    kwargs.setdefault("module", OneTripDBAPI())

    keeper: sqlite3.Connection | None = None
    if _is_memory(url):
        # One in-memory database per engine, shared by the engine's pooled connections,
        # each with a transaction of its own (the memdb VFS does proper locking). A
        # single-connection StaticPool would make concurrent sessions share a transaction.
        name = f"/asyncorm-{uuid.uuid4().hex}"
        url = url.set(database=f"file:{name}", query={"vfs": "memdb", "uri": "true"})
        # keeps the database alive while the engine exists, even with no connection open
        keeper = sqlite3.connect(f"file:{name}?vfs=memdb", uri=True, check_same_thread=False)
        label = "in-memory database"
        kwargs.setdefault("poolclass", AsyncAdaptedQueuePool)
    else:
        label = repr(url.database)
    autocommit = kwargs.get("isolation_level") == "AUTOCOMMIT"
    wal = keeper is None
    profile = _SQLiteProfile(label, timeout, autocommit=autocommit, wal=wal)

    def install(engine: AsyncEngine) -> None:
        profile.install(engine)
        if keeper is not None:
            weakref.finalize(engine.sync_engine, keeper.close)

    return url, kwargs, install


class _WriterSlot:
    """The write lock of one engine within one event loop, and who holds it."""

    __slots__ = ("holder", "lock", "since", "task")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.holder: object | None = None  # the holding pool entry's record_info
        self.task: asyncio.Task[Any] | None = None
        self.since = 0.0


class _SQLiteProfile:
    def __init__(self, label: str, timeout: float, *, autocommit: bool, wal: bool) -> None:
        self.label = label
        self.timeout = timeout
        self.autocommit = autocommit
        self.pragmas = ["PRAGMA foreign_keys=ON"]
        if wal:
            self.pragmas += ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL"]
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WriterSlot] = (
            weakref.WeakKeyDictionary()
        )

    def install(self, engine: AsyncEngine) -> None:
        sync_engine = engine.sync_engine
        event.listen(sync_engine, "connect", self._on_connect)
        # dialect events: unlike a connection event such as "begin", they add no work to
        # SQLAlchemy's executions, commits and rollbacks beyond the call itself
        dialect = sync_engine.dialect
        event.listen(dialect, "do_execute", self._on_execute)
        event.listen(dialect, "do_executemany", self._on_execute)
        event.listen(dialect, "do_execute_no_params", self._on_execute_no_params)
        event.listen(sync_engine, "checkin", self._on_return)
        event.listen(sync_engine, "detach", self._on_return)

    # -- events ---------------------------------------------------------------------------

    def _on_connect(self, dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for pragma in self.pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    def _on_execute(
        self, cursor: Any, statement: str, parameters: Any, context: ExecutionContext
    ) -> bool:
        self._ensure_transaction(context)
        return False  # SQLAlchemy executes the statement as usual

    def _on_execute_no_params(
        self, cursor: Any, statement: str, context: ExecutionContext
    ) -> bool:
        self._ensure_transaction(context)
        return False

    def _ensure_transaction(self, context: ExecutionContext) -> None:
        """Before a statement: take the write lock and BEGIN IMMEDIATE, unless already done."""
        conn = context.root_connection
        adapter = conn.connection.dbapi_connection
        if isinstance(adapter, OneTripConnection):
            if adapter.transaction_started:
                return
        elif conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
            return
        if self.autocommit or conn.get_execution_options().get("isolation_level") == (
            "AUTOCOMMIT"
        ):
            return
        record = conn.connection.record_info
        slot = self._slot()
        acquired = slot.holder is not record
        if acquired:
            self._acquire(slot, record)
        if isinstance(adapter, OneTripConnection):
            # sent with this statement, in the same trip to the driver's thread
            adapter.queue_begin("BEGIN IMMEDIATE")
            return
        try:
            # a user-given DBAPI module: a call to the driver's thread of its own
            await_(conn.connection.driver_connection.execute("BEGIN IMMEDIATE"))  # type: ignore[union-attr]
        except BaseException:
            if acquired:
                self._release(slot)
            raise

    def _on_return(self, dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        if isinstance(dbapi_connection, OneTripConnection):
            dbapi_connection.discard_queued_begin()
        record = connection_record.record_info
        for slot in list(self._slots.values()):
            if slot.holder is record:
                self._release(slot)

    # -- the lock -------------------------------------------------------------------------

    def _slot(self) -> _WriterSlot:
        loop = asyncio.get_running_loop()
        slot = self._slots.get(loop)
        if slot is None:
            slot = self._slots[loop] = _WriterSlot()
        return slot

    def _acquire(self, slot: _WriterSlot, record: object) -> None:
        task = asyncio.current_task()
        if slot.holder is not None and task is not None and slot.task is task:
            raise SQLiteWriteLockError(
                f"Task {task.get_name()!r} already holds the write lock of the SQLite "
                f"{self.label} through another connection (for {self._held_for(slot)}) and "
                f"now begins a second transaction; waiting for itself would deadlock. "
                f"SQLite runs one write transaction at a time: commit, roll back or close "
                f"the first session before beginning another in the same task, or use one "
                f"session for both."
            )
        try:
            await_(self._wait(slot, record, task))
        except TimeoutError:
            holder = slot.task.get_name() if slot.task is not None else "unknown"
            raise SQLiteWriteLockTimeout(
                f"Waited {self.timeout:g}s for the write lock of the SQLite {self.label}; "
                f"task {holder!r} has held it for {self._held_for(slot)}. Keep transactions "
                f"short (don't await other work inside them; a task awaiting children that use "
                f"the database must end its transaction first) or raise the engine's "
                f"connect_args={{'timeout': seconds}}."
            ) from None

    async def _wait(
        self, slot: _WriterSlot, record: object, task: asyncio.Task[Any] | None
    ) -> None:
        async with asyncio.timeout(self.timeout):
            await slot.lock.acquire()
        slot.holder, slot.task, slot.since = record, task, time.monotonic()

    @staticmethod
    def _release(slot: _WriterSlot) -> None:
        slot.holder = slot.task = None
        # RuntimeError: the lock's event loop is closed, so nobody can be waiting
        with contextlib.suppress(RuntimeError):
            slot.lock.release()

    @staticmethod
    def _held_for(slot: _WriterSlot) -> str:
        return f"{time.monotonic() - slot.since:.1f}s"
