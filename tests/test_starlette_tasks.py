"""SessionMiddleware when the work of a request leaves the request's task.

A ``BaseHTTPMiddleware`` inside the middleware (the handler runs in a task of its own),
``db.remove()`` before a streamed response, a background task after a streamed response (both
sent from another task under uvicorn's ASGI 2.3), and two registries' auto-commits. Real
uvicorn servers, real httpx clients, both backends.
"""

# no `from __future__ import annotations`: FastAPI must see the endpoints' annotations
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import asyncorm
from asyncorm import AsyncSession, async_scoped_session
from asyncorm.starlette import DEFAULT_READ_ONLY_METHODS, SessionMiddleware
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
