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
import sqlite3
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
    LABELS,
    PEERS,
    PICCOLO,
    POSTGRESQL,
    RAW,
    RAW_NO_RESET,
    SQLALCHEMY,
    SQLITE,
    Sizes,
)
from benchmarks._peers import Peer, missing_peer, open_peer
from benchmarks._schema import Account, Base, Item, item_row

__all__ = [
    "Bench",
    "RawConnection",
    "RawDB",
    "free_slots",
    "open_bench",
    "postgres_problem",
]

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


class _ResetSwitch:
    """Whether the shared asyncpg pool resets a connection on release: set by the contender
    checking it out (the raw contenders never run at the same time)."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = True

    async def reset(self, conn: Any) -> None:
        """asyncpg's own reset, when on: ``Pool`` has already run ``conn._reset()`` (listeners
        cleared, an open transaction rolled back), as ``Connection.reset()`` does before
        sending ``get_reset_query()``; when off nothing is sent, as asyncorm sends nothing."""
        if self.on:
            query = conn.get_reset_query()
            if query:
                await conn.execute(query)


class AsyncpgRaw:
    """An asyncpg pool, with asyncpg's reset on release (the default) or without it.

    Both raw contenders share one pool of ``Sizes.pool`` connections (a server's connection
    slots are the scarce resource once Tortoise and Piccolo have pools too), through
    ``create_pool(reset=...)``, asyncpg's documented hook: with the reset on, a release does
    exactly what asyncpg's default ``Connection.reset()`` does (one round trip: advisory
    unlock, ``CLOSE ALL``, ``UNLISTEN *``, ``RESET ALL``); with it off, it sends nothing.
    """

    def __init__(self, pool: Any, switch: _ResetSwitch, *, resets: bool) -> None:
        self._pool = pool
        self._switch = switch
        self._resets = resets

    @classmethod
    async def open(cls, url: str, size: int) -> AsyncpgRaw:
        switch = _ResetSwitch()
        pool = await asyncpg.create_pool(url, min_size=size, max_size=size, reset=switch.reset)
        return cls(pool, switch, resets=True)

    def without_reset(self) -> AsyncpgRaw:
        """The same pool, its connections released without the reset query."""
        return AsyncpgRaw(self._pool, self._switch, resets=False)

    def sql(self, text: str) -> str:
        parts = text.split("?")
        out = [parts[0]]
        for n, part in enumerate(parts[1:], start=1):
            out.append(f"${n}{part}")
        return "".join(out)

    def connection(self) -> AbstractAsyncContextManager[RawConnection]:
        self._switch.on = self._resets
        acquire: AbstractAsyncContextManager[RawConnection] = self._pool.acquire()
        return acquire

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[RawConnection]:
        self._switch.on = self._resets
        async with self._pool.acquire() as conn, conn.transaction():
            yield conn

    async def close(self) -> None:
        if self._resets:  # the pool's owner
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
    async def open(cls, path: Path, size: int) -> AiosqliteRaw:
        conns = []
        for _ in range(size):
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
    raw_no_reset: RawDB | None = None
    """PostgreSQL: the raw pool without asyncpg's reset on release (the physical limit)."""
    peers: dict[str, Peer] = field(default_factory=dict)
    """Tortoise and Piccolo, those installed and with room on the server."""
    skipped: list[str] = field(default_factory=list)
    """Why a contender is not measured on this backend, for the report."""
    sync_reference: sqlalchemy.Engine | None = None
    """A stock sync engine on the raw driver's rows: pysqlite on its SQLite file, psycopg on
    PostgreSQL (when installed). The sync Session on it is W1/W2's reference for what any
    async layer over SQLAlchemy's ORM can reach."""
    cleanup: list[Callable[[], Any]] = field(default_factory=list)

    def raw_for(self, contender: str) -> RawDB | None:
        """The raw contender's pool: with asyncpg's reset, or without (None on SQLite)."""
        return self.raw_no_reset if contender == RAW_NO_RESET else self.raw

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
        for peer in self.peers.values():
            await peer.close()
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


async def _warm(engine: AsyncEngine, size: int) -> None:
    """Open every pooled connection now, so no timed operation pays for a connect."""
    async with AsyncExitStack() as stack:
        for _ in range(size):
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


