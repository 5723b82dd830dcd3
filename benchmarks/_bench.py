"""The databases and the contenders' connections for one backend, opened outside the timing.

Every contender gets the same schema and the same rows. On PostgreSQL they share one
database (they never run at the same time). On SQLite each contender has a file of its own
in a temporary directory, because SQLite's journal mode is stored in the file: asyncorm and
the raw driver switch their files to WAL (``synchronous=NORMAL``), while plain SQLAlchemy
keeps SQLite's defaults (rollback journal, ``synchronous=FULL``), as a stock engine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import asyncpg
import sqlalchemy
from sqlalchemy import insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.ext.asyncio import async_sessionmaker as sa_async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import asyncorm
from benchmarks._core import (
    ASYNCORM,
    POOL_SIZE,
    POSTGRESQL,
    RAW,
    SQLALCHEMY,
    SQLITE,
    Sizes,
)
from benchmarks._schema import Account, Base, Item, item_row

__all__ = ["Bench", "RawConnection", "RawDB", "open_bench", "postgres_problem"]

SessionFactory = sa_async_sessionmaker[Any]

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
)
"""What the raw aiosqlite connections set: the same as asyncorm's SQLite profile."""


class RawConnection(Protocol):
    """The part of a driver connection the raw workloads use (asyncpg's signatures)."""

    async def fetch(self, sql: str, *args: Any) -> Sequence[Sequence[Any]]: ...

    async def execute(self, sql: str, *args: Any) -> object: ...

    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> object: ...


class RawDB(Protocol):
    """A pool of driver connections: plain checkouts, and checkouts in a transaction."""

    def sql(self, text: str) -> str:
        """``text`` with its ``?`` placeholders in the driver's style."""
        ...

    def connection(self) -> AbstractAsyncContextManager[RawConnection]: ...

    def transaction(self) -> AbstractAsyncContextManager[RawConnection]: ...

    async def close(self) -> None: ...


class AsyncpgRaw:
    """asyncpg's own pool with its defaults (it resets a connection when it is released)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> AsyncpgRaw:
        return cls(await asyncpg.create_pool(url, min_size=POOL_SIZE, max_size=POOL_SIZE))

    def sql(self, text: str) -> str:
        parts = text.split("?")
        out = [parts[0]]
        for n, part in enumerate(parts[1:], start=1):
            out.append(f"${n}{part}")
        return "".join(out)

    def connection(self) -> AbstractAsyncContextManager[RawConnection]:
        acquire: AbstractAsyncContextManager[RawConnection] = self._pool.acquire()
        return acquire

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[RawConnection]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield conn

    async def close(self) -> None:
        await self._pool.close()


class _AiosqliteConnection:
    """aiosqlite with asyncpg's method names; each call is one trip to its thread."""

    __slots__ = ("conn",)

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def fetch(self, sql: str, *args: Any) -> Sequence[Sequence[Any]]:
        return list(await self.conn.execute_fetchall(sql, args))

    async def execute(self, sql: str, *args: Any) -> object:
        return await self.conn.execute(sql, args)

    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> object:
        return await self.conn.executemany(sql, args)


