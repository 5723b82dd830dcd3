"""aiohttp integration: one registry scope per request, and cleanup on shutdown.

:func:`setup` installs a middleware that runs every request handler inside
``async with registry.scope(**kwargs):`` (so ``db()`` in the handler is the request's session,
taking no connection until its first IO), and a cleanup context that, when the application
shuts down, waits for the registry's background closes and disposes of the engines bound to
the registry's factory.

Commit policy (``commit=``):

* ``None`` (the default): nothing is committed unless the handler commits; whatever is left
  is rolled back when the scope ends.
* ``"auto"``: the request's session is committed when the handler's response has a status
  below 400, *before* the response is sent; a failing commit raises, so aiohttp answers 500
  and the client never sees a 2xx for work that was not committed. A status of 400 or more,
  an exception (including a raised ``web.HTTPException`` of status 400 or more), or a
  client that disconnected before the handler returned (aiohttp's default
  ``handler_cancellation=False`` lets such a handler run on) rolls back. A raised
  ``HTTPFound`` (or any 3xx) counts as below 400 and commits. A response the handler
  prepared itself (a streamed ``StreamResponse``, a ``WebSocketResponse``) has sent its
  headers already: it is committed when the handler returns, so the client may have seen a
  200 for work whose commit then fails; aiohttp then drops the connection, and a body the
  handler had not finished (no ``write_eof()``) reaches the client truncated, as an error.

aiohttp is an optional extra (``pip install asyncorm[aiohttp]``); ``import asyncorm`` never
imports this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ._errors import UncommittedTaskWorkError
from ._registry import async_scoped_session
from ._scope import _ScopeContext, lost_work_message

__all__ = ["READ_ONLY_METHODS", "REGISTRY_KEY", "setup"]

READ_ONLY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
"""The HTTP methods that do not change state; pass as ``setup(..., read_only_methods=...)``."""

REGISTRY_KEY: Final = web.AppKey("asyncorm.registry", async_scoped_session)
"""``app[REGISTRY_KEY]`` is the registry :func:`setup` installed on ``app``."""

SessionKwargs = Mapping[str, Any] | Callable[[web.Request], Mapping[str, Any]]


@dataclass(frozen=True)
class _Policy:
    registry: async_scoped_session[Any]
    auto: bool
    read_only_methods: frozenset[str]
    session_kwargs: SessionKwargs | None

    def kwargs_for(self, request: web.Request) -> dict[str, Any]:
        """The session arguments of ``request``'s scope."""
        user = self.session_kwargs
        if callable(user):
            user = user(request)
        user = dict(user or {})
        if "read_only" in user or "write" in user:  # the user chose: no defaults
            return user
        if request.method in self.read_only_methods:
            return {"read_only": True, **user}
        if self.auto:
            return {"write": True, **user}
        return user


async def _commit(
    registry: async_scoped_session[Any], request: web.Request, scope: _ScopeContext[Any]
) -> None:
    """Commit the current task's (the request's) session when it has anything to commit,
    unless the client is gone: then nothing is committed (the scope rolls back). Writes left
    uncommitted by tasks the handler spawned (their own sessions, rolled back) are lost
    work: :class:`~asyncorm.UncommittedTaskWorkError`, nothing committed, a 500."""
    if _client_gone(request):
        return
    if lost := scope.unsaved_children():
        raise UncommittedTaskWorkError(lost_work_message(lost, ""))
    session: AsyncSession = registry()
    if session.in_transaction() or session.new or session.deleted or session.dirty:
        await session.commit()


