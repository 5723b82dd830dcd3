"""asyncorm.aiohttp: one scope per request on a real aiohttp server, commit policies, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import ForeignKey, event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import asyncorm
import asyncorm.aiohttp
from tests.conftest import Backend
from tests.models import User

Registry = asyncorm.async_scoped_session[asyncorm.AsyncSession]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class DeferredBase(DeclarativeBase):
    pass


class Parent(DeferredBase):
    __tablename__ = "aiohttp_parents"

    id: Mapped[int] = mapped_column(primary_key=True)


class Child(DeferredBase):
    """Its foreign key is checked at COMMIT, so a flush succeeds and the commit fails."""

    __tablename__ = "aiohttp_children"

    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(
        ForeignKey("aiohttp_parents.id", deferrable=True, initially="DEFERRED")
    )


@pytest.fixture
async def db(engine: AsyncEngine) -> AsyncIterator[Registry]:
    registry = asyncorm.async_scoped_session(asyncorm.async_sessionmaker(engine))
    yield registry
    async with asyncio.timeout(10):
        await registry.wait_closed()
    assert registry.live_sessions == 0


class Tracker:
    """An outer middleware: when each request's inner chain (asyncorm's scope) has ended."""

    def __init__(self, app: web.Application) -> None:
        self.done: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.errors: dict[str, BaseException] = {}
        app.middlewares.append(self.middleware)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BaseException as exc:
            self.errors[request.path] = exc
            raise
        finally:
            self.done[request.path].set()


@asynccontextmanager
async def serve(app: web.Application, **runner_kwargs: Any) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port; yield its base URL; clean up at the end."""
    runner = web.AppRunner(app, **runner_kwargs)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def user_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set((await conn.scalars(select(User.name))).all())


