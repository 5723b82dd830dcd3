"""examples/worker.py under load and under SIGTERM/SIGINT, as a subprocess, on both backends.

Every job the example reports done was applied exactly once (its ledger row, its amount in
the balances, one notification from on_commit); a signal mid-run stops it with nothing
half-done and no connection left open. The test reads the database itself afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

import asyncorm
from tests.conftest import Backend

WORKER = Path(__file__).parent.parent / "examples" / "worker.py"


def command(backend: Backend, *args: str) -> list[str]:
    return [sys.executable, "-W", "error", str(WORKER), "--url", backend.url, *args]


async def database_state(backend: Backend) -> tuple[int, int, int, int, int]:
    """(done jobs, ledger rows, sum of ledger amounts, sum of balances, backends of this
    database idle in a transaction)."""
    engine = asyncorm.create_engine(backend.url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT (SELECT count(*) FROM worker_jobs WHERE state = 'done'), "
                        "(SELECT count(*) FROM worker_ledger), "
                        "(SELECT coalesce(sum(amount), 0) FROM worker_ledger), "
                        "(SELECT coalesce(sum(balance), 0) FROM worker_accounts)"
                    )
                )
            ).one()
            idle = 0
            if not backend.is_sqlite:
                idle = int(
                    await conn.scalar(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND state LIKE 'idle in transaction%'"
                        )
                    )
                    or 0
                )
        return int(row[0]), int(row[1]), int(row[2]), int(row[3]), idle
    finally:
        await engine.dispose()


async def run_worker(backend: Backend, cwd: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command(backend, *args),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(300):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode or 0, out.decode(), err.decode()


async def check_jobs(backend: Backend, mode: str, cwd: Path, jobs: int) -> None:
    code, out, err = await run_worker(
        backend, cwd, "--mode", mode, "--jobs", str(jobs), "--workers", "8", "--accounts", "50"
    )
    assert code == 0, err
    assert err == ""
    assert f"{mode}: {jobs} jobs done, 0 pending" in out
    assert f"{mode}: every done job applied and notified exactly once: True" in out
    assert f"{mode}: connections checked out: 0" in out
    done, ledger, applied, balances, idle = await database_state(backend)
    assert (done, ledger, idle) == (jobs, jobs, 0)
    assert applied == balances


async def test_a_thousand_queued_jobs_on_eight_workers_are_each_applied_once(
    backend: Backend, tmp_path: Path
) -> None:
    """Jobs that update the same one of 50 accounts at once conflict and are retried."""
    await check_jobs(backend, "queue", tmp_path, 1000)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # SQLite: the same turns
async def test_jobs_claimed_with_skip_locked_by_eight_workers_are_each_applied_once(
    backend: Backend, tmp_path: Path
) -> None:
    await check_jobs(backend, "table", tmp_path, 400)


@pytest.mark.parametrize(
    ("mode", "sig", "grace"),
    [
        ("queue", signal.SIGTERM, "10"),  # the jobs in flight finish
        ("table", signal.SIGINT, "10"),
        ("table", signal.SIGTERM, "0"),  # the jobs in flight are cancelled: they roll back
    ],
)
async def test_a_signal_mid_run_stops_with_nothing_half_done(
    backend: Backend, mode: str, sig: signal.Signals, grace: str, tmp_path: Path
) -> None:
    process = await asyncio.create_subprocess_exec(
        *command(backend, "--mode", mode, "--jobs", "1000", "--workers", "8"),
        "--announce",
        "--grace",
        grace,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(120):
            first = await process.stdout.readline()  # a job has committed: it is working
            assert first == b"working\n"
            process.send_signal(sig)
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    assert err == b""
    output = out.decode()
    assert "stopped by a signal" in output
    assert f"{mode}: every done job applied and notified exactly once: True" in output
    assert f"{mode}: connections checked out: 0" in output
    jobs, ledger, applied, balances, idle = await database_state(backend)
    assert f"{mode}: {jobs} jobs done, {1000 - jobs} pending" in output
    assert 0 < jobs < 1000  # stopped mid-run
    assert (ledger, idle) == (jobs, 0)
    assert applied == balances
