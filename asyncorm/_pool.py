"""The engines' queue pool: SQLAlchemy's, with a pool timeout that says what to do about it.

SQLAlchemy's :class:`~sqlalchemy.pool.AsyncAdaptedQueuePool` raises
``TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out,
timeout 30.00")`` when no connection comes free in time. asyncorm's engines use this
subclass, which raises :class:`~asyncorm.PoolTimeoutError` (a subclass of that
``TimeoutError``) naming the engine, how many connections are checked out, the pool size,
the overflow and the timeout, and the usual causes (with the last failure to open a
connection, when one failed within the timeout).

It also keeps a waiter from sleeping through an outage it could see the end of: see
:meth:`QueuePool._keep_slot`.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.util import queue as sqla_queue

from ._errors import PoolTimeoutError

__all__ = ["QueuePool"]


class QueuePool(AsyncAdaptedQueuePool):
    """:class:`~sqlalchemy.pool.AsyncAdaptedQueuePool` raising :class:`PoolTimeoutError`."""

    label = "this engine"
    last_connect_failure: tuple[float, BaseException] | None = None

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
