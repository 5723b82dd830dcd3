"""PostgreSQL behind a real pgbouncer in transaction pooling mode (``pgbouncer=True``).

pgbouncer keeps 5 server connections (tests/pgbouncer.py), fewer than the engines' client
connections, so clients share them: a statement outside a transaction, and each
transaction, may run on any of them.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncorm
from asyncorm._check import check
from tests.conftest import postgres_url, require_pgbouncer, reset_schema
from tests.models import Account, User
from tests.pgbouncer import POOL_SIZE, Bouncer

COUNTERS = 10
SESSIONS = 200
_MARK = "asyncorm_pgbouncer_cancel_test"


@pytest.fixture
async def server() -> AsyncIterator[AsyncEngine]:
    """An engine straight on the server (no pgbouncer), with fresh tables and 10 counters."""
    engine = asyncorm.create_engine(postgres_url())
    await reset_schema(engine)
    async with engine.begin() as conn:
        await conn.execute(
            insert(Account), [{"id": i, "balance": 0} for i in range(COUNTERS)]
        )
    yield engine
    await engine.dispose()


def count_connects(engine: AsyncEngine) -> list[int]:
    """A list that grows by one for each client connection ``engine`` opens."""
    opened: list[int] = []
    event.listen(engine.sync_engine, "connect", lambda *args: opened.append(1))
    return opened


async def workload(engine: AsyncEngine) -> tuple[list[BaseException], set[int]]:
    """200 concurrent sessions through the registry: each increments a counter in a declared
    unit (read-modify-write under FOR UPDATE) that also inserts two rows in one statement,
    then reads outside any declared unit (plain
    reads: deferred BEGIN) and checks what it reads. Returns the errors and the server
    backends the units ran on."""
    db = asyncorm.async_scoped_session(asyncorm.async_sessionmaker(engine))
    errors: list[BaseException] = []
    backends: set[int] = set()
    rng = random.Random(14)
    picks = [rng.randrange(COUNTERS) for _ in range(SESSIONS)]

    async def one(counter: int) -> None:
        try:
            async with db.scope():
                async with db.begin():
                    account = await db.get(Account, counter, with_for_update=True)
                    assert account is not None
                    account.balance += 1
                    written = account.balance
                    db.add_all([User(name=f"u{counter}"), User(name=f"v{counter}")])  # many
                    backends.add(await db.scalar(text("SELECT pg_backend_pid()")))
                # plain reads, no transaction block: any server connection may answer
                seen = await db.scalar(
                    select(Account.balance).where(Account.id == counter).execution_options(
                        populate_existing=True
                    )
                )
                assert seen is not None
                assert seen >= written, (seen, written)
                total = await db.scalar(select(func.sum(Account.balance)))
                assert total is not None
                assert total >= 1
                assert await db.scalar(select(func.count()).select_from(Account)) == COUNTERS
        except Exception as exc:  # collected: the test shows them all
            errors.append(exc)

    await asyncio.gather(*(one(counter) for counter in picks))
    return errors, backends


async def counters(server: AsyncEngine) -> int:
    async with server.connect() as conn:
        return int(await conn.scalar(select(func.sum(Account.balance))) or 0)


async def users(server: AsyncEngine) -> int:
    async with server.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(User)) or 0)


async def on_every_server(engine: AsyncEngine, sql: str) -> tuple[set[int], list[str]]:
    """Run ``sql`` on each of pgbouncer's server connections: hold them all at once, each in
    a transaction. Returns their backends and the first column of the rows."""
    arrived = 0
    all_in = asyncio.Event()
    pids: set[int] = set()
    rows: list[str] = []

    async def hold() -> None:
        nonlocal arrived
        async with engine.begin() as conn:
            pids.add(int(await conn.scalar(text("SELECT pg_backend_pid()"))))
            result = await conn.execute(text(sql))
            if result.returns_rows:
                rows.extend(result.scalars().all())
            arrived += 1
            if arrived == POOL_SIZE:
                all_in.set()
            await all_in.wait()

    await asyncio.gather(*(hold() for _ in range(POOL_SIZE)))
    assert len(pids) == POOL_SIZE
    return pids, rows


async def test_200_concurrent_sessions_through_transaction_pooling_end_exact(
    pgbouncer: Bouncer, server: AsyncEngine
) -> None:
    # a ping on every checkout: the pre-ping goes through pgbouncer too
    engine = asyncorm.create_engine(pgbouncer.url(), pgbouncer=True, pool_pre_ping_after=0)
    opened = count_connects(engine)
    try:
        # what other clients (tests without pgbouncer=True) left on the server connections
        await on_every_server(engine, "DEALLOCATE ALL")
        errors, backends = await workload(engine)
        assert errors == []
        assert await counters(server) == SESSIONS
        assert await users(server) == 2 * SESSIONS
        # more client connections than server connections: they were shared
        assert len(backends) <= POOL_SIZE < len(opened)
        # no named statement was left on any server connection
        _, names = await on_every_server(engine, "SELECT name FROM pg_prepared_statements")
        assert names == []
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_transactional_units_with_retries_through_transaction_pooling_end_exact(
    pgbouncer: Bouncer, server: AsyncEngine
) -> None:
    """200 REPEATABLE READ units read-modify-write 10 counters through pgbouncer: the
    conflicts (40001) are retried whole, each on whatever server connection pgbouncer gives,
    and every on_commit callback runs once per committed unit."""
    engine = asyncorm.create_engine(pgbouncer.url(), pgbouncer=True, pool_size=20)
    db = asyncorm.async_scoped_session(asyncorm.async_sessionmaker(engine))
    retries: list[int] = []
    committed: list[int] = []
    rng = random.Random(11)
    picks = [rng.randrange(COUNTERS) for _ in range(SESSIONS)]

    @db.transactional(
        retries=50,
        isolation_level="REPEATABLE READ",
        backoff=asyncorm.Backoff(initial=0.001, maximum=0.05),
        on_retry=lambda error, attempt, pause: retries.append(attempt),
    )
    async def increment(counter: int) -> None:
        account = await db.get(Account, counter)  # no FOR UPDATE: conflicts are retried
        assert account is not None
        account.balance += 1
        db.on_commit(lambda: committed.append(counter))

    try:
        await on_every_server(engine, "DEALLOCATE ALL")
        await asyncio.gather(*(increment(counter) for counter in picks))
        assert await counters(server) == SESSIONS
        assert sorted(committed) == sorted(picks)
        assert retries, "200 units on 10 counters must have conflicted at least once"
        assert db.live_sessions == 0
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_the_url_parameter_turns_it_on(pgbouncer: Bouncer, server: AsyncEngine) -> None:
    engine = asyncorm.create_engine(pgbouncer.url("pgbouncer=true"))
    try:
        errors, _ = await workload(engine)
        assert errors == []
        assert await counters(server) == SESSIONS
    finally:
        await engine.dispose()


async def test_without_the_option_the_same_workload_fails(
    pgbouncer: Bouncer, server: AsyncEngine
) -> None:
    """asyncpg's and SQLAlchemy's named prepared statements meet other clients' ones (or
    miss their own) on the shared server connections."""
    engine = asyncorm.create_engine(pgbouncer.url())
    try:
        errors, _ = await workload(engine)
    finally:
        await engine.dispose()
    messages = [str(error) for error in errors]
    assert any(
        re.search(r'prepared statement "__asyncpg_stmt_\w+__" (does not exist|already exists)', m)
        for m in messages
    ), messages[:5]


async def test_plain_reads_run_outside_a_transaction_through_pgbouncer(
    pgbouncer: Bouncer, server: AsyncEngine
) -> None:
    """Deferred BEGIN under transaction pooling: a plain read holds no server connection
    after it, and the first write begins a real transaction that holds one."""
    engine = asyncorm.create_engine(pgbouncer.url(), pgbouncer=True)
    try:
        async with asyncorm.async_sessionmaker(engine)() as session:
            assert (await session.get(Account, 1)) is not None
            raw: Any = (await (await session.connection()).get_raw_connection()).driver_connection
            assert not raw.is_in_transaction()
            account = await session.get(Account, 2)
            assert account is not None
            account.balance = 7
            await session.flush()
            assert raw.is_in_transaction()
            await session.commit()
        async with server.connect() as conn:
            assert await conn.scalar(select(Account.balance).where(Account.id == 2)) == 7
    finally:
        await engine.dispose()


async def running(server: AsyncEngine) -> int:
    """How many server backends run (or wait in) the test's long query."""
    async with server.connect() as conn:
        return int(
            await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE :mark AND pid <> pg_backend_pid()"
                ),
                {"mark": f"%{_MARK}%"},
            )
        )


