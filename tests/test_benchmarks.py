"""Smoke tests of the benchmark harness (benchmarks/): it runs, and writes its table.

``--quick`` sizes on each backend; no timing is asserted anywhere, only that every case
was measured for every contender and that the output files exist.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

import benchmarks.run
from benchmarks import sqlite_trips
from benchmarks._core import ASYNCORM, RAW, SQLALCHEMY, Case, Result
from benchmarks._report import render_backend
from benchmarks.run import main
from tests.conftest import postgres_url

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(360)  # every workload, seven contenders: ~1 min alone, more on a busy machine
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_quick_run_writes_the_table(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--quick", "--backend", backend, "--out", str(tmp_path)]
    if backend == "postgresql":
        args += ["--postgres-url", postgres_url()]

    assert main(args) == 0

    _assert_peers_left_no_global_state()
    out = capsys.readouterr().out
    assert "| workload | unit/s | raw driver | SQLAlchemy | asyncorm |" in out
    results = (tmp_path / "RESULTS.md").read_text(encoding="utf-8")
    for case in (
        "W1 request read, 1 task",
        "W1 request read, 20 tasks",
        "W2 read-modify-write, 20 tasks",
        "W3 bulk insert, fastest path",
        "W3 bulk insert, ORM bulk both",
        "W4 load as ORM objects",
        "W4 load as rows",
        "W4 load as rows, Core on the session",
        "W5 identity-map get()",
    ):
        assert f"| {case} |" in results
    assert "failed" not in results
    assert "| SQLAlchemy |" in results  # the machine section names the versions
    # W1 with one task has the sync Session reference (pysqlite / psycopg) on both backends
    w1 = next(line for line in results.splitlines() if line.startswith("| W1 request read, 1"))
    sync_cell = w1.split("|")[6].strip()
    assert sync_cell != "-", w1
    assert sync_cell.endswith("x)"), w1
    if backend == "sqlite":
        # W6 is SQLite only; asyncorm's transfers keep the money (a correctness check):
        # declared units of work without a single error, plain sessions by refusing the
        # transfers whose snapshot went stale (WriteConflictError), never by losing money
        assert (
            "W6 concurrent transfers, Session.begin(), asyncorm: sum 1,000 (expected 1,000), "
            "errors 0"
        ) in results
        assert "W6 concurrent transfers, asyncorm: sum 1,000 (expected 1,000)" in results
    else:
        assert "W6" not in results
        # the raw driver without asyncpg's pool reset, and asyncorm's ratio to it
        assert "| raw, no pool reset |" in results
        assert "| asyncorm / raw, no pool reset |" in results
    _assert_peers_measured(results)


def _assert_peers_measured(results: str) -> None:
    """Tortoise ORM and Piccolo ran W1, W2 and W4 objects; asyncorm's ratio to each shows."""
    if importlib.util.find_spec("tortoise") is None or importlib.util.find_spec("piccolo") is None:
        return  # optional contenders (the bench extra)
    assert "Skipped" not in results
    header = next(line for line in results.splitlines() if line.startswith("| workload"))
    columns = [cell.strip() for cell in header.split("|")]
    assert {"Tortoise", "Piccolo", "asyncorm / Tortoise", "asyncorm / Piccolo"} <= set(columns)
    tortoise, piccolo = columns.index("asyncorm / Tortoise"), columns.index("asyncorm / Piccolo")
    for case in ("W1 request read, 1 task", "W2 read-modify-write, 20 tasks",
                 "W4 load as ORM objects"):  # fmt: skip
        row = next(line for line in results.splitlines() if line.startswith(f"| {case} |"))
        cells = [cell.strip() for cell in row.split("|")]
        assert cells[tortoise].endswith(("x", "x ~")), row
        assert cells[piccolo].endswith(("x", "x ~")), row


def _assert_peers_left_no_global_state() -> None:
    """Tortoise's context and SQL cache, Piccolo's table registry: nothing left behind."""
    if importlib.util.find_spec("tortoise") is not None:
        from tortoise.backends.base.executor import EXECUTOR_CACHE
        from tortoise.context import get_current_context

        assert get_current_context() is None
        assert not [key for key in EXECUTOR_CACHE if str(key[0]).startswith("bench_")]
    if importlib.util.find_spec("piccolo") is not None:
        from piccolo.table import TABLE_REGISTRY

        assert not [t for t in TABLE_REGISTRY if t._meta.tablename.startswith("bench_")]


