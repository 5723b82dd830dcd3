"""pgbouncer in transaction pooling mode: ``create_engine(url, pgbouncer=True)``.

In transaction pooling (``pool_mode = transaction``, what hosted poolers run) pgbouncer
lends a server connection to a client for one transaction, or for one statement outside a
transaction, then to another client. Whatever a client leaves on a server connection is
seen by the next client that gets it, and is gone from the client's next transaction:
prepared statements, ``SET``, advisory locks, temporary tables, ``LISTEN``.

asyncpg and SQLAlchemy's asyncpg adapter rely on one of these: named prepared statements,
prepared once and kept per client connection (asyncpg's ``statement_cache_size`` and
SQLAlchemy's ``prepared_statement_cache_size``, 100 each). Through pgbouncer 1.18 to 1.20
(and later ones without ``max_prepared_statements``) a client's ``__asyncpg_stmt_1__`` lands
on a server connection where another client prepared its own ``__asyncpg_stmt_1__``
(``prepared statement "__asyncpg_stmt_1__" already exists``), or its next execution lands
where it was never prepared (``... does not exist``).

``pgbouncer=True`` (or ``?pgbouncer=true`` in the URL, the spelling Prisma's documentation uses)
sets both caches to 0. asyncpg then prepares every statement unnamed and sends its ``Parse``
again in the same message sequence as the ``Bind`` and ``Execute`` (asyncpg >= 0.29): each
execution is complete in one ``Sync`` and needs nothing from an earlier one, wherever
pgbouncer sends it. No named statement is ever created, so none is left behind on a server
connection (SQLAlchemy's other workaround, unique statement names, leaves one per
execution there). The cost is one more round trip per statement (asyncpg describes each
statement before executing it). A user's ``async_creator`` opens connections its own way:
one it opens with asyncpg's statement cache on is refused.

What else holds under transaction pooling, once statements are unnamed:

* deferred BEGIN: a plain read outside a transaction block is one statement at READ
  COMMITTED, which gives the same rows on any server connection; the first statement that
  begins a transaction stays on one server connection until COMMIT or ROLLBACK. The
  connection's default isolation level and search path, which deferral depends on, are
  read once per client connection: behind pgbouncer they are the database's and role's
  (``ALTER DATABASE/ROLE ... SET``), the same on every server connection of its pool;
* the pre-ping is a simple-protocol ``SELECT 1``, which pgbouncer runs on any server;
* cancellation: asyncpg sends a CancelRequest with the key pgbouncer gave the client, and
  pgbouncer passes it to the server connection running that client's statement.

What does not: settings sent when a connection starts. pgbouncer 1.18 accepts only the
startup parameters it tracks (``application_name``, ``client_encoding``, ``DateStyle``,
``TimeZone``, ``standard_conforming_strings``) and refuses the others ("unsupported startup
parameter") or, listed in its ``ignore_startup_parameters``, drops them silently. With
``pgbouncer=True``, the ``statement_timeout`` and ``lock_timeout`` engine options and the
URL's ``options`` are a :class:`~asyncorm.ConfigurationError` saying where to set them instead
(``ALTER ROLE app SET statement_timeout = '5s'``); without it, pgbouncer's refusal at connect
becomes one (:func:`startup_refused`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import URL

from ._errors import ConfigurationError

__all__ = ["CACHES", "configure", "enabled", "startup_refused"]

CACHES = ("statement_cache_size", "prepared_statement_cache_size")
"""asyncpg's and SQLAlchemy's prepared statement caches: 0 under pgbouncer."""

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_SESSION_SETTINGS = ("statement_timeout", "lock_timeout")
_WHERE_INSTEAD = (
    "pgbouncer does not pass on the settings a connection starts with: set them on the "
    "role or database instead (ALTER ROLE app SET statement_timeout = '5s', which every "
    "server connection pgbouncer opens for that role then has), or per transaction with "
    "SET LOCAL"
)


def enabled(url: URL, option: object = None) -> bool:
    """Whether pgbouncer mode is on: the ``pgbouncer`` engine option if given, else the
    URL's ``?pgbouncer=`` (true/false, 1/0, yes/no, on/off); off when neither is given."""
    if option is not None:
        if not isinstance(option, bool):
            raise ConfigurationError(f"pgbouncer must be True or False, got {option!r}.")
        return option
    value = url.query.get("pgbouncer")
    if value is None:
        return False
    text = value.lower() if isinstance(value, str) else ""
    if text not in _TRUE | _FALSE:
        raise ConfigurationError(
            f"pgbouncer={value!r} in the URL must be true or false (1/0, yes/no, on/off)."
        )
    return text in _TRUE