class AiosqliteRaw:
    """A LIFO pool of aiosqlite connections (autocommit mode, WAL).

    Reads run outside any transaction (a single SELECT is its own snapshot). Write
    transactions are the fair raw equivalent of asyncorm's: ``BEGIN IMMEDIATE`` taken
    behind one :class:`asyncio.Lock`, so writers queue in the event loop, not in SQLite.
    """

    def __init__(self, conns: list[_AiosqliteConnection]) -> None:
        self._conns = conns
        self._idle: asyncio.LifoQueue[_AiosqliteConnection] = asyncio.LifoQueue()
        for conn in conns:
            self._idle.put_nowait(conn)
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> AiosqliteRaw:
        conns = []
        for _ in range(POOL_SIZE):
            conn = await aiosqlite.connect(path, isolation_level=None, timeout=30.0)
            for pragma in SQLITE_PRAGMAS:
                await conn.execute(pragma)
            conns.append(_AiosqliteConnection(conn))
        return cls(conns)

    def sql(self, text: str) -> str:
        return text

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[RawConnection]:
        conn = await self._idle.get()
        try:
            yield conn
        finally:
            self._idle.put_nowait(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[RawConnection]:
        conn = await self._idle.get()
        try:
            async with self._write_lock:
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    await conn.execute("ROLLBACK")
                    raise
                await conn.execute("COMMIT")
        finally:
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        for conn in self._conns:
            await conn.conn.close()


@dataclass
class Bench:
    """One backend, loaded with data, and every contender's warm connections to it."""

    backend: str
    sizes: Sizes
    raw: RawDB
    engines: dict[str, AsyncEngine]
    factories: dict[str, SessionFactory]
    sync_engine: sqlalchemy.Engine
    sync_reference: sqlalchemy.Engine | None = None
    """A stock sync engine on the raw driver's rows: pysqlite on its SQLite file, psycopg on
    PostgreSQL (when installed). The sync Session on it is W1/W2's reference for what any
    async layer over SQLAlchemy's ORM can reach."""
    cleanup: list[Callable[[], Any]] = field(default_factory=list)

    def factory(self, contender: str) -> SessionFactory:
        """The session factory of an ORM contender (SQLAlchemy's or asyncorm's)."""
        return self.factories[contender]

    def sync_session(self) -> Session:
        """A sync Session on a sync in-memory SQLite engine holding the same items."""
        return Session(self.sync_engine)

    def sample(self, n: int, seed: int) -> list[int]:
        """``n`` distinct item ids, the same for every contender."""
        return random.Random(seed).sample(range(1, self.sizes.items + 1), n)

    def clear_sql(self, table: str) -> str:
        if self.backend == POSTGRESQL:
            return f"TRUNCATE {table}"
        return f"DELETE FROM {table}"

    async def execute(self, contender: str, sql: str) -> None:
        """Run ``sql`` in a committed transaction through ``contender``'s connections."""
        if contender == RAW:
            async with self.raw.transaction() as conn:
                await conn.execute(sql)
        else:
            async with self.engines[contender].begin() as conn:
                await conn.exec_driver_sql(sql)

    async def scalar(self, contender: str, sql: str) -> Any:
        """The single value ``sql`` selects, through ``contender``'s connections."""
        if contender == RAW:
            async with self.raw.connection() as conn:
                return (await conn.fetch(sql))[0][0]
        async with self.engines[contender].connect() as conn:
            return (await conn.exec_driver_sql(sql)).scalar_one()

    async def close(self) -> None:
        await self.raw.close()
        for engine in self.engines.values():
            await engine.dispose()
        self.sync_engine.dispose()
        if self.sync_reference is not None:
            self.sync_reference.dispose()
        for fn in reversed(self.cleanup):
            result = fn()
            if asyncio.iscoroutine(result):
                await result


async def postgres_problem(url: str) -> str | None:
    """Why ``url`` cannot be used for the benchmark, or None when it can."""
    try:
        conn = await asyncio.wait_for(asyncpg.connect(url), timeout=5)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    await conn.close()
    return None


async def postgres_version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        version: str = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return version


async def _load(sa_url: str, sizes: Sizes) -> None:
    """Create the tables and insert the rows, with a throwaway stock engine."""
    engine = create_async_engine(sa_url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
            chunk = 5_000
            for start in range(1, sizes.items + 1, chunk):
                stop = min(start + chunk, sizes.items + 1)
                await conn.execute(insert(Item), [item_row(i) for i in range(start, stop)])
            await conn.execute(
                insert(Account),
                [{"id": i, "balance": 100} for i in range(1, sizes.accounts + 1)],
            )
    finally:
        await engine.dispose()


async def _drop(sa_url: str) -> None:
    engine = create_async_engine(sa_url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
    finally:
        await engine.dispose()


async def _warm(engine: AsyncEngine) -> None:
    """Open every pooled connection now, so no timed operation pays for a connect."""
    async with AsyncExitStack() as stack:
        for _ in range(POOL_SIZE):
            await stack.enter_async_context(engine.connect())


def _sync_file_engine(path: Path) -> sqlalchemy.Engine:
    """A stock sync engine on ``path``, with the raw driver's ``synchronous`` setting."""
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")

    @sqlalchemy.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    with engine.connect():
        pass
    return engine


def _sync_postgres_engine(postgres_url: str) -> sqlalchemy.Engine | None:
    """A stock sync engine through psycopg (the ``bench`` extra), or None without it."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None
    url = make_url(postgres_url).set(drivername="postgresql+psycopg")
    engine = sqlalchemy.create_engine(url, pool_size=POOL_SIZE, max_overflow=0)
    with engine.connect():
        pass
    return engine


def _sync_engine(sizes: Sizes) -> sqlalchemy.Engine:
    engine = sqlalchemy.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.execute(insert(Item), [item_row(i) for i in range(1, min(sizes.items, 100) + 1)])
    return engine


async def open_bench(backend: str, sizes: Sizes, *, postgres_url: str, workdir: Path) -> Bench:
    """Load the data and open the three contenders' pools for ``backend``, all warm.

    If anything fails (a PostgreSQL server out of connection slots, say), what was opened
    is closed again before the error propagates.
    """
    engine_args: dict[str, Any] = {"pool_size": POOL_SIZE, "max_overflow": 0}
    cleanup: list[Callable[[], Any]] = []
    opened: list[Callable[[], Awaitable[None]]] = []
    sync_reference: sqlalchemy.Engine | None = None
    try:
        if backend == SQLITE:
            paths = {c: workdir / f"{c}.db" for c in (RAW, SQLALCHEMY, ASYNCORM)}
            for path in paths.values():
                await _load(f"sqlite+aiosqlite:///{path}", sizes)
            raw: RawDB = await AiosqliteRaw.open(paths[RAW])
            opened.append(raw.close)
            sa_url = f"sqlite+aiosqlite:///{paths[SQLALCHEMY]}"
            sa_engine = create_async_engine(sa_url, **engine_args)
            orm_engine = asyncorm.create_engine(f"sqlite:///{paths[ASYNCORM]}", **engine_args)
            sync_reference = _sync_file_engine(paths[RAW])
        else:
            sa_text = (
                make_url(postgres_url)
                .set(drivername="postgresql+asyncpg")
                .render_as_string(hide_password=False)
            )
            await _load(sa_text, sizes)
            cleanup.append(lambda: _drop(sa_text))
            opened.append(lambda: _drop(sa_text))
            raw = await AsyncpgRaw.open(postgres_url)
            opened.append(raw.close)
            sa_engine = create_async_engine(sa_text, **engine_args)
            orm_engine = asyncorm.create_engine(postgres_url, **engine_args)
            sync_reference = _sync_postgres_engine(sa_text)
        engines = {SQLALCHEMY: sa_engine, ASYNCORM: orm_engine}
        opened += [sa_engine.dispose, orm_engine.dispose]
        for engine in engines.values():
            await _warm(engine)
    except BaseException:
        if sync_reference is not None:
            sync_reference.dispose()
        for close in reversed(opened):
            with contextlib.suppress(Exception):
                await close()
        raise
    factories: dict[str, SessionFactory] = {
        SQLALCHEMY: sa_async_sessionmaker(sa_engine),
        ASYNCORM: asyncorm.async_sessionmaker(orm_engine),
    }
    return Bench(
        backend=backend,
        sizes=sizes,
        raw=raw,
        engines=engines,
        factories=factories,
        sync_engine=_sync_engine(sizes),
        sync_reference=sync_reference,
        cleanup=cleanup,
    )
