"""The engines' queue pool: SQLAlchemy's, with a pool timeout that says what to do about it.

SQLAlchemy's :class:`~sqlalchemy.pool.AsyncAdaptedQueuePool` raises
``TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out,
timeout 30.00")`` when no connection comes free in time. asyncorm's engines use this
subclass, which raises :class:`~asyncorm.PoolTimeoutError` (a subclass of that
``TimeoutError``) naming the engine, how many connections are checked out, the pool size,
the overflow and the timeout, and the usual causes (with the last failure to open a
connection, when one failed within the timeout).

It also keeps a waiter from sleeping through an outage it could see the end of (see
:meth:`QueuePool._keep_slot`), and serves waiting tasks first come, first served (see
:class:`FairQueue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.util import queue as sqla_queue
from sqlalchemy.util.concurrency import await_

from ._errors import PoolTimeoutError

__all__ = ["FairQueue", "QueuePool"]


class FairQueue(sqla_queue.AsyncAdaptedQueue[ConnectionPoolEntry]):
    """The pool's queue of idle connections, serving waiting tasks in the order they came.

    SQLAlchemy's asyncio queue lets a task that asks for a connection take an idle one at
    once, even while others wait: the task that returns a connection and loops straight into
    its next unit of work takes it back ahead of the waiter its return woke, and that waiter
    goes to the back of the line. Under sustained load (50 workers on 15 connections) a
    waiter can lose its turn until ``pool_timeout`` and fail though connections were
    returned all along (SQLAlchemy issue #7679, asyncpg #1247). Here a returned connection
    goes straight to the longest-waiting task, and a task that asks while others wait queues
    behind them.

    Example::

        engine = asyncorm.create_engine(url, pool_size=15)  # its pool uses a FairQueue
    """

    discard: Callable[[ConnectionPoolEntry], None] | None = None
    """Closes a connection handed to a waiter that gave up when no one else wants it and the
    queue is full (an overflow connection): the pool's return, set by :class:`QueuePool`."""

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        super().__init__(maxsize, use_lifo)
        self._waiters: deque[asyncio.Future[ConnectionPoolEntry]] = deque()

    def waiting(self) -> int:
        """How many tasks wait for a connection."""
        self._prune()
        return len(self._waiters)

    def _prune(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()  # timed out or cancelled

    def put_nowait(self, item: ConnectionPoolEntry) -> None:
        self._prune()
        if self._waiters:
            self._waiters.popleft().set_result(item)  # handed over: never idle in the queue
            return
        super().put_nowait(item)

    def put(
        self, item: ConnectionPoolEntry, block: bool = True, timeout: float | None = None
    ) -> None:
        self.put_nowait(item)  # the pool returns connections without blocking

    def get(self, block: bool = True, timeout: float | None = None) -> ConnectionPoolEntry:
        self._prune()
        if not self._waiters and not self.empty():
            return self.get_nowait()
        if not block:
            raise sqla_queue.Empty()
        surplus: list[ConnectionPoolEntry] = []
        try:
            return await_(self._wait(timeout, surplus))
        finally:
            for item in surplus:  # closed here, in the greenlet, where closing can await
                if self.discard is None:
                    raise sqla_queue.Full()
                self.discard(item)

    async def _wait(
        self, seconds: float | None, surplus: list[ConnectionPoolEntry]
    ) -> ConnectionPoolEntry:
        waiter: asyncio.Future[ConnectionPoolEntry] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(seconds):
                return await waiter
        except TimeoutError:
            self._pass_on(waiter, surplus)
            raise sqla_queue.Empty() from None
        except BaseException:  # cancelled while waiting
            self._pass_on(waiter, surplus)
            raise

    def _pass_on(
        self, waiter: asyncio.Future[ConnectionPoolEntry], surplus: list[ConnectionPoolEntry]
    ) -> None:
        """A waiter that gives up: a connection handed to it at that moment goes to the next.

        With no one next, it goes back to the queue; an overflow connection handed over as
        the queue filled up has no place there, and is left for :attr:`discard` (not raised:
        ``Full`` would replace the waiter's cancellation or timeout, and the connection and
        its overflow slot would be lost).
        """
        if waiter.done() and not waiter.cancelled():
            try:
                self.put_nowait(waiter.result())
            except sqla_queue.Full:
                surplus.append(waiter.result())
        else:
            waiter.cancel()
            with contextlib.suppress(ValueError):  # already pruned
                self._waiters.remove(waiter)


class QueuePool(AsyncAdaptedQueuePool):
    """:class:`~sqlalchemy.pool.AsyncAdaptedQueuePool` raising :class:`PoolTimeoutError`."""

    _queue_class = FairQueue
    label = "this engine"
    last_connect_failure: tuple[float, BaseException] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self._pool, FairQueue):
            self._pool.discard = self._do_return_conn  # closes it, and frees its overflow slot

    def _do_get(self) -> ConnectionPoolEntry:
        try:
            return super()._do_get()
        except sa_exc.TimeoutError:
            checked_out = self.checkedout()
            raise PoolTimeoutError(
                f"No connection of {self.label} came free within pool_timeout="
                f"{self.timeout():g} s: {checked_out} connection"
                f"{'s are' if checked_out != 1 else ' is'} checked out, the most the pool "
                f"holds (pool_size={self.size()} + max_overflow={self._max_overflow}). "
                f"Sessions or connections are held too long (one left open, a slow "
                f"transaction, a task awaiting something else mid-transaction): close them "
                f"sooner, or raise pool_size, max_overflow or pool_timeout.{self._failure_note()}"
            ) from None
        except Exception as exc:  # opening a connection failed (server down, restarting)
            self.last_connect_failure = (time.monotonic(), exc)
            self._keep_slot()
            raise

    def _keep_slot(self) -> None:
        """Keep the slot of a connection that failed to open in the pool, unconnected.

        SQLAlchemy's pool forgets an overflow connection whose connect failed and wakes none
        of the tasks waiting for a connection: during an outage every slot can fail that way,
        and the waiters then sleep their whole ``pool_timeout`` though the server may be back
        long before. A record that connects at checkout, as an invalidated pooled one does,
        takes the slot's place in the queue instead: a waiter gets it at once and connects
        (or fails at once, as this task did).
        """
        if not self._inc_overflow():
            return
        try:
            self._pool.put(_ConnectionRecord(self, connect=False), False)
        except sqla_queue.Full:
            self._dec_overflow()

    def _failure_note(self) -> str:
        """Why connections may be scarce: opening one failed lately (pool_timeout ago or less);
        SQLAlchemy's pool then wakes no waiter until a connection is returned."""
        if self.last_connect_failure is None:
            return ""
        when, exc = self.last_connect_failure
        ago = time.monotonic() - when
        if ago > self.timeout():
            return ""
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return (
            f" Opening a connection failed {ago:.1f} s ago ({type(exc).__name__}: "
            f"{reason[:120]}): if the server is down or restarting, that is the cause; new "
            f"connections are opened as soon as it answers."
        )

    @property
    def max_overflow(self) -> int:
        """Connections opened beyond ``pool_size`` when all are in use (-1: no limit)."""
        return self._max_overflow

    @property
    def recycle(self) -> int:
        """Seconds after which a connection is replaced at checkout (-1: never)."""
        return self._recycle

    def recreate(self) -> QueuePool:
        new: Any = super().recreate()  # on dispose(): the same settings, a fresh pool
        new.label = self.label
        return new  # type: ignore[no-any-return]
