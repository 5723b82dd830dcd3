"""The pytest plugin, run on small test projects with ``pytester`` on both backends.

Each project is run in-process (fast); the one that checks the plugin stays inert runs in a
subprocess, where nothing was imported before it. The database is passed as the
``ASYNCORM_TEST_URL`` of the run (unset for SQLite: the plugin's temporary file).
"""

from __future__ import annotations

import textwrap

# In-process runs forget the modules they imported when they end; drivers and other C
# extensions cannot be imported twice in a process, so they are imported here, once.
import aiohttp.test_utils  # noqa: F401
import aiosqlite  # noqa: F401
import asyncpg  # noqa: F401
import httpx  # noqa: F401
import pytest
import starlette.applications  # noqa: F401

import asyncorm._testclients
import asyncorm.aiohttp
import asyncorm.starlette  # noqa: F401
from tests.conftest import Backend

pytest_plugins = ["pytester"]

MODELS = """
    import asyncorm
    from sqlalchemy import String, event, func, select
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


    class Base(asyncorm.AsyncAttrs, DeclarativeBase):
        pass


    class Item(Base):
        __tablename__ = "plugin_items"

        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(50))


    CREATED = []
    event.listen(Base.metadata, "after_create", lambda *args, **kw: CREATED.append(1))

    db = asyncorm.async_scoped_session(asyncorm.async_sessionmaker())


    async def count(session):
        return await session.scalar(select(func.count()).select_from(Item))


    async def count_outside(engine):
        # a connection of its own: sees only what was really committed
        async with engine.connect() as conn:
            return await conn.scalar(select(func.count()).select_from(Item))
"""

CONFTEST = """
    import pytest
    from models import Base, db


    @pytest.fixture(scope="session")
    def asyncorm_metadata():
        return Base.metadata


    @pytest.fixture
    def asyncorm_app_registry():
        return db
"""

TEST_A = """
    import pytest
    from models import CREATED, Item, count, count_outside

    pytestmark = pytest.mark.asyncio


    async def test_a_commits(asyncorm_session, asyncorm_engine):
        asyncorm_session.add(Item(name="a"))
        await asyncorm_session.commit()
        assert await count(asyncorm_session) == 1
        assert await count_outside(asyncorm_engine) == 0
        assert CREATED == [1]
"""

TEST_B = """
    import pytest
    from models import CREATED, db, count, count_outside

    pytestmark = pytest.mark.asyncio


    async def test_b_sees_nothing(asyncorm_session, asyncorm_engine):
        assert await count(asyncorm_session) == 0
        assert await count_outside(asyncorm_engine) == 0
        assert CREATED == [1], "tables are created once per run"
        assert db.session_factory.kw["bind"] is None, "the registry was restored"
"""

TEST_ROLLBACK = """
    import pytest
    from models import Item, count

    pytestmark = pytest.mark.asyncio


    async def test_rollback_then_go_on(asyncorm_session):
        asyncorm_session.add(Item(name="x"))
        await asyncorm_session.flush()
        await asyncorm_session.rollback()
        assert await count(asyncorm_session) == 0
        asyncorm_session.add(Item(name="y"))
        await asyncorm_session.commit()
        asyncorm_session.add(Item(name="z"))
        await asyncorm_session.commit()
        assert await count(asyncorm_session) == 2
"""

TEST_REGISTRY = """
    import asyncio

    import pytest
    from models import Item, count, db

    pytestmark = pytest.mark.asyncio


    async def test_db_is_the_test_session(asyncorm_registry, asyncorm_session):
        assert asyncorm_registry is db
        assert db() is asyncorm_session
        db.add(Item(name="r"))
        await db.commit()

        async def child():
            session = db()  # a task of its own: a session of its own, same transaction
            assert session is not asyncorm_session
            assert await count(session) == 1
            session.add(Item(name="child"))
            await session.commit()

        await asyncio.create_task(child())
        assert await count(asyncorm_session) == 2
        async with db.scope() as scoped:
            assert db() is scoped and scoped is not asyncorm_session
            assert await count(scoped) == 2
        assert db() is asyncorm_session
        await db.remove()  # leaves the test's session alone
        assert db() is asyncorm_session
"""

TEST_STARLETTE = """
    import pytest
    from models import Item, count, db
    from sqlalchemy import func, select
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from asyncorm.starlette import SessionMiddleware

    pytestmark = pytest.mark.asyncio


    async def create(request):
        item = Item(name=(await request.json())["name"])
        db.add(item)
        await db.flush()
        return JSONResponse({"id": item.id}, status_code=201)


    async def how_many(request):
        return JSONResponse({"count": await db.scalar(select(func.count(Item.id)))})


    app = Starlette(
        routes=[Route("/items", create, methods=["POST"]), Route("/items", how_many)],
        middleware=[Middleware(SessionMiddleware, registry=db, commit="auto")],
    )


    async def test_starlette_app(asyncorm_asgi_client, asyncorm_session):
        async with asyncorm_asgi_client(app) as client:
            response = await client.post("/items", json={"name": "web"})
            assert response.status_code == 201
            assert (await client.get("/items")).json() == {"count": 1}
        assert await count(asyncorm_session) == 1
"""

