"""One test's outer transaction: everything the test does is rolled back at its end.

SQLAlchemy's recipe "joining a session into an external transaction", for asyncio: the test
checks out a connection and begins a transaction on it (the *outer* transaction); sessions
are bound to that connection with ``join_transaction_mode="create_savepoint"``, so their
``commit()`` releases a savepoint and their ``rollback()`` rolls back to one, and the outer
transaction, rolled back when the test ends, takes everything with it.

The engine profiles make the recipe hold (a plain aiosqlite engine would not: pysqlite sends
no BEGIN before a SAVEPOINT, so the savepoint *is* the transaction and its RELEASE commits):

* SQLite: the profile sends a BEGIN before the first statement of the outer transaction, the
  session's first ``SAVEPOINT`` included (see :mod:`asyncorm._sqlite`); the connection takes
  the engine's writer turn at its first write and keeps it until the outer ROLLBACK, so a
  second connection that writes during the test waits for the test to end (or is refused as
  a deadlock when it is the test's own task that waits).
* PostgreSQL: the deferred BEGIN (:mod:`asyncorm._postgresql`) only ever runs *plain reads*
  of a connection with no transaction block open, and those see exactly what they would
  inside one; a session's first statement is its ``SAVEPOINT``, which is not a plain read,
  so BEGIN is sent before it and every write is inside the outer transaction.

Registries are *bound* to the transaction: their session factory is replaced, for the test,
by the same factory bound to the test's connection (so scopes, tasks and request middleware
get sessions joined to the outer transaction), and restored when the test ends.

A pooled connection belongs to the event loop that opened it (asyncpg). The engine of the
fixtures outlives a test's loop, so a watcher task per (engine, loop) returns the engine's
connections (``dispose()``) when that loop shuts down: pytest-asyncio's ``asyncio.Runner``
cancels the tasks left in a loop before closing it.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction
from sqlalchemy.ext.asyncio import async_sessionmaker as sa_async_sessionmaker
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.sql.elements import TextClause

from ._errors import EventLoopMismatchError, ReadOnlySessionError, shown_statement
from ._options import READ_ONLY
from ._registry import async_scoped_session
from ._scope import _Scope
from ._session import AsyncSession, async_sessionmaker
from ._sqlite import _text_writes

__all__ = ["OuterTransaction"]

_JOIN = {"join_transaction_mode": "create_savepoint"}
_R = TypeVar("_R", bound=async_scoped_session[Any])


class OuterTransaction:
    """One test's transaction, rolled back at the end of the test: the ``asyncorm_transaction``
    fixture.

    ``connection`` is the test's connection, inside the outer transaction; ``sessionmaker``
    makes sessions joined to it (``join_transaction_mode="create_savepoint"``: their
    ``commit()`` and ``rollback()`` act on savepoints); ``session`` is the test's session
    (the ``asyncorm_session`` fixture). :meth:`bind` makes a registry hand out sessions
    joined to the transaction until the test ends.

    Do not commit ``connection`` itself: that is refused, as it would keep the test's data.

    Example::

        async def test_signup(asyncorm_transaction):
            db = asyncorm_transaction.bind(myapp.db)     # myapp's registry, for this test
            async with db.scope():
                await myapp.signup("ann")               # commits: a savepoint is released
            assert await asyncorm_transaction.session.scalar(select(func.count(User.id)))

    .. versionadded:: 0.2
    """

    __test__ = False  # not a test class, whatever module imports it

    connection: AsyncConnection
    """The test's connection, inside the outer transaction."""

    sessionmaker: async_sessionmaker[AsyncSession]
    """Makes sessions joined to the outer transaction (each ``commit()`` a savepoint)."""

    def __init__(
        self,
        connection: AsyncConnection,
        transaction: AsyncTransaction,
        mismatch: Callable[[], str] | None = None,
    ) -> None:
        self.connection = connection
        self._transaction = transaction
        # what to say when the transaction is used in another event loop
        self._mismatch = mismatch or _default_mismatch
        self.sessionmaker = _JoinedSessionmaker(connection)
        self._session: AsyncSession | None = None
        self._loop = asyncio.get_running_loop()
        self._bound: list[tuple[async_scoped_session[Any], Callable[..., Any], bool]] = []
        self._test_task: asyncio.Task[Any] | None = None
        sync = connection.sync_connection
        assert sync is not None
        self._sync = sync
        event.listen(sync, "commit", self._refuse_commit)
        event.listen(sync, "before_cursor_execute", self._check_loop)

    @classmethod
    async def begin(
        cls, engine: AsyncEngine, mismatch: Callable[[], str] | None = None
    ) -> OuterTransaction:
        """Check out a connection of ``engine`` and begin the outer transaction on it.

        ``mismatch`` returns the message of the error raised when the transaction is used
        in another event loop than this one.
        """
        watch_loop(engine)
        connection = await engine.connect()
        try:
            transaction = await connection.begin()
        except BaseException:
            await connection.close()
            raise
        return cls(connection, transaction, mismatch)

    @property
    def session(self) -> AsyncSession:
        """The test's session, joined to the outer transaction (created on first use)."""
        if self._session is None:
            self._session = self.sessionmaker()
        return self._session

    def bind(self, registry: _R, *, adopt: bool = False) -> _R:
        """Make ``registry`` hand out sessions joined to this transaction until the test ends.

        The registry's session factory is replaced by one that makes the same sessions
        (the factory's own arguments are kept) bound to the test's connection; every
        scope, task-owned session and request scope of the registry gets such a session.
        The factory is restored when the test ends. With ``adopt=True`` (the
        ``asyncorm_registry`` fixture), ``db()`` in the test's own task returns
        :attr:`session` itself. Binding a registry twice is a no-op. Returns ``registry``.
        """
        if not isinstance(registry, async_scoped_session):
            raise TypeError(
                f"bind() needs an asyncorm.async_scoped_session; {registry!r} is not one."
            )
        for bound, _, _ in self._bound:
            if bound is registry:
                return registry
        original = registry.session_factory
        registry.session_factory = _joined_factory(original, self.connection, registry)
        self._bound.append((registry, original, adopt))
        if adopt and self._test_task is not None and asyncio.current_task() is self._test_task:
            self._adopt(registry)
        return registry

    # -- the test's own task ----------------------------------------------------------------

    def _enter_test_task(self) -> None:
        """Called first thing in the test's task: check the loop, adopt the registries."""
        if asyncio.get_running_loop() is not self._loop:
            raise EventLoopMismatchError(self._mismatch())
        self._test_task = asyncio.current_task()
        for registry, _, adopt in self._bound:
            if adopt:
                self._adopt(registry)

    def _adopt(self, registry: async_scoped_session[Any]) -> None:
        """``db()`` in the current task (the test's) is :attr:`session`, never closed by the
        registry: a scope with no frame and no tracker (``remove()`` leaves it alone)."""
        task = asyncio.current_task()
        assert task is not None
        registry._contextvar.set(_Scope(task, self.session, None, None, {}))

    # -- guards -----------------------------------------------------------------------------

    def _refuse_commit(self, conn: Connection) -> None:
        raise RuntimeError(
            "The test's outer transaction (asyncorm_connection) cannot be "
            "committed: it is what rolls the test's work back. Commit a session instead "
            "(asyncorm_session, or one from asyncorm_transaction.sessionmaker: its commit "
            "releases a savepoint), or use `async with connection.begin_nested():`."
        )

    def _check_loop(self, conn: Connection, *args: Any) -> None:
        if asyncio.get_running_loop() is not self._loop:
            raise EventLoopMismatchError(self._mismatch())

    # -- the end ----------------------------------------------------------------------------

    async def end(self) -> None:
        """Roll everything back: the registries' sessions closed and their factories
        restored, the test's session closed, the outer transaction rolled back, the
        connection returned."""
        try:
            for registry, _, _ in self._bound:
                await registry.wait_closed()
        finally:
            for registry, original, _ in reversed(self._bound):
                registry.session_factory = original
            self._bound.clear()
            try:
                if self._session is not None:
                    await self._session.close()
            finally:
                event.remove(self._sync, "commit", self._refuse_commit)
                event.remove(self._sync, "before_cursor_execute", self._check_loop)
                try:
                    if self._transaction.is_active:
                        await self._transaction.rollback()
                finally:
                    await self.connection.close()


