"""create_engine(): URL handling, errors, password hygiene and the dialect profiles."""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import delete, event, func, insert, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool
from sqlalchemy.util import greenlet_spawn

import asyncorm
from tests.conftest import Backend, postgres_url, reset_schema
from tests.models import Account, Address, User

# -- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "driver", "database"),
    [
        ("sqlite://", "aiosqlite", None),
        ("sqlite:///:memory:", "aiosqlite", None),
        ("sqlite:///rel.db", "aiosqlite", "rel.db"),
        ("sqlite:////abs/path.db", "aiosqlite", "/abs/path.db"),
        ("sqlite+aiosqlite:///rel.db", "aiosqlite", "rel.db"),
        ("postgresql://u@h/app", "asyncpg", "app"),
        ("postgres://u@h/app", "asyncpg", "app"),
        ("postgresql+asyncpg://u@h:5433/app", "asyncpg", "app"),
    ],
)
async def test_accepted_urls_pick_the_async_driver(
    url: str, driver: str, database: str | None
) -> None:
    engine = asyncorm.create_engine(url)
    try:
        assert engine.dialect.driver == driver
        assert engine.url.drivername.endswith(f"+{driver}")
        if database is not None:
            assert engine.url.database == database
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u@h/app", r"Unsupported database URL 'mysql://u@h/app': asyncorm supports"),
        ("postgresql+psycopg2://u@h/app", r"Unsupported driver 'psycopg2'.*asyncpg"),
        ("sqlite+pysqlite:///x.db", r"Unsupported driver 'pysqlite'.*aiosqlite"),
        ("", r"empty URL. Supported: sqlite://"),
        ("   ", r"empty URL"),
        ("not a url", r"Could not parse database URL 'not a url'. Supported:"),
        ("postgresql://app@db:notaport/app", r"Could not parse database URL"),
    ],
)
def test_unsupported_urls_raise_configuration_error(url: str, message: str) -> None:
    with pytest.raises(asyncorm.ConfigurationError, match=message):
        asyncorm.create_engine(url)


def test_non_string_url_is_a_configuration_error() -> None:
    with pytest.raises(asyncorm.ConfigurationError, match="got int"):
        asyncorm.create_engine(42)  # type: ignore[arg-type]


def test_configuration_error_is_an_sqlalchemy_argument_error() -> None:
    from sqlalchemy.exc import ArgumentError

    with pytest.raises(ArgumentError):
        asyncorm.create_engine("mysql://x/y")


def test_bad_engine_argument_is_a_configuration_error() -> None:
    with pytest.raises(asyncorm.ConfigurationError, match="no_such_option"):
        asyncorm.create_engine("sqlite://", no_such_option=1)


def test_bad_sqlite_timeout_is_a_configuration_error() -> None:
    with pytest.raises(asyncorm.ConfigurationError, match="timeout must be a number"):
        asyncorm.create_engine("sqlite://", connect_args={"timeout": "soon"})


@pytest.mark.parametrize(("module", "url"), [("asyncpg", "postgresql://h/db"),
                                             ("aiosqlite", "sqlite://")])
def test_missing_driver_names_the_pip_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, url: str
) -> None:
    extra = "postgresql" if module == "asyncpg" else "sqlite"
    monkeypatch.setitem(sys.modules, module, None)  # how Python marks a module unimportable
    with pytest.raises(
        asyncorm.ConfigurationError,
        match=rf"needs the {module} driver.*pip install 'asyncorm\[{extra}\]'",
    ):
        asyncorm.create_engine(url)


# -- passwords --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "mysql://app:s3cret-pw@h/app",
        "postgresql+psycopg2://app:s3cret-pw@h/app",
        "oracle+cx://app:s3cret-pw@h/app",
        "postgres:/app:s3cret-pw@:::",
        "postgresql://app:s3cret-pw@db:notaport/app",
    ],
)
def test_passwords_never_appear_in_errors(url: str) -> None:
    with pytest.raises(asyncorm.ConfigurationError) as info:
        asyncorm.create_engine(url)
    assert "s3cret-pw" not in str(info.value)
    assert "s3cret-pw" not in repr(info.value)


