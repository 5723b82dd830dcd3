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
  0 pings on every checkout.

Deferred BEGIN. Under READ COMMITTED, PostgreSQL's default, every statement sees a fresh
snapshot whether or not it runs inside a transaction block, so a plain ``SELECT`` (no
``FOR UPDATE``/``FOR SHARE``, no ``INTO``, no function outside a list of side-effect-free
ones, not streamed through a server-side cursor) returns exactly the same rows with or
without a ``BEGIN`` before it. The profile therefore leaves a new transaction's connection in
autocommit until the first statement that is not such a read: a request that only reads
costs one round trip instead of three (BEGIN, SELECT, ROLLBACK), and the first other
statement (a flush, ``FOR UPDATE``, ``text()``, a savepoint) sends BEGIN first, so
everything from there on is one atomic transaction, as usual. Transactions under another
isolation level, ``postgresql_readonly`` or ``postgresql_deferrable`` always begin at once.
``create_engine(url, defer_begin=False)`` turns it off.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, ExecutionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.util import await_

from ._cancellation import wait_to_completion
from ._errors import ConfigurationError

__all__ = ["prepare"]

DEFAULT_PING_AFTER = 5.0
"""Seconds a pooled connection may sit idle before its next checkout pings it."""

_RETURNED_AT = "asyncorm_returned_at"


def prepare(
    url: URL, kwargs: dict[str, Any]
) -> tuple[URL, dict[str, Any], Callable[[AsyncEngine], None]]:
    """Apply the PostgreSQL profile; ``pool_pre_ping`` (default True) is asyncorm's ping."""
    pre_ping = kwargs.pop("pool_pre_ping", True)
    defer_begin = kwargs.pop("defer_begin", True)
    isolation = kwargs.get("isolation_level")
    ping_after = kwargs.pop("pool_pre_ping_after", DEFAULT_PING_AFTER)
    if not isinstance(ping_after, int | float) or ping_after < 0:
        raise ConfigurationError(
            f"pool_pre_ping_after must be a number of seconds >= 0, got {ping_after!r}."
        )

    def install(engine: AsyncEngine) -> None:
        if pre_ping:
            _PrePing(float(ping_after)).install(engine)
        if defer_begin and _read_committed(isolation):
            _DeferredBegin().install(engine)

    return url, kwargs, install


class _PrePing:
    def __init__(self, ping_after: float) -> None:
        self.ping_after = ping_after

    def install(self, engine: AsyncEngine) -> None:
        event.listen(engine.sync_engine, "checkout", self._on_checkout)
        event.listen(engine.sync_engine, "checkin", self._on_checkin)

    def _on_checkin(self, dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        if dbapi_connection is not None:
            connection_record.info[_RETURNED_AT] = time.monotonic()

    def _on_checkout(
        self,
        dbapi_connection: Any,
        connection_record: ConnectionPoolEntry,
        connection_proxy: PoolProxiedConnection,
    ) -> None:
        # info is cleared when the DBAPI connection is replaced: a new one is fresh
        returned_at = connection_record.info.get(_RETURNED_AT)
        if returned_at is None:
            return
        driver = connection_record.driver_connection
        if driver is None or driver.is_closed():
            raise DisconnectionError("the server closed this pooled connection")
        if time.monotonic() - returned_at < self.ping_after:
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
    return level is None or str(level).upper().replace("_", " ") == "READ COMMITTED"


# functions that read and change nothing; any other function call gets a transaction
_SAFE_CALLS = frozenset(
    {
        "in", "exists", "any", "all", "some", "values", "array", "row", "cast", "coalesce",
        "nullif", "greatest", "least", "count", "sum", "min", "max", "avg", "every", "bool_and",
        "bool_or", "array_agg", "string_agg", "json_agg", "jsonb_agg", "json_build_object",
        "jsonb_build_object", "json_object_agg", "jsonb_object_agg", "lower", "upper", "length",
        "char_length", "octet_length", "trim", "ltrim", "rtrim", "substring", "substr", "position",
        "replace", "concat", "concat_ws", "left", "right", "lpad", "rpad", "abs", "round", "ceil",
        "ceiling", "floor", "trunc", "mod", "power", "sqrt", "date_trunc", "date_part", "extract",
        "to_char", "to_date", "to_timestamp", "to_number", "row_number", "rank", "dense_rank",
        "percent_rank", "cume_dist", "ntile", "lag", "lead", "first_value", "last_value", "over",
        "filter", "within", "lateral", "unnest"
    }
)
_CALL = re.compile(r'("?)([A-Za-z_][A-Za-z0-9_$]*)\1\s*\(')
# locking reads, SELECT INTO, and the clock: CURRENT_TIMESTAMP is the transaction's start
_NOT_PLAIN = re.compile(
    r"\bFOR\s+(UPDATE|SHARE|NO\s+KEY\s+UPDATE|KEY\s+SHARE)\b|\bINTO\b"
    r"|\b(CURRENT_TIMESTAMP|CURRENT_TIME|CURRENT_DATE|LOCALTIME|LOCALTIMESTAMP)\b",
    re.I,
)


@functools.lru_cache(maxsize=2048)
def _is_plain_read(sql: str) -> bool:
    """True for a SELECT whose rows cannot differ inside or outside a READ COMMITTED block."""
    if sql.lstrip()[:7].upper() != "SELECT " or _NOT_PLAIN.search(sql):
        return False
    return all(name.lower() in _SAFE_CALLS for _, name in _CALL.findall(sql))


_DEFERRED = "asyncorm_deferred_begin"


class _DeferredBegin:
    def install(self, engine: AsyncEngine) -> None:
        sync_engine = engine.sync_engine
        event.listen(sync_engine, "begin", self._on_begin)
        event.listen(sync_engine, "before_cursor_execute", self._before_execute)
        # no commit/rollback listeners (every connection-level event type costs each new
        # Connection): the next begin, or the return to the pool, restores the connection
        event.listen(sync_engine, "checkin", self._on_checkin)

    @staticmethod
    def _on_begin(conn: Connection) -> None:
        adapter = conn.connection.dbapi_connection
        if adapter is None:
            return
        if conn.info.pop(_DEFERRED, False):  # a previous transaction that only read
            adapter.autocommit = False
        level = conn.get_execution_options().get("isolation_level")
        if not (_read_committed(level) and _read_committed(conn.default_isolation_level)):
            return
        if adapter.readonly or adapter.deferrable or adapter.autocommit:
            return
        adapter.autocommit = True  # no BEGIN is sent while the statements are plain reads
        conn.info[_DEFERRED] = True

    @staticmethod
    def _before_execute(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None,
        executemany: bool,
    ) -> None:
        if not conn.info.get(_DEFERRED):
            return
        streamed = context is not None and context.execution_options.get("stream_results")
        if executemany or streamed or not _is_plain_read(statement):
            # from here on the transaction is real: the driver sends BEGIN first
            conn.info[_DEFERRED] = False
            conn.connection.dbapi_connection.autocommit = False  # type: ignore[union-attr]

    @staticmethod
    def _on_checkin(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        if connection_record.info.pop(_DEFERRED, False) and dbapi_connection is not None:
            dbapi_connection.autocommit = False