def _sync_postgres_engine(postgres_url: str, size: int) -> sqlalchemy.Engine | None:
    """A stock sync engine through psycopg (the ``bench`` extra), or None without it."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None
    url = make_url(postgres_url).set(drivername="postgresql+psycopg")
    engine = sqlalchemy.create_engine(url, pool_size=size, max_overflow=0)
    with engine.connect():
        pass
    return engine


def _sync_engine(sizes: Sizes) -> sqlalchemy.Engine:
    engine = sqlalchemy.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.execute(insert(Item), [item_row(i) for i in range(1, min(sizes.items, 100) + 1)])
    return engine


async def free_slots(postgres_url: str) -> int:
    """How many more connections the server at ``postgres_url`` accepts from a normal user."""
    conn = await asyncpg.connect(postgres_url)
    try:
        free: int = await conn.fetchval(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
            " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
        )
    finally:
        await conn.close()
    return free


async def _open_peers(
    backend: str, sizes: Sizes, postgres_url: str, paths: dict[str, Path], skipped: list[str]
) -> dict[str, Peer]:
    """Tortoise and Piccolo, each when installed and, on PostgreSQL, when its pool fits."""
    peers: dict[str, Peer] = {}
    for name in PEERS:
        problem = missing_peer(name)
        if problem is None and backend == POSTGRESQL:
            free = await free_slots(postgres_url)
            if free < sizes.pool + 1:
                problem = (
                    f"the server has {free} free connection slots, its pool needs "
                    f"{sizes.pool}; raise max_connections (a full run with the peers needs "
                    f"about {6 * sizes.pool + 10})"
                )
        if problem is None:
            try:
                peers[name] = await open_peer(
                    name, backend, pool=sizes.pool, postgres_url=postgres_url,
                    sqlite_path=paths.get(name, Path()),
                )  # fmt: skip
            except Exception as exc:
                problem = f"could not open it ({type(exc).__name__}: {exc})"
        if problem is not None:
            skipped.append(f"{LABELS[name]} on {backend}: {problem}")
    return peers


def _wal(path: Path) -> None:
    """Switch the SQLite file at ``path`` to WAL (stored in the file, so it persists)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


async def open_bench(backend: str, sizes: Sizes, *, postgres_url: str, workdir: Path) -> Bench:
    """Load the data and open every contender's pool for ``backend``, all warm.

    If anything fails (a PostgreSQL server out of connection slots, say), what was opened
    is closed again before the error propagates. A peer (Tortoise, Piccolo) that is not
    installed, or does not fit in the server's connection slots, is left out and the reason
    recorded in ``Bench.skipped``.
    """
    engine_args: dict[str, Any] = {"pool_size": sizes.pool, "max_overflow": 0}
    cleanup: list[Callable[[], Any]] = []
    opened: list[Callable[[], Awaitable[None]]] = []
    sync_reference: sqlalchemy.Engine | None = None
    raw_no_reset: RawDB | None = None
    skipped: list[str] = []
    try:
        if backend == SQLITE:
            names = (RAW, SQLALCHEMY, ASYNCORM, *(p for p in PEERS if missing_peer(p) is None))
            paths = {c: workdir / f"{c}.db" for c in names}
            for path in paths.values():
                await _load(f"sqlite+aiosqlite:///{path}", sizes)
            if PICCOLO in paths:
                # Piccolo opens a connection per query, so no per-connection pragma can be
                # set; WAL is stored in the file (Tortoise's own default is WAL too)
                _wal(paths[PICCOLO])
            raw: RawDB = await AiosqliteRaw.open(paths[RAW], sizes.pool)
            opened.append(raw.close)
            sa_url = f"sqlite+aiosqlite:///{paths[SQLALCHEMY]}"
            sa_engine = create_async_engine(sa_url, **engine_args)
            orm_engine = asyncorm.create_engine(f"sqlite:///{paths[ASYNCORM]}", **engine_args)
            sync_reference = _sync_file_engine(paths[RAW])
        else:
            paths = {}
            sa_text = (
                make_url(postgres_url)
                .set(drivername="postgresql+asyncpg")
                .render_as_string(hide_password=False)
            )
            await _load(sa_text, sizes)
            cleanup.append(lambda: _drop(sa_text))
            opened.append(lambda: _drop(sa_text))
            pg_raw = await AsyncpgRaw.open(postgres_url, sizes.pool)
            raw, raw_no_reset = pg_raw, pg_raw.without_reset()
            opened.append(raw.close)
            sa_engine = create_async_engine(sa_text, **engine_args)
            orm_engine = asyncorm.create_engine(postgres_url, **engine_args)
            sync_reference = _sync_postgres_engine(sa_text, sizes.pool)
        engines = {SQLALCHEMY: sa_engine, ASYNCORM: orm_engine}
        opened += [sa_engine.dispose, orm_engine.dispose]
        for engine in engines.values():
            await _warm(engine, sizes.pool)
        peers = await _open_peers(backend, sizes, postgres_url, paths, skipped)
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
        raw_no_reset=raw_no_reset,
        peers=peers,
        skipped=skipped,
        sync_reference=sync_reference,
        cleanup=cleanup,
    )
