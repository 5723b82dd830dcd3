"""``python -m asyncorm check URL``, run as a user runs it: a subprocess, on both backends,
through TLS and pgbouncer, and every way a connection fails."""

from __future__ import annotations

import io
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

from asyncorm._check import check as asyncorm_check
from tests.conftest import Backend
from tests.pgbouncer import Bouncer
from tests.pgcluster import PASSWORD_USER, TLS_ONLY_USER, Cluster


def run(url: str) -> subprocess.CompletedProcess[str]:
    """The command in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "asyncorm", "check", url],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def check(url: str) -> subprocess.CompletedProcess[str]:
    """The same command in this process (a process costs seconds on a loaded machine)."""
    out, err = io.StringIO(), io.StringIO()
    code = await asyncorm_check(url, out, err)
    return subprocess.CompletedProcess([url], code, out.getvalue(), err.getvalue())


def parse(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in done.stdout.splitlines())


async def report(url: str) -> dict[str, str]:
    return parse(await check(url))


def test_check_reports_the_engine_on_each_backend(backend: Backend, tmp_path: Path) -> None:
    url = backend.url
    if backend.is_sqlite:
        sqlite3.connect(tmp_path / "test.db").close()  # the check opens, never creates
    else:  # a password is accepted (trust) and must never be printed
        url = url.replace("postgres@", "postgres:s3cret-pw@")
    lines = parse(run(url))
    assert set(lines) >= {"url", "driver", "server", "pool", "round trip"}
    assert lines["pool"] == "pool_size=5, max_overflow=10, pool_timeout=30 s, pool_recycle=off"
    assert re.fullmatch(r"[\d.]+ ms median of 5 SELECT 1 \(min [\d.]+ ms\)", lines["round trip"])
    if backend.is_sqlite:
        assert lines["driver"].startswith("aiosqlite ")
        assert lines["journal mode"] == "wal"
        assert lines["foreign keys"] == "on"
        assert lines["busy timeout"] == "30000 ms"
        assert lines["database"] == str(tmp_path / "test.db")
    else:
        assert lines["driver"].startswith("asyncpg ")
        assert lines["server"].startswith("PostgreSQL ")
        assert lines["pooler"].startswith("none detected")
        assert lines["timeouts"] == "statement_timeout=0, lock_timeout=0"
        assert "s3cret-pw" not in repr(lines)
        assert lines["url"] == url.replace("s3cret-pw", "***")


async def test_check_on_sqlite_in_memory() -> None:
    lines = await report("sqlite://")
    assert (lines["database"], lines["foreign keys"]) == ("in memory", "on")


async def test_check_reports_tls(pg_cluster: Cluster) -> None:
    lines = await report(pg_cluster.url(query="sslmode=require"))
    assert re.fullmatch(r"on \(TLSv1\.[23], \S+\)", lines["tls"])
    assert (await report(pg_cluster.url(query="sslmode=disable")))["tls"] == "off (not encrypted)"


async def test_check_detects_a_pgbouncer_in_front(pgbouncer: Bouncer) -> None:
    """(tests/test_pgbouncer.py checks what it says of pgbouncer=true.)"""
    lines = await report(pgbouncer.url())
    assert lines["pooler"].startswith(
        f"yes: the server listens on port {pgbouncer.server.port or 5432}, the URL's port is "
        f"{pgbouncer.port} (a pgbouncer or another proxy in front)"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def fails(url: str, code: int = 1) -> str:
    done = await check(url)
    assert (done.returncode, done.stdout) == (code, "")
    assert done.stderr.count("\n") == 1, done.stderr  # one line
    assert "s3cret-pw" not in done.stderr
    return done.stderr.strip()


async def test_check_failures_are_one_clear_line(pg_cluster: Cluster, tmp_path: Path) -> None:
    user, _ = PASSWORD_USER
    wrong_password = await fails(pg_cluster.url(user=f"{user}:s3cret-pw"))
    assert wrong_password.endswith(
        f'authentication failed: password authentication failed for user "{user}"'
    )
    unknown = await fails(pg_cluster.url(database="nowhere"))
    assert unknown.endswith('unknown database: database "nowhere" does not exist')
    no_tls = await fails(pg_cluster.url(user=TLS_ONLY_USER, query="sslmode=disable"))
    assert "TLS required: pg_hba.conf rejects connection" in no_tls
    assert no_tls.endswith("no encryption; add ?sslmode=require to the URL")
    tls = await fails(pg_cluster.url(query=f"sslmode=verify-full&sslrootcert={pg_cluster.ca}"))
    assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in tls
    no_host = await fails("postgresql://app:s3cret-pw@no-such-host.invalid/app")
    assert "host name 'no-such-host.invalid' not found" in no_host
    missing = tmp_path / "missing.db"
    assert await fails(f"sqlite:///{missing}") == (
        f"asyncorm check: cannot use sqlite:///{missing}: no such file '{missing}' (the "
        f"check does not create it; asyncorm would, on first use)"
    )
    assert not missing.exists()
    bad = await fails("mysql://app:s3cret-pw@db/app", code=2)
    assert bad.startswith("asyncorm check: Unsupported database URL 'mysql://app:***@db/app'")
    assert "Unknown parameter 'sslmdoe'" in await fails("postgresql://u@h/x?sslmdoe=1", code=2)


def test_check_as_a_process_fails_with_one_line_and_exit_1() -> None:
    port = _free_port()
    done = run(f"postgresql://app:s3cret-pw@127.0.0.1:{port}/app")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"asyncorm check: cannot use postgresql://app:***@127.0.0.1:{port}/app: connection "
        f"refused at 127.0.0.1:{port}: is the server running and on that port?\n"
    )


def test_check_usage_errors() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "asyncorm"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "usage: python -m asyncorm" in done.stderr
