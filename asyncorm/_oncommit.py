"""``session.on_commit(fn)``: callbacks run after the outermost transaction commits.

A callback is recorded with the transaction that is innermost when it is registered (the
current savepoint, else the session's transaction, else ``None``: the session's next
transaction). Through SQLAlchemy's session events, listened to on the session instance the
first time it registers a callback (sessions that never do pay nothing):

* ``after_soft_rollback``: a rolled-back savepoint drops the callbacks registered inside it
  (and inside the savepoints it enclosed); a rolled-back transaction drops them all;
* ``after_commit`` of the outermost transaction (a savepoint's release fires it too, and is
  told apart by the savepoint still being the session's nested transaction) makes the
  callbacks *ready*;
* ``after_transaction_end`` of the outermost transaction without a commit (``close()``)
  drops those left.

The awaitable commit paths of :class:`asyncorm.AsyncSession` (``commit()``, the commit of
``async with session.begin()`` and ``Session.begin()``) run the ready callbacks, in the
order they were registered, once COMMIT has succeeded, with cancellations held back as for
the COMMIT itself (see :func:`run_ready`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from ._errors import OnCommitError

if TYPE_CHECKING:
    from ._session import AsyncSession

__all__ = ["OnCommitCallback", "register", "run_ready", "take_ready"]

OnCommitCallback = Callable[[], object]
"""A callback: called with no argument; an awaitable it returns is awaited."""


class Pending:
    """The callbacks of one session: those waiting for a commit, and those ready to run."""

    __slots__ = ("entries", "ready")

    def __init__(self) -> None:
        self.entries: list[tuple[SessionTransaction | None, OnCommitCallback]] = []
        self.ready: list[OnCommitCallback] = []

    def after_commit(self, session: Session) -> None:
        if session.get_nested_transaction() is None:  # the outermost transaction committed
            self.ready.extend(fn for _, fn in self.entries)
            self.entries.clear()

    def after_soft_rollback(self, session: Session, previous: SessionTransaction) -> None:
        if previous.parent is None:
            self.entries.clear()
        elif self.entries:
            self.entries = [e for e in self.entries if not _inside(e[0], previous)]

    def after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            self.entries.clear()  # ended without a commit (a commit took them already)


def _inside(transaction: SessionTransaction | None, ended: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ended:
            return True
        transaction = transaction.parent
    return False


def register(session: AsyncSession, fn: OnCommitCallback) -> None:
    """Record ``fn`` to run after ``session``'s outermost transaction commits."""
    if not callable(fn):
        raise TypeError(
            f"on_commit() takes a callable (a function or a coroutine function called with no "
            f"argument); got {fn!r}. Use functools.partial() or a lambda to pass arguments."
        )
    pending = session._asyncorm_on_commit
    sync = session.sync_session
    if pending is None:
        pending = session._asyncorm_on_commit = Pending()
        event.listen(sync, "after_commit", pending.after_commit)
        event.listen(sync, "after_soft_rollback", pending.after_soft_rollback)
        event.listen(sync, "after_transaction_end", pending.after_transaction_end)
    pending.entries.append((sync.get_nested_transaction() or sync.get_transaction(), fn))


def take_ready(session: AsyncSession) -> list[OnCommitCallback]:
    """The callbacks made ready by a commit, removed from the session."""
    pending = session._asyncorm_on_commit
    if pending is None or not pending.ready:
        return []
    ready, pending.ready = pending.ready, []
    return ready


async def run_ready(session: AsyncSession, ready: list[OnCommitCallback]) -> None:
    """Run the ready callbacks in order; after them all, raise :class:`OnCommitError` if any
    raised an exception. A ``BaseException`` (a cancellation) stops the rest and propagates."""
    failed: list[tuple[OnCommitCallback, Exception]] = []
    for fn in ready:
        try:
            result = fn()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            failed.append((fn, exc))
    if failed:
        raise _failure(session, len(ready), failed)


def _failure(
    session: AsyncSession, count: int, failed: list[tuple[OnCommitCallback, Exception]]
) -> OnCommitError:
    shown = "; ".join(f"{_name(fn)} raised {exc!r}" for fn, exc in failed[:3])
    more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
    error = OnCommitError(
        f"The transaction of session <{type(session).__name__} {id(session):#x}> was "
        f"committed, but {len(failed)} of its {count} on_commit callback(s) failed: "
        f"{shown}{more}. The other callbacks ran. The data is committed: do not run the "
        f"transaction again; repeat or repair the failed side effects instead.",
        [exc for _, exc in failed],
    )
    error.__cause__ = failed[0][1]
    return error


def _name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return f"{name}()" if name else repr(fn)
