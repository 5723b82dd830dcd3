"""Pooled connections: they keep no caller's context alive, and a dead one is never handed out."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

import asyncorm
from tests.conftest import Backend, postgres_url, reset_schema
from tests.models import User

request_state: contextvars.ContextVar[object] = contextvars.ContextVar("request_state")


class RequestState:
    """What an application keeps in a context variable for the length of one request."""


async def test_pooled_connections_keep_no_request_context_alive(
    backend: Backend, engine: AsyncEngine
) -> None:
    """300 request tasks, each with its own context state and registry scope, run on a pool
    of a few connections; once they are done, none of their states or sessions is reachable,
    though the connections they opened are still open in the pool."""
    db = asyncorm.async_scoped_session(asyncorm.async_sessionmaker(engine))
    states: list[weakref.ref[RequestState]] = []
    sessions: list[weakref.ref[asyncorm.AsyncSession]] = []

    async def request() -> None:
        state = RequestState()
        states.append(weakref.ref(state))
        request_state.set(state)
        async with db.scope() as session:
            sessions.append(weakref.ref(session))
            assert await session.scalar(select(func.count()).select_from(User)) == 0

    async with asyncio.TaskGroup() as group:
        for _ in range(300):
            group.create_task(request())
    gc.collect()

    assert engine.pool.checkedin() >= (1 if backend.is_sqlite else 2)  # type: ignore[attr-defined]
    assert [ref for ref in states if ref() is not None] == []
    assert [ref for ref in sessions if ref() is not None] == []


async def test_connections_are_opened_in_an_empty_context_with_the_dialect_set_up() -> None:
    """Connections opened from the URL or by a user's ``async_creator`` see none of the
    caller's context variables, and SQLAlchemy's setup of them (json codec, server version)
    still runs."""
    url = make_url(postgres_url())
    seen: list[object] = []

    async def creator() -> Any:
        seen.append(request_state.get(None))
        return await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, database=url.database
        )

    async def open_one(engine: AsyncEngine) -> weakref.ref[RequestState]:
        state = RequestState()
        request_state.set(state)
        async with engine.connect() as conn:
            assert await conn.scalar(text("""SELECT '{"a": [1]}'::json""")) == {"a": [1]}
            assert engine.dialect.server_version_info >= (10,)  # type: ignore[operator]
        return weakref.ref(state)

    for engine in (
        asyncorm.create_engine(url),
        asyncorm.create_engine(url, async_creator=creator),
    ):
        try:
            async with asyncio.TaskGroup() as group:  # a request task of its own
                task = group.create_task(open_one(engine))
            state = task.result()
            del task
            gc.collect()
            assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
            assert state() is None
        finally:
            await engine.dispose()
    assert seen == [None]


class FinHoldingProxy:
    """A TCP proxy in front of the PostgreSQL server that forwards every byte, and while
    ``holding`` is set holds back a server's end of file: what the client sees between the
    FATAL error a terminated backend sends and the close that follows it, made to last."""

    def __init__(self, url: str) -> None:
        self.upstream = make_url(url)
        self.holding = False
        self.server_ended = asyncio.Event()  # a held server side closed; all before it sent
        self.writers: list[asyncio.StreamWriter] = []
        self.pumps: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return self.upstream.set(host="127.0.0.1", port=port).render_as_string(False)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        for pump in self.pumps:
            pump.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, client_in: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        server_in, server = await asyncio.open_connection(
            self.upstream.host, self.upstream.port or 5432
        )
        self.writers += [client, server]
        for pump in (self._pump(client_in, server, True), self._pump(server_in, client, False)):
            task = asyncio.create_task(pump)
            self.pumps.add(task)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, to_server: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        if to_server or not self.holding:
            sink.close()
        else:
            self.server_ended.set()  # the client's side stays open until close()


@pytest.fixture
async def proxy() -> AsyncIterator[FinHoldingProxy]:
    proxy = FinHoldingProxy(postgres_url())
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def direct() -> AsyncIterator[AsyncConnection]:
    """A connection to the server that does not pass through the proxy."""
    engine = asyncorm.create_engine(postgres_url())
    await reset_schema(engine)
    async with engine.connect() as conn:
        yield conn
    await engine.dispose()


async def terminate_behind(proxy: FinHoldingProxy, direct: AsyncConnection, pid: int) -> None:
    """End backend ``pid``; return once its FATAL error has reached and been read by the
    client, its end of file held back by the proxy."""
    # with a timeout, pg_terminate_backend returns once the backend has exited
    proxy.holding = True
    assert await direct.scalar(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})
    await proxy.server_ended.wait()
    proxy.holding = False
    # a round trip on another socket: the event loop reads the waiting error meanwhile
    await direct.scalar(text("SELECT 1"))


async def pid_of(session: Awaitable[Any]) -> int:
    pid = await session
    assert isinstance(pid, int)
    return pid


async def test_a_pooled_connection_whose_backend_was_terminated_is_replaced_at_checkout(
    proxy: FinHoldingProxy, direct: AsyncConnection
) -> None:
    """The client has read the server's FATAL error but not yet its end of file: asyncpg
    still calls the connection open, and the next query would fail with "cannot switch to
    state 12; another operation is in progress". The pre-ping sees the server spoke while
    the connection was idle, pings it, and the pool hands out a fresh connection."""
    engine = asyncorm.create_engine(proxy.url, pool_size=1, max_overflow=0)
    Session = asyncorm.async_sessionmaker(engine)
    try:
        async with Session() as session:
            pid = await pid_of(session.scalar(select(func.pg_backend_pid())))
        await terminate_behind(proxy, direct, pid)
        async with Session() as session:
            assert await session.scalar(select(func.pg_backend_pid())) != pid
    finally:
        await engine.dispose()


async def test_a_statement_on_a_connection_whose_backend_was_terminated_invalidates_it(
    proxy: FinHoldingProxy, direct: AsyncConnection
) -> None:
    """A session holding the connection when its backend is terminated gets
    ConnectionLostError, a disconnect (asyncpg aborts the connection whose protocol refuses
    the query, and SQLAlchemy finds it closed): the connection is invalidated, the next
    session gets a fresh one."""
    engine = asyncorm.create_engine(proxy.url, pool_size=1, max_overflow=0)
    Session = asyncorm.async_sessionmaker(engine)
    try:
        async with Session() as session:
            pid = await pid_of(session.scalar(select(func.pg_backend_pid())))
            await terminate_behind(proxy, direct, pid)
            with pytest.raises(
                asyncorm.ConnectionLostError,
                match=r"The connection to the PostgreSQL server at .* was lost during 'SELECT "
                r"pg_backend_pid\(\) AS pg_backend_pid_1': the server had ended the session "
                r"while it sat in the pool \(.*another operation \(2\) is in progress\)\. The "
                r"server rolls back the open transaction of a lost connection, so nothing of "
                r"this unit of work was committed; the pool replaces the connection\.",
            ) as info:
                await session.scalar(select(func.pg_backend_pid()))
            assert info.value.connection_invalidated
        async with Session() as session:
            assert await session.scalar(select(func.pg_backend_pid())) != pid
    finally:
        await engine.dispose()


async def test_a_read_right_after_pg_terminate_backend_runs_on_a_fresh_connection(
    direct: AsyncConnection,
) -> None:
    """Without a proxy: terminate the pooled connection's backend, read again at once."""
    engine = asyncorm.create_engine(postgres_url(), pool_size=1, max_overflow=0)
    Session = asyncorm.async_sessionmaker(engine)
    try:
        for _ in range(3):
            async with Session() as session:
                pid = await pid_of(session.scalar(select(func.pg_backend_pid())))
            await direct.scalar(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})
            async with Session() as session:
                assert await session.scalar(select(func.pg_backend_pid())) != pid
    finally:
        await engine.dispose()


