"""Which errors a whole transaction may be run again after, and how long to wait first."""

from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError

from ._errors import SQLiteWriteLockError, TransactionOutcomeUnknownError, WriteConflictError

__all__ = ["RETRYABLE_SQLSTATES", "Backoff", "is_retryable"]

RETRYABLE_SQLSTATES = {"40001": "serialization_failure", "40P01": "deadlock_detected"}
"""PostgreSQL's errors after which the whole transaction may be run again."""

_SQLITE_BUSY, _SQLITE_LOCKED = sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED



def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` ended a transaction that may safely be run again from the start.

    True for PostgreSQL's ``serialization_failure`` (SQLSTATE 40001) and
    ``deadlock_detected`` (40P01), for SQLite's "database is busy/locked" (``SQLITE_BUSY``,
    ``SQLITE_LOCKED``: another process held the database past the busy timeout) and for
    :class:`~asyncorm.WriteConflictError`, raised as SQLAlchemy's ``DBAPIError`` or as the
    driver's own exception. The database rolled such a transaction back (or never applied
    its statement), so running the whole unit again cannot apply it twice.

    False for everything else, notably :class:`~asyncorm.TransactionOutcomeUnknownError`
    (the COMMIT may have been applied), integrity errors, lost connections,
    :class:`~asyncorm.SQLiteWriteLockTimeout` and cancellations.

    Example::

        for attempt in range(5):
            try:
                async with Session.begin() as session:
                    await transfer(session, 1, 2, 10)
                break
            except Exception as exc:
                if not asyncorm.is_retryable(exc) or attempt == 4:
                    raise

    .. versionadded:: 0.2
    """
    if isinstance(exc, WriteConflictError):
        return True
    if isinstance(exc, TransactionOutcomeUnknownError | SQLiteWriteLockError):
        return False
    orig: object = exc.orig if isinstance(exc, DBAPIError) else exc
    if orig is None:
        return False
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate in RETRYABLE_SQLSTATES
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(orig, sqlite3.Error) and isinstance(code, int):
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return False


@dataclass(frozen=True)
class Backoff:
    """Bounded exponential backoff with jitter: how long to wait before each retry.

    Before retry ``n`` (1 for the first), the pause is drawn uniformly between half and all
    of ``min(maximum, initial * multiplier ** (n - 1))`` seconds (all of it with
    ``jitter=False``): it grows with each retry, never exceeds ``maximum``, and the jitter
    spreads out units that failed together so they do not collide again. Any callable taking
    the retry number and returning seconds can be given as ``backoff=`` instead.

    Example::

        @db.transactional(retries=10, backoff=asyncorm.Backoff(initial=0.005, maximum=0.2))
        async def book_seat(seat_id: int) -> None: ...

    .. versionadded:: 0.2
    """

    initial: float = 0.01
    maximum: float = 1.0
    multiplier: float = 2.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if not (0 <= self.initial <= self.maximum) or self.multiplier < 1:
            raise ValueError(
                f"Backoff needs 0 <= initial <= maximum and multiplier >= 1; got "
                f"initial={self.initial!r}, maximum={self.maximum!r}, "
                f"multiplier={self.multiplier!r}."
            )

    def __call__(self, retry: int) -> float:
        """The pause in seconds before retry number ``retry`` (1 for the first)."""
        ceiling = min(self.maximum, self.initial * self.multiplier ** max(retry - 1, 0))
        return random.uniform(ceiling / 2, ceiling) if self.jitter else ceiling
