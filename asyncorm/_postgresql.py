"""The PostgreSQL profile: asyncpg, a cheap pre-ping, and BEGIN deferred past plain reads.

Pre-ping.

SQLAlchemy's ``pool_pre_ping`` on asyncpg opens a transaction to ping (BEGIN, ``;``,
ROLLBACK: three round trips) on every checkout, which triples the cost of a short request.
This profile keeps the protection with less traffic, through the pool's documented
``checkout`` event, raising :class:`~sqlalchemy.exc.DisconnectionError` for a dead connection
so the pool replaces it:

* a connection whose socket the server already closed (restart, ``pg_terminate_backend``,
  ``idle_session_timeout``) is known dead without a round trip (asyncpg's ``is_closed()``);
* a connection that has sat in the pool for ``pool_pre_ping_after`` seconds or more (5 by
  default) is pinged with one simple-protocol round trip, which also works through pgbouncer;
  0 pings on every checkout;
* so is a connection the server sent anything to while it sat in the pool (the FATAL error a
  terminated backend sends before closing the socket, which would leave asyncpg refusing the
  next query; see :mod:`asyncorm._asyncpg`).

Connections are opened in a context of their own (:mod:`asyncorm._asyncpg`).

Deferred BEGIN. Under READ COMMITTED, PostgreSQL's default, every statement sees a fresh
snapshot whether or not it runs inside a transaction block, so a plain read returns exactly
the same rows with or without a ``BEGIN`` before it. A plain read is a ``SELECT`` built with
SQLAlchemy (both the compiled statement, ORM expressions expanded, and the SQL text sent to
the driver, with what ``TypeDecorator.column_expression()`` and the like add, are judged once
per cached statement: see :mod:`asyncorm._plainread`) with no ``FOR UPDATE``/``FOR SHARE``,
no ``INTO``, no data-modifying CTE (``INSERT``/``UPDATE``/``DELETE``/``MERGE`` anywhere in
it), no clock (``now()``, ``CURRENT_TIMESTAMP``), no ``text()`` or literal SQL, no
user-defined operator, and no function but PostgreSQL's own side-effect-free ones
(``count``, ``lower``, ...) called unqualified; not streamed through a server-side cursor.
While no transaction block is open, the profile runs each plain read with the driver in
autocommit (on SQLAlchemy's ``do_execute`` dialect event): a request that only reads costs
one round trip instead of three (BEGIN, SELECT, ROLLBACK), and the first other statement (a
flush, ``FOR UPDATE``, ``text()``, ``exec_driver_sql()``, a savepoint) sends BEGIN first, so
everything from there on is one atomic transaction, as usual. What SQL text cannot show is
not seen: a view over a function that writes, or a table column name that PostgreSQL
resolves as a function call. Transactions under another isolation level, read-only ones
(``postgresql_readonly``, a session with ``read_only=True``: the server enforces them) or
with ``postgresql_deferrable`` always begin at once, and so do those of a connection whose
search path holds a function named like one the judge trusts (``public.lower(bigint)``, an
overload PostgreSQL may pick over its own), and those
of a connection whose session default is another isolation level (a ``connect`` listener's
``SET SESSION CHARACTERISTICS``, ``ALTER DATABASE/ROLE ... SET
default_transaction_isolation``): the default is read once per physical connection.
``create_engine(url, defer_begin=False)`` turns it off.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, ExceptionContext, ExecutionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.util import await_

from . import _asyncpg, _lost, _pgbouncer, _pgparams
from ._cancellation import wait_to_completion
from ._engine import redact_url
from ._errors import ConfigurationError, ReadOnlySessionError, shown_statement
from ._options import READ_ONLY
from ._plainread import SAFE_CALLS, is_plain_read

__all__ = ["prepare"]

DEFAULT_PING_AFTER = 5.0
"""Seconds a pooled connection may sit idle before its next checkout pings it."""

_IDLE = "asyncorm_idle"
"""A pooled connection's entry: (when it was returned, its watch (:mod:`asyncorm._asyncpg`),
what the server had sent by then)."""


def prepare(
    url: URL, kwargs: dict[str, Any]
) -> tuple[URL, dict[str, Any], Callable[[AsyncEngine], None]]:
    """Apply the PostgreSQL profile; ``pool_pre_ping`` (default True) is asyncorm's ping,
    ``pgbouncer=True`` makes it safe behind pgbouncer's transaction pooling."""
    pre_ping = kwargs.pop("pool_pre_ping", True)
    defer_begin = kwargs.pop("defer_begin", True)
    isolation = kwargs.get("isolation_level")
    ping_after = kwargs.pop("pool_pre_ping_after", DEFAULT_PING_AFTER)
    if not isinstance(ping_after, int | float) or ping_after < 0:
        raise ConfigurationError(
            f"pool_pre_ping_after must be a number of seconds >= 0, got {ping_after!r}."
        )
    if kwargs.get("async_creator") is not None:  # bypasses do_connect: wrapped here
        kwargs["async_creator"] = _asyncpg.in_own_context(kwargs["async_creator"])
    shown = redact_url(url)
    _pgbouncer.configure(url, kwargs, shown)  # pgbouncer=True: no prepared statement kept
    connect_args = _server_settings(kwargs, shown)
    url, params = _pgparams.translate(url, shown, connect_args)

    def install(engine: AsyncEngine) -> None:
        _asyncpg.install(engine, params)
        _lost.install(engine)
        event.listen(engine.sync_engine, "handle_error", _read_only_refused)
        if pre_ping:
            _PrePing(float(ping_after)).install(engine)
        if defer_begin and _read_committed(isolation):
            _DeferredBegin().install(engine)

    return url, kwargs, install


