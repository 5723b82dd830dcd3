"""A background worker: a pool of asyncio workers, each job one transactional unit.

Two ways to hand out jobs, the same unit of work behind both:

* ``--mode queue``: a producer puts job ids on an ``asyncio.Queue``; each worker takes one,
  runs it as a REPEATABLE READ unit (jobs updating one account at once conflict: the later
  one fails with a serialization error and is run again whole) and sends its notification
  from ``on_commit``.
* ``--mode table``: the jobs table is the queue. Each unit claims the oldest pending job
  with ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL: workers, here or in other
  processes, never wait for each other's jobs; SQLite ignores the clause, its units take
  turns anyway) and does it in the same transaction: a job is done exactly when its
  transaction commits.

SIGINT/SIGTERM stop it gracefully: no new job is taken, the jobs in flight finish (or, after
``--grace`` seconds, are cancelled and roll back), the engine is disposed.

    python examples/worker.py                        # both modes, a SQLite file
    python examples/worker.py --url postgresql://postgres@127.0.0.1/test --mode table
    python examples/worker.py --jobs 1000 --workers 8 --accounts 5
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import signal
import sys
from collections import Counter
from typing import Any

from sqlalchemy import ForeignKey, String, func, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import asyncorm


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "worker_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    balance: Mapped[int] = mapped_column(default=0)


class Job(Base):
    __tablename__ = "worker_jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("worker_accounts.id"))
    amount: Mapped[int]
    state: Mapped[str] = mapped_column(String(10), default="pending", index=True)


class Ledger(Base):
    """One row per applied job: the primary key makes applying a job twice impossible."""

    __tablename__ = "worker_ledger"
    job_id: Mapped[int] = mapped_column(ForeignKey("worker_jobs.id"), primary_key=True)
    account_id: Mapped[int]
    amount: Mapped[int]


class Worker:
    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.engine = asyncorm.create_engine(url)
        self.db = asyncorm.async_scoped_session(asyncorm.async_sessionmaker(self.engine))
        self.args = args
        self.stop = asyncio.Event()
        self.notified: Counter[int] = Counter()  # the side effect: one per committed job
        self.retries = 0
        self.busy: set[asyncio.Task[Any]] = set()
        self.announced = False
        db = self.db

        # REPEATABLE READ: two jobs that read-modify-write one account at once conflict, the
        # later writer gets a serialization failure and its whole unit runs again
        @db.transactional(retries=50, isolation_level="REPEATABLE READ", on_retry=self.count)
        async def apply_job(job_id: int) -> bool:
            """Queue mode: apply one job, whose id the queue gave."""
            job = await db.get_one(Job, job_id)
            if job.state == "done":  # already applied (idempotent)
                return False
            account = await db.get_one(Account, job.account_id)
            account.balance += job.amount  # read-modify-write: conflicts are retried
            self.finish(job)
            return True

        @db.transactional(retries=50, on_retry=self.count)
        async def claim_and_apply() -> bool:
            """Table mode: claim the oldest pending job and apply it; False if none."""
            job = await db.scalar(
                select(Job)
                .where(Job.state == "pending")
                .order_by(Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if job is None:
                return False
            await db.execute(
                update(Account)
                .where(Account.id == job.account_id)
                .values(balance=Account.balance + job.amount)
            )
            self.finish(job)
            return True

        self.apply_job = apply_job
        self.claim_and_apply = claim_and_apply

    def count(self, error: BaseException, attempt: int, pause: float) -> None:
        self.retries += 1

    def finish(self, job: Job) -> None:
        job.state = "done"
        self.db.add(Ledger(job_id=job.id, account_id=job.account_id, amount=job.amount))
        self.db.on_commit(lambda: self.notify(job.id))

    def notify(self, job_id: int) -> None:
        """The side effect of a job (an e-mail, a message): only once it is committed."""
        self.notified[job_id] += 1
        if not self.announced and self.args.announce:
            self.announced = True
            print("working", flush=True)  # a test waits for this line before signalling

    # -- setup and the two modes ----------------------------------------------------------

    async def create_jobs(self) -> list[int]:
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
        rng = random.Random(self.args.seed)
        async with self.db.scope() as session:
            session.add_all(Account(id=n, balance=0) for n in range(1, self.args.accounts + 1))
            jobs = [
                Job(account_id=rng.randint(1, self.args.accounts), amount=rng.randint(1, 100))
                for _ in range(self.args.jobs)
            ]
            session.add_all(jobs)
            await session.commit()
            return [job.id for job in jobs]

    async def run_queue(self, job_ids: list[int]) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue(maxsize=self.args.workers * 2)

        async def produce() -> None:
            for job_id in job_ids:
                if self.stop.is_set():
                    return
                await queue.put(job_id)

        async def work() -> None:
            while not self.stop.is_set():
                job_id = await queue.get()  # an idle worker is cancelled at shutdown
                await self.run_one(functools.partial(self.apply_job, job_id))
                queue.task_done()

        producer = asyncio.create_task(produce())
        workers = [asyncio.create_task(work()) for _ in range(self.args.workers)]
        finished = asyncio.create_task(self.all_done(producer, queue))
        await self.supervise([producer, *workers], finished)

    async def all_done(self, producer: asyncio.Task[None], queue: asyncio.Queue[int]) -> None:
        await producer
        await queue.join()

    async def run_table(self) -> None:
        async def work() -> None:
            while not self.stop.is_set():
                if not await self.run_one(self.claim_and_apply):
                    return  # no pending job left (a long-running worker would poll or LISTEN)

        workers = [asyncio.create_task(work()) for _ in range(self.args.workers)]
        finished = asyncio.create_task(self.wait_all(workers))
        await self.supervise(workers, finished)

    @staticmethod
    async def wait_all(tasks: list[asyncio.Task[None]]) -> None:
        await asyncio.wait(tasks)

    async def run_one(self, unit: Any) -> bool:
        """Run one unit; a failed job is reported and the worker goes on."""
        task = asyncio.current_task()
        assert task is not None
        self.busy.add(task)
        try:
            return bool(await unit())
        except asyncorm.TransactionOutcomeUnknownError as exc:
            print(f"outcome unknown, the job's state will tell: {exc}", file=sys.stderr)
        except asyncorm.OnCommitError as exc:
            print(f"committed, but its notification failed: {exc}", file=sys.stderr)
        except Exception as exc:
            print(f"job failed and was rolled back: {exc!r}", file=sys.stderr)
        finally:
            self.busy.discard(task)
        return False

    async def supervise(self, tasks: list[asyncio.Task[Any]], finished: asyncio.Task[None]) -> None:
        """Wait for the work to finish, or for a signal: then stop taking jobs, let those in
        flight finish for ``--grace`` seconds, cancel what is left (it rolls back)."""
        stopping = asyncio.create_task(self.stop.wait())
        await asyncio.wait([finished, stopping], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task not in self.busy:  # idle: waiting for a job
                task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=self.args.grace)
        for task in pending:
            task.cancel()  # in a unit: its transaction rolls back, it is not retried
        await asyncio.wait(tasks)
        for task in (finished, stopping):
            task.cancel()
        await asyncio.wait([finished, stopping])

    # -- the check --------------------------------------------------------------------------

    async def report(self, mode: str) -> None:
        async with self.db.scope() as session:
            done = await session.scalar(select(func.count()).where(Job.state == "done"))
            pending = await session.scalar(select(func.count()).where(Job.state != "done"))
            ledger = await session.scalar(select(func.count()).select_from(Ledger))
            applied = await session.scalar(select(func.coalesce(func.sum(Ledger.amount), 0)))
            total = await session.scalar(select(func.coalesce(func.sum(Account.balance), 0)))
        once = all(count == 1 for count in self.notified.values())
        exact = done == ledger == len(self.notified) and applied == total and once
        print(f"{mode}: {done} jobs done, {pending} pending, {self.retries} retries")
        print(f"{mode}: every done job applied and notified exactly once: {exact}")
        print(f"{mode}: connections checked out: {self.engine.pool.checkedout()}")  # type: ignore[attr-defined]


async def run(url: str, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    for mode in (["queue", "table"] if args.mode == "both" else [args.mode]):
        worker = Worker(url, args)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop.set)
        try:
            job_ids = await worker.create_jobs()
            if mode == "queue":
                await worker.run_queue(job_ids)
            else:
                await worker.run_table()
            await worker.db.wait_closed()
            await worker.report(mode)
        finally:
            await worker.engine.dispose()
        if worker.stop.is_set():
            print("stopped by a signal")
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("ASYNCORM_URL", "sqlite:///worker.db"))
    parser.add_argument("--mode", choices=["queue", "table", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--accounts", type=int, default=10, help="fewer: more conflicts")
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--announce", action="store_true", help='print "working" once busy')
    args = parser.parse_args()
    asyncio.run(run(args.url, args))


if __name__ == "__main__":
    main()
