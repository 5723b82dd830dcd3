"""Clients that drive a web app against a test's transaction (the pytest plugin's fixtures).

The app's registry is found where the integrations put it (an ASGI app's
:class:`~asyncorm.starlette.SessionMiddleware`, an aiohttp app's
:data:`~asyncorm.aiohttp.REGISTRY_KEY`) or given as ``registry=``, and bound to the test's
transaction (:meth:`OuterTransaction.bind`): each request's scope gets a session of its own,
joined to the test's transaction, so the test sees what the request committed and the end of
the test rolls it back. httpx and aiohttp are imported only when a client is asked for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from ._outer import OuterTransaction
from ._registry import async_scoped_session

if TYPE_CHECKING:
    import httpx
    from aiohttp import web
    from aiohttp.test_utils import TestClient

__all__ = ["aiohttp_client", "asgi_client"]


@asynccontextmanager
async def asgi_client(
    app: Any,
    *,
    transaction: OuterTransaction,
    registry: async_scoped_session[Any] | None = None,
    base_url: str = "http://testserver",
    **client_kwargs: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` calling the ASGI ``app`` in the current task (httpx's
    ``ASGITransport``), the app's registry bound to ``transaction``.

    The registries of the app's ``SessionMiddleware`` are found in ``app.user_middleware``
    (Starlette, FastAPI) or in a chain of ``SessionMiddleware`` objects; pass ``registry=``
    for an app that opens scopes otherwise (the FastAPI dependency alone).
    """
    import httpx

    registries = _asgi_registries(app)
    if registry is not None:
        registries.append(registry)
    _bind_all(transaction, registries, app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=base_url, **client_kwargs) as client:
        yield client


@asynccontextmanager
async def aiohttp_client(
    app: web.Application,
    *,
    transaction: OuterTransaction,
    registry: async_scoped_session[Any] | None = None,
) -> AsyncIterator[TestClient[Any, Any]]:
    """aiohttp's ``TestClient`` on a ``TestServer`` running ``app`` (on a free loopback
    port, in the current loop), the registry of ``asyncorm.aiohttp.setup()`` (or
    ``registry=``) bound to ``transaction``. Handlers run in tasks of their own, so each
    request's scope has its own session joined to the test's transaction."""
    from aiohttp.test_utils import TestClient, TestServer

    from .aiohttp import REGISTRY_KEY

    registries = [app[REGISTRY_KEY]] if REGISTRY_KEY in app else []
    if registry is not None:
        registries.append(registry)
    _bind_all(transaction, registries, app)
    async with TestClient(TestServer(app)) as client:
        yield client


def _bind_all(
    transaction: OuterTransaction, registries: list[async_scoped_session[Any]], app: Any
) -> None:
    if not registries:
        raise ValueError(
            f"No asyncorm registry found in {app!r}: its requests would use the real "
            f"database, outside the test's transaction. Install the integration "
            f"(asyncorm.starlette.SessionMiddleware, asyncorm.aiohttp.setup) or pass the "
            f"registry the app uses: client(app, registry=db)."
        )
    for registry in registries:
        transaction.bind(registry)


def _asgi_registries(app: Any) -> list[async_scoped_session[Any]]:
    """The registries of the SessionMiddleware layers of ``app`` (without calling it)."""
    from .starlette import SessionMiddleware

    found: list[async_scoped_session[Any]] = []
    seen: set[int] = set()
    while app is not None and id(app) not in seen:
        seen.add(id(app))
        if isinstance(app, SessionMiddleware):
            found.append(app.registry)
        for middleware in getattr(app, "user_middleware", ()):  # Starlette, FastAPI
            cls = getattr(middleware, "cls", None)
            if isinstance(cls, type) and issubclass(cls, SessionMiddleware):
                kwargs = getattr(middleware, "kwargs", {})
                args = getattr(middleware, "args", ())
                candidate = kwargs.get("registry", args[0] if args else None)
                if isinstance(candidate, async_scoped_session):
                    found.append(candidate)
        app = getattr(app, "app", None)  # the app a middleware object wraps
    return found
