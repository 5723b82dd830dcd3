"""SessionMiddleware when the work of a request leaves the request's task.

A ``BaseHTTPMiddleware`` inside the middleware (the handler runs in a task of its own),
``db.remove()`` before a streamed response, a background task after a streamed response (both
sent from another task under uvicorn's ASGI 2.3), two registries' auto-commits, and the
app's exception handlers for a failing auto-commit. Real uvicorn servers, real httpx
clients, both backends.
"""

# no `from __future__ import annotations`: FastAPI must see the endpoints' annotations
import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import fastapi
import pytest
from sqlalchemy import event, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import asyncorm
from asyncorm import AsyncSession, ScopeError, UncommittedTaskWorkError, async_scoped_session
from asyncorm.fastapi import session_dependency
from asyncorm.starlette import DEFAULT_READ_ONLY_METHODS, SessionMiddleware
from tests.conftest import Backend, reset_schema
from tests.models import User
from tests.test_starlette import names, serve

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


class Recorder:
    """The outermost ASGI layer: records what the app raised (after its 500 was sent)."""

    def __init__(self, app: ASGI) -> None:
        self.app = app
        self.errors: list[BaseException] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            self.errors.append(exc)


class Timing(BaseHTTPMiddleware):
    """A typical BaseHTTPMiddleware: it runs the rest of the app in a task of its own."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers["x-timing"] = "1"
        return response


# -- a BaseHTTPMiddleware inside SessionMiddleware -----------------------------------------


@pytest.mark.parametrize("how", ["pending", "flushed", "insert", "text"])
async def test_writes_in_a_handler_behind_base_http_middleware_give_500_not_a_silent_200(
    db: Registry, engine: AsyncEngine, how: str
) -> None:
    async def handler(request: Request) -> Response:
        if how in ("pending", "flushed"):
            db.add(User(name="lost"))
            if how == "flushed":
                await db.flush()
        elif how == "insert":
            await db.execute(insert(User).values(name="lost"))
        else:
            await db.execute(text("INSERT INTO users (name) VALUES ('lost')"))
        return PlainTextResponse("created", status_code=201)

    async def reader(request: Request) -> Response:
        return PlainTextResponse(str(len(list(await db.scalars(select(User))))))

    app = Recorder(
        Starlette(
            routes=[Route("/", handler, methods=["POST"]), Route("/", reader, methods=["GET"])],
            middleware=[
                Middleware(SessionMiddleware, registry=db, commit="auto"),
                Middleware(Timing),  # inside SessionMiddleware: the mistake
            ],
        )
    )
    async with serve(app) as client:
        response = await client.post("/")
        assert (await client.get("/")).text == "0"  # reading there is harmless
    assert response.status_code == 500
    assert await names(db.session_factory) == []
    assert len(app.errors) == 1
    with pytest.raises(UncommittedTaskWorkError) as caught:
        raise app.errors[0]
    message = str(caught.value)
    assert re.search(r"cannot commit the uncommitted writes of task '[^']+' \(its session", message)
    assert f"{__file__}:" in message
    assert "in handler()" in message
    assert "put SessionMiddleware inside every BaseHTTPMiddleware" in message
    assert "Nothing was committed: the request is answered 500" in message


@pytest.mark.parametrize("commits", [False, True], ids=["left-uncommitted", "committed"])
async def test_gathered_sub_tasks_that_ended_with_uncommitted_writes_give_500(
    db: Registry, engine: AsyncEngine, commits: bool
) -> None:
    """Sub-tasks the handler gathers have sessions of their own (registry rule 3); writes
    they leave uncommitted are rolled back when they end, before the response starts. Under
    commit='auto' that is lost work: a 500, never a 201 with only the handler's row saved."""

    async def sub(n: int) -> None:
        db.add(User(name=f"sub{n}"))
        await db.flush()
        if commits:
            await db.commit()

    async def handler(request: Request) -> Response:
        await asyncio.gather(sub(1), sub(2))  # both have ended when the response starts
        db.add(User(name="main"))
        return PlainTextResponse("created", status_code=201)

    app = Recorder(
        Starlette(
            routes=[Route("/", handler, methods=["POST"])],
            middleware=[Middleware(SessionMiddleware, registry=db, commit="auto")],
        )
    )
    async with serve(app) as client:
        response = await client.post("/")
    if commits:
        assert response.status_code == 201
        assert await names(db.session_factory) == ["main", "sub1", "sub2"]
        assert app.errors == []
        return
    assert response.status_code == 500
    assert await names(db.session_factory) == []
    with pytest.raises(UncommittedTaskWorkError, match="a sub-task gathered by the handler"):
        raise app.errors[0]
    assert str(app.errors[0]).count("(its session created at") == 2


