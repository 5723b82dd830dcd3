"""PostgreSQL restarted under load: 50 workers run units of work while the server restarts.

On the throwaway cluster (tests/pgcluster.py). Units caught by the restart fail with asyncorm
errors that say what happened to their work, none hangs, none is half committed, and units
begun once the server is back all succeed: no dead pooled connection is handed out.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

from sqlalchemy import text

import asyncorm
from tests.pgcluster import Cluster

WORKERS = 50
# what a unit caught by the restart may raise, and how much of it may be in the database
EXPECTED = {
    "ConnectionLostError": {0},  # a statement's connection lost: rolled back by the server
    "DatabaseUnavailableError": {0},  # could not connect while the server was down
    "TransactionOutcomeUnknownError": {0, 2},  # lost at COMMIT: either, never half
}


async def test_units_of_work_through_a_server_restart(pg_cluster: Cluster) -> None:
    # fewer connections than workers: the pool serves its waiters in order (asyncorm's
    # FairQueue); with SQLAlchemy's queue a worker looping straight into its next unit took
    # the returned connection ahead of the woken waiter, which could starve until pool_timeout
    engine = asyncorm.create_engine(
        pg_cluster.url(query="sslmode=disable"), pool_size=15, max_overflow=0, pool_timeout=30
    )
    Session = asyncorm.async_sessionmaker(engine)
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS ledger"))
        await conn.execute(text("CREATE TABLE ledger (unit int NOT NULL, leg int NOT NULL)"))
    outcomes: dict[int, str] = {}
    started_after_restart: set[int] = set()
    next_unit = iter(range(1_000_000))
    restarted = False
    committed = 0
    committed_after = 0
    warmed_up, recovered, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def worker() -> None:
        nonlocal committed, committed_after
        while not stop.is_set():
            unit = next(next_unit)
            if restarted:
                started_after_restart.add(unit)
            try:
                async with Session.begin() as session:  # two legs: both or neither
                    await session.execute(
                        text("SELECT count(*) FROM ledger WHERE unit = :u"), {"u": unit}
                    )
                    for leg in (1, 2):
                        await session.execute(
                            text("INSERT INTO ledger VALUES (:u, :leg)"), {"u": unit, "leg": leg}
                        )
            except asyncorm.AsyncORMError as exc:
                outcomes[unit] = type(exc).__name__
                continue
            outcomes[unit] = "committed"
            committed += 1
            if committed == 100:
                warmed_up.set()
            if unit in started_after_restart:
                committed_after += 1
                if committed_after == 200:
                    recovered.set()

    try:
        async with asyncio.timeout(90):  # a hang fails the test instead of blocking the run
            workers = [asyncio.create_task(worker()) for _ in range(WORKERS)]
            try:
                await warmed_up.wait()
                await asyncio.to_thread(pg_cluster.restart)  # pg_ctl restart -m fast -w
                restarted = True
                await recovered.wait()
            finally:
                stop.set()
                await asyncio.gather(*workers)
        async with engine.connect() as conn:
            legs: dict[int, int] = dict(
                (await conn.execute(text("SELECT unit, count(*) FROM ledger GROUP BY unit"))).all()
            )
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()

    failures = Counter(name for name in outcomes.values() if name != "committed")
    assert set(failures) <= set(EXPECTED), failures
    assert failures["ConnectionLostError"] + failures["TransactionOutcomeUnknownError"] > 0
    for unit, outcome in outcomes.items():
        allowed = {2} if outcome == "committed" else EXPECTED[outcome]
        assert legs.get(unit, 0) in allowed, (unit, outcome, legs.get(unit, 0))
    assert set(legs) <= set(outcomes)
    # begun with the server back: every one committed, on live connections
    assert {outcomes[unit] for unit in started_after_restart} == {"committed"}


async def test_a_task_waiting_for_the_pool_is_woken_when_a_connect_fails() -> None:
    """SQLAlchemy's pool forgets a slot whose connect failed and wakes no waiter: during an
    outage, waiters slept their whole pool_timeout even after the server came back. The slot
    stays in the pool, unconnected: the waiter takes it at once and fails (or connects) now."""
    with socket.socket() as sock:  # a port nothing listens on: connects are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = asyncorm.create_engine(
        f"postgresql://app@127.0.0.1:{port}/app", pool_size=1, max_overflow=0, pool_timeout=600
    )
    try:
        # the first opens the pool's only connection; the second waits for it, and would
        # sleep its whole pool_timeout (the guard fails the test first)
        async with asyncio.timeout(30):
            first, second = await asyncio.gather(
                engine.connect().start(), engine.connect().start(), return_exceptions=True
            )
        for outcome in (first, second):
            assert isinstance(outcome, asyncorm.DatabaseUnavailableError), outcome
            assert f"at 127.0.0.1:{port}: connection refused" in str(outcome)
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
