"""What ``session.begin()`` and ``Session.begin()`` return: ``_Transaction``, ``_BeginContext``.

Both are SQLAlchemy's classes (``AsyncSessionTransaction`` and the context manager of
``async_sessionmaker.begin()``) with their commit routed through
:func:`asyncorm._commit._commit_in_two_phases` in the caller's task, and their rollback and
close run to completion. They are apart from :mod:`asyncorm._session` because they are the
transaction's context managers, not the session's API; the session only constructs them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio.session import _AsyncSessionContextManager
from sqlalchemy.orm import Session

from ._cancellation import deliver_later, hold_cancellations, run_to_completion
from ._commit import _commit_in_two_phases
from ._guards import enter, leave
from ._identity import runs_sqlalchemys

if TYPE_CHECKING:
    from ._session import AsyncSession

_AS = TypeVar("_AS", bound=sa_asyncio.AsyncSession)


class _Transaction(sa_asyncio.AsyncSessionTransaction):
    """SQLAlchemy's ``AsyncSessionTransaction`` under the session's guard.

    The commit of ``async with session.begin():`` and ``commit()`` are
    :func:`_commit_in_two_phases`: a cancellation before COMMIT rolls back, one during COMMIT
    waits for it and is delivered after. The rollback of a failed block runs to completion
    even if the task is cancelled meanwhile. A SAVEPOINT (``begin_nested()``) is released as
    SQLAlchemy does: it commits nothing by itself.
    """

    __slots__ = ()
    __module__ = "asyncorm._session"  # where it was defined before the split: same repr

    @property
    def _owner(self) -> AsyncSession:
        return cast("AsyncSession", self.session)

    async def start(self, is_ctxmanager: bool = False) -> sa_asyncio.AsyncSessionTransaction:
        took = enter(self._owner, "begin")
        try:
            sync_session = self._owner.sync_session
            if self.nested or not begins_inline(sync_session):
                return await super().start(is_ctxmanager)
            # SQLAlchemy's start() without its greenlet: Session.begin() only creates the
            # SessionTransaction (no connection, no IO) and nothing listens to that
            global begun_inline
            begun_inline += 1
            self.sync_transaction = self._assign_proxied(sync_session.begin())
            if is_ctxmanager:
                self.sync_transaction.__enter__()
            return self
        finally:
            if took:
                leave(self._owner)

    async def commit(self) -> None:
        took = enter(self._owner, "commit")
        try:
            if self.nested or self.sync_transaction is None:
                await super().commit()
                return
            held: list[asyncio.CancelledError] = []
            try:
                await _commit_in_two_phases(
                    self._owner,
                    lambda: self._sync_transaction().commit(),
                    self._roll_back_if_cancelled,
                    held,
                )
            finally:
                deliver_later(held)
        finally:
            if took:
                leave(self._owner)

    def _roll_back_if_cancelled(self, exc: BaseException) -> Awaitable[None] | None:
        if isinstance(exc, Exception):
            return None  # an ordinary flush error: the caller rolls back, as in SQLAlchemy
        return run_to_completion(_TransactionBase.rollback(self))

    async def rollback(self) -> None:
        took = enter(self._owner, "rollback")
        try:
            await run_to_completion(_TransactionBase.rollback(self))
        finally:
            if took:
                leave(self._owner)

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        if type_ is None and not self.nested:
            held: list[asyncio.CancelledError] = []
            try:
                await self._exit_committing(held)
            finally:
                deliver_later(held)
            return
        exit_ = _TransactionBase.__aexit__
        if type_ is None:
            took = enter(self._owner, "commit")
            try:
                await exit_(self, type_, value, traceback)
            finally:
                if took:
                    leave(self._owner)
            return
        took = enter(self._owner, "rollback")
        try:
            await run_to_completion(exit_(self, type_, value, traceback))
        finally:
            if took:
                leave(self._owner)

    async def _exit_committing(self, held: list[asyncio.CancelledError]) -> None:
        """Leave the block without an exception: commit; held cancellations go to ``held``."""
        exit_ = _TransactionBase.__aexit__
        took = enter(self._owner, "commit")
        try:
            if not self.is_active:  # ended inside the block: nothing to commit
                await exit_(self, None, None, None)
                return

            def roll_back(exc: BaseException) -> Awaitable[None]:
                return run_to_completion(exit_(self, type(exc), exc, exc.__traceback__))

            await _commit_in_two_phases(
                self._owner,
                lambda: self._sync_transaction().__exit__(None, None, None),
                roll_back,
                held,
            )
        finally:
            if took:
                leave(self._owner)


_TransactionBase = sa_asyncio.AsyncSessionTransaction
_SA_START = _TransactionBase.start

begun_inline = 0
"""How many transactions :meth:`_Transaction.start` began without a greenlet (for tests)."""

_BEGIN = ("begin", "_autobegin_t")

NO_IO_ON_CREATE: set[object] = set()
"""asyncorm's own ``after_transaction_create`` listeners, which never await (the SQLite
profile's bookkeeping adds its listener here)."""


def begins_inline(sync_session: Session) -> bool:
    """Whether ``sync_session.begin()`` runs no code that could await, so needs no greenlet:
    SQLAlchemy's own ``begin()`` (it creates a SessionTransaction; the connection is only
    checked out by the first statement), replaced neither on the session, its class nor
    ``Session``; no ``after_transaction_create`` listener (the one event it fires) but
    asyncorm's own; and SQLAlchemy's ``AsyncSessionTransaction.start()`` not replaced."""
    listeners = sync_session.dispatch.after_transaction_create
    if listeners and not all(fn in NO_IO_ON_CREATE for fn in listeners):
        return False
    return _TransactionBase.start is _SA_START and runs_sqlalchemys(sync_session, _BEGIN)


class _BeginContext(_AsyncSessionContextManager[_AS]):
    """What ``async with Session.begin() as session:`` runs: a new session and its transaction.

    SQLAlchemy's runs the commit and the close in a task of their own under
    ``asyncio.shield``, so a cancellation of the caller never reaches the flush or the
    COMMIT: the block commits, and the caller is told it was cancelled. Here the commit runs
    in the caller's task (:func:`_commit_in_two_phases`): a cancellation before COMMIT rolls
    back and is raised; once the COMMIT has succeeded the block exits normally, the session
    is closed, and a cancellation that arrived meanwhile is delivered at the task's next
    suspension. A failed block's rollback and the close run to completion.
    """

    __slots__ = ()
    __module__ = "asyncorm._session"  # where it was defined before the split: same repr

    async def __aenter__(self) -> _AS:
        session = self.async_session
        self.trans = session.begin()
        try:
            await self.trans.__aenter__()
        except BaseException:
            await session.close()
            raise
        return session

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        session = self.async_session
        transaction = self.trans
        if type_ is not None or not isinstance(transaction, _Transaction):
            try:
                await transaction.__aexit__(type_, value, traceback)
            finally:
                await session.close()
            return
        held: list[asyncio.CancelledError] = []
        try:
            try:
                await transaction._exit_committing(held)
            except BaseException:
                await session.close()
                raise
            # committed: nothing after the COMMIT may report the block as cancelled
            await hold_cancellations(session.close(), held)
        finally:
            deliver_later(held)
