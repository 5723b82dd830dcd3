"""``python -m asyncorm check URL``, run as a user runs it: a subprocess, on both backends,
through TLS and pgbouncer, and every way a connection fails."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from asyncorm._check import check as asyncorm_check
from tests.conftest import Backend
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


@pytest.fixture(scope="module")
def pgbouncer(pg_cluster: Cluster) -> Iterator[int]:
    """A pgbouncer in transaction pooling mode in front of the throwaway cluster."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = pg_cluster.dir / "pgbouncer.ini"
    config.write_text(
        f"[databases]\n* = host=127.0.0.1 port={pg_cluster.port}\n[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {pg_cluster.dir / 'userlist.txt'}\n"
        f"pool_mode = transaction\nlogfile = {pg_cluster.dir / 'pgbouncer.log'}\n"
        f"pidfile = {pg_cluster.dir / 'pgbouncer.pid'}\n"
    )
    (pg_cluster.dir / "userlist.txt").write_text('"postgres" ""\n')
    command = [binary, str(config)]
    if os.geteuid() == 0:
        for path in (config, pg_cluster.dir / "userlist.txt"):
            shutil.chown(path, "postgres")
        command = ["runuser", "-u", "postgres", "--", *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    output = []
    for line in process.stdout:  # its log, until it says it listens (or exits)
        output.append(line.decode(errors="replace"))
        if b"process up" in line:
            break
    else:
        pytest.fail(f"pgbouncer exited: {''.join(output)}")
    # keep reading its log, or a full pipe would stop it
    drain = threading.Thread(target=process.stdout.read, daemon=True)
    drain.start()
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        drain.join(timeout=10)
        process.stdout.close()


async def test_check_detects_a_pgbouncer_in_front(pg_cluster: Cluster, pgbouncer: int) -> None:
    url = make_url(pg_cluster.url()).set(port=pgbouncer).render_as_string(False)
    lines = await report(url)
    assert lines["pooler"] == (
        f"yes: the server listens on port {pg_cluster.port}, the URL's port is {pgbouncer} "
        f"(a pgbouncer or another proxy in front)"
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
