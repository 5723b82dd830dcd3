"""An engine used in another event loop than its pooled connections.

asyncpg: EventLoopMismatchError, saying what to do. aiosqlite: the pooled connection serves the
new loop (its thread resolves each call in the caller's loop), as with stock SQLAlchemy, which is
what Starlette's sync ``TestClient`` needs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import asyncorm
from tests.conftest import Backend, postgres_url, reset_schema
from tests.models import User


async def select_one(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT 1")) or 0)


async def select_one_in_a_session(engine: AsyncEngine) -> int:
    async with asyncorm.async_sessionmaker(engine)() as session:
        return int(await session.scalar(text("SELECT 1")) or 0)


MISMATCH = (
    r"^Engine 'postgresql://[^']+' is used in a different event loop than the one its "
    r"pooled connection was opened in \(that loop {state}\), and an asyncpg connection works "
    r"only in the loop that opened it\. Call `await engine\.dispose\(\)` in the new loop before "
    r"using the engine there \(or dispose of it before the first loop ends\), or create the "
    r"engine with `poolclass=NullPool`\. To test an ASGI app, call it in the test's own loop "
    r"with `httpx\.AsyncClient\(transport=httpx\.ASGITransport\(app\)\)` instead of a sync "
    r"TestClient, which runs the app in a loop of its own\.$"
)


def test_asyncpg_in_a_second_loop_gets_the_error_and_dispose_fixes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    engine = asyncorm.create_engine(postgres_url())
    with asyncio.Runner() as first:
        assert first.run(select_one(engine)) == 1
        with asyncio.Runner() as second:
            for use in (select_one, select_one_in_a_session):
                with pytest.raises(
                    asyncorm.EventLoopMismatchError,
                    match=MISMATCH.format(state="is not running now"),
                ):
                    second.run(use(engine))
                assert first.run(select_one(engine)) == 1  # a fresh pooled connection of loop 1
            second.run(engine.dispose())  # the fix: loop 1's connections are let go
            assert second.run(select_one(engine)) == 1
            assert second.run(select_one_in_a_session(engine)) == 1
            second.run(engine.dispose())
    gc.collect()  # a connection of either loop left open would warn here, when collected
    assert caplog.records == []  # nor is anything logged while closing loop 1's connections


def test_asyncpg_error_says_when_the_first_loop_still_runs_in_another_thread() -> None:
    """The first loop is running (in another thread): the message must not say "not running"."""
    engine = asyncorm.create_engine(postgres_url())
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    thread = threading.Thread(target=lambda: (loop.call_soon(ready.set), loop.run_forever()))
    thread.start()
    try:
        ready.wait()
        assert asyncio.run_coroutine_threadsafe(select_one(engine), loop).result() == 1
        with pytest.raises(
            asyncorm.EventLoopMismatchError,
            match=MISMATCH.format(state="is running in another thread"),
        ):
            asyncio.run(select_one(engine))
        asyncio.run_coroutine_threadsafe(engine.dispose(), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_asyncpg_after_the_first_loop_closed() -> None:
    engine = asyncorm.create_engine(postgres_url(), poolclass=NullPool)
    assert asyncio.run(select_one(engine)) == 1
    assert asyncio.run(select_one(engine)) == 1  # NullPool: nothing pooled, nothing to check
    asyncio.run(engine.dispose())


@pytest.mark.parametrize("url", ["file", "memory"])
def test_aiosqlite_pooled_connections_serve_any_loop(
    tmp_path: Path, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two ``asyncio.run()`` calls, and two loops taking turns: no error, nothing leaks."""
    caplog.set_level(logging.WARNING)
    engine = asyncorm.create_engine(
        f"sqlite:///{tmp_path / 'loops.db'}" if url == "file" else "sqlite://"
    )
    assert asyncio.run(select_one(engine)) == 1
    assert asyncio.run(select_one_in_a_session(engine)) == 1  # the first loop is closed
    with asyncio.Runner() as first, asyncio.Runner() as second:
        for _ in range(3):
            assert first.run(select_one_in_a_session(engine)) == 1
            assert second.run(select_one(engine)) == 1
        second.run(engine.dispose())
    gc.collect()
    assert caplog.records == []


def test_null_pool_needs_nothing(backend: Backend) -> None:
    engine = asyncorm.create_engine(backend.url, poolclass=NullPool)
    assert asyncio.run(select_one(engine)) == 1
    assert asyncio.run(select_one(engine)) == 1
    asyncio.run(engine.dispose())


def test_the_error_is_a_runtime_error() -> None:
    assert issubclass(asyncorm.EventLoopMismatchError, RuntimeError)
    assert issubclass(asyncorm.EventLoopMismatchError, asyncorm.AsyncORMError)


# -- Starlette's sync TestClient: the app runs in a thread with a loop of its own ------------


@pytest.fixture
def sqlite_app(tmp_path: Path) -> tuple[Starlette, AsyncEngine]:
    engine = asyncorm.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    Session = asyncorm.async_sessionmaker(engine)

    async def create(request: Request) -> JSONResponse:
        async with Session.begin() as session:
            user = User(name=request.path_params["name"])
            session.add(user)
            await session.flush()
            return JSONResponse({"id": user.id}, status_code=201)

    async def count(request: Request) -> JSONResponse:
        async with Session() as session:
            return JSONResponse({"users": await session.scalar(select(func.count(User.id)))})

    app = Starlette(
        routes=[Route("/users/{name}", create, methods=["POST"]), Route("/users", count)]
    )
    return app, engine


async def test_sync_testclient_shares_a_sqlite_engine_with_the_tests_loop(
    sqlite_app: tuple[Starlette, AsyncEngine],
) -> None:
    """The fixture pattern of FastAPI apps' test suites: the test's loop sets up the schema and
    reads; the sync TestClient's loop (another thread) serves requests on the same engine."""
    app, engine = sqlite_app
    await reset_schema(engine)  # pooled connections now belong to the test's loop
    Session = asyncorm.async_sessionmaker(engine)
    async with Session.begin() as session:
        session.add(User(name="from the test"))
    with TestClient(app) as client:
        for name in ("ann", "bob"):
            response = await asyncio.to_thread(client.post, f"/users/{name}")
            assert response.status_code == 201, response.text
        response = await asyncio.to_thread(client.get, "/users")
        assert response.json() == {"users": 3}
    async with Session() as session:  # back in the test's loop, on the same pool
        names = (await session.scalars(select(User.name).order_by(User.id))).all()
    assert names == ["from the test", "ann", "bob"]
    await engine.dispose()


def test_sync_testclient_in_a_sync_test(sqlite_app: tuple[Starlette, AsyncEngine]) -> None:
    """A plain sync test: the schema made in one asyncio.run(), requests in TestClient's loop."""
    app, engine = sqlite_app
    asyncio.run(reset_schema(engine))
    with TestClient(app) as client:
        assert client.post("/users/ann").status_code == 201
        assert client.get("/users").json() == {"users": 1}
    with TestClient(app) as client:  # a second portal: a third loop
        assert client.get("/users").json() == {"users": 1}
    asyncio.run(engine.dispose())
