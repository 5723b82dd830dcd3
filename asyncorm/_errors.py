"""The exception tree of asyncorm.

Every error asyncorm raises derives from :class:`AsyncORMError`; misuse errors also derive
from the builtin or SQLAlchemy error they refine, so existing ``except`` clauses keep working::

    AsyncORMError
    ├── ConfigurationError        (also sqlalchemy.exc.ArgumentError)
    ├── ConcurrentSessionUseError (also RuntimeError, sqlalchemy.exc.InvalidRequestError)
    ├── LazyLoadError             (also sqlalchemy.exc.MissingGreenlet)
    ├── NoSessionScopeError       (also RuntimeError)
    ├── ReadOnlySessionError      (also sqlalchemy.exc.InvalidRequestError)
    ├── WriteConflictError        (also sqlalchemy.exc.OperationalError)
    ├── ConnectionLostError       (also sqlalchemy.exc.OperationalError)
    ├── DatabaseUnavailableError  (also ConnectionError)
    ├── ScopeError                (also RuntimeError)
    ├── UncommittedTaskWorkError  (also RuntimeError)
    ├── EventLoopMismatchError    (also RuntimeError)
    ├── TransactionOutcomeUnknownError (also RuntimeError)
    ├── PoolTimeoutError          (also sqlalchemy.exc.TimeoutError)
    ├── TLSVerificationError      (also ssl.SSLCertVerificationError)
    ├── OnCommitError             (also RuntimeError)
    ├── TransactionalUnitError    (also sqlalchemy.exc.InvalidRequestError)
    └── SQLiteWriteLockError      (also RuntimeError)
        └── SQLiteWriteLockTimeout (also TimeoutError)
"""

from __future__ import annotations

import ssl
from typing import Any

from sqlalchemy import exc as sa_exc

__all__ = [
    "AsyncORMError",
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "ConnectionLostError",
    "DatabaseUnavailableError",
    "EventLoopMismatchError",
    "LazyLoadError",
    "NoSessionScopeError",
    "OnCommitError",
    "PoolTimeoutError",
    "ReadOnlySessionError",
    "SQLiteWriteLockError",
    "SQLiteWriteLockTimeout",
    "ScopeError",
    "TLSVerificationError",
    "TransactionOutcomeUnknownError",
    "TransactionalUnitError",
    "UncommittedTaskWorkError",
    "WriteConflictError",
]


class AsyncORMError(Exception):
    """Base class of every error raised by asyncorm.

    Example::

        try:
            engine = asyncorm.create_engine(url)
        except asyncorm.AsyncORMError as exc:
            print(exc)
    """


class ConfigurationError(AsyncORMError, sa_exc.ArgumentError):
    """A URL, driver or option asyncorm cannot work with.

    Raised for an unsupported database or driver, an unparsable URL, or a driver package
    that is not installed (the message names the pip extra to install).

    Example::

        >>> asyncorm.create_engine("mysql://db/app")
        Traceback (most recent call last):
        asyncorm.ConfigurationError: Unsupported database URL 'mysql://db/app': ...
    """


class ConcurrentSessionUseError(AsyncORMError, RuntimeError, sa_exc.InvalidRequestError):
    """Two tasks tried to run IO on one session at the same time.

    Raised in the second task, before anything reaches the database; the first task's
    operation is not affected. A session runs one operation at a time. Give each concurrent
    task its own session (``async with db.scope():`` inside the task) or await the
    operations in turn.

    Example::

        >>> await asyncio.gather(session.get(User, 1), session.get(User, 2))
        Traceback (most recent call last):
        asyncorm.ConcurrentSessionUseError: Session <AsyncSession 0x7f...> is in use by ...
    """


class LazyLoadError(AsyncORMError, sa_exc.MissingGreenlet):
    """An attribute access needed IO, which cannot happen implicitly under asyncio.

    Raised by :class:`asyncorm.AsyncSession` when reading a lazy relationship, an expired
    attribute or a deferred column would have to query the database outside an awaited call,
    instead of SQLAlchemy's ``StatementError``/``MissingGreenlet`` from deep in the driver.
    Nothing has been sent to the database. The message names the attribute and the fixes:
    eager loading (``selectinload()``, ``undefer()``), ``await session.refresh(obj, [name])``
    or ``await obj.awaitable_attrs.name`` (with :class:`asyncorm.AsyncAttrs`).

    Example::

        >>> user.addresses
        Traceback (most recent call last):
        asyncorm.LazyLoadError: User.addresses is not loaded on <User id=1>, and loading it ...
    """

    code = None  # type: ignore[assignment]  # a complete message: no link to MissingGreenlet


