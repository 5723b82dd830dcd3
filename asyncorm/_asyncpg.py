"""asyncpg connections: opened in a context of their own, and watched while they sit idle.

A context of their own. asyncio's socket transport registers its reader callback from a
``call_soon`` scheduled in the context current when the connection is opened, so the
reader's handle keeps a copy of that context for as long as the socket is open. A pooled
connection opened by a request task would keep that task's context variables alive (the
registry's scope and its session, and whatever request-scoped state the application keeps
in context variables) for the life of the connection. asyncorm therefore runs every
``asyncpg.connect()`` in a task created with an empty :class:`contextvars.Context`: through
SQLAlchemy's ``do_connect`` dialect event for connections opened from the URL, and by
wrapping a user's ``async_creator``. SQLAlchemy's own setup of the new connection (codecs,
server version) runs afterwards as usual. Later registrations that could capture a caller's
context are short-lived: asyncpg's cancel requests (a task per request, done once the cancel
is sent), query timeouts (cancelled when the query ends) and notification callbacks (run
from the reader, so in the connection's own empty context). The one exception is asyncpg's
``copy_from_*`` on the raw driver connection, which re-registers the reader after pausing it
in the copying task's context.

Watched while idle. A PostgreSQL server says nothing to an idle connection except to end it
(a FATAL ``ErrorResponse`` such as ``terminating connection due to administrator command``,
then end of file), or to deliver a notification. asyncpg, reading that error while idle,
marks its protocol busy consuming an error until a ReadyForQuery that never comes, and until
the end of file arrives the connection still reports itself open: the next query fails with
"cannot switch to state 12; another operation (2) is in progress". Each connection's
transport therefore reports to a small protocol wrapper that counts what it receives
(:func:`idle_mark`, :func:`spoke_since`), so the pre-ping can ping a connection the server
spoke to while it sat in the pool, and the pool replaces it. A statement that meets such a
connection mid-use is already a disconnect: asyncpg aborts a connection whose protocol
refuses an operation, and SQLAlchemy then finds it closed and invalidates it.
"""

from __future__ import annotations

import asyncio
import contextvars
import select
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry

from ._pgconnect import connect_error
from ._pgparams import Translation

__all__ = ["idle_mark", "in_own_context", "install", "spoke_since", "watch_of"]

_Connect = Callable[..., Awaitable[Any]]


def in_own_context(connect: _Connect) -> Callable[..., Awaitable[Any]]:
    """Wrap ``connect`` so that it runs in a task with an empty context, then is watched."""

    async def open_connection(*args: Any, **kwargs: Any) -> Any:
        async def run() -> Any:
            try:
                return _watch(await connect(*args, **kwargs))
            except Exception as exc:  # TLS unverified, server unavailable: asyncorm's errors
                clear = connect_error(exc, kwargs)
                if clear is None:
                    raise
                raise clear from exc

        task = asyncio.get_running_loop().create_task(run(), context=contextvars.Context())
        try:
            return await task  # a cancellation of the caller is passed on to the task
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().terminate()  # opened just as the caller was cancelled
            raise

    return open_connection


def install(engine: AsyncEngine, params: Translation) -> None:
    """Open the engine's connections from the URL in a context of their own, with the
    URL's libpq parameters translated for asyncpg (:mod:`asyncorm._pgparams`)."""

    # SQLAlchemy's asyncpg DBAPI adapter awaits the connection from ``async_creator_fn``, the
    # keyword its own ``async_creator`` engine argument is implemented with; a user's
    # ``async_creator`` bypasses this event and is wrapped by ``_postgresql.prepare`` instead
    def do_connect(
        dialect: Dialect, record: ConnectionPoolEntry, cargs: list[Any], cparams: dict[str, Any]
    ) -> None:
        params.apply(cparams)  # a copy of the engine's arguments, made for this connect
        connect = cparams.get("async_creator_fn")
        if connect is None:
            import asyncpg  # here: asyncorm[sqlite] alone imports without it

            connect = asyncpg.connect
        cparams["async_creator_fn"] = in_own_context(connect)

    event.listen(engine.sync_engine, "do_connect", do_connect)


class _Watch(asyncio.Protocol):
    """The transport's protocol: counts the data it receives, passes everything on.

    It also answers, with one ``poll()`` of the socket and no other work, whether the server
    sent something not read yet: the socket's descriptor is registered once, when the
    connection is watched, in a ``select.poll`` object of its own (which holds no kernel
    resource). A descriptor is only reused after the connection's socket was closed, and
    a closed connection is never asked (its driver reports itself closed first); a closed
    descriptor polls as ``POLLNVAL``, which counts as "sent something" (the safe answer).
    """

    __slots__ = ("_poll", "inner", "received")

    def __init__(self, inner: asyncio.Protocol, fileno: int | None) -> None:
        self.inner = inner
        self.received = 0
        self._poll: Any = None
        if fileno is not None and fileno >= 0 and _POLL is not None:
            self._poll = _POLL()
            self._poll.register(fileno, select.POLLIN)

    def data_received(self, data: bytes) -> None:
        self.received += 1
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


_POLL = getattr(select, "poll", None)  # not on Windows: select() on the socket there


def _transport(driver: Any) -> asyncio.Transport | None:
    # asyncpg exposes no public accessor for its connection's transport
    return getattr(driver, "_transport", None)


def _socket_fileno(transport: asyncio.BaseTransport) -> int | None:
    sock = transport.get_extra_info("socket")
    return None if sock is None else int(sock.fileno())


def _watch(driver: Any) -> Any:
    transport = _transport(driver)
    if transport is not None and isinstance(transport.get_protocol(), asyncio.Protocol):
        watch = _Watch(transport.get_protocol(), _socket_fileno(transport))  # type: ignore[arg-type]
        transport.set_protocol(watch)
    return driver


def watch_of(driver: Any) -> _Watch | None:
    """The watch on ``driver``'s transport (None: not watched)."""
    transport = _transport(driver)
    protocol = None if transport is None else transport.get_protocol()
    return protocol if isinstance(protocol, _Watch) else None


def idle_mark(driver: Any) -> int | None:
    """How much the server has sent on ``driver`` so far (None: not watched)."""
    watch = watch_of(driver)
    return None if watch is None else watch.received


def spoke_since(driver: Any, mark: int | None, watch: _Watch | None = None) -> bool:
    """Whether the server sent anything on ``driver`` since :func:`idle_mark` gave ``mark``
    (``watch``: :func:`watch_of` ``driver``, when the caller has it), or has something not
    read yet (which costs one ``poll()`` or ``select()`` on the socket)."""
    if watch is None:
        watch = watch_of(driver)
    if watch is not None:
        if mark is not None and watch.received != mark:
            return True
        if watch._poll is not None:
            return bool(watch._poll.poll(0))
    elif mark is not None:
        return True  # marked while watched, no longer watched: something changed
    transport = _transport(driver)
    fileno = None if transport is None else _socket_fileno(transport)
    if fileno is None:
        return False
    if fileno < 0:
        return True  # closed under us
    readable, _, _ = select.select([fileno], [], [], 0)
    return bool(readable)