def _client_gone(request: web.Request) -> bool:
    """Whether the request's connection was lost (aiohttp drops its transport then)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def setup(
    app: web.Application,
    registry: async_scoped_session[Any],
    *,
    commit: Literal["auto"] | None = None,
    read_only_methods: frozenset[str] | None = None,
    session_kwargs: SessionKwargs | None = None,
    dispose_engine: bool = True,
) -> None:
    """Give each request of ``app`` its own registry scope, and clean up on shutdown.

    Installs, on ``app``:

    * a middleware (appended to ``app.middlewares``) that runs each handler inside
      ``async with registry.scope(**kwargs):``. ``db()`` in the handler, and in anything it
      awaits, is the request's session; tasks the handler spawns get sessions of their own.
      The scope ends (session closed, uncommitted work rolled back, connection returned)
      when the handler returns, raises, or is cancelled (client gone with
      ``handler_cancellation=True``, or a shutdown past its timeout).
    * with ``commit="auto"``: a commit when the handler returns a response (or raises an
      ``HTTPException``) of status below 400, before aiohttp sends it; a failing commit
      raises, so the client gets a 500. A response the handler prepared (streamed) itself
      is committed when the handler returns, after its headers went out. Nothing is
      committed when the client disconnected before the handler returned.
    * ``read_only_methods`` (e.g. :data:`READ_ONLY_METHODS`): requests with those methods get
      ``registry.scope(read_only=True)``, so a write raises ``ReadOnlySessionError`` (500).
      With ``commit="auto"``, other methods get ``registry.scope(write=True)`` (declared units
      of work: no write conflicts on SQLite). ``session_kwargs`` (a mapping, or a function of
      the request returning one) is added to those; when it names ``read_only`` or ``write``
      it replaces both defaults.
    * a cleanup context (``app.cleanup_ctx``) whose shutdown half awaits
      ``registry.wait_closed()`` and, if ``dispose_engine``, disposes of the engine(s) bound
      to the registry's factory (``bind=`` and ``binds=``).

    Example::

        db = asyncorm.async_scoped_session(asyncorm.async_sessionmaker(engine))

        async def create_user(request: web.Request) -> web.Response:
            db.add(User(name=(await request.json())["name"]))
            return web.json_response({"ok": True}, status=201)   # committed before sent

        app = web.Application()
        app.router.add_post("/users", create_user)
        asyncorm.aiohttp.setup(app, db, commit="auto",
                               read_only_methods=asyncorm.aiohttp.READ_ONLY_METHODS)

    .. versionadded:: 0.1
    """
    if commit not in (None, "auto"):
        raise ValueError(f"commit must be None or 'auto', got {commit!r}.")
    if REGISTRY_KEY in app:
        raise RuntimeError(
            f"asyncorm.aiohttp.setup() was already called on {app!r} (with "
            f"{app[REGISTRY_KEY]!r}); one scope per request needs one middleware. Use one "
            f"registry per application."
        )
    policy = _Policy(
        registry=registry,
        auto=commit == "auto",
        read_only_methods=frozenset(m.upper() for m in read_only_methods or ()),
        session_kwargs=session_kwargs,
    )
    app[REGISTRY_KEY] = registry
    app.middlewares.append(_make_middleware(policy))
    app.cleanup_ctx.append(_make_cleanup(registry, dispose_engine))


def _make_middleware(policy: _Policy) -> Any:
    registry = policy.registry

    @web.middleware
    async def asyncorm_scope(
        request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        scope = registry.scope(**policy.kwargs_for(request))
        async with scope:
            try:
                response: web.StreamResponse = await handler(request)
            except web.HTTPException as exc:
                if policy.auto and exc.status < 400:  # HTTPFound and friends
                    await _commit(registry, request, scope)
                raise
            if policy.auto and response.status < 400:
                # Not prepared yet (a web.Response): aiohttp sends it after we return, so a
                # failing commit becomes a 500. Prepared by the handler (streamed, websocket):
                # its headers are out; a failing commit makes aiohttp drop the connection.
                # A client that disconnected meanwhile gets nothing committed.
                await _commit(registry, request, scope)
            return response

    return asyncorm_scope


def _bound_engines(registry: async_scoped_session[Any]) -> list[AsyncEngine]:
    """The engines bound to the registry's factory (``bind=`` and ``binds=``), each once."""
    kw: Mapping[str, Any] = getattr(registry.session_factory, "kw", {})
    candidates = [kw.get("bind"), *(kw.get("binds") or {}).values()]
    engines: list[AsyncEngine] = []
    for bind in candidates:
        if isinstance(bind, AsyncEngine) and all(bind is not e for e in engines):
            engines.append(bind)
    return engines


def _make_cleanup(
    registry: async_scoped_session[Any], dispose_engine: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def asyncorm_cleanup(app: web.Application) -> AsyncIterator[None]:
        yield
        # aiohttp runs this after the in-flight requests finished or were cancelled: their
        # scopes are left; wait for the closes still running in the background.
        await registry.wait_closed()
        if dispose_engine:
            for engine in _bound_engines(registry):
                await engine.dispose()

    return asyncorm_cleanup
