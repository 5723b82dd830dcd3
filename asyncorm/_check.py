"""``python -m asyncorm check URL``: connect with asyncorm's engine and report its settings.

On success it prints one ``name  value`` line per setting (driver, server, pool, the SQLite
pragmas or PostgreSQL's TLS, pooler and timeouts, round-trip latency) and exits 0. When it
cannot connect it prints one line to stderr saying why (refused, host not found, timed out,
authentication failed, unknown database, TLS refused or required, a bad URL) and exits 1
(2 for a bad URL). The password is never printed.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import socket
import statistics
import time
from typing import Any, TextIO

import sqlalchemy
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from ._engine import create_engine, redact_url
from ._errors import AsyncORMError, ConfigurationError, DatabaseUnavailableError
from ._pgbouncer import enabled as pgbouncer_enabled

__all__ = ["check"]

ROUND_TRIPS = 5


async def check(url: str, out: TextIO, err: TextIO) -> int:
    """Connect to ``url``, print its report to ``out``; on failure one line to ``err``.

    Returns the process exit code: 0 connected, 1 could not connect, 2 bad URL.
    """
    try:
        engine = create_engine(url)
    except ConfigurationError as exc:
        print(f"asyncorm check: {exc}", file=err)
        return 2
    shown = redact_url(url)
    database = _sqlite_file(url) if engine.dialect.name == "sqlite" else None
    if database is not None and not await asyncio.to_thread(os.path.exists, database):
        print(
            f"asyncorm check: cannot use {shown}: no such file {database!r} (the check does "
            f"not create it; asyncorm would, on first use)",
            file=err,
        )
        await engine.dispose()
        return 1
    try:
        async with engine.connect() as conn:
            lines = [("url", shown), *_driver(engine.url)]
            if engine.dialect.name == "sqlite":
                lines += await _sqlite(conn, url)
            else:
                lines += await _postgresql(conn, engine.url)
            lines += [("pool", _pool(engine.pool)), ("round trip", await _latency(conn))]
    except Exception as exc:
        line = _why(exc, engine.url)
        if engine.url.password:
            line = line.replace(str(engine.url.password), "***")
        print(f"asyncorm check: cannot use {shown}: {line}", file=err)
        return 1
    finally:
        await engine.dispose()
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name.ljust(width)}  {value}", file=out)
    return 0


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _driver(url: URL) -> list[tuple[str, str]]:
    driver = url.get_driver_name()
    return [("driver", f"{driver} {_version(driver)}, SQLAlchemy {sqlalchemy.__version__}")]


async def _sqlite(conn: AsyncConnection, url: str) -> list[tuple[str, str]]:
    async def scalar(sql: str) -> Any:
        return (await conn.exec_driver_sql(sql)).scalar()

    lines = [
        ("server", f"SQLite {await scalar('SELECT sqlite_version()')}"),
        ("database", _sqlite_file(url) or "in memory"),
        ("journal mode", str(await scalar("PRAGMA journal_mode"))),
        ("foreign keys", "on" if await scalar("PRAGMA foreign_keys") else "off"),
        ("busy timeout", f"{await scalar('PRAGMA busy_timeout')} ms"),
    ]
    await conn.rollback()
    return lines


def _sqlite_file(url: str) -> str | None:
    database = make_url(url).database
    return None if database in (None, "", ":memory:") or "mode=memory" in url else database


_PG_INFO = (
    "SELECT current_setting('server_version'), current_database(), current_user, "
    "s.ssl, s.version, s.cipher, inet_server_port(), "
    "current_setting('statement_timeout'), current_setting('lock_timeout') "
    "FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()"
)


async def _postgresql(conn: AsyncConnection, url: URL) -> list[tuple[str, str]]:
    row = tuple((await conn.exec_driver_sql(_PG_INFO)).one())
    version, database, user, ssl, tls_version, cipher, server_port = row[:7]
    await conn.rollback()
    return [
        ("server", f"PostgreSQL {version}, database {database!r} as {user!r}"),
        ("tls", f"on ({tls_version}, {cipher})" if ssl else "off (not encrypted)"),
        ("pooler", _pooler(url, server_port)),
        ("timeouts", f"statement_timeout={row[7]}, lock_timeout={row[8]}"),
    ]


def _pooler(url: URL, server_port: int | None) -> str:
    """Whether something (pgbouncer, a proxy) stands between us and the server: the port the
    server listens on is not the one we connected to."""
    ports = {url.port or 5432}
    hosts = url.query.get("host")
    if isinstance(hosts, tuple):
        ports = {int(token.rpartition(":")[2]) for token in hosts if ":" in token}
    mode = pgbouncer_enabled(url)
    if server_port is None:
        found = "unknown (connected through a Unix socket)"
    elif server_port in ports:
        found = "none detected (the server itself answers on this port)"
    else:
        found = (
            f"yes: the server listens on port {server_port}, the URL's port is "
            f"{'/'.join(map(str, sorted(ports)))} (a pgbouncer or another proxy in front)"
        )
        if not mode:
            return (
                f"{found}; if it pools transactions (pgbouncer's pool_mode=transaction), "
                f"add ?pgbouncer=true to the URL"
            )
    return f"{found}; pgbouncer=true: no prepared statement is kept" if mode else found


def _pool(pool: Any) -> str:
    kind = type(pool).__name__
    if not hasattr(pool, "max_overflow"):
        return kind
    recycle = f"{pool.recycle} s" if pool.recycle >= 0 else "off"
    return (
        f"pool_size={pool.size()}, max_overflow={pool.max_overflow}, "
        f"pool_timeout={pool.timeout():g} s, pool_recycle={recycle}"
    )


async def _latency(conn: AsyncConnection) -> str:
    times = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter()
        await conn.exec_driver_sql("SELECT 1")
        times.append((time.perf_counter() - start) * 1000)
    await conn.rollback()
    return (
        f"{statistics.median(times):.2f} ms median of {ROUND_TRIPS} SELECT 1 "
        f"(min {min(times):.2f} ms)"
    )


_SQLSTATES = {
    "28P01": "authentication failed",
    "28000": "the server refused the login",
    "3D000": "unknown database",
    "57P03": "the server is starting up or shutting down",
    "53300": "too many connections",
}


def _why(exc: BaseException, url: URL) -> str:
    """One line: what went wrong while connecting, in the user's terms."""
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    if isinstance(exc, DatabaseUnavailableError) and isinstance(exc.__cause__, Exception):
        exc = exc.__cause__  # the driver's own error: said in one short line below
    if isinstance(exc, AsyncORMError):
        return str(exc)
    if isinstance(exc, sa_exc.DBAPIError):
        orig = exc.orig
        cause = orig.__cause__ if orig is not None and orig.__cause__ is not None else orig
        message = " ".join(str(getattr(orig, "args", [orig])[0] or orig).split())
        sqlstate = getattr(orig, "sqlstate", None)
        if sqlstate == "28000" and "no encryption" in message:
            return f"TLS required: {message}; add ?sslmode=require to the URL"
        if sqlstate in _SQLSTATES:
            return f"{_SQLSTATES[sqlstate]}: {message}"
        if "rejected SSL upgrade" in message or "rejected SSL upgrade" in str(cause):
            return f"TLS refused: the server at {where} does not accept TLS ({message})"
        return message
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused at {where}: is the server running and on that port?"
    if isinstance(exc, socket.gaierror):
        return f"host name {url.host!r} not found ({exc.strerror})"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"no answer from {where} in time (connect_timeout)"
    if isinstance(exc, ConnectionError) and "SSL" in str(exc):
        return f"TLS refused: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({where})"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