def _server_settings(kwargs: dict[str, Any], shown: str) -> dict[str, Any]:
    """``statement_timeout`` and ``lock_timeout`` (seconds, or PostgreSQL's ``'5s'``) as
    settings sent when each connection starts: no round trip. Returns ``connect_args``."""
    connect_args = dict(kwargs.get("connect_args") or {})
    settings = dict(connect_args.get("server_settings") or {})
    for name in _TIMEOUTS:
        value = kwargs.pop(name, None)
        if value is None:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            settings[name] = f"{round(value * 1000)}ms"
        elif isinstance(value, str) and value.strip():
            settings[name] = value
        else:
            raise ConfigurationError(
                f"{name} must be a number of seconds >= 0 (0: no limit) or a PostgreSQL "
                f"duration such as '5s', got {value!r} for {shown!r}."
            )
    if settings:
        connect_args["server_settings"] = settings
        kwargs["connect_args"] = connect_args
    return connect_args


_TIMEOUTS = ("statement_timeout", "lock_timeout")


def _read_only_refused(context: ExceptionContext) -> BaseException | None:
    """A write refused in a READ ONLY transaction (SQLSTATE 25006): ReadOnlySessionError."""
    if getattr(context.original_exception, "sqlstate", None) != "25006":
        return None
    shown = shown_statement(context.statement or "")
    read_only = context.execution_context is not None and (
        context.execution_context.execution_options.get(READ_ONLY, False)
    )
    who = "This session is read-only (read_only=True)" if read_only else (
        "This transaction is READ ONLY"
    )
    error = ReadOnlySessionError(
        f"{who}, and PostgreSQL refused the statement {shown!r}, which writes; nothing was "
        f"written. Use a session without read_only=True for work that writes."
    )
    error.__cause__ = context.sqlalchemy_exception
    return error