async def test_a_pooled_connection_with_the_servers_error_still_unread_is_replaced(
    direct: AsyncConnection,
) -> None:
    """The server's FATAL error and end of file have reached the socket, but the event loop
    has not read them yet (no loop pass between their arrival and the checkout): asyncpg
    still calls the connection open and the pre-ping's count of what it received has not
    moved. The pre-ping's poll of the socket sees the unread data, pings, and the pool hands
    out a fresh connection, on the first checkout and on later ones (the socket's poll is
    set up once per connection)."""
    engine = asyncorm.create_engine(postgres_url(), pool_size=1, max_overflow=0)
    Session = asyncorm.async_sessionmaker(engine)
    try:
        for _ in range(3):
            async with Session() as session:
                pid = await pid_of(session.scalar(select(func.pg_backend_pid())))
                raw = await (await session.connection()).get_raw_connection()
                transport = raw.driver_connection._transport  # type: ignore[union-attr]
            transport.pause_reading()  # the loop leaves what the server sends in the socket
            try:
                assert await direct.scalar(
                    text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid}
                )
            finally:
                transport.resume_reading()  # read at the loop's next pass: after the checkout
            async with Session() as session:
                assert await session.scalar(select(func.pg_backend_pid())) != pid
    finally:
        await engine.dispose()


async def test_a_cancellation_during_the_engines_first_connect_stays_a_cancellation() -> None:
    """SQLAlchemy's first-connect proxy has no ``info``: the cancellation listener must not
    turn a cancellation there into a NotImplementedError (which the dialect swallows, leaving
    itself half set up, and the caller with a TypeError)."""
    engine = asyncorm.create_engine(postgres_url())
    fired: list[bool] = []

    def cancel_during_setup(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        if "version()" in statement and not fired:
            fired.append(True)
            current = asyncio.current_task()
            assert current is not None
            current.cancel()
        return False

    event.listen(engine.sync_engine.dialect, "do_execute", cancel_during_setup)

    async def use() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(use())
        assert fired
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT 1")) == 1
        assert engine.sync_engine.dialect.server_version_info is not None
    finally:
        await engine.dispose()