async def test_a_4xx_behind_base_http_middleware_stays_a_4xx_with_writes_left(
    db: Registry, engine: AsyncEngine
) -> None:
    """A 4xx is rolled back anyway: a task's uncommitted writes lose nothing there, so they
    must not turn the handler's 404 into UncommittedTaskWorkError's 500."""

    async def handler(request: Request) -> Response:
        db.add(User(name="dropped"))
        await db.flush()
        raise HTTPException(404, "no such owner")

    app = Recorder(
        Starlette(
            routes=[Route("/", handler, methods=["POST"])],
            middleware=[
                Middleware(SessionMiddleware, registry=db, commit="auto"),
                Middleware(Timing),
            ],
        )
    )
    async with serve(app) as client:
        response = await client.post("/")
    assert (response.status_code, response.text) == (404, "no such owner")
    assert app.errors == []
    assert await names(db.session_factory) == []


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) FROM users",
        "-- how many\nSELECT count(*) FROM users",
        "/* how many */ SELECT count(*) FROM users",
        "/* a */ -- b\n  /* c */ SELECT count(*) FROM users",
        "WITH n AS (SELECT count(*) AS c FROM users) SELECT c FROM n",
    ],
)
async def test_text_reads_behind_base_http_middleware_are_not_taken_for_writes(
    db: Registry, engine: AsyncEngine, sql: str
) -> None:
    """Only reads in the handler's own task: the auto-commit has nothing to lose, even when
    the SQL starts with a comment (query tags, commented SQL files)."""

    async def handler(request: Request) -> Response:
        return PlainTextResponse(str(await db.scalar(text(sql))))

    app = Recorder(
        Starlette(
            routes=[Route("/", handler, methods=["POST"])],
            middleware=[
                Middleware(SessionMiddleware, registry=db, commit="auto"),
                Middleware(Timing),
            ],
        )
    )
    async with serve(app) as client:
        response = await client.post("/")
    assert app.errors == []
    assert (response.status_code, response.text) == (200, "0")


async def test_explain_analyze_of_an_insert_behind_base_http_middleware_is_a_write(
    db: Registry, engine: AsyncEngine, backend: Backend
) -> None:
    """EXPLAIN ANALYZE runs its statement: on PostgreSQL it inserts, so it is lost work."""
    if backend.is_sqlite:
        pytest.skip("SQLite's EXPLAIN does not run the statement")

    async def handler(request: Request) -> Response:
        await db.execute(text("EXPLAIN ANALYZE INSERT INTO users (name) VALUES ('lost')"))
        return PlainTextResponse("created", status_code=201)

    app = Recorder(
        Starlette(
            routes=[Route("/", handler, methods=["POST"])],
            middleware=[
                Middleware(SessionMiddleware, registry=db, commit="auto"),
                Middleware(Timing),
            ],
        )
    )
    async with serve(app) as client:
        response = await client.post("/")
    assert response.status_code == 500
    assert [type(e) for e in app.errors] == [UncommittedTaskWorkError]
    assert await names(db.session_factory) == []


async def test_handler_behind_base_http_middleware_that_commits_itself_is_fine(
    db: Registry, engine: AsyncEngine
) -> None:
    async def handler(request: Request) -> Response:
        db.add(User(name="kept"))
        await db.commit()
        return PlainTextResponse("created", status_code=201)

    app = Starlette(
        routes=[Route("/", handler, methods=["POST"])],
        middleware=[
            Middleware(SessionMiddleware, registry=db, commit="auto"),
            Middleware(Timing),
        ],
    )
    async with serve(app) as client:
        assert (await client.post("/")).status_code == 201
    assert await names(db.session_factory) == ["kept"]


async def test_session_middleware_inside_base_http_middleware_commits(
    db: Registry, engine: AsyncEngine
) -> None:
    async def handler(request: Request) -> Response:
        db.add(User(name="kept"))
        return PlainTextResponse("created", status_code=201)

    app = Starlette(
        routes=[Route("/", handler, methods=["POST"])],
        middleware=[
            Middleware(Timing),
            Middleware(SessionMiddleware, registry=db, commit="auto"),  # innermost: right
        ],
    )
    async with serve(app) as client:
        response = await client.post("/")
    assert (response.status_code, response.headers["x-timing"]) == (201, "1")
    assert await names(db.session_factory) == ["kept"]


