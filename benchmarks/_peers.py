"""The peers: Tortoise ORM and Piccolo, the async ORMs a user could pick instead (issue 13).

Both are optional (the ``bench`` extra): :func:`open_peers` skips one that is not installed
and says why. Each is set up as its documentation recommends for production and used the
way its documentation shows:

* **Tortoise ORM**: ``TortoiseContext.init`` with its asyncpg backend and a pool of
  ``sizes.pool`` (``minsize = maxsize``), or its aiosqlite backend (one connection, WAL,
  which Tortoise sets itself). W1 ``await Item.get(id=pk)``; W2 ``async with
  in_transaction():`` ``get``, change, ``save(update_fields=["counter"])`` (the same UPDATE
  of one column the others send); W4 ``await Item.all()``.
* **Piccolo**: ``PostgresEngine`` with ``start_connection_pool(min_size=max_size=pool)``, or
  ``SQLiteEngine`` (a new aiosqlite connection per query, as Piccolo does; ``timeout=30``
  and ``TransactionType.immediate`` for writes, both as its docs advise for concurrent
  writers). W1 ``await Item.objects().get(Item.id == pk)``; W2 ``async with
  engine.transaction():`` ``get``, change, ``save([Item.counter])``; W4 ``await
  Item.objects()``.

Both keep global state; it is confined to the benchmark run. Tortoise's lives in a
``TortoiseContext`` (a context variable) entered for the backend and left at its close, so
nothing stays registered once :meth:`Peer.close` returns. Piccolo's tables are classes made
per backend, bound to that backend's engine (``Table(db=engine)``), and taken out of
Piccolo's table registry at close.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from benchmarks._core import PICCOLO, POSTGRESQL, TORTOISE

__all__ = ["Peer", "missing_peer", "open_peer"]

_DISTRIBUTIONS = {TORTOISE: ("tortoise", "tortoise-orm"), PICCOLO: ("piccolo", "piccolo")}


@dataclass
class Peer:
    """One peer ORM opened on one backend: its three operations and how to close it."""

    name: str
    get: Callable[[int], Awaitable[object]]
    """W1: load the item with primary key ``pk`` as an object (one pooled checkout)."""
    increment: Callable[[int], Awaitable[None]]
    """W2: in a transaction, load item ``pk``, add 1 to its counter, save, commit."""
    load_all: Callable[[], Awaitable[int]]
    """W4: load every item as an object; return how many."""
    close: Callable[[], Awaitable[None]]


def missing_peer(name: str) -> str | None:
    """Why peer ``name`` cannot run (its package is not installed), or None when it can."""
    module, dist = _DISTRIBUTIONS[name]
    if importlib.util.find_spec(module) is None:
        return f"{dist} is not installed (pip install 'asyncorm[bench]')"
    return None


async def open_peer(
    name: str, backend: str, *, pool: int, postgres_url: str, sqlite_path: Path
) -> Peer:
    """Open peer ``name`` on ``backend`` with a warm pool of ``pool`` connections."""
    if name == TORTOISE:
        return await _open_tortoise(backend, pool, postgres_url, sqlite_path)
    return await _open_piccolo(backend, pool, postgres_url, sqlite_path)


# -- Tortoise ORM --------------------------------------------------------------------------------


async def _open_tortoise(backend: str, pool: int, postgres_url: str, sqlite_path: Path) -> Peer:
    from tortoise.backends.base.executor import EXECUTOR_CACHE
    from tortoise.context import TortoiseContext
    from tortoise.transactions import in_transaction

    from benchmarks._tortoise_models import TortoiseItem

    if backend == POSTGRESQL:
        url = make_url(postgres_url)
        connection: dict[str, Any] = {
            "engine": "tortoise.backends.asyncpg",
            "credentials": {
                "host": url.host or "localhost",
                "port": url.port or 5432,
                "user": url.username or "postgres",
                "password": url.password or "",
                "database": url.database,
                "minsize": pool,
                "maxsize": pool,
            },
        }
    else:
        connection = {
            "engine": "tortoise.backends.sqlite",
            "credentials": {"file_path": str(sqlite_path)},
        }
    # Tortoise caches each model's SQL in a process-wide dict keyed by connection name
    # (tortoise.backends.base.executor.EXECUTOR_CACHE): a name per backend keeps SQLite's
    # "?" placeholders out of PostgreSQL's statements, and close() drops the entries
    name = f"bench_{backend}"
    config = {
        "connections": {name: connection},
        "apps": {"bench": {"models": [TortoiseItem.__module__], "default_connection": name}},
        "use_tz": True,
    }
    ctx = TortoiseContext()

    async def close() -> None:
        await ctx.__aexit__(None, None, None)
        for key in [key for key in EXECUTOR_CACHE if key[0] == name]:
            del EXECUTOR_CACHE[key]

    await ctx.__aenter__()
    try:
        await ctx.init(config=config)
        # opens the pool (all ``pool`` connections) and warms it
        await TortoiseItem.get(id=1)
    except BaseException:
        await close()
        raise

    async def get(pk: int) -> object:
        return await TortoiseItem.get(id=pk)

    async def increment(pk: int) -> None:
        async with in_transaction():
            item = await TortoiseItem.get(id=pk)
            item.counter += 1
            await item.save(update_fields=["counter"])

    async def load_all() -> int:
        return len(await TortoiseItem.all())

    return Peer(TORTOISE, get, increment, load_all, close)


# -- Piccolo ------------------------------------------------------------------------------------


async def _open_piccolo(backend: str, pool: int, postgres_url: str, sqlite_path: Path) -> Peer:
    from piccolo.columns import Integer, Serial, Varchar
    from piccolo.engine.postgres import PostgresEngine
    from piccolo.engine.sqlite import SQLiteEngine, TransactionType
    from piccolo.table import TABLE_REGISTRY, Table

    engine: Any
    transaction: Callable[[], Any]
    if backend == POSTGRESQL:
        pg = PostgresEngine(config={"dsn": postgres_url})
        await pg.start_connection_pool(min_size=pool, max_size=pool)
        engine = pg
        transaction = pg.transaction
    else:
        lite = SQLiteEngine(path=str(sqlite_path), timeout=30.0)
        engine = lite

        def transaction() -> Any:
            return lite.transaction(transaction_type=TransactionType.immediate)

    class PiccoloItem(Table, tablename="bench_items", db=engine):
        id = Serial(primary_key=True)
        name = Varchar(length=50)
        email = Varchar(length=100)
        value = Integer()
        counter = Integer()

    async def get(pk: int) -> object:
        return await PiccoloItem.objects().get(PiccoloItem.id == pk)

    async def increment(pk: int) -> None:
        async with transaction():
            item = await PiccoloItem.objects().get(PiccoloItem.id == pk)
            assert item is not None
            item.counter += 1
            await item.save([PiccoloItem.counter])

    async def load_all() -> int:
        return len(await PiccoloItem.objects())

    async def close() -> None:
        if PiccoloItem in TABLE_REGISTRY:
            TABLE_REGISTRY.remove(PiccoloItem)
        if backend == POSTGRESQL:
            await engine.close_connection_pool()

    try:
        await get(1)  # warms the pool (and checks the table is there)
    except BaseException:
        await close()
        raise
    return Peer(PICCOLO, get, increment, load_all, close)
