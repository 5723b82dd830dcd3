"""W6 in one process: asyncorm's writer turn against raw aiosqlite behind an asyncio.Lock.

``python -m benchmarks.w6_profile [--runs N] [--transfers N] [--cprofile]``

Alternates raw and asyncorm runs of W6 (``Session.begin()`` transfers, the harness's own
trial) and reports per transfer, median over the runs:

* wall time and event-loop thread CPU (``time.thread_time``);
* asyncorm's writer turn: how long it is held (taken to released), the loop CPU spent while
  it is held (by every task, not only the holder), and the handoff: from one holder's release
  to the next holder having it (the waiter's wake-up, and what the loop runs before it);
* the loop's idle time (waiting in ``select``) and the cyclic garbage collector's time;
* one task doing the same transfers one after another: each phase's loop CPU; and the
  floors: SQLAlchemy's sync ``Session`` doing them on pysqlite, and in one greenlet on
  asyncorm's engine;
* with ``--cprofile``, one asyncorm run by layer and its costliest functions (loop thread
  CPU; cProfile inflates many small calls, so read the shares, not the totals).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import greenlet_spawn

from asyncorm import _sqlite
from benchmarks._bench import Bench, open_bench
from benchmarks._core import ASYNCORM, FULL, RAW, Counters, Trial
from benchmarks._schema import Account
from benchmarks.profile import layer_of
from benchmarks.workloads import select_cases

__all__ = ["main"]


class _GCClock:
    """Time spent in the cyclic garbage collector, by generation."""

    def __init__(self) -> None:
        self.spent = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._start = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            generation = info["generation"]
            self.spent[generation] += time.perf_counter() - self._start
            self.count[generation] += 1

    def reset(self) -> None:
        self.spent = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]


class _TurnClock:
    """Timestamps of the writer turn, taken by wrapping the profile's acquire and release."""

    def __init__(self) -> None:
        self.held: list[float] = []
        self.held_cpu: list[float] = []
        self.handoff: list[float] = []
        self._taken: tuple[float, float] | None = None
        self._released: float | None = None

    def install(self) -> None:
        profile = _sqlite._SQLiteProfile
        acquire, release = profile._acquire, profile._release
        clock = self

        def timed_acquire(self: Any, slot: Any, conn: Any) -> None:
            acquire(self, slot, conn)
            now = time.perf_counter()
            if clock._released is not None:
                clock.handoff.append(now - clock._released)
                clock._released = None
            clock._taken = (now, time.thread_time())

        def timed_release(self: Any, key: object, *, changed: bool = True) -> None:
            holding = [s.holding for s in self._slots.values()]
            release(self, key, changed=changed)
            if clock._taken is not None and any(h is not None and h.key is key for h in holding):
                now = time.perf_counter()
                clock.held.append(now - clock._taken[0])
                clock.held_cpu.append(time.thread_time() - clock._taken[1])
                clock._taken = None
                clock._released = now

        self._originals = (acquire, release)
        profile._acquire = timed_acquire  # type: ignore[method-assign]
        profile._release = timed_release  # type: ignore[method-assign]

    def uninstall(self) -> None:
        profile = _sqlite._SQLiteProfile
        profile._acquire, profile._release = self._originals  # type: ignore[method-assign]

    def reset(self) -> None:
        self.held.clear()
        self.held_cpu.clear()
        self.handoff.clear()
        self._taken = self._released = None


def _trial(trial: Trial | None) -> _Trial:
    assert trial is not None
    assert trial.setup is not None
    assert trial.check is not None
    return _Trial(trial.run, trial.setup, trial.check)


@dataclasses.dataclass(frozen=True)
class _Trial:
    run: Callable[[], Awaitable[int]]
    setup: Callable[[], Awaitable[None]]
    check: Callable[[], Awaitable[Counters]]


def _us(values: list[float]) -> str:
    if not values:
        return "-"
    return (
        f"{statistics.median(values) * 1e6:,.0f} us (mean {statistics.fmean(values) * 1e6:,.0f}, "
        f"p90 {_p90(values) * 1e6:,.0f}, n {len(values)})"
    )


def _p90(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.9)]


async def _main(args: argparse.Namespace) -> int:
    clock, gc_clock = _TurnClock(), _GCClock()
    clock.install()
    gc_clock.install()
    try:
        return await _measure(args, clock, gc_clock)
    finally:
        clock.uninstall()
        gc_clock.uninstall()
        gc.unfreeze()