async def assert_nothing_open(db: Registry, engine: AsyncEngine, backend: Backend) -> None:
    async with asyncio.timeout(10):
        await db.wait_closed()
    assert db.live_sessions == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    if not backend.is_sqlite:
        async with engine.connect() as conn:
            idle = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
                )
            )
        assert idle == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_concurrent_requests_each_get_their_own_session_and_nothing_leaks(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    seen: set[int] = set()

    async def child_session_id() -> int:
        await db.scalar(select(func.count(User.id)))
        return id(db())

    async def read(request: web.Request) -> web.Response:
        # children first: the request's session takes no connection while they run
        children = await asyncio.gather(child_session_id(), child_session_id())
        count = await db.scalar(select(func.count(User.id)))
        mine = id(db())
        assert mine not in children
        assert children[0] != children[1]
        seen.add(mine)
        return web.json_response({"count": count})

    async def write(request: web.Request) -> web.Response:
        db.add(User(name=request.match_info["name"]))
        seen.add(id(db()))
        return web.json_response({"ok": True}, status=201)

    app = web.Application()
    app.router.add_get("/users", read)
    app.router.add_post("/users/{name}", write)
    asyncorm.aiohttp.setup(
        app, db, commit="auto", read_only_methods=asyncorm.aiohttp.READ_ONLY_METHODS
    )
    async with serve(app) as url, aiohttp.ClientSession(url) as client:

        async def call(n: int) -> int:
            if n % 2:
                async with client.get("/users") as response:
                    return response.status
            async with client.post(f"/users/u{n}") as response:
                return response.status

        statuses = await asyncio.gather(*(call(n) for n in range(200)))
        assert statuses.count(201) == 100
        assert statuses.count(200) == 100
        await assert_nothing_open(db, engine, backend)
    assert await user_names(engine) == {f"u{n}" for n in range(0, 200, 2)}
    assert len(seen) > 1


async def test_client_disconnect_cancels_the_handler_and_rolls_back(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    outcome: list[type[BaseException]] = []

    async def slow(request: web.Request) -> web.Response:
        db.add(User(name="abandoned"))
        await db.flush()  # the request's session holds a connection and a transaction
        entered.set()
        try:
            await release.wait()  # never set: only the client going away ends this
        except BaseException as exc:
            outcome.append(type(exc))
            raise
        return web.Response(text="unreachable")

    app = web.Application()
    tracker = Tracker(app)
    app.router.add_post("/slow", slow)
    asyncorm.aiohttp.setup(app, db, commit="auto")
    # aiohttp >= 3.9 cancels the handler when the client goes away only when asked to
    async with serve(app, handler_cancellation=True) as url:
        client = aiohttp.ClientSession(url)
        request = asyncio.create_task(client.post("/slow"))
        await entered.wait()
        request.cancel()
        await client.close()  # closes the connection: the server sees the client go away
        await tracker.done["/slow"].wait()
        assert outcome == [asyncio.CancelledError]
        assert isinstance(tracker.errors["/slow"], asyncio.CancelledError)
        await assert_nothing_open(db, engine, backend)
    with pytest.raises(asyncio.CancelledError):
        await request
    assert await user_names(engine) == set()


async def test_client_disconnect_by_default_fails_the_body_read_and_rolls_back(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    """aiohttp 3.14's default (handler_cancellation=False) lets the handler run on."""
    entered, client_may_go = asyncio.Event(), asyncio.Event()
    outcome: list[type[BaseException]] = []

    async def upload(request: web.Request) -> web.Response:
        db.add(User(name="half-uploaded"))
        await db.flush()
        assert await request.content.readany() == b"first chunk"
        entered.set()
        try:
            await request.content.read()  # the rest never comes: the client goes away
        except BaseException as exc:
            outcome.append(type(exc))
            raise
        return web.Response(text="unreachable")

    async def body() -> AsyncIterator[bytes]:
        yield b"first chunk"
        await client_may_go.wait()
        yield b"never sent"

    app = web.Application()
    tracker = Tracker(app)
    app.router.add_post("/upload", upload)
    asyncorm.aiohttp.setup(app, db, commit="auto")
    async with serve(app) as url:
        client = aiohttp.ClientSession(url)
        request = asyncio.create_task(client.post("/upload", data=body()))
        await entered.wait()
        request.cancel()
        await client.close()
        await tracker.done["/upload"].wait()
        assert len(outcome) == 1
        assert issubclass(outcome[0], ConnectionResetError)
        await assert_nothing_open(db, engine, backend)
    with pytest.raises(asyncio.CancelledError):
        await request
    assert await user_names(engine) == set()


async def test_default_policy_commits_only_what_the_handler_commits(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    async def add(request: web.Request) -> web.Response:
        db.add(User(name=request.match_info["name"]))
        if "commit" in request.query:
            await db.commit()
        return web.Response(status=201)

    async def boom(request: web.Request) -> web.Response:
        db.add(User(name="boom"))
        await db.flush()
        raise RuntimeError("handler failed after a flush")

    app = web.Application()
    tracker = Tracker(app)
    app.router.add_post("/add/{name}", add)
    app.router.add_post("/boom", boom)
    asyncorm.aiohttp.setup(app, db)
    async with serve(app) as url, aiohttp.ClientSession(url) as client:
        for path in ("/add/kept?commit=1", "/add/dropped", "/boom"):
            async with client.post(path) as response:
                assert response.status == (500 if path == "/boom" else 201)
        with pytest.raises(RuntimeError, match="handler failed after a flush"):
            raise tracker.errors["/boom"]
        await assert_nothing_open(db, engine, backend)
    assert await user_names(engine) == {"kept"}


async def test_auto_commit_commits_below_400_and_rolls_back_the_rest(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    async def handler(request: web.Request) -> web.Response:
        case = request.match_info["case"]
        db.add(User(name=case))
        await db.flush()
        if case == "created":
            return web.json_response({"ok": True}, status=201)
        if case == "unprocessable":
            return web.json_response({"ok": False}, status=422)
        if case == "not-found":
            raise web.HTTPNotFound()
        if case == "redirect":
            raise web.HTTPFound("/elsewhere")
        raise RuntimeError(f"{case}: the handler failed")

    app = web.Application()
    app.router.add_post("/{case}", handler)
    asyncorm.aiohttp.setup(app, db, commit="auto")
    expected = {
        "created": 201,
        "unprocessable": 422,
        "not-found": 404,
        "redirect": 302,
        "error": 500,
    }
    async with serve(app) as url, aiohttp.ClientSession(url) as client:
        for case, status in expected.items():
            async with client.post(f"/{case}", allow_redirects=False) as response:
                assert response.status == status, case
        await assert_nothing_open(db, engine, backend)
    assert await user_names(engine) == {"created", "redirect"}


@pytest.fixture
async def deferred_tables(engine: AsyncEngine) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(DeferredBase.metadata.drop_all)
        await conn.run_sync(DeferredBase.metadata.create_all)
    yield
    async with engine.begin() as conn:
        await conn.run_sync(DeferredBase.metadata.drop_all)


@pytest.mark.usefixtures("deferred_tables")
async def test_failing_auto_commit_gives_500_and_never_a_2xx(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    async def orphan(request: web.Request) -> web.Response:
        db.add(Child(parent_id=999))
        await db.flush()  # the foreign key is deferred: checked at COMMIT
        return web.json_response({"ok": True}, status=201)

    app = web.Application()
    tracker = Tracker(app)
    app.router.add_post("/orphan", orphan)
    asyncorm.aiohttp.setup(app, db, commit="auto")
    async with serve(app) as url, aiohttp.ClientSession(url) as client:
        async with client.post("/orphan") as response:
            assert response.status == 500
        assert "FOREIGN KEY" in str(tracker.errors["/orphan"]).upper()
        await assert_nothing_open(db, engine, backend)
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count(Child.id))) == 0


@pytest.mark.usefixtures("deferred_tables")
async def test_failing_final_commit_of_a_streamed_response_aborts_its_body(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)  # nothing to commit yet: the 200 goes out
        await response.write(b"partial")
        db.add(Child(parent_id=997))  # work after the headers: committed at the end
        return response

    app = web.Application()
    tracker = Tracker(app)
    app.router.add_post("/stream", stream)
    asyncorm.aiohttp.setup(app, db, commit="auto")
    async with serve(app) as url, aiohttp.ClientSession(url) as client:
        async with client.post("/stream") as response:
            assert response.status == 200  # the client saw the 200 before the commit...
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()  # ...but never a complete body
        await tracker.done["/stream"].wait()
        assert "FOREIGN KEY" in str(tracker.errors["/stream"]).upper()
        await assert_nothing_open(db, engine, backend)
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count(Child.id))) == 0


async def test_read_only_get_that_writes_gives_500_and_writes_nothing(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    async def sneaky(request: web.Request) -> web.Response:
        assert db().read_only
        db.add(User(name="sneaky"))
        await db.flush()
        return web.Response(text="written?")

    async def post(request: web.Request) -> web.Response:
        assert db().write
        db.add(User(name="posted"))
        return web.Response(status=201)

    app = web.Application()
    tracker = Tracker(app)
    app.router.add_get("/sneaky", sneaky)
    app.router.add_post("/post", post)
    asyncorm.aiohttp.setup(
        app, db, commit="auto", read_only_methods=asyncorm.aiohttp.READ_ONLY_METHODS
    )
    async with serve(app) as url, aiohttp.ClientSession(url) as client:
        async with client.get("/sneaky") as response:
            assert response.status == 500
        async with client.post("/post") as response:
            assert response.status == 201
        assert isinstance(tracker.errors["/sneaky"], asyncorm.ReadOnlySessionError)
        await assert_nothing_open(db, engine, backend)
    assert await user_names(engine) == {"posted"}


async def test_spawned_tasks_get_sessions_of_their_own(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    background_done = asyncio.Event()
    background: set[asyncio.Task[None]] = set()

    async def session_of_child() -> int:
        return id(db())

    async def after_the_request(name: str) -> None:
        db.add(User(name=name))  # its own session: the request's is closed by now
        await db.commit()
        background_done.set()

    async def handler(request: web.Request) -> web.Response:
        mine = id(db())
        db.add(User(name="request"))
        spawned = await asyncio.create_task(session_of_child())
        gathered = await asyncio.gather(session_of_child(), session_of_child())
        assert mine not in {spawned, *gathered}
        task = asyncio.create_task(after_the_request("background"))
        background.add(task)
        task.add_done_callback(background.discard)
        return web.Response(status=201)

    app = web.Application()
    app.router.add_post("/spawn", handler)
    asyncorm.aiohttp.setup(app, db, commit="auto")
    async with serve(app) as url, aiohttp.ClientSession(url) as client:
        async with client.post("/spawn") as response:
            assert response.status == 201
        await background_done.wait()
        await assert_nothing_open(db, engine, backend)
    assert await user_names(engine) == {"request", "background"}


@pytest.mark.parametrize("commits", [False, True], ids=["left-uncommitted", "committed"])
async def test_gathered_sub_tasks_that_ended_with_uncommitted_writes_give_500(
    db: Registry, engine: AsyncEngine, backend: Backend, commits: bool
) -> None:
    """Writes a gathered sub-task leaves uncommitted in its own session are rolled back when
    it ends: under commit='auto' the request fails (500), never a 201 with half the work."""

    async def sub(n: int) -> None:
        db.add(User(name=f"sub{n}"))
        await db.flush()
        if commits:
            await db.commit()

    async def handler(request: web.Request) -> web.Response:
        await asyncio.gather(sub(1), sub(2))
        db.add(User(name="main"))
        return web.Response(status=201)

    app = web.Application()
    tracker = Tracker(app)
    app.router.add_post("/gather", handler)
    asyncorm.aiohttp.setup(app, db, commit="auto")
    async with serve(app) as url, aiohttp.ClientSession(url) as client:
        async with client.post("/gather") as response:
            assert response.status == (201 if commits else 500)
        await tracker.done["/gather"].wait()
        await assert_nothing_open(db, engine, backend)
    if commits:
        assert await user_names(engine) == {"main", "sub1", "sub2"}
        return
    assert await user_names(engine) == set()
    with pytest.raises(asyncorm.UncommittedTaskWorkError, match="a sub-task gathered by"):
        raise tracker.errors["/gather"]


async def test_websocket_uses_one_session_across_messages(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    async def chat(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            command, _, name = message.data.partition(" ")
            if command == "add":
                db.add(User(name=name))
                await db.flush()
            elif command == "commit":
                await db.commit()
            # uncommitted rows are visible to their own session only
            visible = sorted((await db.scalars(select(User.name))).all())
            await ws.send_json({"session": id(db()), "visible": visible})
        return ws

    app = web.Application()
    tracker = Tracker(app)
    app.router.add_get("/ws", chat)
    asyncorm.aiohttp.setup(app, db)
    async with serve(app) as url, aiohttp.ClientSession(url) as client:
        async with client.ws_connect("/ws") as ws:
            replies = []
            for command in ("add ann", "add bob", "commit", "add cat"):
                await ws.send_str(command)
                replies.append(await ws.receive_json())
        await tracker.done["/ws"].wait()
        assert len({reply["session"] for reply in replies}) == 1
        assert [reply["visible"] for reply in replies] == [
            ["ann"],
            ["ann", "bob"],
            ["ann", "bob"],
            ["ann", "bob", "cat"],
        ]
        await assert_nothing_open(db, engine, backend)
    assert await user_names(engine) == {"ann", "bob"}  # "cat" was never committed


async def test_graceful_shutdown_finishes_the_request_in_flight_and_disposes_the_engine(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    entered, shutting_down, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    disposed: list[object] = []
    event.listen(engine.sync_engine, "engine_disposed", disposed.append)

    async def in_flight(request: web.Request) -> web.Response:
        db.add(User(name="in-flight"))
        await db.flush()
        entered.set()
        await release.wait()
        return web.Response(status=201)

    async def on_shutdown(app: web.Application) -> None:
        shutting_down.set()

    app = web.Application()
    app.router.add_post("/in-flight", in_flight)
    app.on_shutdown.append(on_shutdown)
    asyncorm.aiohttp.setup(app, db, commit="auto")
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession(url) as client:
        request = asyncio.create_task(client.post("/in-flight"))
        await entered.wait()
        cleanup = asyncio.create_task(runner.cleanup())
        await shutting_down.wait()
        assert not disposed  # the request is still running: the engine is in use
        release.set()
        async with await request as response:
            assert response.status == 201
        await cleanup
    assert disposed == [engine.sync_engine]
    await assert_nothing_open(db, engine, backend)
    assert await user_names(engine) == {"in-flight"}


async def test_shutdown_past_its_timeout_cancels_the_request_and_rolls_back(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    entered, never = asyncio.Event(), asyncio.Event()
    disposed: list[object] = []
    event.listen(engine.sync_engine, "engine_disposed", disposed.append)

    async def stuck(request: web.Request) -> web.Response:
        db.add(User(name="stuck"))
        await db.flush()
        entered.set()
        await never.wait()
        return web.Response(status=201)

    app = web.Application()
    app.router.add_post("/stuck", stuck)
    asyncorm.aiohttp.setup(app, db, commit="auto")
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession(url) as client:
        request = asyncio.create_task(client.post("/stuck"))
        await entered.wait()
        await runner.cleanup()  # waits 0.2 s for the request, then cancels it
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await request
    assert disposed == [engine.sync_engine]
    await assert_nothing_open(db, engine, backend)
    assert await user_names(engine) == set()


async def test_setup_refuses_a_second_call_and_a_bad_commit_policy(db: Registry) -> None:
    app = web.Application()
    with pytest.raises(ValueError, match="commit must be None or 'auto', got 'always'"):
        asyncorm.aiohttp.setup(app, db, commit="always")  # type: ignore[arg-type]
    asyncorm.aiohttp.setup(app, db)
    assert app[asyncorm.aiohttp.REGISTRY_KEY] is db
    with pytest.raises(RuntimeError, match=r"setup\(\) was already called"):
        asyncorm.aiohttp.setup(app, db)


async def test_session_kwargs_are_added_and_replace_the_method_defaults(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    async def flags(request: web.Request) -> web.Response:
        session = db()
        return web.json_response(
            {"read_only": session.read_only, "write": session.write, "autoflush": session.autoflush}
        )

    def per_request(request: web.Request) -> dict[str, Any]:
        if "writer" in request.query:  # names `write`: replaces the read-only default
            return {"write": True}
        return {"autoflush": False}

    app = web.Application()
    app.router.add_route("*", "/flags", flags)
    asyncorm.aiohttp.setup(
        app,
        db,
        commit="auto",
        read_only_methods=asyncorm.aiohttp.READ_ONLY_METHODS,
        session_kwargs=per_request,
    )
    async with serve(app) as url, aiohttp.ClientSession(url) as client:
        results = {}
        for method, path in (("GET", "/flags"), ("POST", "/flags"), ("GET", "/flags?writer")):
            async with client.request(method, path) as response:
                results[method, path] = await response.json()
        await assert_nothing_open(db, engine, backend)
    assert results == {
        ("GET", "/flags"): {"read_only": True, "write": False, "autoflush": False},
        ("POST", "/flags"): {"read_only": False, "write": True, "autoflush": False},
        ("GET", "/flags?writer"): {"read_only": False, "write": True, "autoflush": True},
    }


@pytest.mark.parametrize("prepared", [False, True])
async def test_handler_finishing_after_its_client_left_is_not_auto_committed(
    db: Registry, engine: AsyncEngine, backend: Backend, prepared: bool
) -> None:
    """aiohttp's default (handler_cancellation=False) lets the handler run on: roll back."""
    entered, release = asyncio.Event(), asyncio.Event()
    client_gone = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        db.add(User(name="orphan"))
        await db.flush()  # holds a connection and a transaction
        entered.set()
        await release.wait()  # set once the server has seen the client go away
        if prepared:
            response = web.StreamResponse(status=200)
            with contextlib.suppress(ConnectionResetError):  # nobody to send them to
                await response.prepare(request)
            return response
        return web.json_response({"ok": True}, status=201)

    app = web.Application()
    tracker = Tracker(app)
    app.router.add_post("/slow", slow)
    asyncorm.aiohttp.setup(app, db, commit="auto")
    runner = web.AppRunner(app)
    await runner.setup()
    server = runner.server
    assert server is not None
    lost = server.connection_lost

    def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        lost(handler, exc)
        client_gone.set()

    server.connection_lost = connection_lost  # type: ignore[method-assign]
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        client = aiohttp.ClientSession(url)
        request = asyncio.create_task(client.post("/slow"))
        await entered.wait()
        request.cancel()
        await client.close()  # closes the connection while the handler waits
        await client_gone.wait()
        release.set()
        await tracker.done["/slow"].wait()
        assert "/slow" not in tracker.errors  # the handler returned normally
        await assert_nothing_open(db, engine, backend)
    finally:
        await runner.cleanup()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert await user_names(engine) == set()
