"""The PostgreSQL deferred BEGIN decides from what is really sent and really in effect.

Deferral must follow the isolation level the connection really uses (a session default set
by a ``connect`` listener, ``ALTER DATABASE ... SET`` or ``SET SESSION CHARACTERISTICS``),
and the verdict "plain read" must judge the SQL text that goes to the driver, including what
only compilation adds (``TypeDecorator.column_expression()``/``bind_expression()``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    TypeDecorator,
    cast,
    event,
    func,
    insert,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.elements import ColumnElement

import asyncorm
from tests.conftest import postgres_url, reset_schema
from tests.models import User
from tests.test_postgresql import in_transaction_block


class BumpText(TypeDecorator[str]):
    """A type whose SQL expressions call a function that writes (rv.bump_text)."""

    impl = String
    cache_ok = True

    def column_expression(self, col: ColumnElement[Any]) -> ColumnElement[str]:
        return func.rv.bump_text(col, type_=String)

    def bind_expression(self, bindvalue: Any) -> ColumnElement[str]:
        return func.rv.bump_text(bindvalue, type_=String)


metadata = MetaData()
rv_users = Table(
    "rv_users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", BumpText),
    Column("plain", String),
    Column("odd(name", String),  # a quoted name with a parenthesis
)


async def audit_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        count = (await conn.exec_driver_sql("SELECT count(*) FROM rv.audit")).scalar()
    return int(count or 0)


async def create_rv(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
        for statement in (
            "DROP SCHEMA IF EXISTS rv CASCADE",
            "CREATE SCHEMA rv",
            "CREATE TABLE rv.audit (n int)",
            "CREATE FUNCTION rv.bump_text(text) RETURNS text LANGUAGE sql AS "
            "'INSERT INTO rv.audit VALUES (1); SELECT $1'",
            "CREATE FUNCTION rv.rows() RETURNS SETOF int LANGUAGE sql AS "
            "'INSERT INTO rv.audit VALUES (2) RETURNING n'",
        ):
            await conn.exec_driver_sql(statement)
        await conn.run_sync(metadata.create_all)
        await conn.execute(insert(rv_users).values(id=1, name="ann", plain="ann"))
        await conn.exec_driver_sql("DELETE FROM rv.audit")  # the INSERT's bind_expression


async def drop_rv(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
        await conn.exec_driver_sql("DROP SCHEMA IF EXISTS rv CASCADE")


@pytest.fixture
async def rv_engine() -> AsyncIterator[AsyncEngine]:
    engine = asyncorm.create_engine(postgres_url())
    await create_rv(engine)
    try:
        yield engine
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        await drop_rv(engine)
    finally:
        await engine.dispose()


def set_repeatable_read(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
    """A user ``connect`` listener making REPEATABLE READ the session default."""
    dbapi_connection.run_async(
        lambda conn: conn.execute(
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ"
        )
    )


async def two_reads_around_a_committed_write(engine: AsyncEngine) -> tuple[int, int]:
    """Count users twice in one session while another connection commits a new user."""
    Session = asyncorm.async_sessionmaker(engine)
    async with Session() as session:
        first = await session.scalar(select(func.count()).select_from(User))
        async with engine.begin() as writer:
            await writer.execute(insert(User).values(name="committed meanwhile"))
        second = await session.scalar(select(func.count()).select_from(User))
        await session.rollback()
    return int(first or 0), int(second or 0)


async def test_a_connect_listener_making_repeatable_read_the_default_keeps_one_snapshot() -> None:
    engine = asyncorm.create_engine(postgres_url())
    event.listen(engine.sync_engine, "connect", set_repeatable_read)
    try:
        await reset_schema(engine)
        first, second = await two_reads_around_a_committed_write(engine)
        assert (first, second) == (0, 0)
    finally:
        await engine.dispose()


async def test_a_database_default_set_after_start_keeps_one_snapshot() -> None:
    engine = asyncorm.create_engine(postgres_url())
    database = make_url(postgres_url()).database
    try:
        await reset_schema(engine)  # the dialect's first connection saw READ COMMITTED
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                f"ALTER DATABASE {database} SET default_transaction_isolation = 'repeatable read'"
            )
        await engine.dispose()  # the next connections start with the new default
        first, second = await two_reads_around_a_committed_write(engine)
        assert (first, second) == (0, 0)
    finally:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                f"ALTER DATABASE {database} RESET default_transaction_isolation"
            )
        await engine.dispose()


async def test_set_session_characteristics_through_a_session_holds_for_the_next_one() -> None:
    engine = asyncorm.create_engine(postgres_url(), pool_size=1, max_overflow=0)
    writer = asyncorm.create_engine(postgres_url())
    try:
        await reset_schema(engine)
        Session = asyncorm.async_sessionmaker(engine)
        async with Session() as session:
            await session.get(User, 1)  # deferred: this connection's default is known
            await session.execute(
                text("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            )
            await session.commit()
        async with Session() as session:  # the same (only) connection
            first = await session.scalar(select(func.count()).select_from(User))
            async with writer.begin() as conn:
                await conn.execute(insert(User).values(name="committed meanwhile"))
            second = await session.scalar(select(func.count()).select_from(User))
            assert (first, second) == (0, 0)
    finally:
        await engine.dispose()
        await writer.dispose()


async def test_an_explicit_read_committed_level_still_defers_under_another_default() -> None:
    """``isolation_level="READ COMMITTED"`` names the level in the BEGIN: deferral is safe."""
    engine = asyncorm.create_engine(postgres_url(), isolation_level="READ COMMITTED")
    event.listen(engine.sync_engine, "connect", set_repeatable_read)
    try:
        await reset_schema(engine)
        async with asyncorm.async_sessionmaker(engine)() as session:
            await session.execute(select(User))
            assert not await in_transaction_block(session)
    finally:
        await engine.dispose()


async def test_a_writing_function_added_by_column_expression_is_rolled_back(
    rv_engine: AsyncEngine,
) -> None:
    async with asyncorm.async_sessionmaker(rv_engine)() as session:
        assert (await session.execute(select(rv_users.c.id, rv_users.c.name))).all() == [
            (1, "ann")
        ]
        assert await in_transaction_block(session)
        await session.rollback()
    assert await audit_count(rv_engine) == 0


@pytest.mark.parametrize(
    "build",
    [
        lambda: select(rv_users.c.id).where(rv_users.c.name == "ann"),
        lambda: select(type_coerce(rv_users.c.plain, BumpText())),
        lambda: select(cast(rv_users.c.plain, BumpText())),
    ],
    ids=["bind-expression", "type-coerce", "cast"],
)
async def test_writing_functions_added_at_compile_time_are_rolled_back(
    rv_engine: AsyncEngine, build: Callable[[], Any]
) -> None:
    async with asyncorm.async_sessionmaker(rv_engine)() as session:
        await session.execute(build())
        assert await in_transaction_block(session)
        await session.rollback()
    assert await audit_count(rv_engine) == 0


@pytest.mark.parametrize(
    "build",
    [
        lambda: select(rv_users.c["odd(name"]),
        lambda: select(func.row_number().over(order_by=rv_users.c.id), rv_users.c.plain),
        lambda: select(cast(rv_users.c.id, Numeric(10, 2))),
        lambda: select(rv_users.c.id).where(
            rv_users.c.id.in_([1, 2]), rv_users.c.plain.like("a%")
        ),
        lambda: select(func.count().filter(rv_users.c.plain != "x")).select_from(rv_users),
    ],
    ids=["quoted-parenthesis", "window", "cast-numeric", "in-like", "count-filter"],
)
async def test_plain_reads_that_look_like_calls_stay_deferred(
    rv_engine: AsyncEngine, build: Callable[[], Any]
) -> None:
    async with asyncorm.async_sessionmaker(rv_engine)() as session:
        await session.execute(build())
        assert not await in_transaction_block(session)


COMPARED: list[Callable[[], Any]] = [
    lambda: select(rv_users.c.id, rv_users.c.plain).order_by(rv_users.c.id),
    lambda: select(func.count()).select_from(rv_users),
    lambda: select(rv_users.c.id, rv_users.c.name),
    lambda: select(rv_users.c.id).where(rv_users.c.name == "ann"),
    lambda: select(type_coerce(rv_users.c.plain, BumpText())),
    lambda: select(func.rv.rows().table_valued("n").render_derived(name="r")),
    lambda: select(
        update(rv_users).values(plain="changed").returning(rv_users.c.id).cte("changed").c.id
    ),
]


@pytest.mark.parametrize(
    "build",
    COMPARED,
    ids=[
        "plain", "count", "column-expression", "bind-expression", "type-coerce",
        "table-valued-function", "update-cte",
    ],
)
async def test_the_deferred_path_matches_sqlalchemys_general_path(
    build: Callable[[], Any],
) -> None:
    """The same statement, then rollback(), on both engines: the same rows, the same
    database afterwards."""
    outcomes = []
    for defer_begin in (True, False):
        engine = asyncorm.create_engine(postgres_url(), defer_begin=defer_begin)
        try:
            await create_rv(engine)
            async with asyncorm.async_sessionmaker(engine)() as session:
                rows = [tuple(row) for row in (await session.execute(build())).all()]
                await session.rollback()
            async with engine.connect() as conn:
                table = (await conn.execute(select(rv_users.c.id, rv_users.c.plain))).all()
            outcomes.append((rows, [tuple(row) for row in table], await audit_count(engine)))
            await drop_rv(engine)
        finally:
            await engine.dispose()
    deferred, general = outcomes
    assert deferred == general
    assert deferred[1:] == ([(1, "ann")], 0)  # rolled back: nothing written survives


@pytest.mark.parametrize(
    ("sql", "plain"),
    [
        ("SELECT users.id FROM users WHERE users.id = $1::INTEGER", True),
        ('SELECT "odd(name", \'bump(\', $$ bump( $$, $a$ x( $a$ FROM t', True),
        ("SELECT /* f( /* nested */ g( */ 1 -- h(\n", True),
        ("SELECT CAST(a AS NUMERIC(10, 2)), a::VARCHAR(5) FROM t", True),
        ("SELECT count(*) FILTER (WHERE a > $1) OVER (PARTITION BY (b)) FROM t", True),
        ("SELECT * FROM a LEFT OUTER JOIN (b JOIN c ON b.x = c.x) ON a.y = b.y", True),
        ("WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL (SELECT n FROM c)) SELECT n FROM c", True),
        ("SELECT rv.bump_text(rv_users.name) AS name FROM rv_users", False),
        ('SELECT "bump"(a), x FROM t', False),
        ("SELECT nextval('x'::regclass)", False),
        ("SELECT * FROM f() AS g(n)", False),
        ("SELECT * FROM t, LATERAL f(t.a) AS x", False),
        ("SELECT a over(b) FROM t", False),
        ("SELECT a FROM t WHERE a LIKE join(b)", False),
        ("SELECT a +++ b, OPERATOR(pg_catalog.+)(1, 2) FROM t", False),
        ("SELECT 1; SELECT bump()", False),
        ("SELECT 'unterminated bump(", False),
        ("SELECT /* unterminated bump(", False),
    ],
)
def test_the_text_judge_sees_every_call(sql: str, plain: bool) -> None:
    from asyncorm._plainread import plain_text

    assert plain_text(sql) is plain


# -- found in review: a trusted function name that resolves elsewhere ---------------------------


SHADOW = """
CREATE OR REPLACE FUNCTION public.lower(bigint) RETURNS bigint LANGUAGE sql VOLATILE AS $$
    INSERT INTO users (name) VALUES ('written by lower(bigint)'); SELECT $1 $$