async def _measure(args: argparse.Namespace, clock: _TurnClock, gc_clock: _GCClock) -> int:
    gc_counts: dict[str, list[float]] = {}
    sizes = dataclasses.replace(FULL, items=200, transfers=args.transfers)
    (case,) = [c for c in select_cases({"W6"}) if "begin" in c.title]
    with tempfile.TemporaryDirectory(prefix="asyncorm-w6-") as tmp:
        bench = await open_bench("sqlite", sizes, postgres_url="", workdir=Path(tmp))
        try:
            trials = {c: _trial(case.build(bench, c)) for c in (RAW, ASYNCORM)}
            keys = ("wall", "cpu", "held", "held_cpu", "handoff", "gc", "idle")
            figures = {c: {key: list[float]() for key in keys} for c in trials}
            for trial in trials.values():
                await trial.setup()
                await trial.run()
            if args.gc_freeze:
                gc.collect()
                gc.freeze()  # what an application may do once started: see docs/performance.md
            selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
            select = selector.select
            idle = [0.0]

            def timed_select(timeout: float | None = None) -> Any:
                start = time.perf_counter()
                try:
                    return select(timeout)
                finally:
                    idle[0] += time.perf_counter() - start

            selector.select = timed_select  # the loop is asyncio.run()'s, closed after
            for _ in range(args.runs):
                for contender, trial in trials.items():
                    await trial.setup()
                    clock.reset()
                    idle[0] = 0.0
                    gc_clock.reset()
                    start, cpu = time.perf_counter(), time.thread_time()
                    done = await trial.run()
                    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
                    counters = await trial.check()
                    assert counters["sum"] == counters["expected"], counters
                    assert counters["errors"] == 0, counters
                    mine = figures[contender]
                    mine["wall"].append(wall / done)
                    mine["cpu"].append(cpu / done)
                    mine["gc"].append(sum(gc_clock.spent) / done)
                    mine["idle"].append(idle[0] / done)
                    gc_counts[contender] = [
                        *gc_clock.count,
                        *(round(t * 1e3, 1) for t in gc_clock.spent),
                    ]
                    if contender == ASYNCORM:
                        mine["held"] += clock.held
                        mine["held_cpu"] += clock.held_cpu
                        mine["handoff"] += clock.handoff
            raw, orm = figures[RAW], figures[ASYNCORM]
            ratios = [r / o for r, o in zip(raw["wall"], orm["wall"], strict=True)]
            print(f"W6, {args.transfers} transfers, {args.runs} runs each (median; spread)")
            for name, mine in figures.items():
                print(
                    f"  {name:9} wall/transfer {_us(mine['wall'])}, "
                    f"{1 / statistics.median(mine['wall']):,.0f} txns/s, "
                    f"loop CPU/transfer {_us(mine['cpu'])}, "
                    f"loop idle in select {_us(mine['idle'])}, "
                    f"in the GC {_us(mine['gc'])}, "
                    f"last run's collections by generation, then their ms, {gc_counts[name]}"
                )
            print(
                f"  ratio asyncorm/raw per run: median {statistics.median(ratios):.2f}x, "
                f"range {min(ratios):.2f}-{max(ratios):.2f}x"
            )
            print(f"  writer turn held        {_us(orm['held'])}")
            print(f"  loop CPU while held     {_us(orm['held_cpu'])}")
            print(f"  handoff release->taken  {_us(orm['handoff'])}")
            await _sequential(bench, args.transfers)
            await _floors(bench, Path(tmp), args.transfers)
            if args.cprofile:
                trial = trials[ASYNCORM]
                await trial.setup()
                profiler = cProfile.Profile(time.thread_time)
                profiler.enable()
                await trial.run()
                profiler.disable()
                await trial.check()
                stats = pstats.Stats(profiler)
                by_layer: dict[str, float] = {}
                raw_stats: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
                for (filename, _line, name), (_cc, _nc, tottime, _ct, _c) in raw_stats.items():
                    layer = layer_of(filename, name)
                    by_layer[layer] = by_layer.get(layer, 0.0) + tottime
                total = sum(by_layer.values())
                print(f"  cProfile, one run: {total / args.transfers * 1e6:,.0f} us per transfer")
                for layer, spent in sorted(by_layer.items(), key=lambda kv: -kv[1]):
                    print(f"    {spent / args.transfers * 1e6:6,.0f} us  {layer}")
                stats.sort_stats(args.sort).print_stats(args.top)
        finally:
            await bench.close()
    return 0