class NoSessionScopeError(AsyncORMError, RuntimeError):
    """``db()`` was called outside any scope on a registry created with ``strict=True``.

    Open a scope first: ``async with db.scope():``, decorate the coroutine with
    ``@db.scoped``, or install the framework middleware.
    """


class ScopeError(AsyncORMError, RuntimeError):
    """A registry scope was used against its rules (e.g. exited from another task)."""


class UncommittedTaskWorkError(AsyncORMError, RuntimeError):
    """A request's auto-commit found writes it cannot commit, in another task's own session.

    Raised by ``SessionMiddleware(commit="auto")`` at response start, instead of committing,
    when a task spawned inside the request (it inherited the request's scope) holds
    uncommitted writes in its own session (registry rule 3): those writes are rolled back
    when that task ends, so a success status would be a lie. The usual cause is a Starlette
    ``BaseHTTPMiddleware`` (``@app.middleware("http")``) inside ``SessionMiddleware``, which
    runs the handler in a task of its own. Everything is rolled back and the client gets a
    500. Put ``SessionMiddleware`` inside every ``BaseHTTPMiddleware``, or commit in that
    task, or give a task that outlives the request its own scope (``@db.scoped``).

    Example::

        app = Starlette(routes=routes, middleware=[
            Middleware(SessionMiddleware, registry=db, commit="auto"),
            Middleware(TimingMiddleware),   # a BaseHTTPMiddleware: move it above
        ])
        # POST /users -> 500, UncommittedTaskWorkError: ... task 'Task-7' ...

    .. versionadded:: 0.2
    """


class EventLoopMismatchError(AsyncORMError, RuntimeError):
    """An engine's pooled asyncpg connection was checked out in another event loop than its own.

    An asyncpg connection only works in the event loop that opened it (aiosqlite connections
    serve any loop and never raise this). Call
    ``await engine.dispose()`` inside the new loop before using the engine there (or dispose
    of it before the first loop ends), or create the engine with ``poolclass=NullPool``.
    """


class SQLiteWriteLockError(AsyncORMError, RuntimeError):
    """A SQLite transaction cannot get the database's write lock.

    asyncorm serialises SQLite transactions of one engine in-process, so that
    read-modify-write transactions neither lose updates nor fail with "database is locked".
    This error is raised when waiting would deadlock: the task waiting for the lock (or the
    task a helper task works for) is the task that opened the session or connection holding
    it (e.g. a second session opened inside the first one's transaction). The message names
    the holding session or connection and where its transaction took the lock.
    """


class SQLiteWriteLockTimeout(SQLiteWriteLockError, TimeoutError):
    """Waiting for a SQLite database's write lock took longer than the engine's timeout.

    The timeout is the engine's ``connect_args={"timeout": seconds}`` (30 by default), the
    same value SQLite's own busy timeout uses. Keep transactions short, or raise it. The
    message names the session or connection holding the lock, the task that opened it and
    where its transaction took the lock.
    """


class TransactionOutcomeUnknownError(AsyncORMError, RuntimeError):
    """A COMMIT was sent, and whether the database applied it cannot be known.

    The connection failed (lost, killed, or the task was cancelled and the database had not
    answered 10 seconds later) after COMMIT was sent and before the database answered: the
    transaction may have been committed, or not. Its
    ``__cause__`` is the original error. It is deliberately not a
    ``sqlalchemy.exc.DBAPIError``, so that handlers that retry on connection errors do not
    blindly run again a transaction that may already have been applied: check whether its
    changes are in the database (a unique key, an idempotency token) before doing it again.

    Example::

        try:
            async with Session.begin() as session:
                session.add(Payment(key=key, amount=10))
        except asyncorm.TransactionOutcomeUnknownError:
            async with Session() as session:
                done = await session.scalar(select(Payment.id).filter_by(key=key))
    """


