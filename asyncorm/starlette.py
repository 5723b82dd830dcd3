"""Pure ASGI middleware for Starlette (and FastAPI, and any ASGI app): one scope per request.

``SessionMiddleware(app, registry=db)`` opens ``db.scope()`` around every ``http`` and
``websocket`` connection, so ``db()`` in a handler is the request's session; ``lifespan``
passes through. It never uses ``BaseHTTPMiddleware``: it wraps ``receive`` and ``send``.

Timing of one HTTP request (``commit="auto"``)::

    server                  SessionMiddleware                   app (handler)
    ──────                  ─────────────────                   ─────────────
    call app ─────────────> enter request scope (session S) ──> db() is S; reads, writes
                            <── send(http.response.start 2xx) ─ return Response
                            S.commit()   (fails: raises, the 2xx is never sent -> 500)
    <── response.start ──── forward
    <── response.body ───── forward the last body message
                            leave request scope: S rolled back if anything is left
                            uncommitted, closed, connection returned
                            <───────────────────────────────── background tasks: db() is a
                                                                new session B
                            leave the call's scope: B closed
    call returns <────────

The request's scope ends when the last body message has been sent (or when the call ends, on
an error, a cancellation or a client disconnect), so background tasks, which Starlette runs
in the same task after the response, never see the request's session. When Starlette sends
the response from another task (ASGI < 2.4 servers stream in a task group), the commit and
the end of the request's work still apply to the session ``db()`` returns in the request's
task (the scope frame knows it), and the background tasks get a new session.

At response start the auto-commit first checks the tasks spawned inside the request (a
handler behind a ``BaseHTTPMiddleware`` runs in one): uncommitted writes in such a task's own
session cannot be committed by the request, so it raises ``UncommittedTaskWorkError`` (500)
instead of answering 2xx for lost work.
"""

from __future__ import annotations

import asyncio
import inspect
import warnings
from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping
from typing import Any, Final, Literal

from ._errors import ScopeError, UncommittedTaskWorkError
from ._registry import async_scoped_session
from ._scope import _ScopeContext, lost_work_message
from ._session import AsyncSession