def test_redact_url_hides_passwords_in_text_and_urls() -> None:
    from sqlalchemy.engine import make_url

    assert asyncorm.redact_url("postgresql://app:pw@db/x") == "postgresql://app:***@db/x"
    assert asyncorm.redact_url(make_url("postgresql://app:pw@db/x")) == (
        "postgresql://app:***@db/x"
    )
    assert asyncorm.redact_url("sqlite:///x.db") == "sqlite:///x.db"


async def test_passwords_never_appear_in_reprs_or_logs(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    if backend.is_sqlite:
        url = "postgresql://app:s3cret-pw@127.0.0.1:1/none"  # never connected
    else:
        # the test server trusts local connections, so a password is accepted and ignored
        url = postgres_url().replace("postgres@", "postgres:s3cret-pw@")
    caplog.set_level(logging.DEBUG)
    engine = asyncorm.create_engine(url, echo="debug", echo_pool="debug")
    try:
        if not backend.is_sqlite:
            async with engine.connect() as conn:
                assert await conn.scalar(text("select 1")) == 1
        shown = [repr(engine), str(engine.url), repr(engine.url), repr(engine.pool)]
        assert all("s3cret-pw" not in s for s in shown), shown
    finally:
        await engine.dispose()
    assert "s3cret-pw" not in caplog.text


# -- SQLite profile ---------------------------------------------------------------------


async def _pragma(engine: AsyncEngine, name: str) -> object:
    async with engine.connect() as conn:
        return await conn.scalar(text(f"PRAGMA {name}"))


async def test_sqlite_file_profile_pragmas(tmp_path: Path) -> None:
    engine = asyncorm.create_engine(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        assert await _pragma(engine, "foreign_keys") == 1
        assert await _pragma(engine, "journal_mode") == "wal"
        assert await _pragma(engine, "busy_timeout") == 30000
        assert await _pragma(engine, "synchronous") == 1  # NORMAL, safe with WAL
    finally:
        await engine.dispose()


async def test_sqlite_timeout_is_configurable(tmp_path: Path) -> None:
    engine = asyncorm.create_engine(
        f"sqlite:///{tmp_path / 'p.db'}", connect_args={"timeout": 2.5}
    )
    try:
        assert await _pragma(engine, "busy_timeout") == 2500
    finally:
        await engine.dispose()


async def test_sqlite_memory_profile_has_foreign_keys() -> None:
    engine = asyncorm.create_engine("sqlite://")
    try:
        assert await _pragma(engine, "foreign_keys") == 1
    finally:
        await engine.dispose()


async def test_foreign_keys_are_enforced(
    Session: asyncorm.async_sessionmaker[asyncorm.AsyncSession],
) -> None:
    async with Session() as session:
        session.add(Address(email="nobody@example.com", user_id=12345))
        with pytest.raises(IntegrityError):
            await session.commit()


async def test_sqlite_memory_database_is_shared_by_the_engines_connections() -> None:
    engine = asyncorm.create_engine("sqlite://")
    try:
        await reset_schema(engine)
        async with engine.connect() as first:
            await first.execute(insert(User).values(id=1, name="ann"))
            await first.commit()
        # another pooled connection of the same engine sees the same database
        async with engine.connect() as first_again, engine.connect() as second:
            assert first_again.sync_connection is not second.sync_connection
            await first_again.close()
            assert await second.scalar(select(User.name)) == "ann"
    finally:
        await engine.dispose()


async def test_two_memory_engines_are_separate_databases() -> None:
    one, two = asyncorm.create_engine("sqlite://"), asyncorm.create_engine("sqlite://")
    try:
        await reset_schema(one)
        async with two.connect() as conn:
            tables = await conn.scalar(text("select count(*) from sqlite_master"))
        assert tables == 0
    finally:
        await one.dispose()
        await two.dispose()


# -- concurrency: the reasons for the SQLite profile --------------------------------------


@pytest.mark.parametrize("first_outcome", ["rollback", "commit"])
async def test_interleaved_sessions_never_share_a_transaction(
    backend: Backend, first_outcome: str
) -> None:
    await _interleave(backend.url, first_outcome)


@pytest.mark.parametrize("first_outcome", ["rollback", "commit"])
async def test_interleaved_sessions_on_sqlite_memory_never_share_a_transaction(
    first_outcome: str,
) -> None:
    """With SQLAlchemy's default StaticPool for ``sqlite://`` both sessions share one
    connection, so the second session's commit also commits the first one's flushed row.
    """
    await _interleave("sqlite://", first_outcome)


async def _interleave(url: str, first_outcome: str) -> None:
    """One session rolls back (or commits) while another commits (or rolls back)."""
    engine = asyncorm.create_engine(url)
    Session = asyncorm.async_sessionmaker(engine)
    try:
        await reset_schema(engine)
        first_flushed, second_added = asyncio.Event(), asyncio.Event()

        async def second() -> None:
            await first_flushed.wait()
            async with Session() as session:
                session.add(User(id=2, name="second"))
                second_added.set()
                if first_outcome == "rollback":
                    await session.commit()
                else:
                    await session.flush()
                    await session.rollback()

        task = asyncio.create_task(second())
        async with Session() as session:
            session.add(User(id=1, name="first"))
            await session.flush()
            first_flushed.set()
            await second_added.wait()
            if first_outcome == "rollback":
                await session.rollback()
            else:
                await session.commit()
        await task

        async with Session() as session:
            names = (await session.scalars(select(User.name).order_by(User.id))).all()
        assert names == (["second"] if first_outcome == "rollback" else ["first"])
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def _seed_accounts(
    Session: asyncorm.async_sessionmaker[asyncorm.AsyncSession], count: int, balance: int
) -> None:
    async with Session.begin() as session:
        session.add_all([Account(id=i, balance=balance) for i in range(count)])


async def test_concurrent_transfers_preserve_the_total(
    backend: Backend, Session: asyncorm.async_sessionmaker[asyncorm.AsyncSession]
) -> None:
    """500 concurrent read-modify-write transfers between 10 accounts: no update is lost.

    SQLAlchemy's defaults on aiosqlite end at a total of ~930 instead of 1000 (the reads
    run outside the transaction); plain BEGIN makes most transfers fail with "database is
    locked". PostgreSQL needs the rows locked (``with_for_update``), in a stable order.
    """
    await _seed_accounts(Session, 10, 100)
    errors: list[BaseException] = []

    async def transfer(seed: int) -> None:
        rnd = random.Random(seed)
        src, dst = sorted(rnd.sample(range(10), 2))
        amount = rnd.randint(1, 20)
        lock = not backend.is_sqlite
        try:
            async with Session.begin() as session:
                a = await session.get(Account, src, with_for_update=lock)
                b = await session.get(Account, dst, with_for_update=lock)
                assert a is not None
                assert b is not None
                a.balance -= amount
                b.balance += amount
        except Exception as exc:  # collected: the test asserts there are none
            errors.append(exc)

    await asyncio.gather(*(transfer(seed) for seed in range(500)))
    assert errors == []
    async with Session() as session:
        assert await session.scalar(select(func.sum(Account.balance))) == 1000


async def test_savepoints_work_on_sqlite_memory() -> None:
    engine = asyncorm.create_engine("sqlite://")
    Session = asyncorm.async_sessionmaker(engine)
    try:
        await reset_schema(engine)
        async with Session.begin() as session:
            session.add(User(id=1, name="kept"))
            nested = await session.begin_nested()
            session.add(User(id=2, name="discarded"))
            await session.flush()
            await nested.rollback()
        async with Session() as session:
            assert (await session.scalars(select(User.name))).all() == ["kept"]
    finally:
        await engine.dispose()


async def test_second_transaction_in_the_same_task_fails_fast_instead_of_deadlocking(
    tmp_path: Path,
) -> None:
    engine = asyncorm.create_engine(f"sqlite:///{tmp_path / 'd.db'}")
    Session = asyncorm.async_sessionmaker(engine)
    try:
        await reset_schema(engine)
        async with Session() as outer:
            await outer.execute(select(User))  # a read: a snapshot, no writer turn
            async with Session() as inner:
                assert (await inner.scalars(select(User))).all() == []  # reads never wait
            outer.add(User(name="outer"))
            await outer.flush()  # the first write takes the writer turn
            async with Session() as inner:
                inner.add(User(name="inner"))
                with pytest.raises(asyncorm.SQLiteWriteLockError, match=r"would deadlock"):
                    await inner.flush()
        # both sessions closed: the lock is free again
        async with Session() as session:
            assert (await session.scalars(select(User))).all() == []
    finally:
        await engine.dispose()


async def test_waiting_too_long_for_the_write_lock_names_the_holder(tmp_path: Path) -> None:
    engine = asyncorm.create_engine(
        f"sqlite:///{tmp_path / 't.db'}", connect_args={"timeout": 0.2}
    )
    Session = asyncorm.async_sessionmaker(engine)
    try:
        await reset_schema(engine)
        holding, done = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with Session() as session:
                session.add(User(name="holder"))
                await session.flush()
                holding.set()
                await done.wait()

        task = asyncio.create_task(holder(), name="slow-holder")
        await holding.wait()
        async with Session() as session:
            with pytest.raises(
                asyncorm.SQLiteWriteLockTimeout,
                match=r"Waited 0.2s for the write lock.*task 'slow-holder' has held it",
            ):
                await session.execute(delete(User))
        done.set()
        await task
    finally:
        await engine.dispose()


async def test_autocommit_connections_take_no_lock(tmp_path: Path) -> None:
    engine = asyncorm.create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        await reset_schema(engine)
        async with engine.connect() as writer:
            await writer.execute(insert(User).values(name="w"))  # holds the writer turn
            auto = await engine.connect()
            try:
                auto = await auto.execution_options(isolation_level="AUTOCOMMIT")
                assert (await auto.execute(select(func.count()).select_from(User))).scalar() == 0
            finally:
                await auto.close()
    finally:
        await engine.dispose()


async def _terminate_pooled_connection(engine: AsyncEngine, admin: AsyncEngine) -> Any:
    """Use a pooled connection once, then have the server kill it; return asyncpg's object."""
    async with engine.connect() as conn:
        pid = await conn.scalar(text("select pg_backend_pid()"))
        driver = (await conn.get_raw_connection()).driver_connection
    async with admin.connect() as conn:
        await conn.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid})
    return driver


