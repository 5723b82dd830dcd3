"""``AsyncSession`` and ``async_sessionmaker``.

The session's own API: the guards on its members, ``get()`` from the identity map, the
cleanups, ``commit()``, ``on_commit()``, ``query()``, and the factory. The commit they share
with the transaction context managers is in :mod:`asyncorm._commit`; those context managers
(what ``begin()`` and ``Session.begin()`` return) are in :mod:`asyncorm._begin`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from sqlalchemy import util as sa_util
from sqlalchemy.exc import NoResultFound
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.ext.asyncio.session import _AsyncSessionContextManager
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.util import greenlet_spawn

from ._begin import _BeginContext, _Transaction
from ._cancellation import deliver_later
from ._commit import _commit_in_two_phases, _to_completion, closes_inline
from ._errors import close_in_unit_error
from ._fastget import load as _fast_load
from ._fastget import plan as _fast_plan
from ._guards import enter, guarded, leave
from ._identity import identity_map_hit
from ._lazyload import SyncSession
from ._oncommit import OnCommitCallback, Pending, register
from ._options import read_only_options
from ._query import AsyncQuery

if TYPE_CHECKING:
    from sqlalchemy.orm._typing import OrmExecuteOptionsParameter
    from sqlalchemy.orm.interfaces import ORMOption
    from sqlalchemy.orm.session import _EntityBindKey, _PKIdentityArgument
    from sqlalchemy.sql.selectable import ForUpdateParameter

__all__ = ["AsyncSession", "async_sessionmaker"]

_O = TypeVar("_O")
_C = TypeVar("_C", bound=OnCommitCallback)
_AS = TypeVar("_AS", bound=sa_asyncio.AsyncSession)

_AsyncBase = sa_asyncio.AsyncSession
_SA_CLOSE = _AsyncBase.close


class AsyncSession(sa_asyncio.AsyncSession):
    """SQLAlchemy's :class:`~sqlalchemy.ext.asyncio.AsyncSession`, plus ``query()`` and guards.

    A drop-in: constructed directly it takes SQLAlchemy's arguments with SQLAlchemy's
    defaults, and every documented member keeps its meaning. The identity map, unit of
    work, flush and autoflush are SQLAlchemy's own. On top of them:

    * **One task at a time.** A task starting IO on the session (any awaitable member, the
      awaitable query terminals, ``async with session.begin()``) while another task's IO on
      it is in flight gets :class:`~asyncorm.ConcurrentSessionUseError` before anything
      reaches the database; the other task's operation is unharmed. Handing the session from
      task to task in turn is fine.
    * **No implicit IO.** Reading a lazy relationship, an expired attribute or a deferred
      column outside an awaited call raises :class:`~asyncorm.LazyLoadError` naming the
      attribute and the fixes.
    * **get() without a greenlet.** ``await session.get(User, 5)`` answers from the identity
      map directly when the object is there and not expired; on a miss it loads the row with
      a statement prebuilt per mapper when that is exactly SQLAlchemy's load
      (``fast_get=False`` turns that off); otherwise it is SQLAlchemy's ``get()``.
    * **Clean cancellation.** ``close()``, ``rollback()`` and the rollback of a failed
      ``async with session.begin():`` run to completion when the task is cancelled, and the
      cancellation is raised after; with an engine from :func:`asyncorm.create_engine` the
      connection goes back to the pool rolled back and alive.
    * **A commit is never reported as cancelled.** ``commit()`` and the commit of
      ``async with session.begin():`` / ``Session.begin()`` flush first, cancellably (a
      cancellation then rolls back), and then send COMMIT without letting a cancellation
      interrupt it: once it succeeded they return normally and the cancellation is delivered
      at the task's next await; a connection lost during COMMIT raises
      :class:`~asyncorm.TransactionOutcomeUnknownError` (docs/errors.md, "Cancellation").
    * **on_commit(fn)**: side effects that run after the outermost transaction commits, in
      order, and are dropped when it rolls back (see :meth:`on_commit`).
    * **write=True** (here, on the factory, or ``db.scope(write=True)``): every transaction of
      the session is a declared unit of work, as if begun with ``session.begin()``: on SQLite
      it takes the writer turn before its first read (``BEGIN IMMEDIATE``), so a
      read-modify-write never conflicts. For code that will write: a POST handler, a job.
    * **read_only=True** (here, on the factory, or ``db.scope(read_only=True)``): a write
      raises :class:`~asyncorm.ReadOnlySessionError` and nothing is written (SQLite: refused
      before it is sent; PostgreSQL: the transactions are ``READ ONLY``). On SQLite such a
      session reads a snapshot and never waits for a writer.

    On SQLite a session's transaction begins deferred when its first statement reads (a
    snapshot: sessions that only read never wait for each other or for a writer) and takes
    the engine's writer turn at its first write; a transaction begun explicitly
    (``session.begin()``, ``Session.begin()``) is a declared unit of work and begins
    IMMEDIATE. See docs/sessions.md, "SQLite transactions".

    A custom ``sync_session_class`` should subclass ``AsyncSession.sync_session_class``
    (SQLAlchemy's ``Session`` with the lazy-load check); with a plain ``Session`` subclass,
    implicit IO fails with SQLAlchemy's own ``MissingGreenlet`` instead.

    Example::

        async with asyncorm.AsyncSession(engine) as session:
            session.add(User(name="ann"))
            await session.commit()
            ann = await session.query(User).filter_by(name="ann").one()

    .. versionadded:: 0.1
    """

    sync_session_class: type[Session] = SyncSession

    def __init__(
        self,
        bind: AsyncEngine | AsyncConnection | None = None,
        *,
        read_only: bool = False,
        write: bool = False,
        fast_get: bool = True,
        **kw: Any,
    ) -> None:
        if read_only and write:
            raise ValueError("A session cannot be both read_only=True and write=True.")
        if read_only:
            kw["execution_options"] = {**(kw.get("execution_options") or {}),
                                       **read_only_options()}  # fmt: skip
        super().__init__(bind, **kw)
        self.read_only = read_only
        """Whether the session refuses writes (``read_only=True``)."""
        self.write = write
        """Whether every transaction of the session is a declared unit of work
        (``write=True``): on SQLite it begins IMMEDIATE, as ``session.begin()`` does."""
        self.fast_get = fast_get
        try:
            opened_by = asyncio.current_task()
        except RuntimeError:  # constructed outside an event loop
            opened_by = None
        self._asyncorm_opened_by = opened_by
        """The task that opened the session: the owner of the SQLite writer turn it takes."""

    fast_get: bool = True
    """Whether ``get()`` loads a missing object with a statement prebuilt per mapper when
    that is exactly SQLAlchemy's load (the default); ``False`` runs SQLAlchemy's ``get()`` on
    every identity-map miss. Set by the ``fast_get`` argument; may be changed at any time."""

    _asyncorm_owner: object | None = None
    """The task inside an operation on this session, None when idle (see ``_guards``)."""
    _asyncorm_op: str | None = None
    """The name of that operation."""
    _asyncorm_on_commit: Pending | None = None
    """The session's on_commit callbacks (see ``_oncommit``), None until the first one."""
    _asyncorm_unit: str | None = None
    """The name of the transactional unit whose function runs in this session, if any: the
    unit commits when it returns, and refuses a commit in the middle (see ``_transaction``)."""

    # -- the concurrent-use guard on every awaitable member ---------------------------------

    if not TYPE_CHECKING:  # type checkers keep SQLAlchemy's (overloaded) signatures
        execute = guarded("execute", _AsyncBase.execute, _AsyncBase)
        scalar = guarded("scalar", _AsyncBase.scalar, _AsyncBase)
        scalars = guarded("scalars", _AsyncBase.scalars, _AsyncBase)
        stream = guarded("stream", _AsyncBase.stream, _AsyncBase)
        stream_scalars = guarded("stream_scalars", _AsyncBase.stream_scalars, _AsyncBase)
        delete = guarded("delete", _AsyncBase.delete, _AsyncBase)
        delete_all = guarded("delete_all", _AsyncBase.delete_all, _AsyncBase)
        merge = guarded("merge", _AsyncBase.merge, _AsyncBase)
        merge_all = guarded("merge_all", _AsyncBase.merge_all, _AsyncBase)
        flush = guarded("flush", _AsyncBase.flush, _AsyncBase)
        refresh = guarded("refresh", _AsyncBase.refresh, _AsyncBase)
        run_sync = guarded("run_sync", _AsyncBase.run_sync, _AsyncBase)
        connection = guarded("connection", _AsyncBase.connection, _AsyncBase)

    async def get(
        self,
        entity: _EntityBindKey[_O],
        ident: _PKIdentityArgument,
        *,
        options: Sequence[ORMOption] | None = None,
        populate_existing: bool | None = None,
        with_for_update: ForUpdateParameter = None,
        identity_token: Any | None = None,
        execution_options: OrmExecuteOptionsParameter = sa_util.EMPTY_DICT,
    ) -> _O | None:
        """Return the object with primary key ``ident``, or ``None``, as SQLAlchemy's ``get()``.

        An object present in the identity map and not expired is returned without SQL and
        without entering SQLAlchemy's greenlet bridge (``options`` do not apply to such an
        object in SQLAlchemy's ``get()`` either). A missing object is loaded with a
        ``select()`` built once per mapper, the same SQL and the same load as ``get()``'s,
        unless an argument, the identifier, the mapper or a listener could make the results
        differ (docs/sessions.md, "get() by primary key"); then, and with
        ``fast_get=False``, it is SQLAlchemy's ``get()``.

        Example::

            user = await session.get(User, 5)
        """
        took = enter(self, "get")
        try:
            found = self._identity_map_hit(
                entity,
                ident,
                populate_existing,
                with_for_update,
                identity_token,
                execution_options,
            )
            if found is not None:
                return found  # type: ignore[no-any-return]
            if (
                self.fast_get
                and options is None
                and populate_existing is None
                and with_for_update is None
                and identity_token is None
                and not execution_options
            ):
                fast = _fast_plan(self.sync_session, entity, ident)
                if fast is not None:
                    return await greenlet_spawn(_fast_load, self.sync_session, fast)
            return await _AsyncBase.get(
                self,
                entity,
                ident,
                options=options,
                populate_existing=populate_existing,
                with_for_update=with_for_update,
                identity_token=identity_token,
                execution_options=execution_options,
            )
        finally:
            if took:
                leave(self)

    async def get_one(
        self,
        entity: _EntityBindKey[_O],
        ident: _PKIdentityArgument,
        *,
        options: Sequence[ORMOption] | None = None,
        populate_existing: bool | None = None,
        with_for_update: ForUpdateParameter = None,
        identity_token: Any | None = None,
        execution_options: OrmExecuteOptionsParameter = sa_util.EMPTY_DICT,
    ) -> _O:
        """As :meth:`get`, raising :class:`~sqlalchemy.exc.NoResultFound` for no row."""
        took = enter(self, "get_one")  # get() below runs inside this guard
        try:
            found = await self.get(
                entity,
                ident,
                options=options,
                populate_existing=populate_existing,
                with_for_update=with_for_update,
                identity_token=identity_token,
                execution_options=execution_options,
            )
        finally:
            if took:
                leave(self)
        if found is None:  # as SQLAlchemy's Session.get_one()
            raise NoResultFound("No row was found when one was required")
        return found

    def _identity_map_hit(
        self,
        entity: Any,
        ident: Any,
        populate_existing: bool | None,
        with_for_update: ForUpdateParameter,
        identity_token: Any,
        execution_options: OrmExecuteOptionsParameter,
    ) -> Any:
        """What get() finds in the identity map without SQL, or None (then ask SQLAlchemy)."""
        if populate_existing or with_for_update is not None or identity_token is not None:
            return None
        if execution_options:  # e.g. populate_existing given as an execution option
            return None
        return identity_map_hit(self.sync_session, entity, ident)

    # -- cleanup runs to completion, even when the task is cancelled meanwhile ---------------

    async def rollback(self) -> None:
        """Roll back the current transaction, to completion even if the task is cancelled."""
        await self._cleanup("rollback", _AsyncBase.rollback)

    async def close(self) -> None:
        """Close the session (expunge all, release connections), to completion.

        A cancellation arriving meanwhile is raised once the connection is back in the pool.
        """
        if self._asyncorm_unit is not None:
            raise close_in_unit_error(self._asyncorm_unit, "close()")
        if _AsyncBase.close is _SA_CLOSE and closes_inline(self.sync_session):
            # no transaction: SQLAlchemy's close() only expunges, no greenlet needed
            took = enter(self, "close")
            try:
                self.sync_session.close()
            finally:
                if took:
                    leave(self)
            return
        await self._cleanup("close", _AsyncBase.close)

    async def reset(self) -> None:
        """As SQLAlchemy's ``reset()``, to completion even if the task is cancelled."""
        if self._asyncorm_unit is not None:
            raise close_in_unit_error(self._asyncorm_unit, "reset()")
        await self._cleanup("reset", _AsyncBase.reset)

    async def invalidate(self) -> None:
        """As SQLAlchemy's ``invalidate()``, to completion even if the task is cancelled."""
        await self._cleanup("invalidate", _AsyncBase.invalidate)

    async def _cleanup(
        self, operation: str, method: Callable[[_AsyncBase], Coroutine[Any, Any, None]]
    ) -> None:
        took = enter(self, operation)  # may raise: create the coroutine only after it
        try:
            await _to_completion(self, method(self))
        finally:
            if took:
                leave(self)

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        await self.close()

    # -- transactions ----------------------------------------------------------------------

    def begin(self) -> sa_asyncio.AsyncSessionTransaction:
        """Begin a transaction: ``async with session.begin():`` commits, or rolls back."""
        return _Transaction(self)

    def begin_nested(self) -> sa_asyncio.AsyncSessionTransaction:
        """Begin a SAVEPOINT: ``async with session.begin_nested():``."""
        return _Transaction(self, nested=True)

    async def commit(self) -> None:
        """Commit the current transaction, as SQLAlchemy's ``commit()``.

        Pending changes are flushed first, cancellably: a cancellation during the flush rolls
        the transaction back (to completion) and is raised. The COMMIT itself is never
        interrupted: a cancellation arriving while it is on its way is held back; when the
        COMMIT succeeds, ``commit()`` returns normally and the cancellation is delivered at
        the task's next suspension. A connection failing once COMMIT was sent raises
        :class:`~asyncorm.TransactionOutcomeUnknownError`.
        """
        held: list[asyncio.CancelledError] = []
        try:
            await self._commit_holding(held)
        finally:
            deliver_later(held)

    async def _commit_holding(self, held: list[asyncio.CancelledError]) -> None:
        """``commit()``, leaving the cancellations held back to the caller (``held``)."""
        took = enter(self, "commit")
        try:
            await _commit_in_two_phases(
                self, self.sync_session.commit, self._roll_back_if_cancelled, held
            )
        finally:
            if took:
                leave(self)

    def on_commit(self, fn: _C) -> _C:
        """Run ``fn()`` after the outermost transaction commits; drop it on rollback.

        ``fn`` is called with no argument; if it returns an awaitable (an ``async def``
        function), that is awaited. Callbacks run in the order they were registered, once
        COMMIT has succeeded, at the end of the ``commit()`` (or of the ``begin()`` block)
        that committed, with the connection already back in the pool. A callback registered
        inside a savepoint (``begin_nested()``) waits for the outermost commit too, and is
        dropped if that savepoint rolls back; every callback is dropped when the
        transaction rolls back or the session closes without committing. Registered outside
        any transaction, it waits for the session's next transaction.

        A callback that raises does not stop the others: once they all ran, the commit
        raises :class:`~asyncorm.OnCommitError` (the data is committed). A cancellation
        arriving while they run is held back, as during COMMIT, and delivered after them.
        Returns ``fn``, so it can decorate.

        Example::

            session.add(order)
            session.on_commit(lambda: print("order saved"))
            session.on_commit(functools.partial(send_receipt, order.id))  # async def
            await session.commit()          # commits, then runs both in order

        .. versionadded:: 0.2
        """
        register(self, fn)
        return fn

    def _roll_back_if_cancelled(self, exc: BaseException) -> Awaitable[None] | None:
        # an ordinary flush error leaves the transaction to the caller, as SQLAlchemy does
        return None if isinstance(exc, Exception) else self.rollback()

    # -- the legacy Query ------------------------------------------------------------------

    @overload
    def query(self, entity: type[_O], /) -> AsyncQuery[_O]: ...

    @overload
    def query(self, entity: Mapper[_O], /) -> AsyncQuery[_O]: ...

    @overload
    def query(self, *entities: Any) -> AsyncQuery[Any]: ...

    def query(self, *entities: Any) -> AsyncQuery[Any]:
        """Start a legacy-style query; the terminal methods are awaited.

        Example::

            user = await session.query(User).filter(User.id == 5).one()
            rows = await session.query(User.id, User.name).order_by(User.id).all()
        """
        return AsyncQuery(self, entities)


class async_sessionmaker(sa_asyncio.async_sessionmaker[_AS]):
    """A configured :class:`AsyncSession` factory, as SQLAlchemy's ``async_sessionmaker``.

    Differences from SQLAlchemy's: it produces :class:`asyncorm.AsyncSession`, and
    ``expire_on_commit`` defaults to ``False``. After commit an expired attribute would be
    reloaded on access, which is implicit IO, and implicit IO fails under asyncio; objects
    stay readable after commit instead. Pass ``expire_on_commit=True`` to get SQLAlchemy's
    behaviour back.

    Example::

        Session = asyncorm.async_sessionmaker()      # at import time
        Session.configure(bind=engine)               # at startup

        async with Session() as session:
            ...
        async with Session.begin() as session:       # commits, or rolls back on error
            session.add(User(name="ann"))
        session = Session(autoflush=False)           # per-call overrides

    .. versionadded:: 0.1
    """

    @overload
    def __init__(
        self,
        bind: AsyncEngine | AsyncConnection | None = ...,
        *,
        class_: type[_AS],
        autoflush: bool = ...,
        expire_on_commit: bool = ...,
        info: dict[Any, Any] | None = ...,
        **kw: Any,
    ) -> None: ...

    @overload
    def __init__(
        self: async_sessionmaker[AsyncSession],
        bind: AsyncEngine | AsyncConnection | None = ...,
        *,
        autoflush: bool = ...,
        expire_on_commit: bool = ...,
        info: dict[Any, Any] | None = ...,
        **kw: Any,
    ) -> None: ...

    def __init__(
        self,
        bind: AsyncEngine | AsyncConnection | None = None,
        *,
        class_: type[_AS] = AsyncSession,  # type: ignore[assignment]
        autoflush: bool = True,
        expire_on_commit: bool = False,
        info: dict[Any, Any] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(
            bind,
            class_=class_,
            autoflush=autoflush,
            expire_on_commit=expire_on_commit,
            info=info,
            **kw,
        )

    def begin(self) -> _AsyncSessionContextManager[_AS]:
        """A new session in a transaction: ``async with Session.begin() as session:``.

        Leaving the block commits and closes the session; an exception rolls back. Unlike
        SQLAlchemy's, the commit runs in the caller's task, so a cancellation of the caller
        is not lost: arriving before COMMIT is sent, it rolls the transaction back and is
        raised; arriving while COMMIT is on its way, it waits for the COMMIT, the block
        exits normally (the data is committed), and the cancellation is delivered at the
        task's next suspension. A connection failing once COMMIT was sent raises
        :class:`~asyncorm.TransactionOutcomeUnknownError`. With a ``class_`` that is not an
        :class:`asyncorm.AsyncSession`, this is SQLAlchemy's ``begin()``.

        Example::

            async with Session.begin() as session:
                session.add(User(name="ann"))
            # committed and closed
        """
        if not issubclass(self.class_, AsyncSession):
            return super().begin()
        return _BeginContext(self())
