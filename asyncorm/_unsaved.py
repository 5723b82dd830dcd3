"""Whether a session holds writes that nobody has committed yet.

The registry uses this to tell a request's scope about sessions of tasks spawned under it
that hold uncommitted writes (see :mod:`asyncorm.starlette`): such a task's work is rolled
back when the task ends (registry rule 3), and the request's auto-commit cannot commit it.

A session has unsaved writes when it has pending ORM changes (``new``, ``dirty``,
``deleted``), or when its current transaction flushed or executed a statement that may write:
an ORM flush (the ``after_flush`` event), or an ``insert()``/``update()``/``delete()``
construct or ``text()`` SQL that is not a plain read run through ``execute()``,
``scalar()`` or ``scalars()`` (:func:`note_write`, called by ``SyncSession``). Writes sent
through ``session.connection()`` directly are not seen. The mark names the root
transaction, so a commit or a rollback clears it without another event; it is a weak
reference, because a transaction refers to its session: a strong one would make every
session that wrote a reference cycle, left for the garbage collector to find (about 40
objects per unit of work, and twice the collections of SQLAlchemy's own sessions).
"""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import TextClause

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["has_unsaved_writes", "note_flush", "note_write"]

# leading whitespace, comments (``-- ...`` lines, ``/* ... */``) and opening parentheses
_LEAD = r"(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*"
_READ_TEXT = re.compile(_LEAD + r"(select|values|show|table)\b", re.IGNORECASE | re.DOTALL)
# reads unless they name a DML verb: a CTE may hold one, EXPLAIN ANALYZE runs its statement
_WITH_TEXT = re.compile(_LEAD + r"(with|explain)\b", re.IGNORECASE | re.DOTALL)
_DML_WORD = re.compile(r"\b(insert|update|delete|merge)\b", re.IGNORECASE)


def _may_write(statement: Any) -> bool:
    """Whether ``statement`` may write: a DML construct, or text SQL that is not a read."""
    if getattr(statement, "is_dml", False):
        return True
    if isinstance(statement, TextClause):
        sql = statement.text
        if _WITH_TEXT.match(sql):
            return _DML_WORD.search(sql) is not None
        return _READ_TEXT.match(sql) is None
    return False


def note_write(session: Session, statement: Any) -> None:
    """After ``session`` executed ``statement``: remember its transaction if it may write."""
    if _may_write(statement):
        _mark(session)


def note_flush(session: Session, flush_context: Any) -> None:
    """The ``after_flush`` listener: the session's transaction wrote."""
    _mark(session)


def _mark(session: Session) -> None:
    transaction = session.get_transaction()
    session._asyncorm_wrote_in = (  # type: ignore[attr-defined]
        None if transaction is None else weakref.ref(transaction)
    )


def has_unsaved_writes(session: AsyncSession) -> bool:
    """True when ``session`` has pending ORM changes or an uncommitted transaction that wrote."""
    sync = session.sync_session
    if sync._new or sync._deleted or sync.identity_map.check_modified():
        return True
    transaction = sync.get_transaction()
    if transaction is None:
        return False
    wrote_in = getattr(sync, "_asyncorm_wrote_in", None)
    return wrote_in is not None and wrote_in() is transaction