@pytest.mark.parametrize(
    "options",
    [{}, {"pool_pre_ping_after": 0}, {"pool_pre_ping": False}],
    ids=["default", "ping-every-checkout", "no-pre-ping"],
)
async def test_postgresql_pre_ping_replaces_a_dead_connection(options: dict[str, Any]) -> None:
    url = postgres_url()
    engine = asyncorm.create_engine(url, **options)
    admin = asyncorm.create_engine(url, poolclass=NullPool)
    try:
        dead = await _terminate_pooled_connection(engine, admin)
        if not options:
            # by default a connection idle for less than 5 s is not pinged; one whose socket
            # the server closed is still replaced, without a round trip, once asyncpg has
            # seen the close: let the event loop run until it has
            async with admin.connect() as conn:
                for _ in range(1000):
                    if dead.is_closed():
                        break
                    await conn.execute(text("select 1"))
            assert dead.is_closed()
        async with engine.connect() as conn:
            if options.get("pool_pre_ping") is False:
                with pytest.raises(DBAPIError):
                    await conn.scalar(text("select 1"))
            else:
                assert (await conn.get_raw_connection()).driver_connection is not dead
                assert await conn.scalar(text("select 1")) == 1
    finally:
        await engine.dispose()
        await admin.dispose()


async def test_postgresql_pre_ping_keeps_a_healthy_connection() -> None:
    engine = asyncorm.create_engine(postgres_url(), pool_pre_ping_after=0)
    connects: list[object] = []
    event.listen(engine.sync_engine, "connect", lambda *args: connects.append(args))
    try:
        pids = set()
        for _ in range(3):  # pinged on the second and third checkout
            async with engine.connect() as conn:
                pids.add(await conn.scalar(text("select pg_backend_pid()")))
        assert len(connects) == 1
        assert len(pids) == 1
    finally:
        await engine.dispose()


