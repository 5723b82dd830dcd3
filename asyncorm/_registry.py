"""``async_scoped_session``: the per-task session registry.

The state of a registry is one :class:`~contextvars.ContextVar` holding an immutable
:class:`_Scope`: which task owns it, its session (``None`` until the first ``db()``), the
scope frame that opened it (``None`` for a session a task got outside any scope), and the
session arguments. A task spawned inside a scope inherits a *copy* of its parent's context,
so it sees the parent's scope; the owner check makes it ignore that scope instead of sharing
the parent's session. Nothing is keyed by task id and no mutable mapping is shared.

Every session the registry creates is tracked by a weak reference (:class:`_Tracker`) kept
in the registry's set of live sessions until the session is closed; if the session is
garbage collected first (the event loop was torn down), the tracker's callback warns with a
``ResourceWarning`` naming where the session was created.

``_Scope``, ``_ScopeContext`` (what ``db.scope()`` returns) and ``_Tracker`` are in
:mod:`asyncorm._scope`; this module holds the registry's API and the closing of its sessions.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Coroutine, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, TypeVar, overload

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import async_sessionmaker as sa_async_sessionmaker

from ._cancellation import mark_cleanup_task
from ._errors import NoSessionScopeError, ScopeError, close_in_unit_error
from ._proxy import install_session_proxies
from ._scope import (
    _creation_site,
    _current_task,
    _is_pristine,
    _no_task_message,
    _Scope,
    _ScopeContext,
    _strict_message,
    _Tracker,
)
from ._session import AsyncSession
from ._transaction import OnRetry, UnitDecorator, decorate_for_registry, settings

__all__ = ["async_scoped_session"]

_AS = TypeVar("_AS", bound=AsyncSession)
_T = TypeVar("_T")
_P = ParamSpec("_P")


if TYPE_CHECKING:
    # For type checkers the registry *is* an AsyncSession: `db.add`, `await db.commit()`,
    # `db.execute(...)`, `db.query(User)` get AsyncSession's own signatures. At run time the
    # members are proxies generated from the class by _proxy.install_session_proxies().
    _SessionAPI = AsyncSession
else:

    class _SessionAPI:
        __slots__ = ()


class async_scoped_session(_SessionAPI, Generic[_AS]):
    """The per-task session registry: ``db()`` is the session of the current unit of work.

    The asyncio replacement for the thread-local ``scoped_session``, built on contextvars:

    * ``async with db.scope() as session:`` (or ``@db.scoped``, or the framework middleware)
      binds one session to the current task; leaving the scope closes it (uncommitted work
      rolled back, connection returned), even when the task is cancelled. No session takes
      a connection before its first IO.
    * ``db()`` in the task that opened the scope returns that scope's session. A nested
      scope in the same task opens a new, independent session and restores the outer one
      when it ends.
    * A task with no scope of its own, including a child task spawned inside a scope (it
      inherits a copy of its parent's context), never gets another task's session: ``db()``
      there returns a session owned by that task, closed automatically when the task ends
      however it ends. With ``strict=True`` it raises :class:`NoSessionScopeError` instead.
    * Every public :class:`AsyncSession` member is proxied: ``db.add(obj)``,
      ``await db.commit()``, ``await db.execute(stmt)``, ``db.query(User)``, ``db.new`` ...
      each acting on ``db()`` looked up where the call is written. For type checkers the
      registry is an ``AsyncSession`` (so these are typed); at run time it is not one.

    Example::

        db = asyncorm.async_scoped_session(asyncorm.async_sessionmaker(engine))

        async def handler(user_id: int) -> str:
            user = await db.get(User, user_id)      # the request's session
            return user.name

        async with db.scope():
            await handler(5)
            db.add(User(name="ann"))
            await db.commit()

    .. versionadded:: 0.1
    """

    __slots__ = ("__weakref__", "_closing", "_contextvar", "_live", "session_factory", "strict")

    session_factory: Callable[..., _AS]
    """The factory given to the constructor, for when an unscoped session is needed."""

    strict: bool
    """Whether ``db()`` outside a scope of the current task raises NoSessionScopeError."""

    def __init__(self, session_factory: Callable[..., _AS], *, strict: bool = False) -> None:
        self.session_factory = session_factory
        self.strict = strict
        self._contextvar: ContextVar[_Scope[_AS] | None] = ContextVar(
            "asyncorm_scope", default=None
        )
        # trackers of the sessions created and not closed yet (weak: holds no session)
        self._live: set[_Tracker] = set()
        # background closes in flight: strong references, so the loop cannot drop them
        self._closing: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        strict = ", strict=True" if self.strict else ""
        return f"<async_scoped_session of {self.session_factory!r}{strict}>"

    # -- the current session --------------------------------------------------------------

    def __call__(self) -> _AS:
        """Return the current task's session, creating it on first use.

        Inside a scope opened by this task: that scope's session. Anywhere else: a session
        owned by the current task and closed when the task ends, or, on a strict registry,
        :class:`NoSessionScopeError`. Raises :class:`ScopeError` outside any asyncio task.

        Unlike SQLAlchemy's registry it takes no arguments: pass session arguments to
        :meth:`scope`.
        """
        scope = self._contextvar.get()
        try:
            task = _current_task()
        except RuntimeError:  # no running event loop
            task = None
        if scope is not None and scope.owner is task:
            session = scope.session
            # the frame knows the scope's current session (remove(), or a scope ended from
            # another task, replace it); the ContextVar holds a copy for this fast path
            if session is not None and (scope.frame is None or scope.frame._session is session):
                return session
        return self._resolve(scope, task)

    def _resolve(self, scope: _Scope[_AS] | None, task: asyncio.Task[Any] | None) -> _AS:
        """The slow path of ``db()``: create the session the current task should see."""
        if task is None:
            raise ScopeError(_no_task_message("db()"))
        if scope is not None and scope.owner is task:  # own scope, first use
            frame = scope.frame
            if frame is None:
                session, tracker = self._create(task, scope.kwargs)
                task.add_done_callback(functools.partial(self._task_done, session, tracker))
            elif frame._session is not None and frame._tracker is not None:
                session, tracker = frame._session, frame._tracker  # created in another context
            else:
                session, tracker = self._create(task, frame._session_kwargs())
                frame._session, frame._tracker = session, tracker
            self._contextvar.set(_Scope(task, session, tracker, frame, scope.kwargs))
            return session
        if self.strict:
            raise NoSessionScopeError(_strict_message(task, scope))
        session, tracker = self._create(task, {})
        self._contextvar.set(_Scope(task, session, tracker, None, {}))
        task.add_done_callback(functools.partial(self._task_done, session, tracker))
        if scope is not None and scope.frame is not None:
            scope.frame._adopt(task, tracker)  # a task spawned inside another task's scope
        return session

    def _create(self, task: asyncio.Task[Any], kwargs: Mapping[str, Any]) -> tuple[_AS, _Tracker]:
        session = self.session_factory(**kwargs)
        tracker = _Tracker(session, self._abandoned)
        tracker.site = _creation_site()
        tracker.task_name = task.get_name()
        self._live.add(tracker)
        return session, tracker

    # -- scopes ---------------------------------------------------------------------------

    def scope(self, **session_kwargs: Any) -> _ScopeContext[_AS]:
        """Open a scope: the current task's unit of work, with its own session.

        ``async with db.scope(**session_kwargs) as session:`` creates the session (with the
        factory's arguments overridden by ``session_kwargs``; it takes no connection until
        its first IO), makes it what ``db()`` returns in this task, and closes it on the way
        out: uncommitted work is rolled back and the connection returned, also when the task
        is cancelled. The scope does not commit; call ``await db.commit()``.

        A scope nested in another scope of the same task has a new, independent session;
        the outer session is ``db()`` again once the inner scope ends. A scope must be left
        by the task that entered it, else :class:`ScopeError`.

        Example::

            async with db.scope() as session:
                session.add(User(name="ann"))
                await db.commit()               # db() is session here

        .. versionadded:: 0.1
        """
        return _ScopeContext(self, session_kwargs)

    def scoped(
        self, fn: Callable[_P, Coroutine[Any, Any, _T]]
    ) -> Callable[_P, Coroutine[Any, Any, _T]]:
        """Decorate a coroutine function so that each call runs in its own scope.

        The session is created on the first ``db()`` of the call (a call that never uses
        the database creates none) and closed when the call returns, raises or is
        cancelled. Signature, name and docstring are preserved.

        Example::

            @db.scoped
            async def nightly_report(day: date) -> int:
                return await db.query(Order).filter(Order.day == day).count()

        .. versionadded:: 0.1
        """
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"@db.scoped decorates coroutine functions (async def); {fn!r} is not one. "
                f"For an async generator or a callable object, use `async with db.scope():` "
                f"inside it."
            )

        @functools.wraps(fn)
        async def scoped_call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            frame = _ScopeContext(self, {})
            frame._open(eager=False)
            try:
                return await fn(*args, **kwargs)
            finally:
                await frame._shut()

        return scoped_call

    @overload
    def transactional(
        self, fn: Callable[_P, Coroutine[Any, Any, _T]], /
    ) -> Callable[_P, Coroutine[Any, Any, _T]]: ...

    @overload
    def transactional(
        self,
        fn: None = None,
        /,
        *,
        retries: int = ...,
        isolation_level: str | None = ...,
        read_only: bool = ...,
        deferrable: bool = ...,
        backoff: Callable[[int], float] | None = ...,
        on_retry: OnRetry | None = ...,
    ) -> UnitDecorator: ...

    def transactional(
        self,
        fn: Callable[..., Coroutine[Any, Any, Any]] | None = None,
        /,
        *,
        retries: int = 3,
        isolation_level: str | None = None,
        read_only: bool = False,
        deferrable: bool = False,
        backoff: Callable[[int], float] | None = None,
        on_retry: OnRetry | None = None,
    ) -> Any:
        """Decorate a coroutine function so that each call is one transaction, retried.

        Each call runs in a scope of its own (``db()`` is a new session there), in one
        transaction begun with ``isolation_level``; returning commits (then runs the
        ``on_commit`` callbacks), raising rolls back. After an error that
        :func:`asyncorm.is_retryable` says is safe (PostgreSQL serialization failure or
        deadlock, SQLite busy/locked or :class:`~asyncorm.WriteConflictError`) the whole
        function runs again in a new scope, up to ``retries`` times, after a pause of
        ``backoff(n)`` seconds before retry ``n`` (default :class:`asyncorm.Backoff`:
        exponential, bounded, with jitter); ``on_retry(error, attempt, pause)`` is called
        before each pause. Nothing else is retried, never a cancellation or a connection lost
        during COMMIT (:class:`~asyncorm.TransactionOutcomeUnknownError`). The error ending a
        unit carries the attempt count as ``asyncorm_attempts`` (and a note after retries).

        Called while the task's session is in a transaction (inside another unit, or a
        scope that used its session), the function runs in a savepoint of that transaction
        instead and never retries on its own: the outermost unit retries the whole.

        The arguments are those of :func:`asyncorm.transactional`; ``isolation_level`` is
        PostgreSQL's ``"READ COMMITTED"``/``"REPEATABLE READ"``/``"SERIALIZABLE"`` or SQLite's
        ``"IMMEDIATE"`` (its default)/``"DEFERRED"``. See docs/transactions.md.

        Example::

            @db.transactional(retries=5, isolation_level="SERIALIZABLE")
            async def take_job(job_id: int) -> None:
                job = await db.get_one(Job, job_id)
                job.state = "done"
                db.on_commit(lambda: print(f"job {job_id} done"))

            await take_job(7)

        .. versionadded:: 0.2
        """
        s = settings(
            retries=retries,
            isolation_level=isolation_level,
            read_only=read_only,
            deferrable=deferrable,
            backoff=backoff,
            on_retry=on_retry,
        )
        if fn is not None:
            return decorate_for_registry(self, fn, s)
        return functools.partial(decorate_for_registry, self, s=s)

    def _peek(self, task: asyncio.Task[Any]) -> _AS | None:
        """The session ``task`` has in this registry, without creating one."""
        scope = self._contextvar.get()
        if scope is None or scope.owner is not task:
            return None
        return scope.session

    async def remove(self) -> None:
        """Close the current task's session and forget it, as in SQLAlchemy.

        Inside a scope the next ``db()`` creates a fresh session for the rest of the scope;
        outside one, a fresh task-owned session. Does nothing when the current task has no
        session (a child task never closes its parent's).

        .. versionadded:: 0.1
        """
        scope = self._contextvar.get()
        try:
            task = _current_task()
        except RuntimeError:
            task = None
        if task is None:
            raise ScopeError(_no_task_message("db.remove()"))
        if scope is None or scope.owner is not task:
            return
        current = scope.session if scope.frame is None else scope.frame._session
        if current is not None and current._asyncorm_unit is not None:
            raise close_in_unit_error(current._asyncorm_unit, "db.remove()")
        frame = scope.frame
        if frame is None:
            session, tracker = scope.session, scope.tracker
            if session is None or tracker is None:
                return  # not the registry's to close (the pytest plugin's test session)
            self._contextvar.set(None)
        else:
            session, tracker = frame._session, frame._tracker
            frame._session = frame._tracker = None
            self._contextvar.set(_Scope(task, None, None, frame, scope.kwargs))
        if session is None or tracker is None:
            return
        await self._close(session, tracker)

    def configure(self, **kwargs: Any) -> None:
        """Reconfigure the session factory, e.g. ``db.configure(bind=engine)`` at startup.

        Sessions already created keep their configuration; a warning says so when there
        are any. The factory must be an ``async_sessionmaker``.
        """
        factory = self.session_factory
        if not isinstance(factory, sa_async_sessionmaker):
            raise TypeError(
                f"configure() needs the registry's factory to be an async_sessionmaker; "
                f"{factory!r} is not one. Configure the factory itself."
            )
        if self._live:
            warnings.warn(
                f"{len(self._live)} session(s) of {self!r} already exist; configure() affects "
                f"only the sessions created after it.",
                sa_exc.SAWarning,
                stacklevel=2,
            )
        factory.configure(**kwargs)

    # -- introspection --------------------------------------------------------------------

    @property
    def live_sessions(self) -> int:
        """How many sessions this registry created and has not closed yet (all tasks).

        A session counts until its close has finished, including closes that run in the
        background after a task ended or was cancelled; :meth:`wait_closed` waits for those.

        .. versionadded:: 0.1
        """
        return len(self._live)

    async def wait_closed(self) -> None:
        """Wait until the sessions this registry is closing in the background are closed.

        Sessions of tasks that ended (including one that ended just now), and of scopes left
        by cancelled tasks, are closed in background tasks. Await this before disposing of
        the engine at shutdown. Sessions of scopes and tasks still running are not waited for.

        .. versionadded:: 0.1
        """
        loop = asyncio.get_running_loop()
        # A task that just ended has its done callbacks queued but not run yet: yield once so
        # that they start the closes this waits for.
        await asyncio.sleep(0)
        while pending := [t for t in self._closing if t.get_loop() is loop]:
            await asyncio.wait(pending)

    # -- closing --------------------------------------------------------------------------

    async def _close(self, session: _AS, tracker: _Tracker) -> None:
        """Close a session of the current task; the close completes even if we are cancelled."""
        if _is_pristine(session):
            self._live.discard(tracker)
            return
        closer = asyncio.get_running_loop().create_task(self._close_now(session, tracker))
        self._closing.add(closer)
        closer.add_done_callback(self._closing.discard)
        try:
            await asyncio.shield(closer)
        except asyncio.CancelledError:
            closer.add_done_callback(self._report_failed_close)  # nobody else will see it
            raise

    async def _close_now(self, session: _AS, tracker: _Tracker) -> None:
        # this task is the close's protection already: session.close() need not add a task
        mark_cleanup_task()
        try:
            await session.close()
        finally:
            self._live.discard(tracker)

    def _task_done(self, session: _AS, tracker: _Tracker, task: asyncio.Task[Any]) -> None:
        """Done callback of a task that got a session outside any scope: close it."""
        if tracker not in self._live:  # already closed by db.remove()
            return
        if _is_pristine(session):
            self._live.discard(tracker)
            return
        loop = task.get_loop()
        if loop.is_closed():  # nothing can close it now; the tracker will warn
            return
        closer = loop.create_task(
            self._close_now(session, tracker),
            name=f"asyncorm: close the session of task {task.get_name()!r}",
        )
        self._closing.add(closer)
        closer.add_done_callback(self._closing.discard)
        closer.add_done_callback(self._report_failed_close)

    def _report_failed_close(self, closer: asyncio.Task[None]) -> None:
        if closer.cancelled() or closer.exception() is None:
            return
        closer.get_loop().call_exception_handler(
            {
                "message": f"{self!r} failed to close a session in the background",
                "exception": closer.exception(),
                "task": closer,
            }
        )

    def _abandoned(self, tracker: weakref.ref[Any]) -> None:
        """Callback of a tracker whose session was garbage collected: warn if never closed."""
        assert isinstance(tracker, _Tracker)
        if tracker not in self._live:
            return
        self._live.discard(tracker)
        file, line, function = tracker.site
        warnings.warn(
            f"A session created by {self!r} at {file}:{line} in {function}() for task "
            f"{tracker.task_name!r} was never closed, so its transaction and connection were "
            f"abandoned: its scope was never left, or the event loop stopped before the scope "
            f"or the task ended. Leave every scope in the task that entered it and let tasks "
            f"finish (or `await db.remove()`) before the loop closes.",
            ResourceWarning,
            stacklevel=2,
        )

    # -- what AsyncSession has but a registry cannot do -----------------------------------

    async def __aenter__(self) -> NoReturn:
        raise TypeError(_NOT_A_CONTEXT_MANAGER)

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        raise TypeError(_NOT_A_CONTEXT_MANAGER)


_NOT_A_CONTEXT_MANAGER = (
    "A session registry is not itself a context manager; open a scope with "
    "`async with db.scope() as session:`."
)


install_session_proxies(async_scoped_session)
