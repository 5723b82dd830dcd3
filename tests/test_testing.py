"""``asyncorm.testing``: count_queries(), assert_max_queries(); and the plugin's transaction.

These tests run on the pytest plugin's fixtures (``asyncorm_session`` and friends), on both
backends through the ``asyncorm_url`` override in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.orm import selectinload
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import asyncorm
from asyncorm.starlette import DEFAULT_READ_ONLY_METHODS, SessionMiddleware
from asyncorm.testing import OuterTransaction, QueryLog, assert_max_queries, count_queries
from tests.models import Address, User


async def seed(session: asyncorm.AsyncSession) -> None:
    session.add_all(
        [
            User(name=name, addresses=[Address(email=f"{name}{i}@example.org") for i in range(2)])
            for name in ("ann", "bob", "cat")
        ]
    )
    await session.commit()
    session.expunge_all()


async def test_assert_max_queries_catches_lazy_loads_in_a_loop(
    asyncorm_session: asyncorm.AsyncSession,
) -> None:
    await seed(asyncorm_session)

    async def emails_lazily() -> None:
        async with assert_max_queries(2, asyncorm_session):
            users = (await asyncorm_session.scalars(select(User).order_by(User.id))).all()
            for user in users:
                assert len(await user.awaitable_attrs.addresses) == 2

    with pytest.raises(AssertionError) as caught:
        await emails_lazily()
    message = str(caught.value)
    session = f"session <AsyncSession {id(asyncorm_session):#x}>"
    assert message.startswith(f"4 statements ran on {session}")
    assert "more than the 2 allowed" in message
    lines = message.splitlines()
    assert re.fullmatch(r"  3 x SELECT addresses\.id, .* FROM addresses WHERE .*", lines[1])
    assert re.fullmatch(r"  1 x SELECT users\.id, .* FROM users ORDER BY users\.id", lines[2])
    assert "The first statement ran 3 times: an N+1 pattern" in lines[3]
    assert "selectinload" in lines[3]


async def test_assert_max_queries_passes_with_eager_loading(
    asyncorm_session: asyncorm.AsyncSession,
) -> None:
    await seed(asyncorm_session)
    async with assert_max_queries(2, asyncorm_session) as queries:
        stmt = select(User).options(selectinload(User.addresses))
        users = (await asyncorm_session.scalars(stmt)).all()
        assert sum(len(user.addresses) for user in users) == 6
    assert len(queries) == 2


async def test_assert_max_queries_checks_nothing_when_the_block_raises(
    asyncorm_session: asyncorm.AsyncSession,
) -> None:
    async def failing() -> None:
        async with assert_max_queries(0, asyncorm_session):
            await asyncorm_session.scalar(select(func.count(User.id)))
            raise KeyError("the block's own error")

    with pytest.raises(KeyError):
        await failing()


@pytest.mark.parametrize("n", [-1, 1.5, True, "2"])
async def test_assert_max_queries_needs_a_count(
    asyncorm_session: asyncorm.AsyncSession, n: object
) -> None:
    with pytest.raises(ValueError, match=r"needs a number of statements >= 0, got "):
        async with assert_max_queries(n, asyncorm_session):  # type: ignore[arg-type]
            pass


async def test_transaction_control_is_not_counted(
    asyncorm_session: asyncorm.AsyncSession,
) -> None:
    async with count_queries(asyncorm_session) as queries:
        asyncorm_session.add(User(name="ann"))
        await asyncorm_session.commit()  # SAVEPOINT ... RELEASE SAVEPOINT: not counted
        await asyncorm_session.rollback()
    assert [s.split()[0] for s in queries.statements] == ["INSERT"]
    assert repr(queries).endswith(": 1 statement(s)>")


async def test_count_queries_of_an_engine_a_connection_and_a_registry(
    asyncorm_engine: AsyncEngine,
    asyncorm_connection: AsyncConnection,
    asyncorm_registry: asyncorm.async_scoped_session[asyncorm.AsyncSession],
) -> None:
    one = select(func.count(User.id))
    async with (
        count_queries(asyncorm_engine) as on_engine,
        count_queries(asyncorm_connection) as on_connection,
        count_queries(asyncorm_registry) as on_registry,
    ):
        await asyncorm_registry.scalar(one)  # the test's session: the test's connection
        async with asyncorm_engine.connect() as other:  # another connection of the engine
            await other.scalar(one)
    assert len(on_engine) == 2
    assert len(on_connection) == len(on_registry) == 1
    assert on_registry.target.startswith("registry <async_scoped_session")


async def test_count_queries_of_a_session_on_an_engine_follows_its_connections(
    asyncorm_engine: AsyncEngine,
) -> None:
    async with asyncorm.AsyncSession(asyncorm_engine) as session:
        await session.scalar(select(func.count(User.id)))  # in a transaction already
        async with count_queries(session) as queries, asyncorm_engine.connect() as other:
            await session.scalar(select(func.count(Address.id)))
            await session.commit()
            await session.scalar(select(User.id).limit(1))  # a new transaction, connection
            await other.scalar(select(func.count(User.id)))  # not the session's
    assert len(queries) == 2
    assert queries.counts() == {" ".join(s.split()): 1 for s in queries.statements}


async def test_count_queries_refuses_what_it_cannot_watch() -> None:
    with pytest.raises(TypeError, match=r"counts the statements of an AsyncEngine"):
        async with count_queries("engine"):  # type: ignore[arg-type]
            pass
    unbound = asyncorm.async_scoped_session(asyncorm.async_sessionmaker())
    with pytest.raises(ValueError, match=r"cannot tell which engine .* has no bind"):
        async with count_queries(unbound):
            pass


def test_query_log_report_ranks_repeated_statements() -> None:
    log = QueryLog("engine x")
    log.statements += ["SELECT 1", "SELECT  2", "SELECT 2", "SELECT\n2"]
    assert log.report() == "  3 x SELECT 2\n  1 x SELECT 1"


# -- the outer transaction -----------------------------------------------------------------


async def test_the_outer_transaction_cannot_be_committed(
    asyncorm_connection: AsyncConnection,
) -> None:
    with pytest.raises(RuntimeError, match=r"outer transaction \(asyncorm_connection\) cannot "):
        await asyncorm_connection.commit()


async def test_deferred_begin_never_runs_a_write_outside_the_transaction(
    asyncorm_url: str,
    asyncorm_engine: AsyncEngine,
    asyncorm_connection: AsyncConnection,
    asyncorm_session: asyncorm.AsyncSession,
) -> None:
    # the session's first statement is its SAVEPOINT: BEGIN goes first, on both backends
    assert await asyncorm_session.scalar(select(func.count(User.id))) == 0
    raw = await asyncorm_connection.get_raw_connection()
    if asyncorm_url.startswith("postgresql"):
        assert raw.driver_connection.is_in_transaction()  # type: ignore[union-attr]
    asyncorm_session.add(User(name="ann"))
    await asyncorm_session.commit()
    await asyncorm_connection.execute(text("UPDATE users SET name = 'bob'"))
    async with asyncorm_engine.connect() as other:
        assert await other.scalar(select(func.count(User.id))) == 0
    assert await asyncorm_session.scalar(select(User.name)) == "bob"


async def test_a_child_task_gets_a_session_of_its_own_in_the_same_transaction(
    asyncorm_registry: asyncorm.async_scoped_session[asyncorm.AsyncSession],
    asyncorm_session: asyncorm.AsyncSession,
    asyncorm_transaction: OuterTransaction,
) -> None:
    asyncorm_registry.add(User(name="ann"))
    await asyncorm_registry.flush()

    async def child() -> tuple[bool, int | None]:
        session = asyncorm_registry()
        return session is asyncorm_session, await session.scalar(select(func.count(User.id)))

    assert await asyncio.create_task(child()) == (False, 1)
    await asyncorm_registry.wait_closed()
    assert asyncorm_registry.live_sessions == 0
    assert asyncorm_transaction.bind(asyncorm_registry) is asyncorm_registry  # no-op


@pytest.fixture(scope="session")
def sqlite_only(asyncorm_url: str) -> None:
    """Skip before the plugin's engine is set up (a session fixture listed first)."""
    if not asyncorm_url.startswith("sqlite"):
        pytest.skip("PostgreSQL locks rows, not the database")


