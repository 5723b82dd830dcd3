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
snapshot whether or not it runs inside a transaction block, so a plain read returns exactly
the same rows with or without a ``BEGIN`` before it. A plain read is a ``SELECT`` built with
SQLAlchemy (the compiled statement, ORM expressions expanded, is inspected once per cached
statement) with no ``FOR UPDATE``/``FOR SHARE``, no ``INTO``, no data-modifying CTE
(``INSERT``/``UPDATE``/``DELETE``/``MERGE`` anywhere in it), no clock (``now()``,
``CURRENT_TIMESTAMP``), no ``text()`` or literal SQL, no user-defined operator, and no
function but PostgreSQL's own side-effect-free ones (``count``, ``lower``, ...) called
unqualified; not streamed through a server-side cursor. While no transaction block is open,
the profile runs each plain read with the driver in autocommit (on SQLAlchemy's ``do_execute``
dialect event): a request that only reads costs one round trip instead of three (BEGIN,
SELECT, ROLLBACK), and the first other statement (a flush, ``FOR UPDATE``, ``text()``,
``exec_driver_sql()``, a savepoint) sends BEGIN first, so everything from there on is one
atomic transaction, as usual. What SQL text cannot show is not seen: a view over a function
that writes, or a table column name that PostgreSQL resolves as a function call. Transactions
under another
isolation level, ``postgresql_readonly`` or ``postgresql_deferrable`` always begin at once.
``create_engine(url, defer_begin=False)`` turns it off.
"""

from __future__ import annotations

import re
import time
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Compiled, ExecutionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.sql import Select, operators, visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import BinaryExpression, TextClause
from sqlalchemy.sql.functions import FunctionElement
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


# functions that read and change nothing (PostgreSQL's own, unqualified); any other
# function gets a transaction
_SAFE_CALLS = frozenset(
    {
        "coalesce", "nullif", "greatest", "least", "count", "sum", "min", "max", "avg", "every",
        "bool_and", "bool_or", "array_agg", "string_agg", "json_agg", "jsonb_agg",
        "json_build_object", "jsonb_build_object", "json_object_agg", "jsonb_object_agg",
        "lower", "upper", "length", "char_length", "octet_length", "trim", "ltrim", "rtrim",
        "substring", "substr", "position", "replace", "concat", "concat_ws", "left", "right",
        "lpad", "rpad", "abs", "round", "ceil", "ceiling", "floor", "trunc", "mod", "power",
        "sqrt", "date_trunc", "date_part", "extract", "to_char", "to_date", "to_timestamp",
        "to_number", "row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile",
        "lag", "lead", "first_value", "last_value", "unnest"
    }
)
# locking reads, SELECT INTO, and the clock: CURRENT_TIMESTAMP is the transaction's start
_NOT_PLAIN = re.compile(
    r"\bFOR\s+(UPDATE|SHARE|NO\s+KEY\s+UPDATE|KEY\s+SHARE)\b|\bINTO\b"
    r"|\b(CURRENT_TIMESTAMP|CURRENT_TIME|CURRENT_DATE|LOCALTIME|LOCALTIMESTAMP)\b",
    re.I,
)

# verdicts per compiled statement: SQLAlchemy caches compiled statements, so each distinct
# statement is judged once
_verdicts: weakref.WeakKeyDictionary[Compiled, bool] = weakref.WeakKeyDictionary()


def _is_plain_read(context: ExecutionContext | None, sql: str) -> bool:
    """True for a SELECT built with SQLAlchemy whose rows cannot differ inside or outside a
    READ COMMITTED transaction block (it calls no function that could write).

    Hand-written SQL (``text()``, ``exec_driver_sql()``) is never judged plain.
    """
    compiled = None if context is None else context.compiled
    if compiled is None:
        return False
    verdict = _verdicts.get(compiled)
    if verdict is None:
        # an ORM statement's compile state holds the Core SELECT actually compiled, with
        # column_property() and other ORM expressions expanded
        state = getattr(compiled, "compile_state", None)
        statement = getattr(state, "statement", None)
        if statement is None:
            statement = compiled.statement
        verdict = _plain_select(statement) and not _NOT_PLAIN.search(sql)
        _verdicts[compiled] = verdict
    return verdict


def _plain_select(statement: object) -> bool:
    if not isinstance(statement, Select):
        return False
    for element in visitors.iterate(statement):
        if isinstance(element, FunctionElement):
            name = str(getattr(element, "name", ""))
            if getattr(element, "packagenames", ()) or name.lower() not in _SAFE_CALLS:
                return False  # also schema.lower(), which is not pg_catalog's lower()
        elif isinstance(element, TextClause) or (
            getattr(element, "is_literal", False) and getattr(element, "name", None) != "*"
        ):
            return False  # text() and literal_column() (but count()'s *): unjudged SQL
        elif isinstance(element, BinaryExpression) and isinstance(
            element.operator, operators.custom_op
        ):
            return False  # a user-defined operator runs a function of its own
        elif isinstance(element, UpdateBase):
            return False  # INSERT/UPDATE/DELETE ... RETURNING in a CTE
    return True


class _DeferredBegin:
    """Run a transaction's leading plain reads with the driver in autocommit.

    On SQLAlchemy's ``do_execute`` dialect event, which sees the cursor, the statement and
    its execution context. SQLAlchemy's asyncpg adapter sends BEGIN lazily, just before the
    first statement of a transaction; for a plain read while no transaction block is open,
    this listener executes the statement itself with the adapter in autocommit for that one
    statement, so no BEGIN goes first. The first other statement finds no block open and
    the adapter back in its normal mode: it sends BEGIN, and the transaction is real from
    there on. No state outlives the statement, and a dialect event (unlike a connection
    event) adds no work to SQLAlchemy's other executions, commits or rollbacks.
    """

    def install(self, engine: AsyncEngine) -> None:
        event.listen(engine.sync_engine.dialect, "do_execute", self._do_execute)

    @staticmethod
    def _do_execute(
        cursor: Any, statement: str, parameters: Any, context: ExecutionContext
    ) -> bool:
        adapter: Any = context.root_connection.connection.dbapi_connection
        if adapter is None or adapter.autocommit or adapter.readonly or adapter.deferrable:
            return False
        if adapter.driver_connection.is_in_transaction():
            return False  # the transaction is real already
        if context.execution_options.get("stream_results") or not _is_plain_read(
            context, statement
        ):
            return False
        conn = context.root_connection
        level = conn.get_execution_options().get("isolation_level")
        if not (_read_committed(level) and _read_committed(conn.default_isolation_level)):
            return False
        adapter.autocommit = True  # for this statement only: no BEGIN before it
        try:
            cursor.execute(statement, parameters)
        finally:
            adapter.autocommit = False
        return True
