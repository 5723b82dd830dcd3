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
* the engine's writers take turns on an :class:`asyncio.Lock` before their first write, so
  a waiting transaction awaits in the event loop instead of spinning in SQLite's busy
  handler. The lock is held until the transaction's COMMIT or ROLLBACK completes (or the
  connection is returned, invalidated or closed), whatever holds the connection meanwhile:
  a session whose flush failed keeps its connection until it is closed, but SQLAlchemy has
  already rolled its transaction back.

The lock belongs to the session or connection whose transaction took it, and its owner is the
task that opened that session (``_asyncorm_opened_by`` when the session records it, else the
task that began its transaction) or checked out that connection: not a helper task that sent
the first statement (``asyncio.wait_for`` on Python 3.11, the exit of SQLAlchemy's
``async_sessionmaker.begin()``). Waiting is a deadlock when the waiting task, or the owner of
the session it works for, owns the holder. Where the user's code took the lock is kept (a
frame walk when the lock is taken) for the messages.

Statements SQLite refuses or ignores inside a transaction (VACUUM, PRAGMA foreign_keys,
journal_mode, synchronous, temp_store, wal_checkpoint) run outside one when none is open, as
pysqlite does, taking turns on the lock for their duration; a user's own BEGIN replaces the
profile's.

Other processes writing the same file are still handled by SQLite's busy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import sqlite3
import sys
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import greenlet  # type: ignore[import-untyped]  # SQLAlchemy's asyncio bridge
import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext, ExecutionContext
from sqlalchemy.ext.asyncio import AsyncEngine, async_session
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.session import SessionTransactionOrigin
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.sql import CompoundSelect, Select
from sqlalchemy.util import await_

from ._aiosqlite import OneTripConnection
from ._errors import (
    ConfigurationError,
    ReadOnlySessionError,
    SQLiteWriteLockError,
    SQLiteWriteLockTimeout,
    WriteConflictError,
    shown_statement,
)
from ._inline_end import InlineEndDBAPI
from ._options import READ_ONLY

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
    # lets a read transaction end on the event loop when the driver's thread is idle
    # (asyncorm._inline_end); the driver's thread stays the only one running statements
    if "check_same_thread" not in url.query:  # the URL's own setting goes to sqlite3
        connect_args.setdefault("check_same_thread", False)
    kwargs["connect_args"] = connect_args
    # SQLAlchemy's aiosqlite adapter, one trip to the driver's thread per statement
    kwargs.setdefault("module", InlineEndDBAPI())

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
    foreign_keys = kwargs.pop("sqlite_foreign_keys", True)
    if not isinstance(foreign_keys, bool):
        raise ConfigurationError(
            f"sqlite_foreign_keys must be True (enforce foreign keys, the default) or False, "
            f"got {foreign_keys!r}."
        )
    profile = _SQLiteProfile(
        label, timeout, autocommit=autocommit, wal=wal, foreign_keys=foreign_keys
    )

    def install(engine: AsyncEngine) -> None:
        profile.install(engine)
        if keeper is not None:
            weakref.finalize(engine.sync_engine, keeper.close)

    return url, kwargs, install


_SESSION = "asyncorm.session"
"""Pool record info: a weak reference to the Session whose transaction uses the connection."""
_DECLARED = "asyncorm.declared"
"""Pool record info: the connection's Session transaction was begun explicitly
(``session.begin()``, ``Session.begin()``): a declared unit of work, begun IMMEDIATE."""
_SQLITE_BUSY_SNAPSHOT = 517
_OPENED_BY = "asyncorm.opened_by"
"""Pool record info: a weak reference to the task that checked the connection out."""

_SPECIAL = re.compile(
    r"\s*(?:(?P<outside>VACUUM|PRAGMA\s+(?:\w+\s*\.\s*)?"
    r"(?:foreign_keys|journal_mode|synchronous|temp_store|wal_checkpoint))|(?P<begin>BEGIN))\b",
    re.IGNORECASE,
)
"""Statements that SQLite refuses or ignores inside a transaction (run outside one when no
transaction is open, taking turns on the lock for their duration), and the user's own BEGIN
(which then takes the place of the profile's)."""