async def test_another_connection_writing_during_the_test_is_refused_on_sqlite(
    sqlite_only: None, asyncorm_engine: AsyncEngine, asyncorm_session: asyncorm.AsyncSession
) -> None:
    asyncorm_session.add(User(name="ann"))
    await asyncorm_session.flush()  # the test's connection holds the writer lock now
    async with asyncorm.AsyncSession(asyncorm_engine) as other:
        other.add(User(name="bob"))
        with pytest.raises(asyncorm.SQLiteWriteLockError, match=r"would deadlock"):
            await other.flush()


async def test_read_only_sessions_refuse_writes_and_leave_the_connection_writable(
    asyncorm_transaction: OuterTransaction, asyncorm_session: asyncorm.AsyncSession
) -> None:
    async with asyncorm_transaction.sessionmaker(read_only=True) as reader:
        assert reader.read_only
        assert await reader.scalar(select(func.count(User.id))) == 0
        reader.add(User(name="ann"))
        with pytest.raises(asyncorm.ReadOnlySessionError, match=r"flushing its changes writes"):
            await reader.flush()
        reader.expunge_all()
        with pytest.raises(asyncorm.ReadOnlySessionError, match=r"'DELETE FROM users' writes"):
            await reader.execute(text("DELETE FROM users"))
        await reader.commit()
    # the shared connection is not read-only afterwards
    asyncorm_session.add(User(name="bob"))
    await asyncorm_session.commit()
    assert await asyncorm_session.scalar(select(func.count(User.id))) == 1


