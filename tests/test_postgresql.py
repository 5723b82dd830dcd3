"""The PostgreSQL profile's deferred BEGIN: plain reads skip the transaction block, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, literal_column, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncorm
from tests.conftest import postgres_url, reset_schema
from tests.models import User

Factory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]


@pytest.fixture
async def pg_engine() -> AsyncIterator[AsyncEngine]:
    engine = asyncorm.create_engine(postgres_url())
    await reset_schema(engine)
    async with engine.begin() as conn:
        await conn.execute(insert(User).values(id=1, name="ann"))
    yield engine
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    await engine.dispose()


async def in_transaction_block(session: asyncorm.AsyncSession) -> bool:
    """Whether the session's connection is inside BEGIN ... on the server (no IO)."""
    conn = await session.connection()
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    return bool(driver.is_in_transaction())


async def test_a_plain_read_sends_no_begin(pg_engine: AsyncEngine) -> None:
    async with asyncorm.async_sessionmaker(pg_engine)() as session:
        assert (await session.get(User, 1)) is not None
        assert (await session.scalars(select(User).where(User.name == "ann"))).one()
        assert await session.scalar(select(func.count()).select_from(User)) == 1
        assert not await in_transaction_block(session)


@pytest.mark.parametrize(
    "statement",
    [
        select(User).with_for_update(),
        text("SET LOCAL statement_timeout = 5000"),
        text("SELECT 1"),
        select(func.pg_advisory_xact_lock(1)),
        select(func.txid_current()),
    ],
    ids=["for-update", "set-local", "text-select", "advisory-xact-lock", "txid-current"],
)
async def test_anything_but_a_plain_read_begins_first(
    pg_engine: AsyncEngine, statement: Any
) -> None:
    async with asyncorm.async_sessionmaker(pg_engine)() as session:
        await session.execute(statement)
        assert await in_transaction_block(session)


async def test_a_flush_after_reads_is_one_atomic_transaction(pg_engine: AsyncEngine) -> None:
    Session = asyncorm.async_sessionmaker(pg_engine)
    async with Session() as session:
        ann = await session.get(User, 1)
        assert ann is not None
        ann.name = "changed"
        session.add(User(id=2, name="bob"))
        await session.flush()
        assert await in_transaction_block(session)
        await session.rollback()
    async with Session() as session:
        rows = (await session.execute(select(User.id, User.name).order_by(User.id))).all()
        assert [tuple(row) for row in rows] == [(1, "ann")]


async def test_for_update_locks_until_the_transaction_ends(pg_engine: AsyncEngine) -> None:
    Session = asyncorm.async_sessionmaker(pg_engine)
    async with Session() as holder, Session() as other:
        await holder.execute(select(User).where(User.id == 1).with_for_update())
        with pytest.raises(Exception, match="could not obtain lock"):
            await other.execute(select(User).where(User.id == 1).with_for_update(nowait=True))


async def test_streaming_begins_for_its_server_side_cursor(pg_engine: AsyncEngine) -> None:
    async with asyncorm.async_sessionmaker(pg_engine)() as session:
        result = await session.stream_scalars(select(User))
        assert [user.name async for user in result] == ["ann"]
        assert await in_transaction_block(session)


async def test_savepoint_after_a_read(pg_engine: AsyncEngine) -> None:
    Session = asyncorm.async_sessionmaker(pg_engine)
    async with Session.begin() as session:
        await session.get(User, 1)
        async with session.begin_nested():
            session.add(User(id=3, name="kept"))
        nested = await session.begin_nested()
        session.add(User(id=4, name="discarded"))
        await session.flush()
        await nested.rollback()
    async with Session() as session:
        assert (await session.scalars(select(User.id).order_by(User.id))).all() == [1, 3]


async def test_repeatable_read_begins_at_once_and_keeps_its_snapshot(
    pg_engine: AsyncEngine,
) -> None:
    Session = asyncorm.async_sessionmaker(pg_engine)
    async with Session() as session:
        await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        assert await session.scalar(select(func.count()).select_from(User)) == 1
        assert await in_transaction_block(session)
        async with Session.begin() as writer:
            writer.add(User(id=5, name="later"))
        assert await session.scalar(select(func.count()).select_from(User)) == 1


