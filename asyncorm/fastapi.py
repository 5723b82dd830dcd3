"""FastAPI: a typed dependency that yields the request's session.

``session_dependency(db)`` returns a dependency for ``Depends``. With
:class:`asyncorm.starlette.SessionMiddleware` installed it yields the request's scope session
(what ``db()`` returns in the handler), and the middleware decides when to commit. Without it,
the dependency opens ``db.scope()`` for the request itself and closes it at teardown (the
handler commits).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from starlette.requests import HTTPConnection

from ._errors import ScopeError
from ._registry import async_scoped_session
from ._session import AsyncSession
from .starlette import SCOPE_KEY

__all__ = ["session_dependency"]

_AS = TypeVar("_AS", bound=AsyncSession)


def session_dependency(
    registry: async_scoped_session[_AS], **session_kwargs: Any
) -> Callable[[HTTPConnection], AsyncIterator[_AS]]:
    """Return a FastAPI dependency that yields the current request's session.

    With ``SessionMiddleware(registry=registry)`` installed, the dependency yields ``db()``:
    the session of the scope the middleware opened for this request (``session_kwargs`` are
    ignored then; configure the middleware). Without the middleware it runs the request's
    dependency in ``async with registry.scope(**session_kwargs)``: ``db()`` in the handler is
    the same session, and the scope closes (rolling back what was not committed) at the
    dependency's teardown. Works for HTTP and websocket routes.

    Example::

        from typing import Annotated
        from fastapi import Depends, FastAPI
        from asyncorm import AsyncSession
        from asyncorm.fastapi import session_dependency

        get_session = session_dependency(db)
        DB = Annotated[AsyncSession, Depends(get_session)]

        @app.post("/users")
        async def create_user(name: str, session: DB) -> int:
            user = User(name=name)
            session.add(user)
            await session.commit()
            return user.id

    .. versionadded:: 0.1
    """

    async def get_session(connection: HTTPConnection) -> AsyncIterator[_AS]:
        if any(r is registry for r in connection.scope.get(SCOPE_KEY, ())):
            _check_request_task(registry)
            yield registry()
            return
        async with registry.scope(**session_kwargs) as session:
            yield session

    return get_session


def _check_request_task(registry: async_scoped_session[Any]) -> None:
    """Refuse to run in another task than the one the middleware opened the scope in."""
    scope = registry._contextvar.get()
    task = asyncio.current_task()
    if scope is None or task is None or scope.owner is task:
        return
    raise ScopeError(
        f"session_dependency({registry!r}) runs in task {task.get_name()!r}, but "
        f"SessionMiddleware opened the request's scope in task {scope.owner.get_name()!r}: "
        f"a BaseHTTPMiddleware (@app.middleware('http')) between them runs the app in a "
        f"task of its own, where db() is that task's own session, not the request's, and "
        f"the middleware's commit policy cannot commit it. Put SessionMiddleware inside "
        f"every BaseHTTPMiddleware: call app.add_middleware(SessionMiddleware, ...) before "
        f"any @app.middleware('http') (the middleware added last is the outermost)."
    )
