"""The commit every path shares, and the cleanups that must finish: two-phase commit helpers.

``AsyncSession.commit()``, the commit of ``async with session.begin():`` and of
``async with Session.begin():`` all run :func:`_commit_in_two_phases`: a cancellable flush,
then a COMMIT no cancellation interrupts (both in one greenlet), then the ``on_commit``
callbacks. Its outcome
rules (rolled back, committed, or :class:`~asyncorm.TransactionOutcomeUnknownError` with its
message) and :func:`_to_completion` (rollback/close run to completion, without a task when
they cannot suspend) live here, apart from the session and transaction classes that call
them, so those stay about their API and this about what a cancellation may do to a commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.util.concurrency import await_, greenlet_spawn

from ._cancellation import (
    ending_may_suspend,
    hold_cancellations,
    raised_by_statement,
    run_to_completion,
)
from ._errors import TransactionOutcomeUnknownError, commit_in_unit_error
from ._identity import runs_sqlalchemys
from ._lazyload import SyncSession
from ._oncommit import run_ready, take_ready

if TYPE_CHECKING:
    from ._session import AsyncSession


async def _to_completion(session: AsyncSession, cleanup: Coroutine[Any, Any, None]) -> None:
    """Await a cleanup coroutine; to completion if it may do IO.

    A cleanup that cannot suspend cannot be interrupted by a cancellation, so it needs no
    task of its own (which costs ~20-30 microseconds): so it is without a transaction, or when
    the transaction's one connection has no transaction open on the server (a PostgreSQL
    session that only read, its BEGIN deferred) and its return to the pool does no IO (see
    ``ending_may_suspend``).
    """
    if _cleanup_may_suspend(session.sync_session):
        await run_to_completion(cleanup)
    else:
        await cleanup


closed_inline = 0
"""How many closes ran without a greenlet (:func:`closes_inline`; for tests)."""

_CLOSE = ("close", "_close_impl", "expunge_all")


def closes_inline(sync_session: Session) -> bool:
    """Whether ``sync_session.close()`` runs no code that could await, so needs no greenlet
    (SQLAlchemy's ``AsyncSession.close()`` spawns one for it): the session has no
    transaction (no connection to return, no rollback), its ``close()`` is SQLAlchemy's
    own (replaced neither on the session, its class nor ``Session``), which then only
    expunges the objects, and no listener of the events that expunging fires is
    registered. Counted in :data:`closed_inline` when true."""
    global closed_inline
    if sync_session.get_transaction() is not None:
        return False
    dispatch = sync_session.dispatch
    if (
        dispatch.persistent_to_detached
        or dispatch.deleted_to_detached
        or dispatch.pending_to_transient
        or dispatch.persistent_to_transient
        or not runs_sqlalchemys(sync_session, _CLOSE)
    ):
        return False
    closed_inline += 1
    return True


def _cleanup_may_suspend(sync_session: Session) -> bool:
    if sync_session.get_transaction() is None:
        return False
    if not isinstance(sync_session, SyncSession):
        return True  # a custom sync_session_class: its connections are not known
    open_connections = [c for c in sync_session.transaction_connections() if not c.closed]
    if len(open_connections) > 1:
        return True  # returning one can make the pool close the next: not worth judging
    return any(ending_may_suspend(c) for c in open_connections)


# -- commit: a cancellation either rolls back, or learns that the data is committed ---------


async def _commit_in_two_phases(
    session: AsyncSession,
    commit: Callable[[], object],
    on_flush_error: Callable[[BaseException], Awaitable[None] | None],
    held: list[asyncio.CancelledError],
) -> None:
    """Commit ``session``'s transaction in the caller's task: the one commit of every path.

    ``commit`` is SQLAlchemy's sync commit (the session's or its transaction's). Both phases
    run in one greenlet (the trip count of SQLAlchemy's own ``commit()``):

    1. Flush, cancellable. If it fails (a cancellation included), ``on_flush_error(exc)``
       (the rollback, which runs to completion) is awaited and ``exc`` raised: nothing was
       committed. A cancellation requested during the last stretch of the flush that did not
       reach an await is delivered here too, before COMMIT.
    2. ``commit()`` (``before_commit``, a residual flush if a hook added objects, COMMIT,
       ``after_commit``, the connection back to the pool) with cancellations held
       (:func:`hold_cancellations`, from the moment the flush is done), without a task:
       cancellations arriving meanwhile are appended to ``held``, for the caller to deliver
       with ``deliver_later(held)`` once it has nothing left to await. Then:

       * COMMIT succeeded: return normally. The data is committed and the caller is told so.
       * the connection failed once COMMIT may have been sent (a disconnect, or a held
         cancellation given up on after ``CLEANUP_GRACE``):
         :class:`~asyncorm.TransactionOutcomeUnknownError`, ``held`` left for the caller.
       * anything else failed (the database refused the COMMIT, a deferred constraint, a
         statement of the residual flush, a cancelled one included): nothing was committed;
         a held cancellation is raised, chained to the error, as :func:`run_to_completion`
         does, unless its requester took it back meanwhile (an ``asyncio.timeout`` inside
         the commit, such as SQLite's writer-turn wait); otherwise the error.
    3. Once committed, the session's ``on_commit`` callbacks run, cancellations still held
       (see :mod:`asyncorm._oncommit`).
    """
    if session._asyncorm_unit is not None:
        raise commit_in_unit_error(session._asyncorm_unit)
    task = asyncio.current_task()
    requested = task.cancelling() if task is not None else 0
    sync_session = session.sync_session
    committing = False

    def flush_then_commit() -> None:
        nonlocal committing
        if sync_session.new or sync_session.deleted or sync_session.dirty:
            sync_session.flush()
        if task is not None and task.cancelling():
            # a cancellation requested before this commit or during the flush and not
            # delivered yet (nothing awaited since): it lands here, before COMMIT
            await_(asyncio.sleep(0))
        committing = True  # from here on, cancellations are held
        commit()

    try:
        await hold_cancellations(greenlet_spawn(flush_then_commit), held, lambda: committing)
    except BaseException as exc:
        if not committing:
            cleanup = on_flush_error(exc)
            if cleanup is not None:
                await cleanup
            raise
        if _outcome_unknown(exc):
            raise TransactionOutcomeUnknownError(_outcome_unknown_message(session, exc)) from exc
        if held and task is not None and task.cancelling() <= requested:
            held.clear()  # taken back (an asyncio.timeout inside the commit): none to raise
        if held:
            cancelled = held[0]
            held.clear()
            raise cancelled from exc
        raise
    if task is not None and task.cancelling() > requested + len(held):
        # requested while the commit ran code that did not await afterwards (an event hook):
        # still pending, it would land at the next await and report a committed block as
        # cancelled; take it now and hold it with the others
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError as exc:
            held.append(exc)
    ready = take_ready(session)
    if ready:
        # the side effects of committed data: they run even if a cancellation arrives
        try:
            await hold_cancellations(run_ready(session, ready), held)
        except asyncio.CancelledError:
            if not held:
                raise
            # a callback given up on after the grace period: the held cancellation is the
            # one to raise (once), not the callback's own
            cancelled = held[0]
            held.clear()
            raise cancelled from None


def _outcome_unknown(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a commit, leaves it unknown whether COMMIT was applied."""
    if isinstance(exc, DBAPIError):
        # a lost connection outside any statement: at COMMIT (a statement of a residual flush
        # failing means COMMIT was never sent)
        return exc.connection_invalidated and exc.statement is None
    if raised_by_statement(exc):
        return False  # the same, for what SQLAlchemy does not wrap (a cancelled INSERT)
    # a COMMIT given up on after a cancellation; a socket error or timeout from the driver
    return isinstance(exc, (asyncio.CancelledError, OSError))


def _outcome_unknown_message(session: AsyncSession, exc: BaseException) -> str:
    name = f"<{type(session).__name__} {id(session):#x}>"
    if isinstance(exc, asyncio.CancelledError):
        why = (
            "the task was cancelled while COMMIT was on its way, and the database had not "
            "answered when asyncorm stopped waiting for it"
        )
    else:
        cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        detail = " ".join(str(cause).split()) or type(cause).__name__
        why = f"the connection failed before the database answered ({detail})"
    return (
        f"The transaction of session {name} may or may not have been committed: COMMIT was "
        f"sent, but {why}. Do not simply run it again: check whether its changes are in the "
        f"database (a unique key, an idempotency token) before retrying."
    )
