"""Shared fixtures: the ``backend`` parametrisation over SQLite and PostgreSQL.

The suite also uses asyncorm's own pytest plugin (loaded through its entry point): its
``asyncorm_url`` is overridden here to run on both backends, and ``asyncorm_metadata`` to
create the tables of :mod:`tests.models`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, MetaData, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncorm
from tests import pgbouncer as bouncer
from tests.models import Base
from tests.pgcluster import Cluster, why_unavailable

POSTGRES_URL = os.environ.get(
    "ASYNCORM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("ASYNCORM_REQUIRE_POSTGRES") == "1"


@dataclass(frozen=True)
class Backend:
    """A database the tests run against: its name (``sqlite``/``postgresql``) and URL."""

    name: str
    url: str

    @property
    def is_sqlite(self) -> bool:
        return self.name == "sqlite"


@cache
def postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when its port answers."""
    url = make_url(POSTGRES_URL)
    host, port = url.host or "127.0.0.1", url.port or 5432
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"PostgreSQL at {host}:{port} is unreachable ({exc.strerror or exc})"
    return None


def postgres_url() -> str:
    """The PostgreSQL URL, skipping (or failing, when required) if it is unreachable."""
    reason = postgres_unreachable()
    if reason is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"{reason} and ASYNCORM_REQUIRE_POSTGRES=1 is set")
        pytest.skip(
            f"{reason}; set ASYNCORM_TEST_POSTGRES_URL to use another server, "
            f"or ASYNCORM_REQUIRE_POSTGRES=1 to fail instead"
        )
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each test that uses it runs once on a SQLite file and once on PostgreSQL."""
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp_path / 'test.db'}")
    return Backend("postgresql", postgres_url())


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def asyncorm_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The plugin's database: a SQLite file, then PostgreSQL (each test using it runs twice)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('asyncorm') / 'plugin.db'}"
    return postgres_url()


@pytest.fixture(scope="session")
def asyncorm_metadata() -> MetaData:
    """The plugin creates the tables of tests.models once per backend."""
    return Base.metadata


@contextmanager
def capture_sql(engine: AsyncEngine) -> Iterator[list[str]]:
    """Collect the SQL statements ``engine`` sends while the block runs."""
    statements: list[str] = []

    def record(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def reset_schema(engine: AsyncEngine) -> None:
    """Drop and create the test tables."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)


@pytest.fixture
async def engine(backend: Backend) -> AsyncIterator[AsyncEngine]:
    """An engine on ``backend`` with fresh test tables; fails the test if it leaks."""
    eng = asyncorm.create_engine(backend.url)
    await reset_schema(eng)
    try:
        yield eng
        checked_out = eng.pool.checkedout()  # type: ignore[attr-defined]
        assert checked_out == 0, f"{checked_out} connection(s) still checked out"
    finally:
        await eng.dispose()


@pytest.fixture
def Session(engine: AsyncEngine) -> asyncorm.async_sessionmaker[asyncorm.AsyncSession]:
    """asyncorm's session factory bound to ``engine``."""
    return asyncorm.async_sessionmaker(engine)


@contextmanager
def tasks_created() -> Iterator[list[str]]:
    """The names of the coroutines of the tasks created while the block runs."""
    loop = asyncio.get_running_loop()
    created: list[str] = []
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        created.append(getattr(coro, "__qualname__", repr(coro)))
        if factory is not None:
            return factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)
    try:
        yield created
    finally:
        loop.set_task_factory(factory)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster (TLS on, test roles) for tests that reconfigure or
    restart a server; removed at the end of the run (see tests/pgcluster.py)."""
    reason = why_unavailable()
    if reason is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"{reason}, and ASYNCORM_REQUIRE_POSTGRES=1 is set")
        pytest.skip(f"no throwaway PostgreSQL cluster: {reason}")
    cluster = Cluster()
    try:
        cluster.create()
        yield cluster
    finally:
        cluster.remove()


def require_pgbouncer() -> str:
    """The PostgreSQL URL for a pgbouncer to stand in front of; skips where pgbouncer is not
    installed, unless ASYNCORM_REQUIRE_POSTGRES=1 (``.ci/run`` installs it)."""
    url = postgres_url()
    if bouncer.binary() is None:
        reason = "pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)"
        if REQUIRE_POSTGRES:
            pytest.fail(f"{reason}, and ASYNCORM_REQUIRE_POSTGRES=1 is set")
        pytest.skip(reason)
    return url


@pytest.fixture(scope="session")
def pgbouncer() -> Iterator[bouncer.Bouncer]:
    """A real pgbouncer in transaction pooling mode in front of the test PostgreSQL server,
    with fewer server connections than the tests' clients; stopped at the end of the run
    (see tests/pgbouncer.py)."""
    running = bouncer.Bouncer(require_pgbouncer())
    try:
        running.start()
        yield running
    finally:
        running.stop()


_HOLD_WRITE_LOCK = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")
c.execute(sys.argv[2])
print("held", flush=True)
sys.stdin.readline()
c.execute(sys.argv[3])
"""


async def another_process_writing(
    path: str, statement: str, end: str
) -> asyncio.subprocess.Process:
    """Another process holding SQLite's write lock on ``path``: it has run BEGIN IMMEDIATE and
    ``statement`` when this returns, and ends its transaction with ``end`` (``COMMIT`` or
    ``ROLLBACK``) once a line is written to its stdin."""
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLD_WRITE_LOCK, path, statement, end,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert other.stdout is not None
    assert await other.stdout.readline() == b"held\n"
    return other