async def test_an_asgi_app_with_read_only_methods_on_the_test_transaction(
    asyncorm_asgi_client: Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]],
    asyncorm_session: asyncorm.AsyncSession,
) -> None:
    db = asyncorm.async_scoped_session(asyncorm.async_sessionmaker())

    async def how_many(request: Request) -> JSONResponse:
        return JSONResponse({"count": await db.scalar(select(func.count(User.id)))})

    async def sneaky_write(request: Request) -> JSONResponse:
        db.add(User(name="sneaky"))
        await db.flush()
        return JSONResponse({})

    app = Starlette(
        routes=[Route("/count", how_many), Route("/sneaky", sneaky_write)],
        middleware=[
            Middleware(
                SessionMiddleware,
                registry=db,
                commit="auto",
                read_only_methods=DEFAULT_READ_ONLY_METHODS,
            )
        ],
    )
    asyncorm_session.add(User(name="ann"))
    await asyncorm_session.commit()
    async with asyncorm_asgi_client(app) as client:
        assert (await client.get("/count")).json() == {"count": 1}
        with pytest.raises(asyncorm.ReadOnlySessionError, match=r"read-only"):
            await client.get("/sneaky")
    asyncorm_session.add(User(name="bob"))  # the GETs left the connection writable
    await asyncorm_session.commit()
    assert await asyncorm_session.scalar(select(func.count(User.id))) == 2


async def test_a_client_for_an_app_without_a_registry_is_refused(
    asyncorm_asgi_client: Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]],
) -> None:
    async def open_client() -> None:
        async with asyncorm_asgi_client(Starlette()):
            pass

    with pytest.raises(ValueError, match=r"No asyncorm registry found in .*: its requests"):
        await open_client()


async def test_a_registry_with_binds_cannot_be_bound(
    asyncorm_transaction: OuterTransaction, asyncorm_engine: AsyncEngine
) -> None:
    factory = asyncorm.async_sessionmaker(binds={User: asyncorm_engine})
    with pytest.raises(ValueError, match=r"has binds= \(one engine per mapper\)"):
        asyncorm_transaction.bind(asyncorm.async_scoped_session(factory))