async def test_postgresql_pre_ping_after_must_be_a_duration() -> None:
    with pytest.raises(asyncorm.ConfigurationError, match="pool_pre_ping_after must be"):
        asyncorm.create_engine("postgresql://u@h/db", pool_pre_ping_after=-1)


async def test_sqlite_connection_returned_inside_a_transaction_is_rolled_back(
    tmp_path: Path,
) -> None:
    """The profile's own reset: only an open transaction costs a rollback on return."""
    engine = asyncorm.create_engine(f"sqlite:///{tmp_path / 'r.db'}", pool_size=1)
    try:
        await reset_schema(engine)
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver = cast(Any, raw.driver_connection)
            await conn.commit()
        # bypass SQLAlchemy's Connection: the pool is the only one left to roll back
        raw = await greenlet_spawn(engine.sync_engine.raw_connection)
        same_connection = raw.driver_connection is driver
        assert same_connection  # pool_size=1
        await driver.execute("BEGIN")
        await driver.execute("INSERT INTO users (id, name) VALUES (1, 'pending')")
        await greenlet_spawn(raw.close)
        assert not driver.in_transaction
        async with engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(User)) == 0
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("missing", "other_url"),
    [("asyncpg", "sqlite://"), ("aiosqlite", "postgresql://app@db/app")],
)
def test_each_extra_works_without_the_other_driver(missing: str, other_url: str) -> None:
    """``pip install 'asyncorm[sqlite]'`` has no asyncpg (and ``[postgresql]`` no aiosqlite):
    importing asyncorm and creating the other backend's engine must not need it."""
    script = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "import asyncorm\n"
        f"asyncorm.create_engine({other_url!r})\n"
        "try:\n"
        f"    asyncorm.create_engine({'sqlite://' if missing == 'aiosqlite' else 'postgresql://a@b/c'!r})\n"
        "except asyncorm.ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert f"needs the {missing} driver, which is not installed" in done.stdout


_CONNECTION_EVENTS = (
    "before_execute", "after_execute", "before_cursor_execute", "after_cursor_execute",
    "engine_connect", "set_connection_execution_options", "set_engine_execution_options",
    "engine_disposed", "begin", "rollback", "commit", "savepoint", "rollback_savepoint",
    "release_savepoint", "begin_twophase", "prepare_twophase", "rollback_twophase",
    "commit_twophase",
)  # fmt: skip


async def test_an_engine_listens_to_no_connection_event(backend: Backend) -> None:
    """asyncorm's hooks are dialect and pool events: one listener of SQLAlchemy's
    ConnectionEvents on the engine makes every statement of it dispatch before_execute,
    before_cursor_execute, after_cursor_execute and after_execute (SQLAlchemy skips them for
    engines without one), which cost PostgreSQL W2 with 20 tasks about 9% once."""
    engine = asyncorm.create_engine(backend.url)
    try:
        dispatch = engine.sync_engine.dispatch
        listening = [name for name in _CONNECTION_EVENTS if getattr(dispatch, name)]
        assert listening == []
    finally:
        await engine.dispose()