_profiled: weakref.WeakSet[Engine] = weakref.WeakSet()
_begun_by: weakref.WeakKeyDictionary[Session, weakref.ref[asyncio.Task[Any]]] = (
    weakref.WeakKeyDictionary()
)
"""The task in which each session's current outermost transaction was created (weakly: the
task's coroutines may refer to the session)."""

_LIBRARY_DIRS = (
    *(os.path.dirname(module.__file__ or "") + os.sep for module in (asyncio, sqlalchemy)),
    os.path.dirname(__file__) + os.sep,
    contextlib.__file__,
    functools.__file__,
    # SQLAlchemy's generated wrappers (Session._flush's deprecation wrapper, that every ORM
    # flush goes through): compiled under this file name, outside SQLAlchemy's directory
    "<sqlalchemy generated ",
)
_RUN_CALLBACK = asyncio.Handle._run.__code__
_is_library: dict[Any, bool] = {}
"""Code objects of SQLAlchemy, asyncio and asyncorm, skipped when naming the user's code."""


def _run(cursor: Any, statement: str, parameters: tuple[Any, ...]) -> None:
    """Execute as SQLAlchemy's do_execute/do_executemany/do_execute_no_params would."""
    if len(parameters) == 2:
        cursor.executemany(statement, parameters[0])
    elif parameters:
        cursor.execute(statement, parameters[0])
    else:
        cursor.execute(statement)


_Location = tuple[str, int, str]
"""A place in the user's code: file, line, function."""


class _Holding:
    """Who holds the write lock: a connection (``key``, its DBAPI connection), for what."""

    __slots__ = ("key", "owner", "since", "taker", "what", "where")

    def __init__(self, key: object, what: str, owner: asyncio.Task[Any] | None) -> None:
        self.key = key
        self.what = what  # "session <AsyncSession 0x..>" or "connection <Connection 0x..>"
        self.owner = owner  # the task that opened the session or connection
        self.taker: asyncio.Task[Any] | None = None  # the task that sent its first statement
        self.where: _Location | None = None  # where the user's code took the lock
        self.since = 0.0


class _WriterSlot:
    """The write lock of one engine within one event loop, and who holds it."""

    __slots__ = ("holding", "lock")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.holding: _Holding | None = None


def _install_session_events() -> None:
    """Listen (once per process) for the Session events that tell whose a connection is."""
    if event.contains(Session, "after_begin", _session_began):
        return
    from ._begin import NO_IO_ON_CREATE

    NO_IO_ON_CREATE.add(_transaction_created)  # no await in it: begin() needs no greenlet
    event.listen(Session, "after_transaction_create", _transaction_created)
    event.listen(Session, "after_begin", _session_began)