@pytest.mark.parametrize("deferred", [False, True], ids=["in-transaction", "plain-read"])
async def test_cancelling_a_long_query_through_pgbouncer_frees_the_server(
    pgbouncer: Bouncer, server: AsyncEngine, deferred: bool
) -> None:
    """asyncpg's CancelRequest goes to pgbouncer, which passes it to the server connection
    running the query: the query stops, the server connection is free, the next units run.
    The long query is a sleep in a transaction, or a plain read (deferred BEGIN: no
    transaction block) waiting for a table another connection holds locked."""
    engine = asyncorm.create_engine(pgbouncer.url(), pgbouncer=True)
    Session = asyncorm.async_sessionmaker(engine)
    started = asyncio.Event()

    async def long_query() -> None:
        async with Session() as session:
            if deferred:
                statement: Any = select(Account.balance.label(_MARK))
            else:
                await session.execute(text("SELECT 1"))  # a transaction block is open
                statement = text(f"SELECT pg_sleep(600) /* {_MARK} */")
            started.set()
            await session.execute(statement)

    try:
        async with server.connect() as locker:
            if deferred:
                await locker.execute(text("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE"))
            task = asyncio.create_task(long_query())
            await started.wait()
            while await running(server) == 0:  # until the server runs it
                assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # the session closed after the cancellation: its query ended on the server
            assert await running(server) == 0
            await locker.rollback()

        # every server connection is usable: more concurrent units than pgbouncer has
        async def unit(i: int) -> int:
            async with Session.begin() as session:
                account = await session.get(Account, i % COUNTERS, with_for_update=True)
                assert account is not None
                account.balance += 1
                return int(await session.scalar(text("SELECT 1")))

        assert await asyncio.gather(*(unit(i) for i in range(4 * POOL_SIZE))) == [1] * 20
        assert await counters(server) == 4 * POOL_SIZE
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_settings_sent_at_connect_are_refused_by_pgbouncer_with_a_clear_error(
    pgbouncer: Bouncer,
) -> None:
    engine = asyncorm.create_engine(pgbouncer.url(), statement_timeout=5)
    try:
        with pytest.raises(
            asyncorm.ConfigurationError,
            match=rf"The server at 127\.0\.0\.1:{pgbouncer.port} \(a pgbouncer\) refused the "
            r"startup parameter 'statement_timeout'\. .*\(ALTER ROLE app SET statement_timeout",
        ):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("", {"statement_timeout": 5}, r"statement_timeout=5 cannot be used with pgbouncer=True"),
        ("", {"lock_timeout": "2s"}, r"lock_timeout='2s' cannot be used with pgbouncer=True"),
        ("?options=-c%20work_mem%3D64MB", {}, r"options cannot be used with pgbouncer=True"),
        ("?statement_cache_size=100", {}, r"statement_cache_size='100' cannot be used"),
        (
            "",
            {"connect_args": {"prepared_statement_cache_size": 10}},
            r"prepared_statement_cache_size=10 cannot be used",
        ),
        (
            "",
            {"connect_args": {"prepared_statement_name_func": lambda: "x"}},
            r"prepared_statement_name_func cannot be used with pgbouncer=True",
        ),
    ],
    ids=["statement_timeout", "lock_timeout", "options", "statement-cache", "sa-cache", "names"],
)
def test_what_pgbouncer_cannot_carry_is_refused_at_create_engine(
    url: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(asyncorm.ConfigurationError, match=message):
        asyncorm.create_engine(f"postgresql://app@db/app{url}", pgbouncer=True, **options)
    if not url:  # the URL parameter means the same
        with pytest.raises(asyncorm.ConfigurationError, match=message):
            asyncorm.create_engine("postgresql://app@db/app?pgbouncer=true", **options)


def test_the_option_and_the_url_parameter_are_read_strictly() -> None:
    with pytest.raises(asyncorm.ConfigurationError, match=r"pgbouncer='maybe' in the URL"):
        asyncorm.create_engine("postgresql://app@db/app?pgbouncer=maybe")
    with pytest.raises(asyncorm.ConfigurationError, match=r"pgbouncer must be True or False"):
        asyncorm.create_engine("postgresql://app@db/app", pgbouncer="yes")
    # the engine option wins over the URL; the URL keeps the parameter as written
    engine = asyncorm.create_engine("postgresql://app@db/app?pgbouncer=true", pgbouncer=False)
    assert engine.url.query["pgbouncer"] == "true"


async def test_check_reports_the_pooler_and_the_mode(pgbouncer: Bouncer) -> None:
    import io

    for query, tail in [
        ("", "; if it pools transactions (pgbouncer's pool_mode=transaction), add "
         "?pgbouncer=true to the URL"),
        ("pgbouncer=true", "; pgbouncer=true: no prepared statement is kept"),
    ]:  # fmt: skip
        out, err = io.StringIO(), io.StringIO()
        assert await check(pgbouncer.url(query), out, err) == 0, err.getvalue()
        lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.getvalue().splitlines())
        port = pgbouncer.server.port or 5432
        assert lines["pooler"] == (
            f"yes: the server listens on port {port}, the URL's port is {pgbouncer.port} "
            f"(a pgbouncer or another proxy in front){tail}"
        )