def _default_mismatch() -> str:
    return (
        "The test's transaction was begun in another event loop than the one this code runs "
        "in, and a database connection works only in the loop that opened it. Run the test "
        "and the fixtures that use the transaction in one loop (docs/testing.md, 'Event "
        "loops')."
    )


_CHARACTERISTICS = frozenset(
    {"isolation_level", "postgresql_readonly", "postgresql_deferrable", READ_ONLY}
)
"""Execution options a session applies to its connection when it begins, which would alter
the shared test connection for good (or fail: its transaction is already begun)."""


class _JoinedSessionmaker(async_sessionmaker[Any]):
    """A factory whose sessions are joined to the test's transaction.

    Made from another factory (its arguments kept), with ``bind`` the test's connection and
    savepoints for ``commit()``/``rollback()``. A session applies its execution options to
    the connection it begins on, which here is shared by every session of the test, so the
    connection characteristics (isolation level, READ ONLY) are not passed on: a
    ``read_only=True`` session refuses writes itself instead, before anything is sent.
    """

    def __call__(self, **local_kw: Any) -> Any:
        kw = {**self.kw, **local_kw}
        if "info" in self.kw and "info" in local_kw:  # merged, as SQLAlchemy's factory does
            kw["info"] = {**self.kw["info"], **local_kw["info"]}
        read_only = bool(kw.pop("read_only", False))
        options = dict(kw.get("execution_options") or {})
        read_only = read_only or bool(options.get(READ_ONLY))
        kw["execution_options"] = {k: v for k, v in options.items() if k not in _CHARACTERISTICS}
        kw.update(_JOIN)
        session = self.class_(**kw)
        if read_only:
            _refuse_writes(session)
        return session