def _transaction_created(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # a sync Session, no event loop running
            return
        if task is not None:
            _begun_by[session] = weakref.ref(task)


def _session_began(session: Session, transaction: SessionTransaction, connection: Any) -> None:
    if connection.engine in _profiled:
        info = connection.info
        info[_SESSION] = weakref.ref(session)
        proxy = async_session(session)
        info[_DECLARED] = transaction.origin is SessionTransactionOrigin.BEGIN or bool(
            getattr(proxy, "write", False)
        )


_FIRST_WORD = re.compile(r"(?:\s|--[^\n]*|/\*.*?\*/|\()*(\w+)", re.DOTALL)
_DML_WORD = re.compile(r"\b(?:INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)
_READ_WORDS = frozenset({"select", "values", "explain"})
_PRAGMA = re.compile(r"\s*PRAGMA\s+(?:\w+\s*\.\s*)?(\w+)\s*(;|$|\(|=)?", re.IGNORECASE)
_PRAGMA_QUERIES = frozenset(
    {
        "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
        "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check",
        "function_list", "pragma_list", "collation_list", "database_list",
    }
)  # fmt: skip
"""PRAGMAs that only report, even with an argument in parentheses."""
_NEUTRAL_WORDS = frozenset({"savepoint", "release", "rollback"})
"""SAVEPOINT, RELEASE, ROLLBACK TO: a transaction's own bookkeeping, neither read nor write."""


def _text_writes(sql: str) -> bool:
    """Whether hand-written SQL may write (any doubt: yes). SQLite's SELECT cannot write
    (but through a user-defined function, which is not seen)."""
    match = _FIRST_WORD.match(sql)
    word = match.group(1).lower() if match else ""
    if word in _READ_WORDS or word in _NEUTRAL_WORDS:
        return False
    if word == "with":
        return _DML_WORD.search(sql) is not None
    if word == "pragma":
        pragma = _PRAGMA.match(sql)
        if pragma is None:
            return True
        name, follows = pragma.group(1).lower(), pragma.group(2)
        # "PRAGMA name" reports; "PRAGMA name = v" and "PRAGMA name(v)" set (but the queries)
        return (follows in ("=", "(") and name not in _PRAGMA_QUERIES) or name in (
            "optimize",
            "incremental_vacuum",
            "shrink_memory",
        )
    return True


def _writes(context: Any, statement: str) -> bool:
    """Whether a statement may write: DML and DDL compiled by SQLAlchemy, and hand-written
    SQL that is not a SELECT/VALUES/EXPLAIN, a WITH without DML, or a PRAGMA that only reads."""
    if context.isinsert or context.isupdate or context.isdelete or context.isddl:
        return True
    compiled = context.compiled
    if compiled is not None and isinstance(compiled.statement, Select | CompoundSelect):
        return False  # a SELECT built with SQLAlchemy (ORM selects included)
    # text(), text().columns() (which may be UPDATE ... RETURNING), exec_driver_sql(), a
    # construct of the user's own: judged by the SQL that is sent
    return _text_writes(statement)


def _code_location(owner: asyncio.Task[Any] | None) -> _Location | None:
    """Where the user's code is: the innermost frame that is not SQLAlchemy's, asyncio's or
    asyncorm's, in this greenlet, then in the task's coroutines; failing that (the current
    task is a helper, such as asyncio.wait_for's), where the owner task is awaiting."""
    frame: Any = sys._getframe(1)
    parent = greenlet.getcurrent().parent
    while True:
        while frame is not None:
            code = frame.f_code
            if code is _RUN_CALLBACK:
                break  # the event loop running the task: no code of the task's any more
            library = _is_library.get(code)
            if library is None:
                library = _is_library[code] = code.co_filename.startswith(_LIBRARY_DIRS)
            if not library:
                return code.co_filename, frame.f_lineno, code.co_name
            frame = frame.f_back
        if parent is None:
            break
        frame, parent = parent.gr_frame, None  # the task's coroutines, awaiting this greenlet
    if owner is not None and owner is not asyncio.current_task() and not owner.done():
        for frame in reversed(owner.get_stack()):
            code = frame.f_code
            if not code.co_filename.startswith(_LIBRARY_DIRS):
                return code.co_filename, frame.f_lineno, code.co_name
    return None


def _describe_location(where: _Location | None) -> str:
    """``path:line in function()`` for a message (the path relative to the working
    directory when it is inside it)."""
    if where is None:
        return "an unknown place (no code of the application on the stack)"
    path, line, function = where
    with contextlib.suppress(ValueError):  # another drive
        relative = os.path.relpath(path)
        if not relative.startswith(".."):
            path = relative
    return f"{path}:{line} in {function}()"


def _task_label(task: asyncio.Task[Any] | None) -> str:
    if task is None:
        return "code running outside any asyncio task"
    done = " (finished)" if task.done() else ""
    return f"task {task.get_name()!r}{done}"


class _SQLiteProfile:
    def __init__(
        self, label: str, timeout: float, *, autocommit: bool, wal: bool, foreign_keys: bool
    ) -> None:
        self.label = label
        self.timeout = timeout
        self.autocommit = autocommit
        self.wal = wal  # a WAL file: transactions that read begin deferred, on a snapshot
        self._generation = 0  # writer turns ended so far (see OneTripConnection.read_since)
        self.pragmas = [f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}"]
        if wal:
            self.pragmas += ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL"]
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WriterSlot] = (
            weakref.WeakKeyDictionary()
        )

    def install(self, engine: AsyncEngine) -> None:
        sync_engine = engine.sync_engine
        _install_session_events()
        _profiled.add(sync_engine)
        event.listen(sync_engine, "connect", self._on_connect)
        # dialect events: unlike a connection event such as "begin", they add no work to
        # SQLAlchemy's executions, commits and rollbacks beyond the call itself
        dialect = sync_engine.dialect
        event.listen(dialect, "do_execute", self._on_execute)
        event.listen(dialect, "do_executemany", self._on_executemany)
        event.listen(dialect, "do_execute_no_params", self._on_execute_no_params)
        event.listen(sync_engine, "checkout", self._on_checkout)
        event.listen(sync_engine, "checkin", self._on_checkin)
        event.listen(sync_engine, "invalidate", self._on_invalidate)
        event.listen(sync_engine, "detach", self._on_detach)
        event.listen(sync_engine, "close_detached", self._release)
        event.listen(sync_engine, "handle_error", self._on_error)

    # -- events ---------------------------------------------------------------------------

    def _on_connect(self, dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        if isinstance(dbapi_connection, OneTripConnection):
            # the writer turn ends with the transaction (a COMMIT or ROLLBACK that completed),
            # not when the connection returns to the pool: a session whose flush failed keeps
            # its connection until it is closed, but SQLAlchemy has rolled its transaction back
            dbapi_connection.on_transaction_end = self._release
        cursor = dbapi_connection.cursor()
        try:
            for pragma in self.pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    def _on_execute(
        self, cursor: Any, statement: str, parameters: Any, context: ExecutionContext
    ) -> bool:
        return self._ensure_transaction(cursor, statement, (parameters,), context)

    def _on_executemany(
        self, cursor: Any, statement: str, parameters: Any, context: ExecutionContext
    ) -> bool:
        return self._ensure_transaction(cursor, statement, (parameters, True), context)

    def _on_execute_no_params(
        self, cursor: Any, statement: str, context: ExecutionContext
    ) -> bool:
        return self._ensure_transaction(cursor, statement, (), context)

    def _on_checkout(
        self, dbapi_connection: Any, connection_record: ConnectionPoolEntry, proxy: Any
    ) -> None:
        info = connection_record.info
        task = asyncio.current_task()
        info[_OPENED_BY] = None if task is None else weakref.ref(task)
        info[_SESSION] = None
        info[_DECLARED] = False

    def _on_checkin(self, dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        if dbapi_connection is None:
            return  # invalidated: released then
        if isinstance(dbapi_connection, OneTripConnection):
            dbapi_connection.discard_queued_begin()
            dbapi_connection.snapshot_only = False
            dbapi_connection.read_since = None
        self._release(dbapi_connection)

    def _on_invalidate(
        self, dbapi_connection: Any, connection_record: ConnectionPoolEntry, exc: Any
    ) -> None:
        self._release(dbapi_connection)  # closed next: SQLite ends its transaction

    def _on_detach(self, dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        """A detached connection leaves the pool, so no checkin will release the lock: it
        releases it when its transaction ends (as every connection does, see ``_on_connect``)
        or when it is closed, and takes it again for its next transaction."""
        if (
            isinstance(dbapi_connection, OneTripConnection)
            and not dbapi_connection.transaction_started
        ):
            self._release(dbapi_connection)
        # another DBAPI module: the lock stays with the connection until it is closed

    def _ensure_transaction(
        self, cursor: Any, statement: str, parameters: tuple[Any, ...], context: ExecutionContext
    ) -> bool:
        """Before a statement: begin the transaction and take the writer turn as needed.

        A transaction is begun deferred (a read snapshot, no writer turn) when its first
        statement reads, on a WAL database, unless it is a declared unit of work; it takes
        the turn at its first write. Otherwise it takes the turn and begins IMMEDIATE.
        Returns True when the statement was run here (outside a transaction).
        """
        conn = context.root_connection
        fairy = conn.connection
        adapter = fairy.dbapi_connection
        one_trip = isinstance(adapter, OneTripConnection)
        if one_trip:
            if adapter.transaction_started:  # type: ignore[union-attr]
                if adapter.snapshot_only:  # type: ignore[union-attr]
                    return self._before_snapshot_statement(
                        adapter,  # type: ignore[arg-type]
                        conn,
                        cursor,
                        statement,
                        parameters,
                        context,
                    )
                if context.execution_options.get(READ_ONLY) and _writes(context, statement):
                    raise self._read_only(statement)  # a read-only IMMEDIATE (in memory)
                return False
        elif fairy.driver_connection.in_transaction:  # type: ignore[union-attr]
            if context.execution_options.get(READ_ONLY) and _writes(context, statement):
                raise self._read_only(statement)
            return False
        if self.autocommit or conn.get_execution_options().get("isolation_level") == (
            "AUTOCOMMIT"
        ):
            return False
        special = _SPECIAL.match(statement)
        read_only = context.execution_options.get(READ_ONLY, False)
        slot = self._slot()
        holding = slot.holding
        acquire = holding is None or holding.key is not adapter
        if read_only or (one_trip and special is None and acquire):
            # (a connection that still holds the turn, a Core connection between its
            # transactions, begins IMMEDIATE: it would only wait for itself later)
            writes = _writes(context, statement)
            if read_only and writes:
                raise self._read_only(statement)
            deferred = one_trip and special is None and not writes
            if deferred and (read_only or not conn.info.get(_DECLARED)):
                if self.wal:
                    adapter.snapshot_only = True  # type: ignore[union-attr]
                    adapter.queue_begin("BEGIN")  # type: ignore[union-attr]
                elif adapter.read_since is None:  # type: ignore[union-attr]
                    # in memory, no WAL: a deferred transaction's read lock would block
                    # every writer's COMMIT for as long as it lasts, so reads run outside a
                    # transaction, and the first write checks nobody wrote since
                    adapter.read_since = self._generation  # type: ignore[union-attr]
                return False
        if special is not None and special.lastgroup == "outside":
            self._run_outside(slot, conn, cursor, statement, parameters, acquire=acquire)
            return True
        if acquire:
            self._acquire(slot, conn)
        if one_trip and adapter.read_since is not None:  # type: ignore[union-attr]
            if adapter.read_since != self._generation:  # type: ignore[union-attr]
                self._release(adapter, changed=False)
                raise self._stale_in_memory(statement)
            adapter.read_since = None  # type: ignore[union-attr]
        if special is not None:
            if one_trip:
                adapter.snapshot_only = False  # type: ignore[union-attr]
            return False  # the user's own BEGIN begins the transaction
        if one_trip:
            # sent with this statement, in the same trip to the driver's thread
            adapter.snapshot_only = False  # type: ignore[union-attr]
            adapter.queue_begin("BEGIN IMMEDIATE")  # type: ignore[union-attr]
            return False
        try:
            # a user-given DBAPI module: a call to the driver's thread of its own
            await_(fairy.driver_connection.execute("BEGIN IMMEDIATE"))  # type: ignore[union-attr]
        except BaseException:
            if acquire:
                self._release(adapter)
            raise
        return False

    def _before_snapshot_statement(
        self,
        adapter: OneTripConnection,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: tuple[Any, ...],
        context: Any,
    ) -> bool:
        """A statement in a transaction begun deferred: its first write takes the turn.

        SQLite then upgrades the snapshot to a write transaction, or refuses: with
        SQLITE_BUSY_SNAPSHOT when another transaction committed since the snapshot began
        (turned into :class:`~asyncorm.WriteConflictError` by ``_on_error``), or with
        SQLITE_BUSY, without calling its busy handler, while another process holds the
        database's write lock: then the statement (which did nothing) is tried again until
        that process is done or the engine's timeout has passed. Returns True when the
        statement was run here.
        """
        if not _writes(context, statement):
            return False
        if context.execution_options.get(READ_ONLY, False):
            raise self._read_only(statement)
        slot = self._slot()
        holding = slot.holding
        if holding is None or holding.key is not adapter:
            self._acquire(slot, conn)
        adapter.snapshot_only = False
        deadline = time.monotonic() + self.timeout
        pause = 0.001
        while True:
            try:
                _run(cursor, statement, parameters)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                await_(asyncio.sleep(pause))  # another process writes: wait as SQLite would
                pause = min(pause * 2, 0.05)
                continue
            return True

    def _read_only(self, statement: str) -> ReadOnlySessionError:
        return ReadOnlySessionError(
            f"This session or connection is read-only (read_only=True), and the statement "
            f"{shown_statement(statement)!r} writes to the SQLite {self.label}; nothing was "
            f"sent. Use a session without read_only=True for work that writes."
        )

    def _conflict(
        self, refuser: str, statement: str | None, params: Any, orig: BaseException
    ) -> WriteConflictError:
        return WriteConflictError(
            f"Another transaction committed a write to the SQLite {self.label} after this "
            f"transaction's first read, so {refuser}: its reads may be stale, and writing "
            f"could lose the other update. Roll back and run the whole unit of work again "
            f"(safe to retry), or declare it with `async with Session.begin()` / "
            f"`session.begin()`, which begins IMMEDIATE: it takes its turn before its first "
            f"read and never conflicts.",
            statement,
            params,
            orig,
        )

    def _stale_in_memory(self, statement: str) -> WriteConflictError:
        stale = sqlite3.OperationalError("stale read: the database changed since the first read")
        refuser = "asyncorm refused this transaction's first write"
        return self._conflict(refuser, statement, None, stale)

    def _on_error(self, context: ExceptionContext) -> BaseException | None:
        """A lock wait that timed out sent nothing: the connection is fine (SQLAlchemy takes an
        asyncio TimeoutError for a lost connection, and a detached one would be dropped
        unclosed). SQLITE_BUSY_SNAPSHOT: a snapshot went stale before its first write."""
        orig = context.original_exception
        if isinstance(orig, SQLiteWriteLockError):
            context.is_disconnect = False
            return None
        if getattr(orig, "sqlite_errorcode", None) != _SQLITE_BUSY_SNAPSHOT:
            return None
        refuser = "SQLite refused this transaction's first write (SQLITE_BUSY_SNAPSHOT)"
        return self._conflict(refuser, context.statement, context.parameters, orig)

    def _run_outside(
        self,
        slot: _WriterSlot,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: tuple[Any, ...],
        *,
        acquire: bool,
    ) -> None:
        """Run a statement SQLite refuses or ignores in a transaction (VACUUM, PRAGMA
        foreign_keys, ...) outside one, as pysqlite does, taking turns on the lock for it."""
        if acquire:
            self._acquire(slot, conn)
        try:
            _run(cursor, statement, parameters)
        except Exception:
            if acquire:
                self._release(conn.connection.dbapi_connection)
            raise
        # a cancellation keeps the lock until the connection is returned: the statement
        # still runs on the driver's thread
        if acquire:
            self._release(conn.connection.dbapi_connection)

    # -- the lock -------------------------------------------------------------------------

    def _slot(self) -> _WriterSlot:
        loop = asyncio.get_running_loop()
        slot = self._slots.get(loop)
        if slot is None:
            slot = self._slots[loop] = _WriterSlot()
        return slot

    def _holding_for(self, conn: Connection) -> _Holding:
        """What takes the lock (a session, or a connection) and the task that opened it."""
        info = conn.info
        ref = info.get(_SESSION)
        sync_session = ref() if ref is not None else None
        key = conn.connection.dbapi_connection
        if sync_session is not None:
            proxy = async_session(sync_session)
            target: object = sync_session if proxy is None else proxy
            owner = getattr(target, "_asyncorm_opened_by", None)
            if owner is None and (begun_by := _begun_by.get(sync_session)) is not None:
                owner = begun_by()
            return _Holding(key, f"session <{type(target).__name__} {id(target):#x}>", owner)
        opened_by = info.get(_OPENED_BY)
        owner = opened_by() if opened_by is not None else None
        if owner is None:
            owner = asyncio.current_task()
        return _Holding(key, f"connection <Connection {id(conn):#x}>", owner)

    def _acquire(self, slot: _WriterSlot, conn: Connection) -> None:
        wanted = self._holding_for(conn)
        task = asyncio.current_task()
        held = slot.holding
        if held is not None and (
            held.taker is task or (held.owner is not None and held.owner in (task, wanted.owner))
        ):
            raise self._deadlock(held, wanted, task)
        try:
            await_(self._wait(slot))
        except TimeoutError:
            raise self._timed_out(slot.holding) from None
        wanted.taker, wanted.since = task, time.monotonic()
        wanted.where = _code_location(wanted.owner)
        slot.holding = wanted

    async def _wait(self, slot: _WriterSlot) -> None:
        async with asyncio.timeout(self.timeout):
            await slot.lock.acquire()

    def _release(self, key: object, *, changed: bool = True) -> None:
        """Release the lock wherever the connection ``key`` holds it; unless ``changed`` is
        False, count a write generation (the in-memory database's stale-read check)."""
        for slot in list(self._slots.values()):
            holding = slot.holding
            if holding is not None and holding.key is key:
                slot.holding = None
                if changed:
                    self._generation += 1
                # RuntimeError: the lock's event loop is closed, so nobody can be waiting
                with contextlib.suppress(RuntimeError):
                    slot.lock.release()

    def _deadlock(
        self, held: _Holding, wanted: _Holding, task: asyncio.Task[Any] | None
    ) -> SQLiteWriteLockError:
        owner = held.owner if held.owner is not None else held.taker
        waiter = _task_label(task)
        if task is not wanted.owner and wanted.owner is not None:
            waiter += f", working for {_task_label(wanted.owner)},"
        holder = _task_label(owner)
        return SQLiteWriteLockError(
            f"{holder[0].upper()}{holder[1:]} holds the write lock of the SQLite {self.label} "
            f"through {held.what} (begun at {_describe_location(held.where)}, "
            f"{self._held_for(held)} ago), and {waiter} now begins a transaction on "
            f"{wanted.what} at {_describe_location(_code_location(wanted.owner))}; waiting "
            f"for the lock would deadlock, as the first transaction cannot end while its own "
            f"task waits. SQLite runs one write transaction at a time: commit, roll back or "
            f"close the first session before beginning another in the same task, or use one "
            f"session for both."
        )

    def _timed_out(self, held: _Holding | None) -> SQLiteWriteLockTimeout:
        if held is None:
            holder = "its holder has just released it"
        else:
            owner = held.owner if held.owner is not None else held.taker
            holder = (
                f"{_task_label(owner)} has held it for {self._held_for(held)} through "
                f"{held.what}, begun at {_describe_location(held.where)}"
            )
        return SQLiteWriteLockTimeout(
            f"Waited {self.timeout:g}s for the write lock of the SQLite {self.label}; "
            f"{holder}. Keep transactions short (don't await other work inside them; a task "
            f"awaiting children that use the database must end its transaction first) or "
            f"raise the engine's connect_args={{'timeout': seconds}}."
        )

    @staticmethod
    def _held_for(holding: _Holding) -> str:
        return f"{time.monotonic() - holding.since:.1f}s"
