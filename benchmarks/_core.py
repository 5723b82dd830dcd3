"""The harness's vocabulary: contenders, sizes, cases, trials and results."""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks._bench import Bench

__all__ = [
    "ASYNCORM",
    "BACKENDS",
    "FULL",
    "LABELS",
    "ORM_CONTENDERS",
    "PEERS",
    "PICCOLO",
    "POOL_SIZE",
    "POSTGRESQL",
    "QUICK",
    "RAW",
    "RAW_NO_RESET",
    "SQLALCHEMY",
    "SQLITE",
    "STANDARD",
    "SYNC",
    "TORTOISE",
    "Case",
    "Counters",
    "OpErrors",
    "Result",
    "Sizes",
    "Trial",
    "geomean",
    "spread",
]

RAW = "raw"
"""The driver on its own: asyncpg's pool, or aiosqlite connections in a small pool."""
SQLALCHEMY = "sqlalchemy"
"""Stock ``create_async_engine`` + ``async_sessionmaker`` with SQLAlchemy's defaults."""
ASYNCORM = "asyncorm"
"""``asyncorm.create_engine`` + ``asyncorm.async_sessionmaker``."""
SYNC = "sync"
"""SQLAlchemy's sync ``Session`` on a sync SQLite engine: W5's baseline."""
RAW_NO_RESET = "raw_no_reset"
"""PostgreSQL only: asyncpg's pool without its reset on release (``Pool(reset=...)`` with a
reset that sends nothing): the driver's physical limit. asyncorm sends no reset either."""
TORTOISE = "tortoise"
"""Tortoise ORM (optional, the ``bench`` extra): its asyncpg backend with a pool of 20, or its
aiosqlite backend, used as its documentation shows (``Model.get``, ``in_transaction``)."""
PICCOLO = "piccolo"
"""Piccolo (optional, the ``bench`` extra): ``PostgresEngine`` with a connection pool of 20,
or ``SQLiteEngine``, used as its documentation shows (``objects().get``, ``transaction``)."""

STANDARD = (RAW, SQLALCHEMY, ASYNCORM)
ORM_CONTENDERS = (SQLALCHEMY, ASYNCORM)
PEERS = (TORTOISE, PICCOLO)
"""The async ORMs a user could pick instead of asyncorm (issue 13): W1, W2 and W4 objects."""
LABELS = {
    RAW: "raw driver",
    RAW_NO_RESET: "raw, no pool reset",
    SQLALCHEMY: "SQLAlchemy",
    ASYNCORM: "asyncorm",
    SYNC: "sync Session",
    TORTOISE: "Tortoise",
    PICCOLO: "Piccolo",
}

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
BACKENDS = (SQLITE, POSTGRESQL)

POOL_SIZE = 20
"""Connections per contender in a full run, opened before any timing (``pool_size=20,
max_overflow=0`` for both engines, ``min_size=max_size=20`` for the asyncpg pools of raw,
Tortoise and Piccolo). ``--quick`` uses :attr:`Sizes.pool` = 4 so that a smoke run fits
a server's default 100 connections beside other users."""

Counters = dict[str, int]
"""What a trial counted besides time: errors, a final sum, ..."""


@dataclass(frozen=True)
class Sizes:
    """How much work one repeat of each workload does."""

    items: int
    """Rows in ``bench_items``: W1/W2 pick from them, W4 loads them all."""
    requests: int
    """W1 sessions per repeat."""
    writes: int
    """W2 read-modify-write transactions per repeat."""
    bulk: int
    """W3 rows inserted per repeat."""
    hits: int
    """W5 identity-map ``get()`` calls per repeat."""
    transfers: int
    """W6 concurrent transfers per repeat."""
    accounts: int
    """W6 accounts, each starting with a balance of 100."""
    think_requests: int
    """W8 requests per repeat (20 at a time)."""
    repeats: int
    """Timed repeats per contender; the table shows the median."""
    short_repeats: int
    """Repeats for the cases whose single run is short (W4, W5), where noise weighs more."""
    pool: int = POOL_SIZE
    """Connections per contender's pool (W1/W2 still run 20 tasks: with a smaller pool they
    queue for connections)."""