async def _sequential(bench: Bench, transfers: int) -> None:
    """One task, one transfer after another: each phase's loop CPU (only this task runs)."""
    rng = random.Random(6)
    plan = [(*rng.sample(range(1, 11), 2), rng.randint(1, 10)) for _ in range(transfers)]
    make = bench.factory(ASYNCORM)
    phases = {"open": 0.0, "get 1": 0.0, "get 2": 0.0, "commit+close": 0.0}
    clock = time.thread_time
    for _ in range(2):
        for key in phases:
            phases[key] = 0.0
        wall = time.perf_counter()
        for src, dst, amount in plan:
            t0 = clock()
            context = make.begin()
            session = await context.__aenter__()
            t1 = clock()
            a = await session.get(Account, src)
            t2 = clock()
            b = await session.get(Account, dst)
            t3 = clock()
            assert a is not None
            assert b is not None
            a.balance -= amount
            b.balance += amount
            await context.__aexit__(None, None, None)
            t4 = clock()
            phases["open"] += t1 - t0
            phases["get 1"] += t2 - t1
            phases["get 2"] += t3 - t2
            phases["commit+close"] += t4 - t3
        wall = time.perf_counter() - wall
    total = sum(phases.values())
    shown = ", ".join(f"{k} {v / transfers * 1e6:,.0f}" for k, v in phases.items())
    print(
        f"  one task, asyncorm: loop CPU/transfer {total / transfers * 1e6:,.0f} us ({shown}), "
        f"wall {wall / transfers * 1e6:,.0f} us"
    )


async def _floors(bench: Bench, workdir: Path, transfers: int) -> None:
    """What SQLAlchemy's own work costs per transfer, one task, no concurrency.

    * its sync ``Session`` on pysqlite, no asyncio and no thread (SQLite's own work
      included, on the same thread): the same statements (BEGIN IMMEDIATE, two SELECTs, one
      UPDATE of two rows, COMMIT);
    * the same sync ``Session`` run whole in one greenlet on asyncorm's engine: SQLAlchemy's
      work plus asyncorm's dialect hooks and four trips to aiosqlite's thread, without the
      async session layer.
    """
    rng = random.Random(6)
    plan = [(*rng.sample(range(1, 11), 2), rng.randint(1, 10)) for _ in range(transfers)]
    sync_engine = sqlalchemy.create_engine(f"sqlite:///{workdir / 'floor.db'}")

    @sqlalchemy.event.listens_for(sync_engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # BEGIN is emitted below
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @sqlalchemy.event.listens_for(sync_engine, "begin")
    def _begin(connection: sqlalchemy.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    Account.metadata.create_all(sync_engine, tables=[Account.__table__])  # type: ignore[list-item]
    with Session(sync_engine) as session, session.begin():
        session.add_all([Account(id=i, balance=100) for i in range(1, 11)])
    on_pysqlite = sessionmaker(sync_engine, expire_on_commit=False)
    engine = bench.engines[ASYNCORM]
    on_asyncorm = sessionmaker(engine.sync_engine, expire_on_commit=False)

    def move(maker: sessionmaker[Session]) -> None:
        for src, dst, amount in plan:
            with maker.begin() as session:
                a = session.get(Account, src)
                b = session.get(Account, dst)
                assert a is not None
                assert b is not None
                a.balance -= amount
                b.balance += amount

    try:
        for name, in_greenlet in (
            ("sync Session on pysqlite, no asyncio", False),
            ("sync Session in one greenlet, asyncorm's engine", True),
        ):
            cpu = []
            for _ in range(3):
                start = time.thread_time()
                if in_greenlet:
                    await greenlet_spawn(move, on_asyncorm)
                else:
                    move(on_pysqlite)
                cpu.append((time.thread_time() - start) / transfers)
            print(f"  one task, {name}: loop CPU/transfer {_us(cpu)}")
    finally:
        sync_engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.w6_profile")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--transfers", type=int, default=500)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--switch-interval", type=float, default=None)
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() once warm, before measuring"
    )
    args = parser.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
