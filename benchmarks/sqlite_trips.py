"""Micro benchmark: what a SQLite request read costs in trips to aiosqlite's thread (issue 13).

Run it::

    python -m benchmarks.sqlite_trips              # ~1 min
    python -m benchmarks.sqlite_trips --quick      # a few seconds, for smoke runs

One operation is a W1-shaped read on a WAL file of 1,000 rows: the primary-key SELECT of
one row, with the transaction around it that each alternative needs. The trip alternatives
run on one aiosqlite connection, opened with ``check_same_thread=False`` so that the inline
ones may call its ``sqlite3`` connection from the event loop (between trips, never during
one). Then the whole asyncorm W1 request (a session, ``get()``, close) with and without the
inline end of its read snapshot (``asyncorm._inline_end``), on engines over the same file.

For each alternative: wall time and event-loop CPU (``time.thread_time`` of the loop's
thread) per operation, medians of the repeats, which run interleaved (each repeat times
every alternative once, in turn). Last, the event loop's latency: how late a 1 ms timer fires
(median, 99th percentile, maximum) while 1 or 20 tasks read in a loop (yielding to the loop
between reads, as a request's other awaits would), with the SELECT sent to the thread or run inline:
what an inline statement costs every other task of the loop. Also a 1,000-row scan, the
kind of statement an inline mode would run on the loop by mistake.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import asyncorm
import asyncorm._aiosqlite
import asyncorm._inline_end

__all__ = ["main"]

ROWS = 1_000
SQL = "SELECT id, name, qty FROM trip_items WHERE id = ?"


class _Base(DeclarativeBase):
    pass


class TripItem(_Base):
    __tablename__ = "trip_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    qty: Mapped[int]


def _make_db(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE trip_items (id INTEGER PRIMARY KEY, name VARCHAR(50) NOT NULL, "
        "qty INTEGER NOT NULL)"
    )
    conn.executemany(
        "INSERT INTO trip_items VALUES (?, ?, ?)", [(i, f"item {i}", i % 7) for i in range(ROWS)]
    )
    conn.close()


# -- functions run on aiosqlite's thread (one trip each) ---------------------------------------


def _select(conn: sqlite3.Connection, pk: int) -> list[Any]:
    return conn.execute(SQL, (pk,)).fetchall()


def _begin_select(conn: sqlite3.Connection, pk: int) -> list[Any]:
    conn.execute("BEGIN")
    return conn.execute(SQL, (pk,)).fetchall()


def _begin_select_rollback(conn: sqlite3.Connection, pk: int) -> list[Any]:
    conn.execute("BEGIN")
    rows = conn.execute(SQL, (pk,)).fetchall()
    conn.rollback()
    return rows


def _scan(conn: sqlite3.Connection) -> list[Any]:
    return conn.execute("SELECT id, name, qty FROM trip_items").fetchall()


Op = Callable[[int], Awaitable[Any]]


def _alternatives(driver: aiosqlite.Connection) -> dict[str, Op]:
    raw: sqlite3.Connection = driver._conn
    execute: Any = driver._execute

    async def one_trip_select(pk: int) -> None:
        await execute(_select, raw, pk)

    async def two_trips(pk: int) -> None:  # asyncorm before: BEGIN + SELECT, then ROLLBACK
        await execute(_begin_select, raw, pk)
        await execute(raw.rollback)

    async def rollback_inline(pk: int) -> None:  # asyncorm now
        await execute(_begin_select, raw, pk)
        raw.rollback()

    async def one_trip_with_end(pk: int) -> None:  # the end batched with the last statement
        await execute(_begin_select_rollback, raw, pk)

    async def all_inline(pk: int) -> None:  # no thread at all
        _begin_select_rollback(raw, pk)

    async def select_inline(pk: int) -> None:
        _select(raw, pk)

    loop = asyncio.get_running_loop()

    async def executor(pk: int) -> None:  # what asyncio.to_thread does
        await loop.run_in_executor(None, _select, raw, pk)

    return {
        "one trip: SELECT, no transaction (raw aiosqlite; no BEGIN)": one_trip_select,
        "two trips: BEGIN + SELECT, then ROLLBACK (asyncorm before)": two_trips,
        "one trip: BEGIN + SELECT; ROLLBACK inline on the loop (asyncorm now)": rollback_inline,
        "one trip: BEGIN + SELECT + ROLLBACK (end batched with the statement)": one_trip_with_end,
        "no trip: BEGIN + SELECT + ROLLBACK inline on the loop": all_inline,
        "no trip: SELECT inline on the loop, no transaction": select_inline,
        "run_in_executor: SELECT (asyncio.to_thread)": executor,
    }


class _StatementsInline(asyncorm._inline_end.InlineEndConnection):
    """An experiment, not adopted: every statement runs on the loop while the thread is idle
    (what an opt-in "inline short statements" mode would do for a primary-key read)."""

    __slots__ = ()

    async def call(self, begin: str | None, sql: str, params: Any, many: bool) -> Any:
        calls = self._calls
        if calls is None or not calls.idle:
            return await super().call(begin, sql, params, many)
        if begin is not None:
            self._begun = True
        try:
            outcome = asyncorm._aiosqlite._run(self._connection._conn, begin, sql, params, many)
        except Exception:
            self.settle()
            raise
        self._begun = outcome[4]
        return outcome


class _StatementsInlineDBAPI(asyncorm._inline_end.InlineEndDBAPI):
    def connect(self, *arg: Any, **kw: Any) -> Any:
        adapted = super().connect(*arg, **kw)
        return _StatementsInline(self, adapted._connection, inline=True)


def _asyncorm_w1(path: Path, *, inline: str) -> tuple[Any, Op]:
    module: Any = {
        "none": asyncorm._aiosqlite.OneTripDBAPI,
        "end": asyncorm._inline_end.InlineEndDBAPI,
        "all": _StatementsInlineDBAPI,
    }[inline]()
    engine = asyncorm.create_engine(f"sqlite:///{path}", pool_size=20, module=module)
    Session = asyncorm.async_sessionmaker(engine)

    async def op(pk: int) -> None:
        async with Session() as session:
            await session.get(TripItem, pk)

    return engine, op


@dataclass
class Figure:
    name: str
    wall: list[float]
    cpu: list[float]

    @property
    def wall_us(self) -> float:
        return statistics.median(self.wall) * 1e6

    @property
    def cpu_us(self) -> float:
        return statistics.median(self.cpu) * 1e6


async def _time(op: Op, pks: list[int]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    for pk in pks:
        await op(pk)
    return (time.perf_counter() - wall) / len(pks), (time.thread_time() - cpu) / len(pks)


async def _time_tasks(op: Op, pks: list[int], tasks: int) -> tuple[float, float]:
    """Like :func:`_time`, with ``tasks`` tasks sharing the operations."""

    async def worker(share: list[int]) -> None:
        for pk in share:
            await op(pk)

    wall, cpu = time.perf_counter(), time.thread_time()
    await asyncio.gather(*(worker(pks[i::tasks]) for i in range(tasks)))
    return (time.perf_counter() - wall) / len(pks), (time.thread_time() - cpu) / len(pks)


async def _lag(op: Op, pks: list[int], tasks: int) -> tuple[float, float, float]:
    """How late (ms) a 1 ms timer fires while ``tasks`` tasks run ``op`` over ``pks``."""
    late: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            start = loop.time()
            await asyncio.sleep(0.001)
            late.append((loop.time() - start - 0.001) * 1e3)

    async def worker(share: list[int]) -> None:
        for pk in share:
            await op(pk)
            await asyncio.sleep(0)  # the rest of a request: other tasks run between reads

    tick = asyncio.create_task(ticker())
    await asyncio.gather(*(worker(pks[i::tasks]) for i in range(tasks)))
    done.set()
    await tick
    late.sort()
    return statistics.median(late), late[int(len(late) * 0.99)], late[-1]


async def run(n: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trips.db"
        _make_db(path)
        rng = random.Random(1)
        pks = [rng.randrange(ROWS) for _ in range(n)]
        driver = await aiosqlite.connect(path, isolation_level=None, check_same_thread=False)
        engines: list[Any] = []
        try:
            cases = _alternatives(driver)
            for label, inline in (
                ("asyncorm W1, ROLLBACK as a trip (before)", "none"),
                ("asyncorm W1, ROLLBACK inline (now)", "end"),
                ("asyncorm W1, statements inline too (experiment)", "all"),
            ):
                engine, op = _asyncorm_w1(path, inline=inline)
                engines.append(engine)
                cases[label] = op
            figures = {name: Figure(name, [], []) for name in cases}
            for op in cases.values():
                await _time(op, pks[: max(1, n // 10)])  # warm-up: connections, caches
            for _ in range(repeats):
                for name, op in cases.items():
                    wall, cpu = await _time(op, pks)
                    figures[name].wall.append(wall)
                    figures[name].cpu.append(cpu)
            print(f"{n:,} operations x {repeats} repeats; medians per operation\n")
            print("| what | wall | loop CPU |\n|---|---:|---:|")
            for figure in figures.values():
                print(f"| {figure.name} | {figure.wall_us:.0f} us | {figure.cpu_us:.0f} us |")
            orm = [name for name in cases if name.startswith("asyncorm")]
            concurrent = {name: Figure(name, [], []) for name in orm}
            for name in orm:
                await _time_tasks(cases[name], pks[: max(20, n // 10)], 20)  # 20 connections
            for _ in range(repeats):
                for name in orm:
                    wall, cpu = await _time_tasks(cases[name], pks, 20)
                    concurrent[name].wall.append(wall)
                    concurrent[name].cpu.append(cpu)
            print("\n20 tasks (pools of 20): per operation\n")
            print("| what | wall | loop CPU |\n|---|---:|---:|")
            for figure in concurrent.values():
                print(f"| {figure.name} | {figure.wall_us:.0f} us | {figure.cpu_us:.0f} us |")

            async def scan_trip(pk: int) -> None:
                await execute(_scan, raw)

            async def scan_inline(pk: int) -> None:
                _scan(raw)

            execute: Any = driver._execute
            raw: sqlite3.Connection = driver._conn
            lag_cases = {
                name: cases[name]
                for name in (
                    "one trip: SELECT, no transaction (raw aiosqlite; no BEGIN)",
                    "no trip: SELECT inline on the loop, no transaction",
                    *orm,
                )
            }
            lag_cases["one trip: a 1,000-row scan"] = scan_trip
            lag_cases["no trip: a 1,000-row scan inline on the loop"] = scan_inline
            lags: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
            for _ in range(repeats):
                for name, op in lag_cases.items():
                    for tasks in (1, 20):
                        lag = await _lag(op, pks[: max(tasks, n // 3)], tasks)
                        lags.setdefault((name, tasks), []).append(lag)
            print(
                "\nEvent-loop latency: how late a 1 ms timer fires (ms; medians of the repeats)\n"
            )
            print(
                "| reads | 1 task: median | p99 | max | 20 tasks: median | p99 | max |\n"
                "|---|---:|---:|---:|---:|---:|---:|"
            )
            for name in lag_cases:
                cells = []
                for tasks in (1, 20):
                    runs = lags[(name, tasks)]
                    cells += [f"{statistics.median(r[i] for r in runs):.2f}" for i in range(3)]
                print(f"| {name} | {' | '.join(cells)} |")
        finally:
            await driver.close()
            for engine in engines:
                await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sqlite_trips")
    parser.add_argument("--quick", action="store_true", help="a few seconds: a smoke run")
    parser.add_argument("-n", type=int, default=None, help="operations per repeat")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    n = args.n or (200 if args.quick else 3_000)
    repeats = args.repeats or (2 if args.quick else 5)
    asyncio.run(run(n, repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