FULL = Sizes(
    items=20_000, requests=1_000, writes=500, bulk=20_000, hits=20_000,
    transfers=500, accounts=10, think_requests=100, repeats=5, short_repeats=15,
)  # fmt: skip
QUICK = Sizes(
    items=200, requests=20, writes=10, bulk=200, hits=200,
    transfers=20, accounts=10, think_requests=20, repeats=1, short_repeats=1, pool=4,
)  # fmt: skip


@dataclass
class Trial:
    """One contender's implementation of one case.

    ``setup`` and ``teardown`` run before and after every repeat, untimed; ``run`` is the
    timed part and returns the number of operations it completed; ``check`` runs after
    every repeat, untimed, and reports what it counted (errors, a final sum).
    """

    run: Callable[[], Awaitable[int]]
    setup: Callable[[], Awaitable[None]] | None = None
    teardown: Callable[[], Awaitable[None]] | None = None
    check: Callable[[], Awaitable[Counters]] | None = None


@dataclass(frozen=True)
class Case:
    """One row of the results table: a workload variant measured for several contenders.

    ``build(bench, contender)`` returns that contender's :class:`Trial`, or None when the
    contender does not apply on ``bench.backend`` (the table shows "-"). Ratios in the
    table are to ``baseline``. ``target`` is the issue's goal for asyncorm as a ratio to
    the baseline, shown in the table (never asserted). ``short`` cases (a run takes a
    fraction of a second) get ``Sizes.short_repeats`` repeats.
    """

    key: str
    title: str
    unit: str
    build: Callable[[Bench, str], Trial | None]
    contenders: tuple[str, ...] = STANDARD
    baseline: str = RAW
    backends: tuple[str, ...] = BACKENDS
    target: float | None = None
    short: bool = False

    def repeats(self, sizes: Sizes) -> int:
        return sizes.short_repeats if self.short else sizes.repeats

    @property
    def name(self) -> str:
        return f"{self.key} {self.title}"


@dataclass
class Result:
    """The measurements of one contender on one case and backend."""

    backend: str
    case: Case
    contender: str
    samples: list[float] = field(default_factory=list)
    """Operations per second, one per timed repeat."""
    counters: list[Counters] = field(default_factory=list)
    """What each repeat's check counted."""
    error: str | None = None
    """Why the trial could not be measured, if it failed."""

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples and not self.error else None


def geomean(values: Sequence[float]) -> float | None:
    """The geometric mean of positive ``values``, None when there are none."""
    positive = [v for v in values if v > 0]
    if not positive:
        return None
    return math.exp(sum(math.log(v) for v in positive) / len(positive))


class OpErrors:
    """Errors raised by individual operations: counted, and the first one kept."""

    def __init__(self) -> None:
        self.count = 0
        self.first: BaseException | None = None

    def add(self, exc: BaseException) -> None:
        self.count += 1
        if self.first is None:
            self.first = exc


async def spread(
    n: int, concurrency: int, op: Callable[[int], Awaitable[None]], errors: OpErrors
) -> int:
    """Run ``op(0) .. op(n - 1)`` on ``concurrency`` tasks; return how many succeeded.

    An operation that raises is counted in ``errors`` and the run goes on; when every
    operation failed, the first error is raised (the harness, not the contender, is broken).
    """

    async def worker(start: int) -> int:
        done = 0
        for i in range(start, n, concurrency):
            try:
                await op(i)
            except Exception as exc:
                errors.add(exc)
            else:
                done += 1
        return done

    if concurrency == 1:
        done = await worker(0)
    else:
        done = sum(await asyncio.gather(*(worker(k) for k in range(concurrency))))
    if done == 0 and errors.first is not None:
        raise errors.first
    return done
