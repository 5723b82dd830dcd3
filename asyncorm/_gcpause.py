"""The cyclic garbage collector paused while a session turns a large result into objects.

Loading 20,000 ORM objects creates some 80,000 container objects (the instance, its
``__dict__``, its ``InstanceState`` and the state's own dicts), none of them garbage. CPython's
collector runs a full collection each time the long-lived objects grow by a quarter, and each
one walks every tracked object in the process: measured on W4 (20,000 rows as objects,
PostgreSQL), two full collections per load took 52% of the load's time, and loading ran at
18.5 us per row with the collector on against 4.4 us with it off. The bigger the application
(its modules, caches and objects are all tracked), the longer each collection.

So, as Mercurial and calibre do around their large reads, a session pauses the collector
while SQLAlchemy builds the objects of a result of :data:`MIN_ROWS` rows or more, and only
then: from the moment the statement's rows are in memory (the execution context's
``post_exec``, after the driver returned them; never for a server-side cursor, whose fetches
wait on the network) to the end of the session's ``execute()``, and not across any further
statement (a ``selectinload``'s query, a lazy load run inside it: entering a nested
``execute()`` resumes it first, and so does sending any other statement, such as a
listener's through ``session.connection()``). No await happens while it is paused, so no
other task runs then: the pause is as long as the Python work of building those objects.

The collector is process-wide; pauses are counted under a lock, so sessions in several
threads nest correctly, and it is resumed only if it was enabled when the first pause began
(a program that disabled it keeps it disabled). Garbage cycles made meanwhile are collected
by the first collection after. Turn it off with ``create_engine(url, pause_gc=False)``.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

__all__ = ["MIN_ROWS", "enter", "install", "leave", "paused"]

MIN_ROWS = 1_000
"""Results of fewer rows build their objects with the collector on: the few young-generation
collections they cause are cheap."""

_lock = threading.Lock()
_pauses = 0
_resume_to = False


def _pause() -> None:
    global _pauses, _resume_to
    with _lock:
        if _pauses == 0:
            _resume_to = gc.isenabled()
            gc.disable()
        _pauses += 1


def _resume() -> None:
    global _pauses
    with _lock:
        _pauses -= 1
        if _pauses == 0 and _resume_to:
            gc.enable()


def paused() -> int:
    """How many pauses are in force now (0: the collector is as the program left it)."""
    return _pauses


class _Load:
    """One outermost session ``execute()`` of a task, and whether it paused the collector.

    A task created meanwhile (by a listener) copies the context, and with it this object:
    it belongs to the task that began it (``owner``) and to no other, and only until it
    ``ended``, or the copy could pause the collector with no ``leave()`` left to resume it.
    """

    __slots__ = ("ended", "owner", "paused")

    def __init__(self, owner: int) -> None:
        self.paused = False
        self.ended = False
        self.owner = owner


def _task_id() -> int:
    """The running task (0 outside any): unique among live tasks, as an owner needs."""
    try:
        return id(asyncio.current_task())
    except RuntimeError:  # no running loop: a session used synchronously in a thread
        return 0


_LOAD: ContextVar[_Load | None] = ContextVar("asyncorm_gc_load", default=None)


def _current() -> _Load | None:
    """The outermost ``execute()`` the running task is inside of, if any."""
    load = _LOAD.get()
    if load is None or load.ended or load.owner != _task_id():
        return None  # none, or one inherited with a copy of the context
    return load


def enter() -> Token[_Load | None] | None:
    """A session's sync ``execute()`` begins: the token to :func:`leave` it with.

    A nested ``execute()`` (a post-load's query, a lazy load) is about to wait on the
    database: a pause of the outer one ends here.
    """
    load = _LOAD.get()
    task = _task_id()
    if load is None or load.ended or load.owner != task:  # none, or inherited with a copy
        return _LOAD.set(_Load(task))
    if load.paused:
        load.paused = False
        _resume()
    return None


def leave(token: Token[_Load | None] | None) -> None:
    """The ``execute()`` :func:`enter` began has ended (returned or raised)."""
    if token is None:
        return
    load = _LOAD.get()
    _LOAD.reset(token)
    if load is None:
        return
    load.ended = True
    if load.paused:
        load.paused = False
        _resume()


def _rows_ready(context: Any) -> None:
    """After the driver returned a statement's rows: pause for a large result in a session."""
    rows = getattr(context.cursor, "_rows", None)  # SQLAlchemy's async adapters buffer here
    if rows is None or len(rows) < MIN_ROWS or context._is_server_side:
        return  # most statements: checked first, it is the cheapest test
    load = _current()
    if load is not None and not load.paused:
        load.paused = True
        _pause()


def _statement_ready() -> None:
    """Before a statement is sent: it waits on the database, so a pause of its task ends.

    A session's own nested ``execute()`` already ended it (:func:`enter`); this catches the
    others, such as a ``load`` listener running ``session.connection().execute()``.
    """
    if not _pauses:
        return  # no pause in force in the process: nothing to end (most statements)
    load = _current()
    if load is not None and load.paused:
        load.paused = False
        _resume()


def install(dialect: Any) -> None:
    """Make ``dialect``'s execution contexts report buffered results (see the module doc)."""
    base = dialect.execution_ctx_cls
    pre_exec: Callable[[Any], None] = base.pre_exec
    post_exec: Callable[[Any], None] = base.post_exec

    def _pre_exec(self: Any) -> None:
        _statement_ready()
        pre_exec(self)

    def _post_exec(self: Any) -> None:
        post_exec(self)
        _rows_ready(self)

    dialect.execution_ctx_cls = type(
        f"GCPausing{base.__name__}", (base,), {"pre_exec": _pre_exec, "post_exec": _post_exec}
    )