async def test_session_middleware_inside_base_http_middleware_commits_after_a_body_read(
    db: Registry, engine: AsyncEngine
) -> None:
    """The disconnect probe before the auto-commit calls the BaseHTTPMiddleware's receive,
    which enters an anyio task group: it must run in a task, not be stepped and closed by
    hand (that broke the task group: 500 for every request that had read its body)."""

    async def handler(request: Request) -> Response:
        db.add(User(name=(await request.body()).decode()))
        return PlainTextResponse("created", status_code=201)

    app = Recorder(
        Starlette(
            routes=[Route("/", handler, methods=["POST"])],
            middleware=[
                Middleware(Timing),
                Middleware(SessionMiddleware, registry=db, commit="auto"),
            ],
        )
    )
    async with serve(app) as client:
        response = await client.post("/", content=b"kept")
    assert app.errors == []
    assert (response.status_code, response.headers["x-timing"]) == (201, "1")
    assert await names(db.session_factory) == ["kept"]


async def test_fastapi_dependency_behind_base_http_middleware_refuses_with_500(
    db: Registry, engine: AsyncEngine
) -> None:
    DB = Annotated[AsyncSession, fastapi.Depends(session_dependency(db))]
    inner = fastapi.FastAPI()
    # the middleware added last is the outermost: SessionMiddleware outside, the mistake
    inner.add_middleware(Timing)
    inner.add_middleware(SessionMiddleware, registry=db, commit="auto")

    @inner.post("/users/{name}")
    async def create(name: str, session: DB) -> dict[str, str]:
        session.add(User(name=name))
        return {"name": name}

    app = Recorder(inner)
    async with serve(app) as client:
        response = await client.post("/users/ann")
    assert response.status_code == 500
    assert await names(db.session_factory) == []
    assert len(app.errors) == 1
    with pytest.raises(ScopeError, match=r"runs in task '[^']+', but SessionMiddleware opened"):
        raise app.errors[0]
    assert "call app.add_middleware(SessionMiddleware, ...) before any" in str(app.errors[0])


# -- responses sent from another task (uvicorn speaks ASGI 2.3) ------------------------------


async def test_auto_commit_after_remove_commits_the_current_session_of_a_streamed_response(
    db: Registry, engine: AsyncEngine
) -> None:
    async def handler(request: Request) -> Response:
        db.add(User(name="dropped"))
        await db.flush()
        await db.remove()  # closes and forgets the first session
        db.add(User(name="kept"))  # db() is a new session of the request's scope
        await db.flush()

        async def body() -> AsyncIterator[bytes]:
            yield b"ok"

        return StreamingResponse(body())

    app = Starlette(
        routes=[Route("/", handler, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, registry=db, commit="auto")],
    )
    async with serve(app) as client:
        response = await client.post("/")
    assert (response.status_code, response.text) == (200, "ok")
    assert await names(db.session_factory) == ["kept"]