class _PrePing:
    def __init__(self, ping_after: float) -> None:
        self.ping_after = ping_after

    def install(self, engine: AsyncEngine) -> None:
        event.listen(engine.sync_engine, "checkout", self._on_checkout)
        event.listen(engine.sync_engine, "checkin", self._on_checkin)

    def _on_checkin(self, dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        if dbapi_connection is not None:
            # one entry: when it was returned, its watch, and what the server had sent then
            watch = _asyncpg.watch_of(connection_record.driver_connection)
            connection_record.info[_IDLE] = (
                time.monotonic(),
                watch,
                None if watch is None else watch.received,
            )

    def _on_checkout(
        self,
        dbapi_connection: Any,
        connection_record: ConnectionPoolEntry,
        connection_proxy: PoolProxiedConnection,
    ) -> None:
        # info is cleared when the DBAPI connection is replaced: a new one is fresh
        idle = connection_record.info.get(_IDLE)
        if idle is None:
            return
        returned_at, watch, heard = idle
        driver = connection_record.driver_connection
        if driver is None or driver.is_closed():
            raise DisconnectionError("the server closed this pooled connection")
        # the server speaks to an idle connection to end it (a FATAL error before the end of
        # file) or with a notification: ping it then, however recently it was returned
        if time.monotonic() - returned_at < self.ping_after and not _asyncpg.spoke_since(
            driver, heard, watch
        ):
            return
        try:
            # a cancellation during the ping waits for it instead of costing the connection
            wait_to_completion(_ping, driver)
        except Exception as exc:  # a ping can only fail on an unusable connection
            raise DisconnectionError(f"pre-ping failed: {exc!r}") from exc


def _ping(driver: Any) -> None:
    # no arguments: the simple query protocol, one round trip, no prepared statement
    await_(driver.execute("SELECT 1"))


def _read_committed(level: object) -> bool:
    if level is None or level == "read committed":  # SHOW's spelling: no string built
        return True
    return str(level).upper().replace("_", " ") == "READ COMMITTED"


class _DeferredBegin:
    """Run a transaction's leading plain reads with the driver in autocommit.

    On SQLAlchemy's ``do_execute`` dialect event, which sees the cursor, the statement and
    its execution context. SQLAlchemy's asyncpg adapter sends BEGIN lazily, just before the
    first statement of a transaction; for a plain read while no transaction block is open,
    this listener executes the statement itself with the adapter in autocommit for that one
    statement, so no BEGIN goes first. The first other statement finds no block open and
    the adapter back in its normal mode: it sends BEGIN, and the transaction is real from
    there on. A dialect event (unlike a connection event) adds no work to SQLAlchemy's other
    executions, commits or rollbacks.

    Deferral is decided from the isolation level the BEGIN would really have: the adapter's
    own (an ``isolation_level`` option names it in the BEGIN), or else the connection's
    session default, read once per physical connection (after every ``connect`` listener,
    at its first deferrable read: ``SHOW default_transaction_isolation``) and kept in the
    pool entry's ``info``, which SQLAlchemy clears when it replaces the connection. The
    dialect's ``default_isolation_level`` is no guide: it is read on the engine's first
    connection, before user ``connect`` listeners run, and ``ALTER DATABASE/ROLE ... SET``
    changes later connections. A statement that may change the default
    (``SET SESSION CHARACTERISTICS``, ``default_transaction_isolation``, ``RESET ALL``,
    ``DISCARD ALL``, ``set_config()``) or the search path (``search_path``, ``SET SCHEMA``,
    ``SET ROLE``) makes the next deferrable read ask again.
    """

    def install(self, engine: AsyncEngine) -> None:
        dialect = engine.sync_engine.dialect
        event.listen(dialect, "do_execute", self._do_execute)
        event.listen(dialect, "do_execute_no_params", self._do_execute_no_params)

    @staticmethod
    def _do_execute_no_params(cursor: Any, statement: str, context: ExecutionContext) -> bool:
        if _changes_default(statement):
            context.root_connection.connection.info.pop(_SESSION_ISOLATION, None)
        return False

    @staticmethod
    def _do_execute(
        cursor: Any, statement: str, parameters: Any, context: ExecutionContext
    ) -> bool:
        pooled = context.root_connection.connection
        if _changes_default(statement):
            pooled.info.pop(_SESSION_ISOLATION, None)  # ask the server again, next time
        adapter: Any = pooled.dbapi_connection
        # a READ ONLY transaction begins at once: the server, not the judge, enforces it
        if adapter is None or adapter.autocommit or adapter.readonly or adapter.deferrable:
            return False
        if adapter.driver_connection.is_in_transaction():
            return False  # the transaction is real already
        if context.execution_options.get("stream_results") or not is_plain_read(
            context, statement
        ):
            return False
        # the level asyncpg's BEGIN would name; None: the connection's session default
        level = adapter.isolation_level
        if level is None:
            level = pooled.info.get(_SESSION_ISOLATION)
            if level is None:
                level = pooled.info[_SESSION_ISOLATION] = _session_isolation(adapter)
        if not _read_committed(level):
            return False
        adapter.autocommit = True  # for this statement only: no BEGIN before it
        try:
            cursor.execute(statement, parameters)
        finally:
            adapter.autocommit = False
        return True


_SESSION_ISOLATION = "asyncorm_session_isolation"
_RESET_ALL = re.compile(r"\b(?:reset|discard)\s+all\b")


def _changes_default(statement: str) -> bool:
    """Whether the session's default isolation level may have changed after ``statement``
    (``SET SESSION CHARACTERISTICS``, ``default_transaction_isolation``, ``RESET ALL``,
    ``DISCARD ALL``, any ``set_config()``, whose setting may be a bound parameter), or the
    search path the check for shadowing functions saw (``search_path``, ``SET SCHEMA``,
    ``SET ROLE``, ``SET SESSION AUTHORIZATION``). This runs for every statement: the answer
    is kept per SQL text (the same string object for every execution of a cached compiled
    statement, so the lookup is a hash already computed) for texts shorter than
    :data:`_CACHED_TEXT` characters, the :data:`_CHANGES_CACHE_SIZE` most recent ones
    (statements rendered per execution, such as expanded ``IN`` lists, are new texts each
    time)."""
    if len(statement) < _CACHED_TEXT:
        return _judged_changes_default(statement)
    return _judge_changes_default(statement)


def _judge_changes_default(statement: str) -> bool:
    # plain substring tests first
    low = statement.lower()
    return (
        "default_transaction_isolation" in low
        or "characteristics" in low
        # set_config() may name the setting in a bound parameter: the text cannot tell
        or "set_config" in low
        # what _ASK also answers: the functions on the search path (a shadowing lower())
        or "search_path" in low
        or (
            ("schema" in low or "role" in low or "authorization" in low)
            and _SEARCH_PATH.search(low) is not None
        )
        or (("reset" in low or "discard" in low) and _RESET_ALL.search(low) is not None)
    )


# SET SCHEMA sets the search path; a role change changes the schema "$user" names in it
_SEARCH_PATH = re.compile(
    r"\b(?:set|reset)\s+(?:(?:session|local)\s+)?(?:schema|role|session\s+authorization)\b"
)


_CHANGES_CACHE_SIZE = 500
_CACHED_TEXT = 4096  # at most ~2 MB of SQL text kept
_judged_changes_default = functools.lru_cache(maxsize=_CHANGES_CACHE_SIZE)(
    _judge_changes_default
)


_SHADOWED = "shadowed"
"""A pseudo level: a function of the connection's search path outside pg_catalog has the
name of a function the judge trusts (an overload or a shadow that may write): no deferral."""

_ASK = (
    "SELECT current_setting('default_transaction_isolation'), EXISTS ("
    "SELECT 1 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n "
    "ON n.oid = p.pronamespace WHERE n.nspname <> 'pg_catalog' "
    "AND n.nspname = ANY (pg_catalog.current_schemas(true)) "
    "AND p.proname = ANY (ARRAY[{names}]::text[]))"
).format(names=", ".join(f"'{name}'" for name in sorted(SAFE_CALLS)))


def _session_isolation(adapter: Any) -> str:
    """The connection's default isolation level, asked outside any transaction block, or
    :data:`_SHADOWED` when a function on its search path (``public.lower(bigint)``) could
    be picked instead of PostgreSQL's own for a name the plain-read judge trusts."""
    adapter.autocommit = True  # no BEGIN before it
    try:
        cursor = adapter.cursor()
        try:
            cursor.execute(_ASK)
            row = cursor.fetchone()
        finally:
            cursor.close()
    finally:
        adapter.autocommit = False
    return _SHADOWED if row[1] else str(row[0])
