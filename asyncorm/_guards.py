"""The concurrent-use guard: one task at a time runs IO on a session.

Every awaitable member of :class:`asyncorm.AsyncSession` is wrapped so that, while one task
awaits an operation on a session, another task starting an operation on the same session gets
:class:`~asyncorm.ConcurrentSessionUseError` before anything reaches the database; the first
operation is not touched. Handing a session from task to task in turn stays allowed, and an
operation may call another on the same session from the same task (``scalars()`` calls
``execute()``, the awaitable query terminals call ``execute()``).

The check is a few attribute reads per call and never awaits: the guard records which task
is inside the session (``_asyncorm_owner``) and what it is doing (``_asyncorm_op``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from ._errors import ConcurrentSessionUseError

if TYPE_CHECKING:
    from ._session import AsyncSession

__all__ = ["concurrent_use_error", "enter", "guarded", "leave", "task_label"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

_current_task = asyncio.current_task

_OUTSIDE_TASKS = object()
"""The owner recorded for code awaiting outside any asyncio task (a hand-driven coroutine)."""


def task_label(task: object) -> str:
    """``task 'name'`` for a message."""
    if isinstance(task, asyncio.Task):
        return f"task {task.get_name()!r}"
    return "code running outside any asyncio task"


def concurrent_use_error(
    session: AsyncSession, task: object, operation: str
) -> ConcurrentSessionUseError:
    """The error for ``task`` starting ``operation`` while another task is inside ``session``."""
    return ConcurrentSessionUseError(
        f"Session <{type(session).__name__} {id(session):#x}> is in use by "
        f"{task_label(session._asyncorm_owner)} ({session._asyncorm_op}()); "
        f"{task_label(task)} tried to call {operation}() on it at the same time. A session "
        f"runs one operation at a time: give each concurrent task its own session "
        f"(`async with Session() as session:` or `async with db.scope():` inside the task) "
        f"or await the operations in turn."
    )


def enter(session: AsyncSession, operation: str) -> bool:
    """Mark ``session`` as used by the current task for ``operation``.

    Returns True when this call took the session (the caller then calls :func:`leave`),
    False when the current task is already inside an operation on it. Raises
    :class:`ConcurrentSessionUseError` when another task is.
    """
    task = _current_task() or _OUTSIDE_TASKS
    owner = session._asyncorm_owner
    if owner is None:
        session._asyncorm_owner = task
        session._asyncorm_op = operation
        return True
    if owner is task:
        return False
    raise concurrent_use_error(session, task, operation)


def leave(session: AsyncSession) -> None:
    """Mark ``session`` idle again."""
    session._asyncorm_owner = session._asyncorm_op = None


def guarded(
    operation: str,
    method: Callable[Concatenate[AsyncSession, _P], Awaitable[_T]],
    base: type | None = None,
) -> Callable[Concatenate[AsyncSession, _P], Coroutine[Any, Any, _T]]:
    """Wrap an awaitable session member in the concurrent-use guard.

    With ``base``, the member is looked up on ``base`` at each call rather than once, so that
    code patching SQLAlchemy's class (a test's ``patch.object(AsyncSession, "scalar")``)
    reaches asyncorm's sessions too, as it would a plain subclass that does not override it.
    """
    name = method.__name__

    @functools.wraps(method)
    async def guard(self: AsyncSession, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        call = method if base is None else getattr(base, name)
        task = _current_task() or _OUTSIDE_TASKS
        owner = self._asyncorm_owner
        if owner is None:
            self._asyncorm_owner = task
            self._asyncorm_op = operation
            try:
                return await call(self, *args, **kwargs)
            finally:
                self._asyncorm_owner = self._asyncorm_op = None
        if owner is task:  # an operation calling another one, in the same task
            return await call(self, *args, **kwargs)
        raise concurrent_use_error(self, task, operation)

    return guard