async def test_background_task_after_a_streamed_response_gets_a_session_of_its_own(
    db: Registry, engine: AsyncEngine
) -> None:
    seen: dict[str, Any] = {}
    done = asyncio.Event()

    async def after_response() -> None:
        session = db()
        seen["background"] = session
        seen["read_only"] = session.read_only
        db.add(User(name="from-background"))
        await db.commit()
        done.set()

    async def handler(request: Request) -> Response:
        seen["request"] = db()
        await db.scalar(select(User.id))  # the read-only request's session is in use

        async def body() -> AsyncIterator[bytes]:
            yield b"streamed"

        return StreamingResponse(body(), background=BackgroundTask(after_response))

    app = Starlette(
        routes=[Route("/", handler)],
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
        response = await client.get("/")
        async with asyncio.timeout(10):
            await done.wait()
    assert (response.status_code, response.text) == (200, "streamed")
    assert seen["request"].read_only
    assert seen["background"] is not seen["request"]
    assert not seen["read_only"]
    assert await names(db.session_factory) == ["from-background"]


async def test_a_task_with_its_own_scope_may_hold_writes_when_the_response_starts(
    db: Registry, engine: AsyncEngine
) -> None:
    """Only tasks relying on their implicit session (registry rule 3) are checked."""
    started, release = asyncio.Event(), asyncio.Event()
    jobs: list[asyncio.Task[None]] = []

    @db.scoped
    async def job() -> None:
        db.add(User(name="from-job"))
        await db.flush()
        started.set()
        await release.wait()  # still uncommitted when the response starts
        await db.commit()

    async def handler(request: Request) -> Response:
        jobs.append(asyncio.create_task(job()))
        await started.wait()  # (on SQLite the job holds the writer turn: no write here)
        return PlainTextResponse("created", status_code=201)

    app = Starlette(
        routes=[Route("/", handler, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, registry=db, commit="auto")],
    )
    async with serve(app) as client:
        assert (await client.post("/")).status_code == 201
    release.set()
    await jobs[0]
    assert await names(db.session_factory) == ["from-job"]


# -- two registries with commit="auto" ----------------------------------------------------


async def _add_pets(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS pets"))
        await conn.execute(
            text(
                "CREATE TABLE pets (id INTEGER PRIMARY KEY, owner_id INTEGER NOT NULL "
                "REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )


@pytest.mark.parametrize("failing", ["outer", "inner"])
async def test_two_registries_commit_outermost_first_after_every_check_and_flush(
    db: Registry, engine: AsyncEngine, tmp_path: Any, failing: str
) -> None:
    """The outermost auto-commit middleware commits both; a failing commit gives 500.

    Outer fails: nothing is committed. Inner fails: the outer database's commit stands (no
    two-phase commit across databases), and the client still gets the 500.
    """
    other_engine = asyncorm.create_engine(f"sqlite:///{tmp_path}/other.db")
    await reset_schema(other_engine)
    other: Registry = async_scoped_session(asyncorm.async_sessionmaker(other_engine))
    await _add_pets(engine)
    await _add_pets(other_engine)
    order: list[str] = []

    def record(name: str) -> Callable[..., None]:
        return lambda *args: order.append(name)

    async def handler(request: Request) -> Response:
        db.add(User(name="outer"))
        other.add(User(name="inner"))
        dangling = db if failing == "outer" else other
        # accepted now, refused at COMMIT
        await dangling.execute(text("INSERT INTO pets (id, owner_id) VALUES (1, 999)"))
        event.listen(db().sync_session, "after_commit", record("outer"))
        event.listen(other().sync_session, "after_commit", record("inner"))
        return PlainTextResponse("created", status_code=201)

    app = Starlette(
        routes=[Route("/", handler, methods=["POST"])],
        middleware=[
            Middleware(SessionMiddleware, registry=db, commit="auto"),
            Middleware(SessionMiddleware, registry=other, commit="auto"),
        ],
    )
    try:
        async with serve(app) as client:
            response = await client.post("/")
        assert response.status_code == 500
        if failing == "outer":
            assert order == []
            assert await names(db.session_factory) == []
        else:
            assert order == ["outer"]
            assert await names(db.session_factory) == ["outer"]
        assert await names(other.session_factory) == []
        await other.wait_closed()
        assert other.live_sessions == 0
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE pets"))
        await other_engine.dispose()


# -- a failing auto-commit and the app's exception handlers --------------------------------


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_failing_auto_commit_runs_the_apps_exception_handler(
    db: Registry, engine: AsyncEngine, framework: str
) -> None:
    await _add_pets(engine)
    handled: list[BaseException] = []

    async def conflict(request: Request, exc: Exception) -> Response:
        handled.append(exc)
        return JSONResponse({"error": "conflict"}, status_code=409)

    async def handler(request: Request) -> Response:
        db.add(User(name="with-pet"))
        # the dangling foreign key is accepted now and refused at COMMIT
        await db.execute(text("INSERT INTO pets (id, owner_id) VALUES (1, 999)"))
        return PlainTextResponse("created", status_code=201)

    app: ASGI
    if framework == "starlette":
        app = Starlette(
            routes=[Route("/", handler, methods=["POST"])],
            middleware=[Middleware(SessionMiddleware, registry=db, commit="auto")],
            exception_handlers={IntegrityError: conflict},
        )
    else:
        api = fastapi.FastAPI()
        api.add_middleware(SessionMiddleware, registry=db, commit="auto")
        api.add_exception_handler(IntegrityError, conflict)
        api.add_api_route("/", handler, methods=["POST"])
        app = api
    try:
        async with serve(app) as client:
            response = await client.post("/")
        assert (response.status_code, response.json()) == (409, {"error": "conflict"})
        assert len(handled) == 1
        assert isinstance(handled[0], IntegrityError)
        assert await names(db.session_factory) == []
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE pets"))
