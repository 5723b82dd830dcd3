"""Micro benchmark of the session registry: ``db()`` lookup and scope enter/exit, no IO.

Run it::

    python -m benchmarks.registry_bench            # ~10 s
    python -m benchmarks.registry_bench --quick    # ~1 s, for CI smoke runs

Every figure is the best of several repeats of a timed loop, in microseconds per operation.
The sessions are bound to an in-memory SQLite engine that is never connected: nothing here
does IO, so the figures are the registry's own cost (plus SQLAlchemy's session creation where
a session is created). Targets from issue 3: lookup under 2 us, scope enter+exit under 20 us.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import asyncorm
from asyncorm import _scope

__all__ = ["Figure", "main", "measure"]


@dataclass(frozen=True)
class Figure:
    """One measured operation: microseconds per op, and its target if it has one."""

    name: str
    micros: float
    target: float | None = None

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "ok" if self.micros < self.target else "OVER TARGET"


class _Base(DeclarativeBase):
    pass


class _Row(_Base):
    """A mapped class to add to a session; never flushed, so no table is needed."""

    __tablename__ = "registry_bench_rows"
    id: Mapped[int] = mapped_column(primary_key=True)


async def _best(op: Callable[[int], Awaitable[float]], n: int, repeats: int) -> float:
    """Best per-op time in microseconds over ``repeats`` runs of ``op(n)`` (which times n ops)."""
    await op(max(1, n // 10))  # warm-up
    return min([await op(n) for _ in range(repeats)]) / n * 1e6


async def measure(n: int = 50_000, repeats: int = 7) -> list[Figure]:
    """Run every measurement on the running loop and return the figures."""
    engine = asyncorm.create_engine("sqlite://")
    db = asyncorm.async_scoped_session(asyncorm.async_sessionmaker(engine))
    figures: list[Figure] = []

    async def lookup_in_scope(count: int) -> float:
        async with db.scope():
            start = time.perf_counter()
            for _ in range(count):
                db()
            return time.perf_counter() - start

    async def lookup_task_owned(count: int) -> float:
        async def body() -> float:
            db()
            start = time.perf_counter()
            for _ in range(count):
                db()
            return time.perf_counter() - start

        return await asyncio.create_task(body())

    async def proxy_call(count: int) -> float:
        async with db.scope():
            start = time.perf_counter()
            for _ in range(count):
                db.in_transaction()
            return time.perf_counter() - start

    async def direct_call(count: int) -> float:
        async with db.scope() as session:
            start = time.perf_counter()
            for _ in range(count):
                session.in_transaction()
            return time.perf_counter() - start

    @db.scoped
    async def scoped_noop() -> None:
        pass

    @db.scoped
    async def scoped_lookup() -> None:
        db()

    async def scoped_call(count: int, fn: Callable[[], Awaitable[None]]) -> float:
        start = time.perf_counter()
        for _ in range(count):
            await fn()
        return time.perf_counter() - start

    async def scope_unused(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            async with db.scope():
                pass
        return time.perf_counter() - start

    async def scope_with_pending_object(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            async with db.scope() as session:
                session.add(_Row(id=1))
        return time.perf_counter() - start

    async def sqlalchemy_session_with_pending_object(count: int) -> float:
        factory = db.session_factory
        start = time.perf_counter()
        for _ in range(count):
            async with factory() as session:
                session.add(_Row(id=1))
        return time.perf_counter() - start

    async def plain_session(count: int) -> float:
        factory = db.session_factory
        start = time.perf_counter()
        for _ in range(count):
            factory()
        return time.perf_counter() - start

    async def task_owned_lifecycle(count: int) -> float:
        async def body() -> None:
            db()

        start = time.perf_counter()
        for _ in range(count):
            await asyncio.create_task(body())
        return time.perf_counter() - start

    async def bare_task(count: int) -> float:
        async def body() -> None:
            pass

        start = time.perf_counter()
        for _ in range(count):
            await asyncio.create_task(body())
        return time.perf_counter() - start

    async def creation_site(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            _scope._creation_site()
        return time.perf_counter() - start

    async def tracking(count: int) -> float:
        sessions = [db.session_factory() for _ in range(count)]
        task = asyncio.current_task()
        assert task is not None
        start = time.perf_counter()
        for session in sessions:
            tracker = _scope._Tracker(session, db._abandoned)
            tracker.site = _scope._creation_site()
            tracker.task_name = task.get_name()
            db._live.add(tracker)
            db._live.discard(tracker)
        return time.perf_counter() - start

    small = max(1, n // 5)
    figures.append(
        Figure("db() in a scope (session exists)", await _best(lookup_in_scope, n, repeats), 2.0)
    )
    figures.append(
        Figure("db() in a task, outside any scope", await _best(lookup_task_owned, n, repeats), 2.0)
    )
    figures.append(Figure("db.in_transaction() via the proxy", await _best(proxy_call, n, repeats)))
    figures.append(
        Figure("session.in_transaction() directly", await _best(direct_call, n, repeats))
    )
    figures.append(
        Figure(
            "@db.scoped call, no db() (lazy scope)",
            await _best(lambda c: scoped_call(c, scoped_noop), small, repeats),
            20.0,
        )
    )
    figures.append(
        Figure(
            "@db.scoped call with one db()",
            await _best(lambda c: scoped_call(c, scoped_lookup), small, repeats),
            20.0,
        )
    )
    figures.append(
        Figure("async with db.scope(): pass", await _best(scope_unused, small, repeats), 20.0)
    )
    figures.append(
        Figure(
            "async with db.scope(): add(obj) (shielded close)",
            await _best(scope_with_pending_object, small, repeats),
        )
    )
    figures.append(
        Figure(
            "  vs async with Session() as s: s.add(obj)",
            await _best(sqlalchemy_session_with_pending_object, small, repeats),
        )
    )
    figures.append(
        Figure(
            "  of which: creating the AsyncSession",
            await _best(plain_session, small, repeats),
        )
    )
    figures.append(
        Figure("task + db() + close at task end", await _best(task_owned_lifecycle, small, repeats))
    )
    figures.append(Figure("  of which: the bare task", await _best(bare_task, small, repeats)))
    figures.append(
        Figure(
            "tracking a session (weakref, site, live set)", await _best(tracking, small, repeats)
        )
    )
    figures.append(
        Figure("  of which: creation-site capture", await _best(creation_site, n, repeats))
    )
    await engine.dispose()
    return figures


def render(figures: list[Figure]) -> str:
    width = max(len(f.name) for f in figures)
    lines = [f"{'operation':<{width}}  {'us/op':>8}  target"]
    for f in figures:
        target = f"< {f.target:g} us {f.verdict}" if f.target is not None else ""
        lines.append(f"{f.name:<{width}}  {f.micros:>8.2f}  {target}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.registry_bench")
    parser.add_argument("--quick", action="store_true", help="small loops, one repeat")
    args = parser.parse_args(argv)
    n, repeats = (5_000, 2) if args.quick else (50_000, 7)
    figures = asyncio.run(measure(n, repeats))
    print(f"asyncorm registry micro benchmark (Python {sys.version.split()[0]}, no IO)")
    print(render(figures))
    return 0 if all(f.verdict != "OVER TARGET" for f in figures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