async def test_defer_begin_false_begins_at_the_first_read() -> None:
    engine = asyncorm.create_engine(postgres_url(), defer_begin=False)
    try:
        await reset_schema(engine)
        async with asyncorm.async_sessionmaker(engine)() as session:
            await session.execute(select(User))
            assert await in_transaction_block(session)
    finally:
        await engine.dispose()


async def test_connection_is_transactional_again_after_a_deferred_one(
    pg_engine: AsyncEngine,
) -> None:
    Session = asyncorm.async_sessionmaker(pg_engine)
    for _ in range(2):  # the same pooled connection, once deferred, then written through
        async with Session() as session:
            await session.get(User, 1)
    async with Session() as session:
        session.add(User(id=6, name="x"))
        await session.flush()
        assert await in_transaction_block(session)
        await session.rollback()


@pytest.fixture
async def audited(pg_engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """A schema with functions that write to an audit table, as a volatile function may."""
    async with pg_engine.begin() as conn:
        for statement in (
            "DROP SCHEMA IF EXISTS asyncorm_t CASCADE",
            "CREATE SCHEMA asyncorm_t",
            "CREATE TABLE asyncorm_t.audit (n int)",
            "CREATE FUNCTION asyncorm_t.bump() RETURNS int LANGUAGE sql AS "
            "'INSERT INTO asyncorm_t.audit VALUES (1) RETURNING n'",
            # the name of a safe built-in, in another schema
            "CREATE FUNCTION asyncorm_t.lower(text) RETURNS text LANGUAGE sql AS "
            "'INSERT INTO asyncorm_t.audit VALUES (2) RETURNING $1'",
        ):
            await conn.exec_driver_sql(statement)
    yield pg_engine
    async with pg_engine.begin() as conn:
        await conn.exec_driver_sql("DROP SCHEMA asyncorm_t CASCADE")


@pytest.mark.parametrize(
    "statement",
    [
        select(func.asyncorm_t.bump()),
        select(func.asyncorm_t.lower("x")),
        select(literal_column("asyncorm_t.bump()")),
        text("SELECT asyncorm_t.bump()"),
        select(User.id).where(User.name == func.asyncorm_t.lower("ann")),
    ],
    ids=["function", "safe-name-other-schema", "literal-column", "text", "in-where"],
)
async def test_a_read_calling_a_function_that_writes_is_rolled_back(
    audited: AsyncEngine, statement: Any
) -> None:
    Session = asyncorm.async_sessionmaker(audited)
    async with Session() as session:
        await session.execute(statement)
        assert await in_transaction_block(session)
        await session.rollback()
    async with audited.connect() as conn:
        assert (await conn.exec_driver_sql("SELECT count(*) FROM asyncorm_t.audit")).scalar() == 0


@pytest.mark.parametrize(
    "statement",
    [
        select(func.now()),
        select(User.id).where(User.name.op("~~*")("a%")),
        select(func.random()),
    ],
    ids=["clock", "custom-operator", "random"],
)
async def test_reads_that_could_differ_begin_first(pg_engine: AsyncEngine, statement: Any) -> None:
    async with asyncorm.async_sessionmaker(pg_engine)() as session:
        await session.execute(statement)
        assert await in_transaction_block(session)


async def test_plain_reads_with_safe_functions_send_no_begin(pg_engine: AsyncEngine) -> None:
    async with asyncorm.async_sessionmaker(pg_engine)() as session:
        await session.execute(select(func.lower(User.name), func.count()).group_by(User.name))
        await session.execute(select(User).where(func.coalesce(User.fullname, "") == ""))
        assert not await in_transaction_block(session)


async def test_a_select_from_a_data_modifying_cte_is_a_write(pg_engine: AsyncEngine) -> None:
    """``WITH u AS (UPDATE ... RETURNING ...) SELECT ... FROM u`` writes: it must begin first,
    so that rollback() undoes it."""
    changed = update(User).values(name="changed").returning(User.id).cte("changed")
    removed = delete(User).where(User.id == 1).returning(User.id).cte("removed")
    Session = asyncorm.async_sessionmaker(pg_engine)
    for statement in (select(changed.c.id), select(removed.c.id)):
        async with Session() as session:
            assert (await session.execute(statement)).all() == [(1,)]
            assert await in_transaction_block(session)
            await session.rollback()
        async with Session() as session:
            assert await session.scalar(select(User.name).where(User.id == 1)) == "ann"
