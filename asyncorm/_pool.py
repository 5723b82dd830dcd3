"""The engines' queue pool: SQLAlchemy's, with a pool timeout that says what to do about it.

SQLAlchemy's :class:`~sqlalchemy.pool.AsyncAdaptedQueuePool` raises
``TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out,
timeout 30.00")`` when no connection comes free in time. asyncorm's engines use this
subclass, which raises :class:`~asyncorm.PoolTimeoutError` (a subclass of that
``TimeoutError``) naming the engine, how many connections are checked out, the pool size,
the overflow and the timeout, and the usual causes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry

from ._errors import PoolTimeoutError

__all__ = ["QueuePool"]


class QueuePool(AsyncAdaptedQueuePool):
    """:class:`~sqlalchemy.pool.AsyncAdaptedQueuePool` raising :class:`PoolTimeoutError`."""

    label = "this engine"

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
                f"sooner, or raise pool_size, max_overflow or pool_timeout."
            ) from None

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
