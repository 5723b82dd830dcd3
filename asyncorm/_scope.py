"""One scope of a session registry, and the records the registry keeps of its sessions.

:class:`_Scope` is the immutable value of a registry's ContextVar (which task owns it, its
session, the frame that opened it); :class:`_ScopeContext` is what ``db.scope()`` returns,
the single-use context manager that sets and resets it; :class:`_Tracker` is the weak
reference by which the registry knows each live session and where it was created, and
:func:`_is_pristine` says whether such a session needs a close at all. They are
the state a registry hands around, apart from :mod:`asyncorm._registry`, which holds the
registry's API and the closing of its sessions. The error messages both modules raise with
are here too.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import weakref
from collections.abc import Mapping
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from sqlalchemy.orm.session import _SessionCloseState

from ._errors import ScopeError
from ._session import AsyncSession
from ._unsaved import has_unsaved_writes

if TYPE_CHECKING:
    from ._registry import async_scoped_session

_AS = TypeVar("_AS", bound=AsyncSession)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_current_task = asyncio.current_task

_Site = tuple[str, int, str]  # file, line, function where a registry session was created


class _Scope(NamedTuple, Generic[_AS]):
    """The value of a registry's ContextVar: one task's scope. Never mutated; replaced."""

    owner: asyncio.Task[Any]
    session: _AS | None
    tracker: _Tracker | None  # in the registry's live set until `session` is closed
    frame: _ScopeContext[_AS] | None  # None: the task's own session, outside any scope
    kwargs: Mapping[str, Any]


class _ScopeContext(Generic[_AS]):
    """What ``db.scope()`` returns: a single-use async context manager for one scope."""

    __slots__ = (
        "_children",
        "_ended",
        "_kwargs",
        "_lost",
        "_owner",
        "_registry",
        "_session",
        "_state",
        "_token",
        "_tracker",
    )

    def __init__(self, registry: async_scoped_session[_AS], kwargs: Mapping[str, Any]) -> None:
        self._registry = registry
        self._kwargs = kwargs
        self._state = _NEW
        self._owner: asyncio.Task[Any] | None = None
        self._token: Token[_Scope[_AS] | None] | None = None
        # the scope's current session, what db() returns in its owner task (None until the
        # first db(), and after remove()); the ContextVar's _Scope holds a copy of it
        self._session: _AS | None = None
        self._tracker: _Tracker | None = None
        self._ended = False  # its unit of work was ended from another task: end_elsewhere()
        # sessions of tasks spawned inside this scope (registry rule 3), while they run
        self._children: dict[_Tracker, asyncio.Task[Any]] = {}
        # those that ended with writes left uncommitted in their session (rolled back)
        self._lost: list[tuple[asyncio.Task[Any], _Site]] = []

    def __repr__(self) -> str:
        owner = f" in task {self._owner.get_name()!r}" if self._owner is not None else ""
        return f"<scope {_STATE_NAMES[self._state]}{owner}>"

    async def __aenter__(self) -> _AS:
        session = self._open(eager=True)
        assert session is not None
        return session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shut()

    def _open(self, *, eager: bool) -> _AS | None:
        if self._state is not _NEW:
            raise ScopeError(
                f"{self!r} was already entered; a scope is single-use. Call db.scope() "
                f"again for a new one."
            )
        try:
            task = _current_task()
        except RuntimeError:
            task = None
        if task is None:
            raise ScopeError(_no_task_message("db.scope()"))
        registry = self._registry
        session = tracker = None
        if eager:
            session, tracker = registry._create(task, self._kwargs)
        self._session, self._tracker = session, tracker
        scope = _Scope(task, session, tracker, self, self._kwargs)
        self._token = registry._contextvar.set(scope)
        self._owner = task
        self._state = _OPEN
        return session

    async def _shut(self) -> None:
        if self._state is not _OPEN:
            raise ScopeError(f"{self!r} cannot be exited: it is not open.")
        try:
            task = _current_task()
        except RuntimeError:
            task = None
        assert self._owner is not None
        assert self._token is not None
        if task is not self._owner:
            where = f"task {task.get_name()!r}" if task is not None else "no task"
            raise ScopeError(
                f"A scope entered in task {self._owner.get_name()!r} was exited in {where}. "
                f"A scope must be left by the task that entered it: keep `async with "
                f"db.scope():` inside one task (fixtures and dependencies that yield may run "
                f"their setup and teardown in different tasks)."
            )
        registry = self._registry
        scope = registry._contextvar.get()
        if scope is None or scope.frame is not self:
            raise ScopeError(
                f"{self!r} was exited while a scope it encloses is still open; nested "
                f"scopes must be left innermost first."
            )
        self._state = _DONE
        session, tracker = self._session, self._tracker
        self._session = self._tracker = None
        self._children.clear()
        self._lost.clear()
        try:
            if session is not None and tracker is not None:
                await registry._close(session, tracker)
        finally:
            registry._contextvar.reset(self._token)

    # -- for the framework integrations -------------------------------------------------

    def _session_kwargs(self) -> Mapping[str, Any]:
        """The arguments of the scope's next session: none once its work ended elsewhere."""
        return {} if self._ended else self._kwargs

    @property
    def current_session(self) -> _AS | None:
        """The session ``db()`` returns in the scope's owner task now (None: not created)."""
        return self._session

    async def end_elsewhere(self) -> None:
        """End the scope's unit of work from another task than its owner.

        Only the owner can leave the scope (it resets the owner's ContextVar). This closes
        the scope's session now (uncommitted work rolled back, connection returned); in the
        owner task, ``db()`` then returns a new session with the factory's defaults, closed
        when the owner leaves the scope.
        """
        if self._state is not _OPEN:
            return
        self._ended = True
        session, tracker = self._session, self._tracker
        self._session = self._tracker = None
        if session is not None and tracker is not None:
            await self._registry._close(session, tracker)

    def _adopt(self, task: asyncio.Task[Any], tracker: _Tracker) -> None:
        """Remember the session of ``task``, spawned inside this scope, while it runs."""
        if self._state is not _OPEN:
            return
        self._children[tracker] = task
        task.add_done_callback(functools.partial(self._forget_child, tracker))

    def _forget_child(self, tracker: _Tracker, task: asyncio.Task[Any]) -> None:
        self._children.pop(tracker, None)
        # runs after the registry's own done callback, which only schedules the close: the
        # session still shows what the task left uncommitted
        session = tracker()
        if (
            self._state is _OPEN
            and session is not None
            and tracker in self._registry._live
            and has_unsaved_writes(session)
        ):
            self._lost.append((task, tracker.site))

    def unsaved_children(self) -> list[tuple[asyncio.Task[Any], _Site]]:
        """Tasks spawned inside this scope whose own session held or holds unsaved writes.

        Those that ended left them to be rolled back; those still running will, when they
        end (registry rule 3): nothing that ends this scope can commit that work.
        """
        live = self._registry._live
        found: list[tuple[asyncio.Task[Any], _Site]] = list(self._lost)
        for tracker, task in self._children.items():
            session = tracker()
            if task.done() or tracker not in live or session is None:
                continue
            if has_unsaved_writes(session):
                found.append((task, tracker.site))
        return found