async def test_an_async_creator_must_open_connections_without_a_statement_cache(
    pgbouncer: Bouncer, server: AsyncEngine
) -> None:
    import asyncpg

    async def cached() -> Any:
        return await asyncpg.connect(pgbouncer.url())

    async def uncached() -> Any:
        return await asyncpg.connect(pgbouncer.url(), statement_cache_size=0)

    engine = asyncorm.create_engine(pgbouncer.url(), pgbouncer=True, async_creator=cached)
    try:
        with pytest.raises(
            asyncorm.ConfigurationError,
            match=r"opened an asyncpg connection with its statement cache on, which "
            r"pgbouncer=True cannot turn off: pass statement_cache_size=0",
        ):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    engine = asyncorm.create_engine(pgbouncer.url(), pgbouncer=True, async_creator=uncached)
    try:
        errors, _ = await workload(engine)
        assert errors == []
    finally:
        await engine.dispose()


async def test_the_pre_ping_replaces_connections_a_restarted_pgbouncer_closed(
    server: AsyncEngine,
) -> None:
    """pgbouncer restarted (its own process, not the session's): every pooled client
    connection is closed, and the next units get new ones without an error."""
    own = Bouncer(require_pgbouncer())
    own.start()
    engine = asyncorm.create_engine(own.url(), pgbouncer=True)
    opened = count_connects(engine)
    try:
        async def unit() -> int:
            async with asyncorm.async_sessionmaker(engine).begin() as session:
                return int(await session.scalar(text("SELECT 1")))

        assert await asyncio.gather(*(unit() for _ in range(10))) == [1] * 10
        before = len(opened)
        own.restart()
        assert await asyncio.gather(*(unit() for _ in range(10))) == [1] * 10
        assert len(opened) > before  # the closed ones were replaced, not handed out
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
        own.stop()
