"""Testing helpers: count the statements a block of code runs, and catch N+1 query loops.

``count_queries(target)`` collects the SQL statements run on an engine, a connection, a
session or a registry while the block runs; ``assert_max_queries(n, target)`` fails when more
than ``n`` ran, listing them with how many times each ran::

    async with assert_max_queries(2, session):
        users = (await session.scalars(select(User))).all()
        for user in users:
            print(await user.awaitable_attrs.addresses)   # one SELECT per user: fails

Statements are seen on SQLAlchemy's ``before_cursor_execute`` event (what really goes to the
driver: flushes, lazy loads, Core statements); transaction control (``BEGIN``, ``COMMIT``,
``ROLLBACK``, ``SAVEPOINT``, ``RELEASE``) is not counted, so a count is the same inside the
pytest plugin's outer transaction as in production. :class:`OuterTransaction` is the value of
the plugin's ``asyncorm_transaction`` fixture (see docs/testing.md).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from ._errors import shown_statement
from ._outer import OuterTransaction
from ._registry import async_scoped_session

__all__ = ["OuterTransaction", "QueryLog", "assert_max_queries", "count_queries"]

Target = AsyncEngine | AsyncConnection | SAAsyncSession | async_scoped_session[Any]

_CONTROL = re.compile(r"\s*(?:BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|END)\b", re.IGNORECASE)
_SHOWN = 300  # characters of a statement shown in a report


class QueryLog:
    """The statements run on a target while a ``count_queries()`` block runs.

    ``len(log)`` is how many ran; ``log.statements`` lists them in order (SQL text as sent
    to the driver, an ``executemany`` counting once); ``log.counts()`` groups them.

    .. versionadded:: 0.2
    """

    def __init__(self, target: str) -> None:
        self.target = target
        """What was watched, for messages: ``"engine Engine(sqlite+aiosqlite:///...)"``."""
        self.statements: list[str] = []
        """The SQL of each statement, in the order they ran."""

    def __len__(self) -> int:
        return len(self.statements)

    def __repr__(self) -> str:
        return f"<QueryLog of {self.target}: {len(self)} statement(s)>"

    def counts(self) -> Counter[str]:
        """How many times each distinct statement ran (whitespace normalised)."""
        return Counter(" ".join(s.split()) for s in self.statements)

    def report(self) -> str:
        """The statements, most repeated first, each with its count, one per line."""
        ranked = sorted(self.counts().items(), key=lambda item: -item[1])  # stable: order run
        width = len(str(ranked[0][1])) if ranked else 1
        return "\n".join(
            f"  {count:>{width}} x {shown_statement(sql, _SHOWN)}" for sql, count in ranked
        )


@asynccontextmanager
async def count_queries(target: Target) -> AsyncIterator[QueryLog]:
    """Collect the SQL statements run on ``target`` while the block runs.

    ``target``: an ``AsyncEngine`` (every statement of every connection), an
    ``AsyncConnection`` (that connection's), an ``AsyncSession`` (the statements on the
    connections the session uses: a session bound to a connection, like the plugin's
    ``asyncorm_session``, counts everything on that connection), or a registry
    (``async_scoped_session``: what its factory is bound to, an engine or, inside a test
    of the pytest plugin, the test's connection). Transaction control is not counted.

    Example::

        async with count_queries(session) as queries:
            await session.get(User, 1)
        assert len(queries) == 1

    .. versionadded:: 0.2
    """
    watch = await _resolve(target)
    log = QueryLog(watch.label)
    every, watched = watch.every, watch.connections

    def record(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if (every or conn in watched) and not _CONTROL.match(statement):
            log.statements.append(statement)

    def began(session: Session, transaction: SessionTransaction, conn: Connection) -> None:
        watched.add(conn)

    sync_engine = watch.engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", record)
    if watch.session is not None:
        event.listen(watch.session, "after_begin", began)
    try:
        yield log
    finally:
        event.remove(sync_engine, "before_cursor_execute", record)
        if watch.session is not None:
            event.remove(watch.session, "after_begin", began)


@asynccontextmanager
async def assert_max_queries(n: int, target: Target) -> AsyncIterator[QueryLog]:
    """Fail when the block runs more than ``n`` statements on ``target``: the N+1 detector.

    The ``AssertionError`` lists the statements, most repeated first, with how many times
    each ran; a statement that ran many times is the signature of a query in a loop (lazy
    loads of a relationship, one ``get()`` per id). ``target`` is as for
    :func:`count_queries`. Nothing is checked when the block raises.

    Example::

        async with assert_max_queries(2, asyncorm_session):
            users = (await session.scalars(
                select(User).options(selectinload(User.addresses)))).all()
            emails = [a.email for u in users for a in u.addresses]

    .. versionadded:: 0.2
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"assert_max_queries(n) needs a number of statements >= 0, got {n!r}.")
    async with count_queries(target) as log:
        yield log
    if len(log) <= n:
        return
    counts = log.counts()
    message = (
        f"{len(log)} statements ran on {log.target}, more than the {n} allowed:\n{log.report()}"
    )
    times = counts.most_common(1)[0][1]
    if times > 1:
        message += (
            f"\nThe first statement ran {times} times: an N+1 pattern (a lazy load, or a "
            f"query in a loop). Load the related rows in one statement, e.g. "
            f"select(User).options(selectinload(User.addresses)), or query them together "
            f"with an IN (...) filter."
        )
    raise AssertionError(message)


class _Watch(NamedTuple):
    engine: AsyncEngine  # listened to
    label: str  # for messages
    every: bool  # every connection of the engine counts
    connections: set[Connection]  # else: these connections count
    session: Session | None  # and those this session begins


async def _resolve(target: Any) -> _Watch:
    if isinstance(target, async_scoped_session):
        bind = getattr(target.session_factory, "kw", {}).get("bind")
        if bind is None:
            raise ValueError(
                f"count_queries() cannot tell which engine {target!r} uses: its factory "
                f"has no bind. Pass the engine (or a session) instead."
            )
        watch = await _resolve(bind)
        return watch._replace(label=f"registry {target!r} ({watch.label})")
    if isinstance(target, AsyncEngine):
        return _Watch(target, f"engine {target.sync_engine!r}", True, set(), None)
    if isinstance(target, AsyncConnection):
        sync = target.sync_connection
        assert sync is not None
        return _Watch(target.engine, f"connection {sync!r}", False, {sync}, None)
    if isinstance(target, SAAsyncSession):
        bind = target.bind
        label = f"session <{type(target).__name__} {id(target):#x}>"
        if isinstance(bind, AsyncConnection):
            return (await _resolve(bind))._replace(label=label)
        if not isinstance(bind, AsyncEngine):
            raise ValueError(
                f"count_queries() cannot tell which engine {label} uses (bind={bind!r}). "
                f"Pass the engine instead."
            )
        connections: set[Connection] = set()
        if target.in_transaction():  # its connection now; those it begins are added
            sync = (await target.connection()).sync_connection
            assert sync is not None
            connections.add(sync)
        return _Watch(bind, label, False, connections, target.sync_session)
    raise TypeError(
        f"count_queries() counts the statements of an AsyncEngine, AsyncConnection, "
        f"AsyncSession or async_scoped_session; got {target!r}."
    )