def test_a_backend_that_cannot_open_is_skipped_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def cannot_open(*args: object, **kwargs: object) -> NoReturn:
        raise RuntimeError("sorry, too many clients already")

    monkeypatch.setattr(benchmarks.run, "open_bench", cannot_open)

    assert main(["--quick", "--backend", "sqlite", "--out", str(tmp_path)]) == 0

    assert "Skipping SQLite: could not load the data or open the pools" in capsys.readouterr().err
    results = (tmp_path / "RESULTS.md").read_text(encoding="utf-8")
    assert "Skipped: SQLite: could not load the data or open the pools (RuntimeError: sorry" in (
        results
    )


def test_only_rejects_an_unknown_workload(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--only", "W1,W99"]) == 2
    assert "unknown workload(s) W99" in capsys.readouterr().err


def test_python_dash_m_benchmarks_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout
    assert "--backend {sqlite,postgresql}" in done.stdout


def test_a_difference_inside_the_noise_is_marked() -> None:
    """The "asyncorm / SQLAlchemy" cell says when the repeats overlap (the run's noise)."""
    case = Case("W9", "example", "ops", lambda bench, contender: None)

    def cell(ours: list[float], theirs: list[float]) -> str:
        results = [
            Result("sqlite", case, RAW, samples=[100.0]),
            Result("sqlite", case, SQLALCHEMY, samples=theirs),
            Result("sqlite", case, ASYNCORM, samples=ours),
        ]
        row = next(line for line in render_backend("sqlite", results).splitlines() if "W9" in line)
        return row.split("|")[-3].strip()

    assert cell([9.0, 10.0, 11.0], [10.5, 12.0, 13.0]) == "0.83x ~"  # overlapping repeats
    assert cell([9.0, 10.0, 10.4], [10.5, 12.0, 13.0]) == "0.83x"  # slower in every repeat
    assert cell([20.0, 21.0, 22.0], [10.0, 11.0, 12.0]) == "1.91x"


def test_the_profiler_sorts_functions_into_layers() -> None:
    """``python -m benchmarks.profile`` charges each function's self time to its layer."""
    from benchmarks.profile import Profile, layer_of, render

    site = "/venv/lib/python3.11/site-packages"
    assert layer_of(f"{site}/sqlalchemy/pool/base.py", "_checkout") == (
        "SA pool checkout and checkin"
    )
    assert layer_of(f"{site}/sqlalchemy/orm/session.py", "__init__") == (
        "SA session: construction, transaction, close"
    )
    assert layer_of(f"{site}/sqlalchemy/orm/loading.py", "instances") == (
        "SA ORM statement and loading"
    )
    assert layer_of("/repo/asyncorm/_session.py", "get") == "asyncorm: session layer"
    assert layer_of("/repo/asyncorm/_aiosqlite.py", "_run") == (
        "asyncorm: dialect and adapter hooks"
    )
    assert layer_of("~", "<method 'switch' of 'greenlet.greenlet' objects>") == (
        "greenlet bridge and SA asyncio layer"
    )
    assert layer_of(f"{site}/tortoise/models.py", "get") == "Tortoise ORM"
    shares = {"asyncorm: session layer": 0.25, "SA events": 0.75}
    table = render(
        [Profile(ASYNCORM, "W1 request read, 1 task", 400.0, 500.0, shares, [])], "sqlite"
    )
    assert "| event-loop thread CPU per operation | 400 us |" in table
    assert "| asyncorm: session layer | 25% |" in table
    assert "| SA events | 75% |" in table


def test_the_sqlite_trips_micro_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert sqlite_trips.main(["--quick", "-n", "20", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| asyncorm W1, ROLLBACK inline (now) |" in out
    assert "| no trip: a 1,000-row scan inline on the loop | " in out


def test_the_w6_profile_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import w6_profile

    assert w6_profile.main(["--runs", "1", "--transfers", "20"]) == 0
    out = capsys.readouterr().out
    assert "ratio asyncorm/raw per run" in out
    assert "writer turn held" in out
    assert "one task, asyncorm: loop CPU/transfer" in out
    assert "one task, sync Session on pysqlite, no asyncio: loop CPU/transfer" in out