class OnCommitError(AsyncORMError, RuntimeError):
    """The transaction committed, and one or more of its ``on_commit`` callbacks failed.

    Every callback ran, in order, even after one failed; this error is raised once they all
    have, by the ``commit()`` (or the commit of the ``begin()`` block) that committed. Its
    ``errors`` are the callbacks' exceptions, in order, and its ``__cause__`` the first of
    them. The data is committed: never run the transaction again because of it (a
    ``transactional`` unit does not retry it); repeat or repair the failed side effects.

    Example::

        try:
            await session.commit()
        except asyncorm.OnCommitError as exc:
            for error in exc.errors:
                log.error("side effect failed after commit: %r", error)

    .. versionadded:: 0.2
    """

    def __init__(self, message: str, errors: list[Exception]) -> None:
        super().__init__(message)
        self.errors = errors
        """The exceptions the failed callbacks raised, in order."""

    def __reduce__(self) -> Any:
        return type(self), (self.args[0], self.errors)


class TransactionalUnitError(AsyncORMError, sa_exc.InvalidRequestError):
    """A ``transactional`` unit's function asked for a commit of its own (or the unit's
    engine is in AUTOCOMMIT, where every statement commits at once).

    A unit (``@db.transactional``, ``asyncorm.transactional(Session)``) commits when its
    function returns, and may run the function again after a retryable error; a commit in
    the middle would make that retry apply the committed part twice. The commit is refused
    before anything is sent, and the unit's transaction rolls back. Remove the commit, or
    split the work into units called one after the other.

    Example::

        @db.transactional
        async def job() -> None:
            db.add(Order())
            await db.commit()   # raises TransactionalUnitError

    .. versionadded:: 0.2
    """


def commit_in_unit_error(name: str) -> TransactionalUnitError:
    """The error for a commit requested inside the transactional unit ``name``."""
    return TransactionalUnitError(
        f"A commit was requested inside the transactional unit {name}(), which commits when "
        f"{name}() returns. A commit in the middle would make a retry apply the committed "
        f"part twice; nothing was committed. Remove the commit, or split the work into two "
        f"units called one after the other."
    )


def close_in_unit_error(name: str, call: str) -> TransactionalUnitError:
    """The error for a close (``call``) requested inside the transactional unit ``name``."""
    return TransactionalUnitError(
        f"{call} was called inside the transactional unit {name}(), which commits its "
        f"session when {name}() returns: closing it now would roll the unit's work back, "
        f"and the unit would return as if it had committed. Nothing was closed. Remove the "
        f"call: the unit closes its session itself."
    )


class PoolTimeoutError(AsyncORMError, sa_exc.TimeoutError):
    """No pooled connection came free within the engine's ``pool_timeout``.

    Every connection the pool may hold (``pool_size`` + ``max_overflow``) was checked out
    for the whole timeout. The message names the engine, how many connections are checked
    out, the pool's size, overflow and timeout. Usually sessions are held too long (one
    never closed, a slow transaction, a task awaiting something else mid-transaction);
    otherwise raise ``pool_size``, ``max_overflow`` or ``pool_timeout``. A subclass of
    SQLAlchemy's ``TimeoutError``, which existing handlers catch.

    Example::

        >>> engine = asyncorm.create_engine(url, pool_size=1, max_overflow=0, pool_timeout=1)
        >>> async with engine.connect(), engine.connect():
        ...     pass
        Traceback (most recent call last):
        asyncorm.PoolTimeoutError: No connection of 'postgresql+asyncpg://app@db/app' came ...

    .. versionadded:: 0.2
    """


class TLSVerificationError(AsyncORMError, ssl.SSLCertVerificationError):
    """The PostgreSQL server's TLS certificate failed verification (``sslmode=verify-ca``
    or ``verify-full``): nothing was sent over the connection.

    The message names the server, OpenSSL's reason and the fix: with ``verify-full`` a
    certificate that does not name the URL's host (connect with a name it does, or use
    ``verify-ca``); otherwise a CA that ``sslrootcert`` does not hold. A subclass of
    :class:`ssl.SSLCertVerificationError`, with its ``verify_code`` and ``verify_message``.

    Example::

        >>> engine = asyncorm.create_engine(
        ...     "postgresql://app@10.0.0.5/app?sslmode=verify-full&sslrootcert=ca.pem")
        >>> await engine.connect()
        Traceback (most recent call last):
        asyncorm.TLSVerificationError: The TLS certificate of the PostgreSQL server at ...

    .. versionadded:: 0.2
    """

    verify_code: int
    verify_message: str

    def __str__(self) -> str:
        return str(self.args[0])


