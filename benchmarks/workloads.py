"""The workloads: W1-W8, each a list of :class:`~benchmarks._core.Case`.

A case's ``build(bench, contender)`` returns the contender's :class:`~benchmarks._core.Trial`.
Everything a trial needs that is not the work being measured (picking ids, resetting tables,
opening the session W5 reuses) happens in ``build``, ``setup`` or ``teardown``, untimed.
The raw contender's SQL is written once with ``?`` placeholders (``bench.raw.sql``).

Each workload's docstring says what one operation is; docs/performance.md says why.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.asyncio import async_scoped_session as sa_async_scoped_session
from sqlalchemy.orm import Session, sessionmaker

import asyncorm
from benchmarks._bench import Bench
from benchmarks._core import (
    ASYNCORM,
    ORM_CONTENDERS,
    PEERS,
    RAW,
    RAW_NO_RESET,
    SQLALCHEMY,
    SQLITE,
    STANDARD,
    SYNC,
    Case,
    Counters,
    OpErrors,
    Trial,
    spread,
)
from benchmarks._schema import ITEM_COLUMNS, Account, BulkItem, Item

__all__ = ["all_cases", "select_cases"]

Op = Callable[[int], Awaitable[None]]

_WITH_PEERS = (*STANDARD, RAW_NO_RESET, *PEERS)
"""W1, W2 and W4 objects also measure the raw driver without asyncpg's pool reset
(PostgreSQL only) and the peers, Tortoise ORM and Piccolo (issue 13), when installed."""
_WITH_SYNC = (*STANDARD, SYNC, RAW_NO_RESET, *PEERS)
"""W1/W2 with one task also measure the sync Session on the same rows (pysqlite on SQLite,
psycopg on PostgreSQL): SQLAlchemy's ORM without asyncio, a reference for what any async
layer over it can reach."""


def _errors_check(errors: OpErrors) -> Callable[[], Awaitable[Counters]]:
    async def check() -> Counters:
        counted = {"errors": errors.count}
        errors.count = 0
        return counted

    return check


# -- W1: request-scoped read ------------------------------------------------------------------


def _w1(concurrency: int) -> Case:
    """One operation: a new session, ``get()`` of one item by primary key, close.

    Raw: check a connection out of the pool, SELECT the row, check it back in. With one
    task, the sync Session is measured too (see ``_WITH_SYNC``).
    """

    def build(bench: Bench, contender: str) -> Trial | None:
        pks = bench.sample(bench.sizes.requests, seed=1)
        errors = OpErrors()
        op: Op
        if contender == SYNC:
            if bench.sync_reference is None:
                return None
            make_sync = sessionmaker(bench.sync_reference)

            async def op(i: int) -> None:
                with make_sync() as session:
                    session.get(Item, pks[i])

        elif contender in PEERS:
            peer = bench.peers.get(contender)
            if peer is None:
                return None
            peer_get = peer.get

            async def op(i: int) -> None:
                await peer_get(pks[i])

        elif contender == RAW_NO_RESET and bench.raw_no_reset is None:
            return None
        else:
            op = _request(bench, contender, pks, think=0.0)

        async def run() -> int:
            return await spread(len(pks), concurrency, op, errors)

        return Trial(run=run, check=_errors_check(errors))

    if concurrency == 1:
        return Case("W1", "request read, 1 task", "sessions", build, _WITH_SYNC, target=0.5)
    return Case("W1", f"request read, {concurrency} tasks", "sessions", build, _WITH_PEERS,
                target=0.5)  # fmt: skip


def _request(bench: Bench, contender: str, pks: list[int], *, think: float) -> Op:
    """W1's and W8's operation: a pooled connection (raw) or a new session, the read of one
    item by primary key, then ``think`` seconds of other awaited work (none when 0)."""
    raw = bench.raw_for(contender)
    if contender in (RAW, RAW_NO_RESET) and raw is not None:
        sql = raw.sql(f"SELECT {ITEM_COLUMNS} FROM bench_items WHERE id = ?")

        async def raw_op(i: int) -> None:
            async with raw.connection() as conn:
                await conn.fetch(sql, pks[i])
                if think:
                    await asyncio.sleep(think)

        return raw_op
    make = bench.factory(contender)

    async def orm_op(i: int) -> None:
        async with make() as session:
            await session.get(Item, pks[i])
            if think:
                await asyncio.sleep(think)

    return orm_op


# -- W2: read-modify-write ----------------------------------------------------------------------


def _w2(concurrency: int) -> Case:
    """One operation: a unit of work (``async with Session.begin() as session``, the shape
    SQLAlchemy's asyncio docs show for one), ``get()`` an item, increment a column, commit.
    On SQLite asyncorm begins a declared unit of work IMMEDIATE (a plain session that reads
    first would begin on a snapshot, and conflict with concurrent writers: see W6).

    Raw: a transaction (on SQLite ``BEGIN IMMEDIATE`` behind an asyncio lock) with the
    SELECT and the UPDATE.
    """

    def build(bench: Bench, contender: str) -> Trial | None:
        pks = bench.sample(bench.sizes.writes, seed=2)
        errors = OpErrors()
        op: Op
        if contender == SYNC:
            if bench.sync_reference is None:
                return None
            make_sync = sessionmaker(bench.sync_reference)

            async def op(i: int) -> None:
                with make_sync() as session:
                    item = session.get(Item, pks[i])
                    assert item is not None
                    item.counter += 1
                    session.commit()

        elif contender in PEERS:
            peer = bench.peers.get(contender)
            if peer is None:
                return None
            peer_increment = peer.increment

            async def op(i: int) -> None:
                await peer_increment(pks[i])

        elif contender in (RAW, RAW_NO_RESET):
            raw = bench.raw_for(contender)
            if raw is None:
                return None
            raw_db = raw
            select_sql = raw.sql(f"SELECT {ITEM_COLUMNS} FROM bench_items WHERE id = ?")
            update_sql = raw.sql("UPDATE bench_items SET counter = ? WHERE id = ?")

            async def op(i: int) -> None:
                async with raw_db.transaction() as conn:
                    row = (await conn.fetch(select_sql, pks[i]))[0]
                    await conn.execute(update_sql, row[4] + 1, pks[i])

        else:
            make = bench.factory(contender)

            async def op(i: int) -> None:
                async with make.begin() as session:
                    item = await session.get(Item, pks[i])
                    assert item is not None
                    item.counter += 1

        async def run() -> int:
            return await spread(len(pks), concurrency, op, errors)

        return Trial(run=run, check=_errors_check(errors))

    if concurrency == 1:
        return Case("W2", "read-modify-write, 1 task", "txns", build, _WITH_SYNC, target=0.5)
    return Case("W2", f"read-modify-write, {concurrency} tasks", "txns", build, _WITH_PEERS,
                target=0.5)  # fmt: skip


# -- W3: bulk insert -------------------------------------------------------------------------


_FASTEST, _ADD_ALL, _ORM_BULK = "fastest", "add_all", "orm_bulk"


def _w3(path: str) -> Case:
    """One operation: one inserted row; a repeat inserts ``sizes.bulk`` rows and commits.

    Building the objects, dicts or tuples is timed too. Raw is always ``executemany``.

    * ``fastest``: each contender's fastest documented path. SQLAlchemy ``add_all`` +
      ``commit`` (the issue's baseline); asyncorm a Core INSERT of the mapped table through
      the session, ``session.execute(insert(Model.__table__), dicts)`` (executemany, no
      per-row ORM work; docs/performance.md says what it skips).
    * ``add_all``: both ORM contenders ``add_all`` objects + ``commit``.
    * ``orm_bulk``: both use SQLAlchemy's ORM bulk INSERT,
      ``session.execute(insert(Model), dicts)``.
    """

    def build(bench: Bench, contender: str) -> Trial:
        n = bench.sizes.bulk
        clear = bench.clear_sql("bench_bulk")

        async def setup() -> None:
            await bench.execute(contender, clear)

        def dicts() -> list[dict[str, Any]]:
            return [{"name": f"bulk {i}", "value": i, "note": "note"} for i in range(n)]

        run: Callable[[], Awaitable[int]]
        if contender == RAW:
            raw = bench.raw
            sql = raw.sql("INSERT INTO bench_bulk (name, value, note) VALUES (?, ?, ?)")

            async def run() -> int:
                async with raw.transaction() as conn:
                    await conn.executemany(sql, [(f"bulk {i}", i, "note") for i in range(n)])
                return n

        elif path == _ORM_BULK or (path == _FASTEST and contender == ASYNCORM):
            make = bench.factory(contender)
            # the Table for Core's executemany, the mapped class for the ORM's bulk INSERT
            statement = insert(cast(Table, BulkItem.__table__) if path == _FASTEST else BulkItem)

            async def run() -> int:
                async with make() as session:
                    await session.execute(statement, dicts())
                    await session.commit()
                return n

        else:
            make = bench.factory(contender)

            async def run() -> int:
                async with make() as session:
                    session.add_all(
                        [BulkItem(name=f"bulk {i}", value=i, note="note") for i in range(n)]
                    )
                    await session.commit()
                return n

        return Trial(run=run, setup=setup)

    if path == _FASTEST:
        return Case("W3", "bulk insert, fastest path", "rows", build, target=0.5)
    if path == _ORM_BULK:
        return Case("W3", "bulk insert, ORM bulk both", "rows", build)
    return Case("W3", "bulk insert, add_all both", "rows", build)


# -- W4: load many rows -----------------------------------------------------------------------


_OBJECTS, _ROWS, _CORE_ROWS = "objects", "rows", "core_rows"


def _w4(shape: str) -> Case:
    """One operation: one loaded row; a repeat loads all ``sizes.items`` rows in a new session.

    * ``objects``: ``(await session.scalars(select(Item))).all()``;
    * ``rows``: ``(await session.execute(select(<the five columns>))).all()``, through the
      ORM, which builds each row in Python;
    * ``core_rows``: the same statement executed by Core on the session's own connection,
      ``(await (await session.connection()).execute(...)).all()``: the documented fast path
      for large column reads (same transaction, no per-row ORM work, no autoflush).

    Raw: ``fetch``. The peers (objects only): Tortoise ``await Item.all()``, Piccolo
    ``await Item.objects()``.
    """

    def build(bench: Bench, contender: str) -> Trial | None:
        run: Callable[[], Awaitable[int]]
        if contender in PEERS:
            peer = bench.peers.get(contender)
            if peer is None:
                return None
            run = peer.load_all
        elif contender in (RAW, RAW_NO_RESET):
            raw = bench.raw_for(contender)
            if raw is None:
                return None
            raw_db = raw
            sql = raw.sql(f"SELECT {ITEM_COLUMNS} FROM bench_items")

            async def run() -> int:
                async with raw_db.connection() as conn:
                    return len(await conn.fetch(sql))

        else:
            make = bench.factory(contender)
            columns = select(Item.id, Item.name, Item.email, Item.value, Item.counter)

            async def run() -> int:
                async with make() as session:
                    if shape == _OBJECTS:
                        return len((await session.scalars(select(Item))).all())
                    if shape == _CORE_ROWS:
                        connection = await session.connection()
                        return len((await connection.execute(columns)).all())
                    return len((await session.execute(columns)).all())

        return Trial(run=run)

    if shape == _OBJECTS:
        # target: no slower than plain SQLAlchemy (see the "asyncorm/SQLAlchemy" column)
        return Case("W4", "load as ORM objects", "rows", build, _WITH_PEERS, short=True)
    if shape == _CORE_ROWS:
        return Case("W4", "load as rows, Core on the session", "rows", build, short=True)
    return Case("W4", "load as rows", "rows", build, target=0.5, short=True)


# -- W5: identity-map hit -----------------------------------------------------------------------


def _w5() -> Case:
    """One operation: ``session.get(Item, pk)`` of an object already in the identity map.

    The object stays referenced (the identity map is weak). No SQL is emitted, so the
    backend only matters for opening the session. The baseline is SQLAlchemy's sync
    ``Session.get()`` on a sync SQLite engine (the target: asyncorm within 1.5x of it,
    i.e. a ratio of at least 0.67).
    """

    def build(bench: Bench, contender: str) -> Trial:
        n = bench.sizes.hits
        pk = 1
        if contender == SYNC:
            # the session and the loaded object: the identity map holds objects weakly
            sync_holder: list[tuple[Session, Item]] = []

            async def sync_setup() -> None:
                session = bench.sync_session()
                item = session.get(Item, pk)
                assert item is not None
                sync_holder.append((session, item))

            async def sync_run() -> int:
                get = sync_holder[0][0].get
                for _ in range(n):
                    get(Item, pk)
                return n

            async def sync_teardown() -> None:
                sync_holder.pop()[0].close()

            return Trial(run=sync_run, setup=sync_setup, teardown=sync_teardown)

        make = bench.factory(contender)
        holder: list[tuple[AsyncSession, Item]] = []

        async def setup() -> None:
            session = make()
            item = await session.get(Item, pk)
            assert item is not None
            holder.append((session, item))

        async def run() -> int:
            get = holder[0][0].get
            for _ in range(n):
                await get(Item, pk)
            return n

        async def teardown() -> None:
            await holder.pop()[0].close()

        return Trial(run=run, setup=setup, teardown=teardown)

    return Case(
        "W5",
        "identity-map get()",
        "gets",
        build,
        contenders=(SYNC, *ORM_CONTENDERS),
        baseline=SYNC,
        target=1 / 1.5,
        short=True,
    )


# -- W6: SQLite concurrent transfers -------------------------------------------------------------


async def _move(session: AsyncSession, src: int, dst: int, amount: int) -> None:
    """W6's transfer inside a session: read both accounts, move ``amount``."""
    a = await session.get(Account, src)
    b = await session.get(Account, dst)
    assert a is not None
    assert b is not None
    a.balance -= amount
    b.balance += amount


def _w6(declared: bool) -> Case:
    """One operation: a transfer transaction between two of ``sizes.accounts`` accounts.

    All ``sizes.transfers`` transfers start at once (each in its own task, each with its
    own session): get both accounts, move an amount, commit. Every account starts at 100,
    so the final sum must be ``100 * accounts``; the check reports the sum and the errors
    (plain SQLAlchemy on SQLite reads outside its transaction and may lose updates).

    Two shapes: a plain session committed by hand (``async with Session() as s: ... await
    s.commit()``), and a declared unit of work (``async with Session.begin() as s:``). On
    SQLite asyncorm begins the second IMMEDIATE (exact, no error); the first reads a snapshot
    and a transfer whose snapshot went stale fails with a conflict error (counted, never a
    lost update).
    """

    def build(bench: Bench, contender: str) -> Trial:
        sizes = bench.sizes
        rng = random.Random(6)
        plan = [
            (*rng.sample(range(1, sizes.accounts + 1), 2), rng.randint(1, 10))
            for _ in range(sizes.transfers)
        ]
        errors = OpErrors()
        transfer: Callable[[int, int, int], Awaitable[None]]
        if contender == RAW:
            raw = bench.raw
            select_sql = raw.sql("SELECT balance FROM bench_accounts WHERE id = ?")
            update_sql = raw.sql("UPDATE bench_accounts SET balance = ? WHERE id = ?")

            async def transfer(src: int, dst: int, amount: int) -> None:
                async with raw.transaction() as conn:
                    src_balance = (await conn.fetch(select_sql, src))[0][0]
                    dst_balance = (await conn.fetch(select_sql, dst))[0][0]
                    await conn.execute(update_sql, src_balance - amount, src)
                    await conn.execute(update_sql, dst_balance + amount, dst)

        elif declared:
            make_declared = bench.factory(contender)

            async def transfer(src: int, dst: int, amount: int) -> None:
                async with make_declared.begin() as session:
                    await _move(session, src, dst, amount)

        else:
            make = bench.factory(contender)

            async def transfer(src: int, dst: int, amount: int) -> None:
                async with make() as session:
                    await _move(session, src, dst, amount)
                    await session.commit()

        async def setup() -> None:
            await bench.execute(contender, "UPDATE bench_accounts SET balance = 100")

        async def run() -> int:
            outcomes = await asyncio.gather(
                *(transfer(*step) for step in plan), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, Exception):
                        raise outcome
                    errors.add(outcome)
            done = len(plan) - errors.count
            if done == 0 and errors.first is not None:
                raise errors.first
            return done

        async def check() -> Counters:
            total = await bench.scalar(contender, "SELECT sum(balance) FROM bench_accounts")
            counted = {"sum": int(total), "expected": 100 * sizes.accounts, "errors": errors.count}
            errors.count = 0
            return counted

        return Trial(run=run, setup=setup, check=check)

    if declared:
        return Case("W6", "concurrent transfers, Session.begin()", "txns", build,
                    backends=(SQLITE,))  # fmt: skip
    return Case("W6", "concurrent transfers", "txns", build, backends=(SQLITE,))


# -- W8: concurrent requests that read, then await other work -----------------------------------


def _w8(think_ms: int) -> Case:
    """One operation: a request: a new session, ``get()`` of one item, then ``think_ms`` of
    other awaited work (an API call, a template) with the session still open, then close.

    20 requests run at once. Raw: a pooled connection, the SELECT, the wait, the checkin. On
    SQLite, sessions that only read must not wait for each other (issue 15): the ratio to
    plain SQLAlchemy's wall time is the figure.
    """
    think = think_ms / 1000

    def build(bench: Bench, contender: str) -> Trial:
        pks = bench.sample(bench.sizes.think_requests, seed=8)
        errors = OpErrors()
        op = _request(bench, contender, pks, think=think)

        async def run() -> int:
            return await spread(len(pks), 20, op, errors)

        return Trial(run=run, check=_errors_check(errors))

    return Case("W8", f"read then {think_ms} ms of other work, 20 tasks", "requests", build,
                baseline=SQLALCHEMY)  # fmt: skip


# -- W7: registry and middleware overhead (extension point) -------------------------------------


def _w7() -> list[Case]:
    """Registry overhead, no IO: asyncorm's ``async_scoped_session`` against SQLAlchemy's.

    SQLAlchemy's registry is set up as its documentation says for asyncio:
    ``async_scoped_session(factory, scopefunc=asyncio.current_task)``, with ``await
    registry.remove()`` ending each unit of work. The baseline is SQLAlchemy's.

    * lookup: ``db()`` of a session that exists (SQLAlchemy: ``registry()``);
    * scope: one unit of work that looks its session up once and does no IO (asyncorm:
      ``async with db.scope(): db()``; SQLAlchemy: ``registry()`` then ``await
      registry.remove()``).

    Framework middleware is not measured yet: asyncorm has none so far.
    """

    def registry(bench: Bench, contender: str) -> Any:
        factory: Any = bench.factory(contender)
        if contender == ASYNCORM:
            return asyncorm.async_scoped_session(factory)
        return sa_async_scoped_session(factory, scopefunc=asyncio.current_task)

    def lookup(bench: Bench, contender: str) -> Trial:
        n = bench.sizes.hits
        db: Any = registry(bench, contender)

        async def run() -> int:
            if contender == ASYNCORM:
                async with db.scope():
                    for _ in range(n):
                        db()
            else:
                for _ in range(n):
                    db()
                await db.remove()
            return n

        return Trial(run=run)

    def scope(bench: Bench, contender: str) -> Trial:
        n = bench.sizes.hits
        db: Any = registry(bench, contender)

        async def run() -> int:
            if contender == ASYNCORM:
                for _ in range(n):
                    async with db.scope():
                        db()
            else:
                for _ in range(n):
                    db()
                    await db.remove()
            return n

        return Trial(run=run)

    return [
        Case("W7", "registry lookup", "lookups", lookup, contenders=ORM_CONTENDERS,
             baseline=SQLALCHEMY, short=True),
        Case("W7", "registry scope, no IO", "scopes", scope, contenders=ORM_CONTENDERS,
             baseline=SQLALCHEMY, short=True),
    ]  # fmt: skip


def all_cases() -> list[Case]:
    """Every case, in table order."""
    return [
        _w1(1),
        _w1(20),
        _w2(1),
        _w2(20),
        _w3(_FASTEST),
        _w3(_ADD_ALL),
        _w3(_ORM_BULK),
        _w4(_OBJECTS),
        _w4(_ROWS),
        _w4(_CORE_ROWS),
        _w5(),
        _w6(declared=False),
        _w6(declared=True),
        *_w7(),
        _w8(0),
        _w8(10),
        _w8(50),
    ]


def select_cases(only: set[str] | None) -> list[Case]:
    """The cases whose key (``W1`` ...) is in ``only`` (all when None)."""
    return [case for case in all_cases() if only is None or case.key in only]
