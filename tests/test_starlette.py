"""``asyncorm.starlette.SessionMiddleware`` and ``asyncorm.fastapi.session_dependency``.

Real uvicorn servers on loopback sockets, real httpx clients, both backends. Ordering is
synchronised with ``asyncio.Event``; every test ends with no live session and no connection
checked out.
"""

# no `from __future__ import annotations`: FastAPI must see the endpoints' annotations,
# which use names local to the tests
import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import fastapi
import httpx
import pytest
import uvicorn
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio import client as websockets

import asyncorm
from asyncorm import AsyncSession, ReadOnlySessionError, async_scoped_session
from asyncorm.fastapi import session_dependency
from asyncorm.starlette import DEFAULT_READ_ONLY_METHODS, SessionMiddleware
from tests.conftest import Backend
from tests.models import User

Registry = async_scoped_session[AsyncSession]
Factory = asyncorm.async_sessionmaker[AsyncSession]
ASGI = Callable[[Any, Any, Any], Awaitable[None]]


@pytest.fixture
async def db(Session: Factory, engine: AsyncEngine) -> AsyncIterator[Registry]:
    registry = async_scoped_session(Session)
    yield registry
    async with asyncio.timeout(10):
        await registry.wait_closed()
    assert registry.live_sessions == 0, f"{registry.live_sessions} session(s) left open"
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@asynccontextmanager
async def running(app: ASGI) -> AsyncIterator[int]:
    """Serve ``app`` with uvicorn on a free loopback port; yield the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)  # connections queue until uvicorn accepts them: no startup race
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="on", log_level="critical", limit_concurrency=1000)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def serve(app: ASGI) -> AsyncIterator[httpx.AsyncClient]:
    """Serve ``app`` with uvicorn; yield an httpx client for it."""
    async with (
        running(app) as port,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            timeout=30,
            limits=httpx.Limits(max_connections=200),
        ) as client,
    ):
        yield client


async def names(Session: Callable[[], AsyncSession]) -> list[str]:
    async with Session() as session:
        return list(await session.scalars(select(User.name).order_by(User.name)))


class Finished:
    """An outer ASGI wrapper whose event is set when the app call has returned."""

    def __init__(self, app: ASGI) -> None:
        self.app = app
        self.done = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                self.done.set()


# -- scopes and concurrency ---------------------------------------------------------------


async def test_200_concurrent_requests_with_sub_tasks_leave_nothing_open(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    async def count() -> int:
        return await db.scalar(select(func.count(User.id))) or 0

    async def handler(request: Request) -> Response:
        n = int(request.path_params["n"])
        session = db()
        assert db() is session
        if n % 2:  # sub-tasks get sessions of their own, never the request's
            counts = await asyncio.gather(count(), count())
            assert db() is session
            return JSONResponse({"n": n, "counts": len(counts)})
        db.add(User(name=f"u{n:03}"))
        await db.commit()
        return JSONResponse({"n": n})

    app = Starlette(
        routes=[Route("/{n}", handler, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, registry=db)],
    )
    async with serve(app) as client:
        responses = await asyncio.gather(*(client.post(f"/{n}") for n in range(200)))
    assert [r.status_code for r in responses] == [200] * 200
    assert len(await names(db.session_factory)) == 100
    await db.wait_closed()
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_uncommitted_work_is_rolled_back_by_default(
    db: Registry, engine: AsyncEngine
) -> None:
    async def handler(request: Request) -> Response:
        db.add(User(name="kept"))
        await db.commit()
        db.add(User(name="dropped"))
        await db.flush()
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", handler, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, registry=db)],
    )
    async with serve(app) as client:
        assert (await client.post("/")).status_code == 200
    assert await names(db.session_factory) == ["kept"]
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("commit", [None, "auto"])
async def test_client_disconnect_mid_request_rolls_back_and_returns_the_connection(
    db: Registry, engine: AsyncEngine, commit: Any
) -> None:
    written = asyncio.Event()
    saw_disconnect = asyncio.Event()

    async def handler(request: Request) -> Response:
        db.add(User(name="ghost"))
        await db.flush()  # holds a connection and a transaction
        written.set()
        while (await request.receive())["type"] != "http.disconnect":
            pass  # the (empty) body, then wait until the client goes away
        saw_disconnect.set()
        return PlainTextResponse("too late")

    app = Finished(
        Starlette(
            routes=[Route("/", handler, methods=["POST"])],
            middleware=[Middleware(SessionMiddleware, registry=db, commit=commit)],
        )
    )
    async with serve(app) as client:
        request = asyncio.create_task(client.post("/", content=b""))
        await written.wait()
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        request.cancel()  # the client closes the connection
        with pytest.raises(asyncio.CancelledError):
            await request
        async with asyncio.timeout(10):
            await saw_disconnect.wait()
            await app.done.wait()
        await db.wait_closed()
        assert db.live_sessions == 0
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await names(db.session_factory) == []


async def test_shutdown_waits_for_requests_at_most_shutdown_timeout(
    db: Registry, engine: AsyncEngine
) -> None:
    """A handler that swallows its cancellation cannot hold the app's shutdown forever."""
    entered, release, shutdown_ran = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def stubborn(request: Request) -> Response:
        entered.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            await release.wait()  # ignores the server's cancellation
        return PlainTextResponse("late")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        shutdown_ran.set()

    app = Starlette(
        routes=[Route("/", stubborn)],
        middleware=[Middleware(SessionMiddleware, registry=db, shutdown_timeout=0.2)],
        lifespan=lifespan,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="critical", timeout_graceful_shutdown=0)
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            request = asyncio.create_task(client.get("/"))
            async with asyncio.timeout(10):
                await entered.wait()
            server.should_exit = True
            # the app's shutdown runs while the handler is still stuck
            with pytest.warns(RuntimeWarning, match=r"1 request task\(s\) .* still running"):
                await asyncio.wait_for(shutdown_ran.wait(), 30)
            release.set()
            await asyncio.gather(request, return_exceptions=True)
    finally:
        release.set()
        server.should_exit = True
        await serving
        sock.close()


