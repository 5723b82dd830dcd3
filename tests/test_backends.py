"""The ``backend`` fixture: PostgreSQL tests skip with one reason, or fail when required."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket is closed


def _run_transfers_test(require: bool) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ASYNCORM_TEST_POSTGRES_URL": f"postgresql://postgres@127.0.0.1:{_closed_port()}/x",
        "ASYNCORM_REQUIRE_POSTGRES": "1" if require else "0",
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
         "tests/test_engine.py", "-k", "interleaved_sessions_never and rollback"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_unreachable_postgres_skips_with_one_visible_reason() -> None:
    done = _run_transfers_test(require=False)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 1 skipped" in done.stdout
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 1
    assert "PostgreSQL at 127.0.0.1:" in skips[0]
    assert "is unreachable" in skips[0]


def test_unreachable_postgres_fails_when_required() -> None:
    done = _run_transfers_test(require=True)
    assert done.returncode == 1, done.stdout
    assert "1 passed" in done.stdout
    assert "1 error" in done.stdout
    assert "is unreachable" in done.stdout
    assert "ASYNCORM_REQUIRE_POSTGRES=1 is set" in done.stdout