def configure(url: URL, kwargs: dict[str, Any], shown: str) -> bool:
    """Read the ``pgbouncer`` option (popped from ``kwargs``) and the URL parameter; when on,
    turn the prepared statement caches off in ``connect_args`` and refuse what pgbouncer
    cannot carry. Returns whether pgbouncer mode is on."""
    if not enabled(url, kwargs.pop("pgbouncer", None)):
        return False
    for name in _SESSION_SETTINGS:
        if kwargs.get(name) is not None:
            raise ConfigurationError(
                f"{name}={kwargs[name]!r} cannot be used with pgbouncer=True for {shown!r}: "
                f"asyncorm sends it when a connection starts, and {_WHERE_INSTEAD}."
            )
    connect_args = dict(kwargs.get("connect_args") or {})
    settings = connect_args.get("server_settings") or {}
    if "options" in url.query or "options" in settings:
        raise ConfigurationError(
            f"options cannot be used with pgbouncer=True for {shown!r}: pgbouncer refuses "
            f"it as a startup parameter or, in ignore_startup_parameters, drops it; "
            f"{_WHERE_INSTEAD}."
        )
    for name in CACHES:
        given = connect_args.get(name, url.query.get(name))
        if given is not None and str(given) != "0":
            raise ConfigurationError(
                f"{name}={given!r} cannot be used with pgbouncer=True for {shown!r}: prepared "
                f"statements kept per connection break in transaction pooling. Leave it out "
                f"(pgbouncer=True sets it to 0)."
            )
        connect_args[name] = 0
    if connect_args.get("prepared_statement_name_func") is not None:
        raise ConfigurationError(
            f"prepared_statement_name_func cannot be used with pgbouncer=True for {shown!r}: "
            f"named statements would be left on pgbouncer's server connections; "
            f"pgbouncer=True uses unnamed ones."
        )
    kwargs["connect_args"] = connect_args
    if kwargs.get("async_creator") is not None:  # opens asyncpg connections its own way
        kwargs["async_creator"] = _cache_checked(kwargs["async_creator"], shown)
    return True


def _cache_checked(
    creator: Callable[[], Awaitable[Any]], shown: str
) -> Callable[[], Awaitable[Any]]:
    """Wrap a user's ``async_creator``: a connection it opens with asyncpg's statement cache
    on is closed and refused (its ``statement_cache_size`` is its own, not connect_args')."""

    async def checked() -> Any:
        connection = await creator()
        # asyncpg keeps the setting in a private attribute only (0.29 to 0.32 at least)
        if getattr(connection, "_stmt_cache_enabled", False):
            await connection.close()
            raise ConfigurationError(
                f"The async_creator of {shown!r} opened an asyncpg connection with its "
                f"statement cache on, which pgbouncer=True cannot turn off: pass "
                f"statement_cache_size=0 to asyncpg.connect()."
            )
        return connection

    return checked


_REFUSED = "unsupported startup parameter"


def startup_refused(exc: BaseException, where: str) -> ConfigurationError | None:
    """A clear error for pgbouncer refusing a startup parameter at connect, or None."""
    message = str(exc)
    if _REFUSED not in message:
        return None
    name = message.partition(f"{_REFUSED}:")[2].strip() or "?"
    return ConfigurationError(
        f"The server at {where} (a pgbouncer) refused the startup parameter {name!r}. "
        f"statement_timeout, lock_timeout (engine options), options (URL) and server_settings "
        f"(connect_args) are sent when a connection starts; {_WHERE_INSTEAD}. If it pools "
        f"transactions (pool_mode=transaction), also set pgbouncer=True (or ?pgbouncer=true)."
    )