TEST_AIOHTTP = """
    import pytest
    from aiohttp import web
    from models import Item, count, db

    import asyncorm.aiohttp

    pytestmark = pytest.mark.asyncio


    async def create(request):
        item = Item(name=(await request.json())["name"])
        db.add(item)
        await db.flush()
        return web.json_response({"id": item.id}, status=201)


    def make_app():
        app = web.Application()
        app.router.add_post("/items", create)
        asyncorm.aiohttp.setup(app, db, commit="auto")
        return app


    async def test_aiohttp_app(asyncorm_aiohttp_client, asyncorm_session):
        async with asyncorm_aiohttp_client(make_app()) as client:
            response = await client.post("/items", json={"name": "web"})
            assert response.status == 201
        assert await count(asyncorm_session) == 1
"""

FILES = {
    "test_a.py": TEST_A,
    "test_rollback.py": TEST_ROLLBACK,
    "test_registry.py": TEST_REGISTRY,
    "test_starlette_app.py": TEST_STARLETTE,
    "test_aiohttp_app.py": TEST_AIOHTTP,
    "test_b.py": TEST_B,
}


def make_project(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    backend: Backend,
    *,
    mode: str = "auto",
    fixture_loop: str = "function",
    test_loop: str = "function",
) -> None:
    if backend.is_sqlite:
        monkeypatch.delenv("ASYNCORM_TEST_URL", raising=False)  # the plugin's own file
    else:
        monkeypatch.setenv("ASYNCORM_TEST_URL", backend.url)
    pytester.makeini(
        f"""
        [pytest]
        asyncio_mode = {mode}
        asyncio_default_fixture_loop_scope = {fixture_loop}
        asyncio_default_test_loop_scope = {test_loop}
        filterwarnings = error
        """
    )
    pytester.makepyfile(
        models=textwrap.dedent(MODELS),
        conftest=textwrap.dedent(CONFTEST),
        **{name.removesuffix(".py"): textwrap.dedent(body) for name, body in FILES.items()},
    )


@pytest.mark.parametrize(
    ("mode", "order"),
    [("auto", list(FILES)), ("strict", list(reversed(FILES)))],
    ids=["auto-committer-first", "strict-checker-first"],
)
def test_every_test_is_rolled_back(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    backend: Backend,
    mode: str,
    order: list[str],
) -> None:
    make_project(pytester, monkeypatch, backend, mode=mode)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", *order)
    result.assert_outcomes(passed=len(FILES))


def test_session_scoped_loop(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, backend: Backend
) -> None:
    make_project(pytester, monkeypatch, backend, fixture_loop="session", test_loop="session")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", *FILES)
    result.assert_outcomes(passed=len(FILES))


TEST_FIXTURE_LOOP = """
    import pytest
    import pytest_asyncio
    from models import Item


    @pytest_asyncio.fixture(loop_scope="session")
    async def seeded(asyncorm_session):
        asyncorm_session.add(Item(name="seed"))
        await asyncorm_session.flush()


    @pytest.mark.asyncio(loop_scope="function")
    async def test_fixture_in_another_loop(seeded):
        pass
"""


def test_a_loop_mismatch_fails_with_what_to_change(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, backend: Backend
) -> None:
    make_project(pytester, monkeypatch, backend, fixture_loop="function", test_loop="session")
    pytester.makepyfile(test_fixture_loop=textwrap.dedent(TEST_FIXTURE_LOOP))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "test_a.py", "test_b.py")
    result.assert_outcomes(failed=2)
    result.stdout.re_match_lines(
        [
            r"E +asyncorm\._errors\.EventLoopMismatchError: test_a\.py::test_a_commits: "
            r"asyncorm_transaction .* was set up in the function-scoped event loop and is "
            r"used in another one: the test runs in the session-scoped loop .* set "
            r"asyncio_default_fixture_loop_scope = 'session' in the pytest configuration"
        ]
    )
    # an async fixture in another loop fails at its first statement
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "test_fixture_loop.py")
    result.assert_outcomes(errors=1)
    result.stdout.re_match_lines([r"E +asyncorm\._errors\.EventLoopMismatchError: .*"])


def test_the_plugin_is_inert_until_a_fixture_is_used(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function"
    )
    pytester.makepyfile(
        test_plain="""
        import gc
        import sys


        def test_nothing_of_asyncorm_ran(request, tmp_path_factory):
            assert request.config.pluginmanager.has_plugin("asyncorm")
            loaded = {"aiosqlite", "asyncpg", "asyncorm._outer", "asyncorm.testing"}
            assert loaded.isdisjoint(sys.modules)
            from sqlalchemy.ext.asyncio import AsyncEngine

            assert not [o for o in gc.get_objects() if isinstance(o, AsyncEngine)]
            assert not list(tmp_path_factory.getbasetemp().glob("asyncorm*"))
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