"""


@pytest.fixture
async def shadowed() -> AsyncIterator[AsyncEngine]:
    """An overload of a name the plain-read judge trusts (``lower``) that writes: PostgreSQL
    picks it for a bigint argument (pg_catalog has only ``lower(text)``)."""
    engine = asyncorm.create_engine(postgres_url())
    await reset_schema(engine)
    async with engine.begin() as conn:
        await conn.execute(text(SHADOW))
    try:
        yield engine
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("DROP FUNCTION IF EXISTS public.lower(bigint)"))
        await engine.dispose()


async def test_a_write_through_a_shadowing_overload_is_rolled_back(shadowed: AsyncEngine) -> None:
    Session = asyncorm.async_sessionmaker(shadowed)
    async with Session() as session:
        assert (await session.execute(select(func.lower(func.count(User.id))))).scalar() == 0
        await session.rollback()
    async with Session() as session:
        assert await session.scalar(select(func.count(User.id))) == 0


async def test_a_read_only_session_cannot_write_through_a_judged_plain_read(
    shadowed: AsyncEngine,
) -> None:
    Session = asyncorm.async_sessionmaker(shadowed, read_only=True)
    async with Session() as session:
        with pytest.raises(
            asyncorm.ReadOnlySessionError,
            match=r"This session is read-only \(read_only=True\), and PostgreSQL refused",
        ):
            await session.execute(select(func.lower(func.count(User.id))))
    async with asyncorm.async_sessionmaker(shadowed)() as session:
        assert await session.scalar(select(func.count(User.id))) == 0
