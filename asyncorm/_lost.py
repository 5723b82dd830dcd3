"""A PostgreSQL connection lost in the middle of a unit of work: :class:`ConnectionLostError`.

When the server ends a session (a restart, a failover, ``pg_terminate_backend``), the
statement in flight fails with whatever the driver saw: ``connection was closed in the middle
of operation: terminating connection due to administrator command``, a connection reset, or,
when asyncpg had already read the FATAL message while the connection sat idle, ``cannot switch
to state 12; another operation (2) is in progress``. SQLAlchemy marks each as a disconnect and
invalidates the connection. This ``handle_error`` listener raises one asyncorm error instead,
a subclass of SQLAlchemy's ``OperationalError`` that keeps ``connection_invalidated``, saying
what happened to the work and what to do.

COMMIT and ROLLBACK are left alone (no statement): a lost COMMIT is
:class:`~asyncorm.TransactionOutcomeUnknownError` (:mod:`asyncorm._commit`), and so are
cancellations (:mod:`asyncorm._cancellation`) and the pre-ping (it replaces the connection).
"""

from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

from ._errors import ConnectionLostError, shown_statement

__all__ = ["install"]


def install(engine: AsyncEngine) -> None:
    """Raise :class:`ConnectionLostError` for a statement whose connection was lost."""
    event.listen(engine.sync_engine, "handle_error", _connection_lost)


def _connection_lost(context: ExceptionContext) -> BaseException | None:
    original = context.original_exception
    if (
        not context.is_disconnect
        or context.is_pre_ping
        or context.connection is None
        or context.statement is None  # COMMIT, ROLLBACK: TransactionOutcomeUnknownError
        or not isinstance(original, Exception)  # a cancellation: asyncorm._cancellation's
    ):
        return None
    url = context.connection.engine.url
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    reason = " ".join(str(original).split("\n")[0].split())
    if "another operation" in reason:
        reason = f"the server had ended the session while it sat in the pool ({reason})"
    try:
        autocommit = bool(context.connection.connection.dbapi_connection.autocommit)  # type: ignore[union-attr]
    except Exception:
        autocommit = False
    outcome = (
        "On an autocommit connection this statement may or may not have been applied"
        if autocommit
        else "The server rolls back the open transaction of a lost connection, so nothing of "
        "this unit of work was committed"
    )
    error = ConnectionLostError(
        f"The connection to the PostgreSQL server at {where} was lost during "
        f"{shown_statement(context.statement)!r}: {reason}. {outcome}; the pool replaces the "
        f"connection. Run the unit of work again (after a restart or failover, once the "
        f"server answers).",
        context.statement,
        context.parameters,
        original,
    )
    error.connection_invalidated = True
    return error