__all__ = ["SessionMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SCOPE_KEY: Final = "asyncorm.registries"
"""The ASGI scope key listing the registries whose middleware opened a scope for the call."""

AUTO_COMMITS_KEY: Final = "asyncorm.auto_commits"
"""The ASGI scope key of the request scopes the outermost ``commit="auto"`` middleware settles."""

DEFAULT_READ_ONLY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
"""The methods that are usually safe: pass them as ``read_only_methods`` to enforce it."""


class SessionMiddleware:
    """Pure ASGI middleware: one registry scope per HTTP request and per websocket.

    Inside the app, ``db()`` is the request's session (created at the start of the request,
    taking no connection before its first query). The scope ends when the response's last
    body message has been sent, or when the call ends however it ends (an exception, a
    cancelled task, a client that disconnected): uncommitted work is rolled back and the
    connection goes back to the pool. Background tasks that run after the response (in the
    same ASGI call) get a new session of their own, closed when the call ends.

    ``commit``:

    * ``None`` (the default): the middleware never commits; the handler calls
      ``await db.commit()``. Whatever it did not commit is rolled back.
    * ``"auto"``: when the app sends ``http.response.start`` with a status below 400, the
      session is committed *before* the start message is forwarded: if the commit fails
      the exception propagates from ``send`` instead, so the framework answers 500 and the
      client never sees the success status. A status of 400 or more, an exception, or a
      client that disconnected (``http.disconnect`` received) rolls back. Requests whose
      method is not read-only get ``db.scope(write=True)`` (a declared unit of work, so a
      read-modify-write never conflicts on SQLite) unless ``session_kwargs`` is given.
      What a streaming body writes after the response started is not committed. A task
      spawned inside the request that still holds uncommitted writes in its own session
      when the response starts (a handler behind a ``BaseHTTPMiddleware``) makes the
      commit fail with :class:`~asyncorm.UncommittedTaskWorkError`, a 500.
      With several ``commit="auto"`` middlewares (one per registry), the outermost one
      settles them all at response start: every check, then a flush of every session, then
      the commits one after the other, outermost first. A failing commit still gives a 500,
      but the commits before it stand: there is no atomicity across databases.
      When the app has an exception handler for the commit's error (Starlette's
      ``exception_handlers={IntegrityError: ...}``, FastAPI's ``@app.exception_handler``),
      the middleware runs it and sends its response instead of the app's, as Starlette
      would for an error raised by the handler; otherwise the error propagates (a 500, and
      a handler for ``500``/``Exception`` runs).

    ``read_only_methods`` (e.g. :data:`DEFAULT_READ_ONLY_METHODS`): requests with these
    methods get ``db.scope(read_only=True)``; a write raises ``ReadOnlySessionError`` (a
    500). ``session_kwargs`` go to ``db.scope(**session_kwargs)`` for every connection.

    Websockets get one scope for the whole connection and no commit policy: commit in the
    handler.

    ``lifespan.shutdown`` reaches the app once this middleware's requests have ended (a
    server whose graceful shutdown timed out has cancelled them; they roll back first), or
    after ``shutdown_timeout`` seconds with a ``RuntimeWarning`` naming those still running.

    Example::

        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from asyncorm.starlette import SessionMiddleware

        app = Starlette(
            routes=routes,
            middleware=[Middleware(SessionMiddleware, registry=db, commit="auto")],
        )

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: ASGIApp,
        registry: async_scoped_session[Any],
        *,
        commit: Literal["auto"] | None = None,
        read_only_methods: Collection[str] | None = None,
        session_kwargs: Mapping[str, Any] | None = None,
        shutdown_timeout: float = 30.0,
    ) -> None:
        if commit not in (None, "auto"):
            raise ValueError(
                f"SessionMiddleware(commit={commit!r}) is not a commit policy: pass "
                f"commit=None (the handler commits) or commit='auto' (commit below 400)."
            )
        if not isinstance(registry, async_scoped_session):
            raise TypeError(
                f"SessionMiddleware(registry=...) needs an asyncorm.async_scoped_session; "
                f"{registry!r} is not one."
            )
        self.app = app
        self.registry = registry
        self.commit = commit
        self.read_only_methods = frozenset(m.upper() for m in read_only_methods or ())
        self.session_kwargs = dict(session_kwargs) if session_kwargs is not None else None
        # the scope of the whole call: the (lazy) session of background work after the
        # response; the request's scope is nested in it and ends with the response
        self._call = registry.scoped(self._serve)
        # the tasks serving a request or websocket now: lifespan shutdown waits for them
        self._serving: set[asyncio.Task[Any]] = set()
        self.shutdown_timeout = shutdown_timeout

    def _kwargs_for(self, scope: Scope) -> dict[str, Any]:
        kwargs = dict(self.session_kwargs or {})
        if scope["type"] != "http":
            return kwargs
        if scope["method"] in self.read_only_methods:
            kwargs.pop("write", None)
            kwargs["read_only"] = True
        elif self.commit == "auto" and self.session_kwargs is None:
            kwargs["write"] = True
        return kwargs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._wrap_lifespan_receive(receive), send)
            return
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
        try:
            await self._call(scope, receive, send)
        finally:
            self._serving.discard(task)

    def _wrap_lifespan_receive(self, receive: Receive) -> Receive:
        """Hold ``lifespan.shutdown`` back until the requests in flight have ended.

        A server whose graceful-shutdown timeout ran out (uvicorn's
        ``timeout_graceful_shutdown``) cancels the requests still running and sends
        ``lifespan.shutdown`` at once; the app's shutdown would then dispose of the engine
        while those requests are still rolling back, and their connections would go back
        to a disposed pool and never be closed. So the app sees the message only once every
        request task of this middleware has ended and the registry's closes are done.
        """

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self._requests_ended()
            return message

        return lifespan_receive

    async def _requests_ended(self) -> None:
        """Wait for this middleware's request tasks, at most ``shutdown_timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        while pending := [t for t in self._serving if t.get_loop() is loop]:
            remaining = deadline - loop.time()
            if remaining <= 0:
                names = ", ".join(repr(t.get_name()) for t in pending)
                warnings.warn(
                    f"SessionMiddleware: {len(pending)} request task(s) ({names}) were still "
                    f"running {self.shutdown_timeout:g} s after lifespan.shutdown (a task that "
                    f"ignored its cancellation?); the app's shutdown goes on, and their "
                    f"sessions' connections may never be closed. Raise shutdown_timeout, or "
                    f"let cancelled handlers end.",
                    RuntimeWarning,
                    stacklevel=1,
                )
                return
            await asyncio.wait(pending, timeout=remaining)
        await self.registry.wait_closed()

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = _RequestScope(self.registry, self.registry.scope(**self._kwargs_for(scope)))
        await request.open()
        scope[SCOPE_KEY] = (*scope.get(SCOPE_KEY, ()), self.registry)
        try:
            if scope["type"] == "websocket":
                await self.app(scope, receive, send)
                return
            # The outermost commit="auto" middleware settles every auto-commit of the call
            # (one per registry, outermost first) at response start; inner ones only join.
            plan: list[_RequestScope] | None = None
            if self.commit == "auto":
                joined = scope.get(AUTO_COMMITS_KEY)
                if joined is None:
                    plan = scope[AUTO_COMMITS_KEY] = [request]
                else:
                    joined.append(request)
            receive = request.wrap_receive(receive)
            await self.app(scope, receive, _wrap_send(scope, request, plan, receive, send))
        finally:
            await request.close()


def _wrap_send(
    scope: Scope,
    request: _RequestScope,
    plan: list[_RequestScope] | None,
    receive: Receive,
    send: Send,
) -> Send:
    replaced = False  # a failed commit's exception handler answered instead

    async def send_wrapper(message: Message) -> None:
        nonlocal replaced
        kind = message["type"]
        final = (kind == "http.response.body" and not message.get("more_body", False)) or (
            kind == "http.response.pathsend"
        )
        if replaced:  # the app's own response, after the commit failed: dropped
            if final:
                await request.finish()
            return
        if kind == "http.response.start" and plan is not None:
            try:
                await _settle(plan, message["status"])
            except Exception as exc:
                # raises: the start is never sent, the framework answers 500; unless the
                # app has an exception handler for it, which answers instead
                handler = _exception_handler(scope, exc)
                if handler is None:
                    raise
                for other in plan:
                    session = other.session()
                    if session is not None:
                        await session.rollback()
                replaced = True
                await _handle(handler, exc, scope, receive, send)
                return
        await send(message)
        if final:
            await request.finish()

    return send_wrapper


def _exception_handler(scope: Scope, exc: Exception) -> Callable[..., Any] | None:
    """The handler a Starlette (or FastAPI) app registered for ``exc``'s class, if any.

    Starlette's ExceptionMiddleware keeps them in the ASGI scope; it cannot run one for an
    error raised from ``send`` after ``http.response.start`` (the response has started, as
    far as it knows), so the middleware runs it, before anything was sent.
    """
    handlers = scope.get("starlette.exception_handlers")
    if not handlers:
        return None
    by_class: Mapping[Any, Callable[..., Any]] = handlers[0]
    for cls in type(exc).__mro__:
        if cls in by_class:
            return by_class[cls]
    return None


async def _handle(
    handler: Callable[..., Any], exc: Exception, scope: Scope, receive: Receive, send: Send
) -> None:
    """Run a Starlette exception handler as ExceptionMiddleware does, and send its response."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request

    request = Request(scope, receive, send)
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004
    ):
        response = await handler(request, exc)
    else:
        response = await run_in_threadpool(handler, request, exc)
    if response is not None:
        await response(scope, receive, send)


async def _settle(plan: list[_RequestScope], status: int) -> None:
    """Commit (below 400) or roll back every auto-commit request scope of the call.

    First the checks, then a flush of every session, then the commits one after the other
    (outermost middleware first): an error before the first commit leaves nothing committed.
    """
    sessions = [s for s in (request.session() for request in plan) if s is not None]
    if status < 400:  # a 4xx/5xx rolls back anyway: a task's unsaved writes lose nothing
        lost = [child for request in plan for child in request.unsaved_children()]
        if lost:
            raise UncommittedTaskWorkError(_lost_work_message(lost))
        for request in plan:
            await request.probe_disconnect()
    if status >= 400 or any(request.disconnected for request in plan):
        for session in sessions:
            await session.rollback()
        return
    if len(sessions) > 1:  # a commit flushes first anyway
        for session in sessions:
            await session.flush()
    for session in sessions:
        await session.commit()
    # a failure anywhere raises from send(): the start is never sent, and the sessions not
    # committed are rolled back when their scopes close, before the framework answers 500


def _lost_work_message(lost: list[tuple[asyncio.Task[Any], tuple[str, int, str]]]) -> str:
    return lost_work_message(
        lost,
        "A handler runs in a task of its own when a BaseHTTPMiddleware "
        "(@app.middleware('http')) sits inside SessionMiddleware: put SessionMiddleware inside "
        "every BaseHTTPMiddleware (after it in middleware=[...]), or use pure ASGI middleware. ",
    )


class _RequestScope:
    """The request's scope, entered by hand: it may end before the ASGI call does."""

    __slots__ = (
        "_body_read", "_context", "_owner", "_receive", "_registry", "_replay", "closed",
        "disconnected",
    )

    def __init__(self, registry: async_scoped_session[Any], context: _ScopeContext[Any]) -> None:
        self._registry = registry
        self._context = context
        self._owner = asyncio.current_task()
        self._receive: Receive | None = None
        self._body_read = False  # the app has received the request's last body message
        self._replay: asyncio.Task[Message] | None = None  # what probe_disconnect() took
        self.closed = False
        self.disconnected = False

    async def open(self) -> None:
        await self._context.__aenter__()

    def session(self) -> AsyncSession | None:
        """The session ``db()`` returns now in the request's task, from any task.

        ``None`` when there is none (``db.remove()`` was called and ``db()`` not since).
        """
        return self._context.current_session

    def unsaved_children(self) -> list[tuple[asyncio.Task[Any], tuple[str, int, str]]]:
        """Tasks spawned inside the request whose own session holds uncommitted writes."""
        return self._context.unsaved_children()

    def wrap_receive(self, receive: Receive) -> Receive:
        self._receive = receive

        async def receive_wrapper() -> Message:
            if self._replay is not None:
                replay, self._replay = self._replay, None
                message = replay.result()  # the message (or error) probe_disconnect() took
            else:
                message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
            elif message["type"] == "http.request" and not message.get("more_body", False):
                self._body_read = True
            return message

        return receive_wrapper

    async def probe_disconnect(self) -> None:
        """Learn, without waiting, whether the client has gone: before an auto-commit.

        Servers that do not cancel the app on a disconnect (uvicorn) tell it only through
        ``receive()``, which a handler that has read its body no longer calls; the
        middleware would then commit the work of a request whose client left. Once the
        body has been read, the next message can only be ``http.disconnect``: ``receive()``
        runs in a task of its own for one turn of the event loop. A server that knows the
        client left answers at once (uvicorn does); otherwise the task is cancelled, having
        taken no message. A message (or error) taken is the app's next ``receive()``.

        A task, not a coroutine stepped by hand: ``receive`` may be anything awaitable (an
        outer middleware's wrapper, a ``BaseHTTPMiddleware``'s, which enters an anyio task
        group that must be left by a task, not by ``close()``).
        """
        if self.disconnected or not self._body_read or self._receive is None:
            return
        receive = self._receive

        async def one() -> Message:
            return await receive()

        probe = asyncio.get_running_loop().create_task(one())
        try:
            await asyncio.sleep(0)  # the probe's first step runs before we resume
        finally:
            if not probe.done():
                probe.cancel()
                await asyncio.wait([probe])
        if probe.cancelled():
            return  # suspended: nothing received, the client is (still) there
        self._replay = probe
        exc = probe.exception()
        self.disconnected = exc is None and probe.result()["type"] == "http.disconnect"

    async def finish(self) -> None:
        """The response is complete: end the request's unit of work now."""
        if self.closed:
            return
        if asyncio.current_task() is not self._owner:
            # The body was sent from another task (Starlette streams in a task group when the
            # server speaks ASGI < 2.4); only the owner can leave the scope. End its unit of
            # work from here: its session closed now, and db() in the request's task (the
            # background tasks Starlette runs next) a new session with the factory's defaults.
            await self._context.end_elsewhere()
            return
        self.closed = True
        try:
            await self._context.__aexit__(None, None, None)
        except ScopeError:
            self.closed = False  # a nested scope is still open: leave it to the call's end

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self._context.__aexit__(None, None, None)