class ReadOnlySessionError(AsyncORMError, sa_exc.InvalidRequestError):
    """A session (or connection) opened with ``read_only=True`` tried to write.

    On SQLite asyncorm refuses the statement before sending it; on PostgreSQL the session's
    transactions are ``READ ONLY`` and the server refuses it (SQLSTATE 25006). Either way
    nothing was written. Use a session without ``read_only=True`` for work that writes.

    Example::

        async with Session(read_only=True) as session:
            session.add(User(name="ann"))
            await session.flush()   # raises ReadOnlySessionError

    .. versionadded:: 0.2
    """


class _OperationalWithMessage(sa_exc.OperationalError):
    """A SQLAlchemy ``OperationalError`` (statement, params, driver error) whose ``str()`` is
    asyncorm's own message; pickles with it."""

    def __init__(
        self, message: str, statement: str | None, params: Any, orig: BaseException
    ) -> None:
        super().__init__(statement, params, orig)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        return type(self), (self.message, self.statement, self.params, self.orig)


class WriteConflictError(AsyncORMError, _OperationalWithMessage):
    """A transaction's first write was refused because its read snapshot went stale.

    On SQLite a session that is not a declared unit of work begins deferred: its reads see a
    snapshot and take no writer turn, so sessions that only read never wait. If another
    transaction commits a write after this one's first read, this one's first write is
    refused (SQLite's ``SQLITE_BUSY_SNAPSHOT``) instead of silently overwriting what it did
    not see (on ``sqlite://``, without WAL, asyncorm itself refuses a first write that
    follows another transaction's write). The whole unit of work is safe to retry: roll back
    and run it again, or declare it with ``async with Session.begin()``, which begins
    IMMEDIATE and never conflicts.

    Example::

        for attempt in range(3):
            try:
                async with Session() as session:
                    account = await session.get(Account, 1)
                    account.balance -= 10
                    await session.commit()
                break
            except asyncorm.WriteConflictError:
                continue

    .. versionadded:: 0.2
    """


def shown_statement(statement: str, limit: int = 80) -> str:
    """A SQL statement on one line, cut to ``limit`` characters, for an error message."""
    shown = " ".join(statement.split())
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


class ConnectionLostError(AsyncORMError, _OperationalWithMessage):
    """A PostgreSQL connection was lost while a statement ran: the server ended the session.

    A restart, a failover, ``pg_terminate_backend`` or a network failure ended the session
    the unit of work ran on. The server rolls back a lost session's open transaction, so
    nothing of the unit of work was committed (on an autocommit connection the statement
    itself may have been applied); the connection is invalidated and the pool replaces it.
    Run the whole unit of work again. ``connection_invalidated`` is true, as on the
    SQLAlchemy error it replaces; a COMMIT lost this way is
    :class:`TransactionOutcomeUnknownError` instead.

    Example::

        try:
            async with Session.begin() as session:
                session.add(Order(...))
        except asyncorm.ConnectionLostError:
            ...  # nothing was committed: run it again once the server answers

    .. versionadded:: 0.2
    """


class DatabaseUnavailableError(AsyncORMError, ConnectionError):
    """A PostgreSQL connection could not be opened: the server is not there right now.

    The connection was refused, reset or timed out, or the server answered that it is
    starting up or shutting down (a restart, a failover). Nothing was sent. The message names
    the server(s) and the driver's reason. Authentication failures and unknown databases are
    not this error: they do not go away by waiting. A subclass of :class:`ConnectionError`
    (so of :class:`OSError`), like the ``ConnectionRefusedError`` asyncpg raises.

    Example::

        try:
            async with Session.begin() as session:
                ...
        except asyncorm.DatabaseUnavailableError:
            ...  # answer 503, retry later

    .. versionadded:: 0.2
    """