def noticing_protocol(http: str, lost: asyncio.Event) -> type[asyncio.Protocol]:
    """uvicorn's ``http`` protocol class, setting ``lost`` when a client connection is lost."""
    base: type[Any]
    if http == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    else:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base

    class Noticing(base):  # type: ignore[misc]
        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            lost.set()

    return Noticing


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_auto_commit_skipped_for_a_client_that_left_while_the_handler_worked(
    db: Registry, engine: AsyncEngine, http: str
) -> None:
    """uvicorn does not cancel a handler whose client left, and a handler that has read its
    body never hears of it: the middleware asks before committing, and rolls back."""
    written, release, lost = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> Response:
        name = (await request.body()).decode()  # the whole body: receive() is not called again
        db.add(User(name=name))
        await db.flush()
        written.set()
        await release.wait()  # the client leaves meanwhile; nothing tells the handler
        return PlainTextResponse("created", status_code=201)

    app = Finished(
        Starlette(
            routes=[Route("/", handler, methods=["POST"])],
            middleware=[Middleware(SessionMiddleware, registry=db, commit="auto")],
        )
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(
        uvicorn.Config(
            app, lifespan="off", log_level="critical", http=noticing_protocol(http, lost)
        )
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=url) as client:
            request = asyncio.create_task(client.post("/", content=b"left"))
            async with asyncio.timeout(10):
                await written.wait()
            request.cancel()  # the client closes the connection
            with pytest.raises(asyncio.CancelledError):
                await request
            async with asyncio.timeout(10):
                await lost.wait()  # the server has seen the connection go
            release.set()
            async with asyncio.timeout(10):
                await app.done.wait()
            # the control: a client that stays gets its row committed
            assert (await client.post("/", content=b"stayed")).status_code == 201
    finally:
        release.set()
        server.should_exit = True
        await serving
        sock.close()
    await db.wait_closed()
    assert await names(db.session_factory) == ["stayed"]


@pytest.mark.parametrize("commit", [None, "auto"])
async def test_request_task_cancelled_by_the_server_rolls_back_and_returns_the_connection(
    db: Registry, engine: AsyncEngine, commit: Any
) -> None:
    written = asyncio.Event()
    never = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(request: Request) -> Response:
        db.add(User(name="ghost"))
        await db.flush()
        written.set()
        await never.wait()  # until the server cancels the request's task
        return PlainTextResponse("unreachable")

    inner = Starlette(
        routes=[Route("/", handler, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, registry=db, commit=commit)],
    )

    async def cancelling_server(scope: Any, receive: Any, send: Any) -> None:
        """What servers that cancel the app's task on disconnect do (hypercorn, granian)."""
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        call = asyncio.create_task(inner(scope, receive, send))
        await written.wait()
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        cancelled.set()
        await PlainTextResponse("cancelled", status_code=499)(scope, receive, send)

    async with serve(cancelling_server) as client:
        assert (await client.post("/")).status_code == 499
    assert cancelled.is_set()
    assert await names(db.session_factory) == []
    await db.wait_closed()
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("commit", [None, "auto"])
async def test_handler_that_raises_gives_500_and_rolls_back(
    db: Registry, engine: AsyncEngine, commit: Any
) -> None:
    async def handler(request: Request) -> Response:
        db.add(User(name="doomed"))
        await db.flush()
        raise RuntimeError("handler failed")

    app = Starlette(
        routes=[Route("/", handler, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, registry=db, commit=commit)],
    )
    async with serve(app) as client:
        assert (await client.post("/")).status_code == 500
    assert await names(db.session_factory) == []
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


# -- commit="auto" --------------------------------------------------------------------------


async def test_auto_commit_commits_2xx_and_rolls_back_4xx(
    db: Registry, engine: AsyncEngine
) -> None:
    async def handler(request: Request) -> Response:
        status = int(request.path_params["status"])
        assert db().write  # not read-only, commit="auto": a declared unit of work
        db.add(User(name=f"s{status}"))
        await db.flush()
        return PlainTextResponse(str(status), status_code=status)

    app = Starlette(
        routes=[Route("/{status}", handler, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, registry=db, commit="auto")],
    )
    async with serve(app) as client:
        for status in (200, 201, 302, 400, 404, 409, 500):
            response = await client.post(f"/{status}", follow_redirects=False)
            assert response.status_code == status
    assert await names(db.session_factory) == ["s200", "s201", "s302"]
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_auto_commit_that_fails_gives_500_and_never_the_2xx(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS pets"))
        await conn.execute(
            text(
                "CREATE TABLE pets (id INTEGER PRIMARY KEY, owner_id INTEGER NOT NULL "
                "REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    handled = asyncio.Event()

    async def handler(request: Request) -> Response:
        # the dangling foreign key is accepted now and refused at COMMIT
        await db.execute(text("INSERT INTO pets (id, owner_id) VALUES (1, 999)"))
        db.add(User(name="with-pet"))
        handled.set()
        return PlainTextResponse("created", status_code=201)

    app = Starlette(
        routes=[Route("/", handler, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, registry=db, commit="auto")],
    )
    async with serve(app) as client:
        response = await client.post("/")
    assert handled.is_set()
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert await names(db.session_factory) == []
    async with db.session_factory() as session:
        assert await session.scalar(text("SELECT count(*) FROM pets")) == 0
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE pets"))
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_read_only_get_that_writes_gives_500_and_writes_nothing(
    db: Registry, engine: AsyncEngine
) -> None:
    failures: list[BaseException] = []

    async def reader(request: Request) -> Response:
        assert db().read_only
        count = await db.scalar(select(func.count(User.id)))
        return PlainTextResponse(str(count))

    async def sneaky_writer(request: Request) -> Response:
        db.add(User(name="sneaky"))
        try:
            await db.flush()
        except ReadOnlySessionError as exc:
            failures.append(exc)
            raise
        return PlainTextResponse("wrote")

    app = Starlette(
        routes=[Route("/read", reader), Route("/write", sneaky_writer)],
        middleware=[
            Middleware(
                SessionMiddleware,
                registry=db,
                commit="auto",
                read_only_methods=DEFAULT_READ_ONLY_METHODS,
            )
        ],
    )
    async with serve(app) as client:
        assert (await client.get("/read")).text == "0"
        assert (await client.get("/write")).status_code == 500
    assert len(failures) == 1
    with pytest.raises(ReadOnlySessionError):
        raise failures[0]
    assert await names(db.session_factory) == []
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_streaming_body_writes_after_the_auto_commit_are_rolled_back(
    db: Registry, engine: AsyncEngine
) -> None:
    async def handler(request: Request) -> Response:
        db.add(User(name="before"))
        await db.flush()

        async def body() -> AsyncIterator[bytes]:
            yield b"a"
            db.add(User(name="while-streaming"))
            await db.flush()
            yield b"b"

        return StreamingResponse(body())

    app = Starlette(
        routes=[Route("/", handler, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, registry=db, commit="auto")],
    )
    async with serve(app) as client:
        response = await client.post("/")
    assert (response.status_code, response.text) == (200, "ab")
    assert await names(db.session_factory) == ["before"]
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_commit_policy_is_checked() -> None:
    registry: Registry = async_scoped_session(asyncorm.async_sessionmaker())
    with pytest.raises(ValueError, match=r"commit='always'\) is not a commit policy"):
        SessionMiddleware(PlainTextResponse("x"), registry=registry, commit="always")  # type: ignore[arg-type]


# -- background tasks and websockets ---------------------------------------------------------


@pytest.mark.parametrize("commit", [None, "auto"])
async def test_background_task_gets_a_session_of_its_own(
    db: Registry, engine: AsyncEngine, commit: Any
) -> None:
    seen: dict[str, Any] = {}
    done = asyncio.Event()

    async def after_response() -> None:
        session = db()
        seen["background"] = session
        seen["clean"] = not session.new and not session.identity_map
        db.add(User(name="from-background"))
        await db.commit()
        done.set()

    async def handler(request: Request) -> Response:
        seen["request"] = db()
        db.add(User(name="from-request"))
        await db.flush()
        if commit is None:
            await db.commit()
        return PlainTextResponse("ok", background=BackgroundTask(after_response))

    app = Starlette(
        routes=[Route("/", handler, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, registry=db, commit=commit)],
    )
    async with serve(app) as client:
        assert (await client.post("/")).status_code == 200
        await done.wait()
    assert seen["background"] is not seen["request"]
    assert seen["clean"]
    assert not seen["background"].write  # the call's own session, not the request's options
    assert await names(db.session_factory) == ["from-background", "from-request"]
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_websocket_uses_one_session_across_messages(
    db: Registry, engine: AsyncEngine
) -> None:
    sessions: set[int] = set()

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        async for name in websocket.iter_text():
            sessions.add(id(db()))
            db.add(User(name=name))
            await db.flush()
            count = await db.scalar(select(func.count(User.id)))
            await websocket.send_text(str(count))
        await db.commit()

    closed = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await starlette_app(scope, receive, send)
        finally:
            if scope["type"] == "websocket":
                closed.set()

    starlette_app = Starlette(
        routes=[WebSocketRoute("/ws", endpoint)],
        middleware=[Middleware(SessionMiddleware, registry=db)],
    )
    replies = []
    async with running(app) as port:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            for name in ("a", "b", "c"):
                await ws.send(name)
                replies.append(await ws.recv())
        await closed.wait()
    assert replies == ["1", "2", "3"]
    assert len(sessions) == 1
    assert await names(db.session_factory) == ["a", "b", "c"]
    await db.wait_closed()
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


# -- FastAPI ---------------------------------------------------------------------------------


@pytest.mark.parametrize("middleware", [True, False])
async def test_fastapi_dependency_yields_the_request_session(
    db: Registry, engine: AsyncEngine, middleware: bool
) -> None:
    get_session = session_dependency(db)
    DB = Annotated[AsyncSession, fastapi.Depends(get_session)]
    app = fastapi.FastAPI()
    if middleware:
        app.add_middleware(SessionMiddleware, registry=db, commit="auto")

    @app.post("/users/{name}")
    async def create(name: str, session: DB) -> dict[str, int]:
        assert session is db()
        user = User(name=name)
        session.add(user)
        await session.flush()
        if not middleware:
            await session.commit()
        return {"id": user.id}

    @app.post("/fail/{name}")
    async def fail(name: str, session: DB) -> dict[str, int]:
        session.add(User(name=name))
        await session.flush()
        raise fastapi.HTTPException(status_code=409, detail="conflict")

    async with serve(app) as client:
        responses = await asyncio.gather(*(client.post(f"/users/n{i}") for i in range(20)))
        assert [r.status_code for r in responses] == [200] * 20
        assert (await client.post("/fail/x")).status_code == 409
    assert await names(db.session_factory) == sorted(f"n{i}" for i in range(20))
    await db.wait_closed()
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
