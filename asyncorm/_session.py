"""``AsyncSession`` and ``async_sessionmaker``."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from sqlalchemy import util as sa_util
from sqlalchemy.exc import NoResultFound
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.orm import Mapper, Session

from ._cancellation import ending_may_suspend, run_to_completion
from ._guards import enter, guarded, leave
from ._identity import identity_map_hit
from ._lazyload import SyncSession
from ._query import AsyncQuery

if TYPE_CHECKING:
    from sqlalchemy.orm._typing import OrmExecuteOptionsParameter
    from sqlalchemy.orm.interfaces import ORMOption
    from sqlalchemy.orm.session import _EntityBindKey, _PKIdentityArgument
    from sqlalchemy.sql.selectable import ForUpdateParameter

__all__ = ["AsyncSession", "async_sessionmaker"]

_O = TypeVar("_O")
_AS = TypeVar("_AS", bound=sa_asyncio.AsyncSession)

_AsyncBase = sa_asyncio.AsyncSession


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
      map directly when the object is there and not expired; otherwise it is SQLAlchemy's
      ``get()``.
    * **Clean cancellation.** ``close()``, ``rollback()`` and the rollback of a failed
      ``async with session.begin():`` run to completion when the task is cancelled, and the
      cancellation is raised after; with an engine from :func:`asyncorm.create_engine` the
      connection goes back to the pool rolled back and alive.

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

    _asyncorm_owner: object | None = None
    """The task inside an operation on this session, None when idle (see ``_guards``)."""
    _asyncorm_op: str | None = None
    """The name of that operation."""

    # -- the concurrent-use guard on every awaitable member ---------------------------------

    if not TYPE_CHECKING:  # type checkers keep SQLAlchemy's (overloaded) signatures
        execute = guarded("execute", _AsyncBase.execute)
        scalar = guarded("scalar", _AsyncBase.scalar)
        scalars = guarded("scalars", _AsyncBase.scalars)
        stream = guarded("stream", _AsyncBase.stream)
        stream_scalars = guarded("stream_scalars", _AsyncBase.stream_scalars)
        delete = guarded("delete", _AsyncBase.delete)
        delete_all = guarded("delete_all", _AsyncBase.delete_all)
        merge = guarded("merge", _AsyncBase.merge)
        merge_all = guarded("merge_all", _AsyncBase.merge_all)
        flush = guarded("flush", _AsyncBase.flush)
        commit = guarded("commit", _AsyncBase.commit)
        refresh = guarded("refresh", _AsyncBase.refresh)
        run_sync = guarded("run_sync", _AsyncBase.run_sync)
        connection = guarded("connection", _AsyncBase.connection)

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
        object in SQLAlchemy's ``get()`` either).

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
        await self._cleanup("close", _AsyncBase.close)

    async def reset(self) -> None:
        """As SQLAlchemy's ``reset()``, to completion even if the task is cancelled."""
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


async def _to_completion(session: AsyncSession, cleanup: Coroutine[Any, Any, None]) -> None:
    """Await a cleanup coroutine; to completion if it may do IO.

    A cleanup that cannot suspend cannot be interrupted by a cancellation, so it needs no
    task of its own (which costs ~20-30 microseconds): so it is without a transaction, or when
    the transaction's one connection has no transaction open on the server (a PostgreSQL
    session that only read, its BEGIN deferred) and its return to the pool does no IO (see
    ``ending_may_suspend``).
    """
    if _cleanup_may_suspend(session.sync_session):
        await run_to_completion(cleanup)
    else:
        await cleanup


def _cleanup_may_suspend(sync_session: Session) -> bool:
    if sync_session.get_transaction() is None:
        return False
    if not isinstance(sync_session, SyncSession):
        return True  # a custom sync_session_class: its connections are not known
    open_connections = [c for c in sync_session.transaction_connections() if not c.closed]
    if len(open_connections) > 1:
        return True  # returning one can make the pool close the next: not worth judging
    return any(ending_may_suspend(c) for c in open_connections)


class _Transaction(sa_asyncio.AsyncSessionTransaction):
    """SQLAlchemy's ``AsyncSessionTransaction`` under the session's guard.

    The rollback of a failed ``async with session.begin():`` block runs to completion even
    if the task is cancelled meanwhile.
    """

    __slots__ = ()

    @property
    def _owner(self) -> AsyncSession:
        return cast(AsyncSession, self.session)

    async def start(self, is_ctxmanager: bool = False) -> sa_asyncio.AsyncSessionTransaction:
        took = enter(self._owner, "begin")
        try:
            return await super().start(is_ctxmanager)
        finally:
            if took:
                leave(self._owner)

    async def commit(self) -> None:
        took = enter(self._owner, "commit")
        try:
            await super().commit()
        finally:
            if took:
                leave(self._owner)

    async def rollback(self) -> None:
        took = enter(self._owner, "rollback")
        try:
            await run_to_completion(sa_asyncio.AsyncSessionTransaction.rollback(self))
        finally:
            if took:
                leave(self._owner)

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        exit_ = sa_asyncio.AsyncSessionTransaction.__aexit__
        if type_ is None:
            took = enter(self._owner, "commit")
            try:
                await exit_(self, type_, value, traceback)
            finally:
                if took:
                    leave(self._owner)
            return
        took = enter(self._owner, "rollback")
        try:
            await run_to_completion(exit_(self, type_, value, traceback))
        finally:
            if took:
                leave(self._owner)


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