_NEW, _OPEN, _DONE = 0, 1, 2
_STATE_NAMES = {_NEW: "not entered", _OPEN: "open", _DONE: "closed"}


# -- helpers --------------------------------------------------------------------------------


class _Tracker(weakref.ref[Any]):
    """A weak reference to a registry session, with where and for whom it was created."""

    __slots__ = ("site", "task_name")

    site: _Site
    task_name: str


def _is_pristine(session: AsyncSession) -> bool:
    """True when closing ``session`` would change nothing, so it needs no (async) close.

    No transaction was begun (so no connection is held), no object is attached, and close
    does not mark the session unusable (``close_resets_only=False``). Reads SQLAlchemy 2.1's
    private Session state; asyncorm pins SQLAlchemy below 2.2.
    """
    sync = session.sync_session
    return (
        sync._transaction is None
        and not sync.identity_map
        and not sync._new
        and not sync._deleted
        and sync._close_state is not _SessionCloseState.ACTIVE
    )


def _creation_site() -> _Site:
    """Where user code (the first frame outside asyncorm) asked for a session. ~0.5 us."""
    frame = sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name


def _no_task_message(what: str) -> str:
    return (
        f"{what} needs a running asyncio task, and was called outside one (in a thread, a "
        f"callback or with no running event loop). A registry session belongs to the task "
        f"that uses it: call it from a coroutine running in the event loop."
    )


def _strict_message(task: asyncio.Task[Any], scope: _Scope[Any] | None) -> str:
    name = task.get_name()
    if scope is None:
        where = f"in task {name!r}, outside any scope"
    else:
        where = (
            f"in task {name!r}, inside a scope of task {scope.owner.get_name()!r}; scopes "
            f"are not shared with child tasks"
        )
    return (
        f"db() was called {where}, and the registry is strict. Open a scope in this task: "
        f"`async with db.scope():`, decorate the coroutine with `@db.scoped`, or install "
        f"the framework middleware."
    )


def lost_work_message(lost: list[tuple[asyncio.Task[Any], _Site]], how_it_happened: str) -> str:
    """The message of :class:`~asyncorm.UncommittedTaskWorkError` for the tasks ``lost``."""
    tasks = ", ".join(
        f"task {task.get_name()!r} (its session created at {file}:{line} in {function}())"
        for task, (file, line, function) in lost
    )
    return (
        f"The request's auto-commit cannot commit the uncommitted writes of {tasks}: that "
        f"task runs inside the request but is not the request's task, so db() there is the "
        f"task's own session, rolled back when the task ends (a sub-task gathered by the "
        f"handler: commit in it, or pass it the request's session). {how_it_happened}A task "
        f"that outlives the request should open its own scope (@db.scoped). Nothing was "
        f"committed: the request is answered 500."
    )