def _joined_factory(
    original: Callable[..., Any], connection: AsyncConnection, registry: Any
) -> Callable[..., Any]:
    """``original``, making its sessions bound to ``connection`` with savepoints."""
    if isinstance(original, sa_async_sessionmaker):
        if original.kw.get("binds"):
            raise ValueError(
                f"The session factory of {registry!r} has binds= (one engine per mapper); "
                f"the test's transaction is on one connection of one database, so it cannot "
                f"be bound to it. Bind the registry's factory to one engine in tests."
            )
        kw = {**original.kw, "bind": connection}
        return _JoinedSessionmaker(class_=original.class_, **kw)
    return functools.partial(original, bind=connection, **_JOIN)


def _refuse_writes(session: Any) -> None:
    """Make a read-only session joined to the test's transaction refuse writes itself (a
    savepoint cannot be READ ONLY, and the connection is shared)."""
    if hasattr(session, "read_only"):
        session.read_only = True
    sync = session.sync_session

    def before_flush(s: Session, flush_context: Any, instances: Any) -> None:
        if s.new or s.dirty or s.deleted:
            raise _read_only_error("flushing its changes")

    def do_orm_execute(state: ORMExecuteState) -> None:
        statement = state.statement
        if (state.is_insert or state.is_update or state.is_delete) or (
            isinstance(statement, TextClause) and _text_writes(statement.text)
        ):
            raise _read_only_error(f"the statement {shown_statement(str(statement))!r}")

    event.listen(sync, "before_flush", before_flush)
    event.listen(sync, "do_orm_execute", do_orm_execute)


def _read_only_error(what: str) -> ReadOnlySessionError:
    return ReadOnlySessionError(
        f"This session is read-only (read_only=True), and {what} writes; nothing was "
        f"sent. Use a session without read_only=True for work that writes."
    )


# -- one watcher per (engine, loop): return the loop's connections before it closes -------

_watched: weakref.WeakKeyDictionary[Any, weakref.WeakSet[asyncio.AbstractEventLoop]] = (
    weakref.WeakKeyDictionary()
)
_watchers: set[asyncio.Task[None]] = set()


def watch_loop(engine: AsyncEngine) -> None:
    """Return ``engine``'s connections (``dispose()``) when the running loop shuts down."""
    loop = asyncio.get_running_loop()
    loops = _watched.setdefault(engine.sync_engine, weakref.WeakSet())
    if loop in loops:
        return
    loops.add(loop)
    watcher = loop.create_task(_dispose_at_shutdown(engine), name="asyncorm: engine watcher")
    _watchers.add(watcher)
    watcher.add_done_callback(_watchers.discard)


async def _dispose_at_shutdown(engine: AsyncEngine) -> None:
    """Wait until the loop shuts down (its tasks cancelled), then return the connections."""
    try:
        await asyncio.Future()
    except asyncio.CancelledError:
        await engine.dispose()
        raise
