"""The event-loop check: a pooled connection belongs to the loop it was opened in.

An asyncio driver connection (a socket, its futures and callbacks) is bound to the event loop
that opened it. An engine kept across loops (two ``asyncio.run()`` calls, a test framework
with a loop per test, a thread with its own loop) hands the new loop connections of the old
one, which fails deep in the driver with "Future attached to a different loop" or "Event loop
is closed". Here every pooled asyncpg connection remembers its loop, and a checkout from another
loop raises :class:`~asyncorm.EventLoopMismatchError` that says what happened and how to fix it.

aiosqlite connections are exempt: each runs its calls on a thread of its own and resolves every
call's future in the loop that made the call, so a pooled connection with no call in flight
serves any loop. A checked-in connection has none (a cancelled call still running on the
thread resolves in its own loop, and later calls queue behind it). That is what lets
Starlette's sync ``TestClient`` (the app in a thread with a loop of its own) share an engine
with the test's loop, as it does with stock SQLAlchemy.

Connections of another loop are also closed without touching that loop's futures when the
pool discards them (``await engine.dispose()`` in the new loop), so that disposing does not
log errors: the driver connection is aborted synchronously, and its socket is closed by its
own loop when that loop runs again (or shuts down).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from ._errors import EventLoopMismatchError

__all__ = ["install"]

_LOOP = "asyncorm.loop"  # pool record info: weakref to the loop the connection was opened in


def install(engine: AsyncEngine, shown: str) -> None:
    """Make ``engine``'s pool check the running loop on checkout.

    ``shown`` is the engine's URL as the user wrote it, password hidden, for the message.
    """
    sync_engine = engine.sync_engine
    if sync_engine.dialect.driver == "aiosqlite":
        return  # serves any loop (see the module docstring); nothing to check or abort

    def on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[_LOOP] = weakref.ref(asyncio.get_running_loop())

    def on_checkout(
        dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        opened_in = record.info.get(_LOOP)
        if opened_in is None:
            return
        loop = asyncio.get_running_loop()
        if opened_in() is loop:
            return
        raise EventLoopMismatchError(
            f"Engine {shown!r} is used in a different event loop than the one its pooled "
            f"connection was opened in (that loop {_state(opened_in())}), and an asyncpg "
            f"connection works only in the loop that opened it. Call `await engine.dispose()` "
            f"in the new loop before using the engine there (or dispose of it before the "
            f"first loop ends), or create the engine with `poolclass=NullPool`. To test an "
            f"ASGI app, call it in the test's own loop with "
            f"`httpx.AsyncClient(transport=httpx.ASGITransport(app))` instead of a sync "
            f"TestClient, which runs the app in a loop of its own."
        )

    def on_close(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        opened_in = record.info.get(_LOOP)
        if opened_in is None or opened_in() is _running_loop():
            return
        _abort(dbapi_connection)

    event.listen(sync_engine, "connect", on_connect)
    event.listen(sync_engine, "checkout", on_checkout)
    event.listen(sync_engine, "close", on_close)


def _state(loop: asyncio.AbstractEventLoop | None) -> str:
    if loop is None or loop.is_closed():
        return "is closed now"
    if loop.is_running():
        return "is running in another thread"
    return "is not running now"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _abort(dbapi_connection: Any) -> None:
    """Close a connection of another loop without awaiting anything in this one."""
    driver = getattr(dbapi_connection, "driver_connection", None)
    terminate = getattr(driver, "terminate", None)  # asyncpg: aborts the transport
    if terminate is None:
        return
    with contextlib.suppress(RuntimeError):  # the other loop is closed: nothing to schedule
        terminate()
