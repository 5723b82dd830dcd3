"""``create_engine()``: URL normalisation, async driver choice and dialect profiles."""

from __future__ import annotations

import importlib
import re
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from . import _cancellation, _gcpause, _loops, _pool
from ._errors import ConfigurationError
from ._pgparams import split_netloc_hosts

__all__ = ["create_engine", "redact_url"]

SUPPORTED = (
    "sqlite:// (in memory), sqlite:///relative.db, sqlite:////absolute.db, "
    "postgresql://user@host/db (also postgres://), "
    "or the explicit drivers sqlite+aiosqlite:// and postgresql+asyncpg://"
)

# backend name as written in the URL -> (canonical backend, async driver, pip extra)
_BACKENDS = {
    "sqlite": ("sqlite", "aiosqlite", "sqlite"),
    "postgresql": ("postgresql", "asyncpg", "postgresql"),
    "postgres": ("postgresql", "asyncpg", "postgresql"),
}

_SCHEME = re.compile(r"[\w+.\-]*:/*")
_SECRET_PARAMS = frozenset({"password", "sslpassword"})
_SECRET_QUERY = re.compile(r"([?&](?:ssl)?password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str | URL) -> str:
    """Render ``url`` for a message or a log line, with any password replaced by ``***``.

    Works on text that does not even parse as a URL (then everything before the last ``@``
    but the scheme is hidden), so it is safe for error messages about bad input.

    Example::

        >>> redact_url("postgresql://app:s3cret@db/app")
        'postgresql://app:***@db/app'
    """
    if isinstance(url, URL):
        secrets = _SECRET_PARAMS.intersection(url.query)
        if secrets:  # libpq's ?password=, ?sslpassword=
            url = url.update_query_dict(dict.fromkeys(secrets, "***"))
        return url.render_as_string(hide_password=True)
    try:
        return redact_url(make_url(url))
    except (sa_exc.ArgumentError, ValueError):
        pass
    url = _SECRET_QUERY.sub(r"\1***", url)
    if "@" not in url:
        return url
    head, _, tail = url.rpartition("@")
    match = _SCHEME.match(head)
    return f"{match.group(0) if match else ''}***@{tail}"


def _parse(url: str | URL) -> URL:
    if isinstance(url, URL):
        return url
    if not isinstance(url, str):
        raise ConfigurationError(
            f"create_engine() needs a database URL as a string or sqlalchemy URL, "
            f"got {type(url).__name__}. Supported: {SUPPORTED}."
        )
    if not url.strip():
        raise ConfigurationError(f"create_engine() got an empty URL. Supported: {SUPPORTED}.")
    try:
        # libpq's several hosts, postgresql://u@a:5432,b:5433/db, as SQLAlchemy's ?host=
        return make_url(split_netloc_hosts(url))
    except (sa_exc.ArgumentError, ValueError):  # ValueError: e.g. a port that is no number
        raise ConfigurationError(
            f"Could not parse database URL {redact_url(url)!r}. Supported: {SUPPORTED}."
        ) from None


def _require_driver(module: str, extra: str, shown: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigurationError(
            f"The URL {shown!r} needs the {module} driver, which is not installed. "
            f"Install it with: pip install 'asyncorm[{extra}]'"
        ) from None


def create_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """Create SQLAlchemy's :class:`~sqlalchemy.ext.asyncio.AsyncEngine` for ``url``.

    The async driver is chosen from the URL (aiosqlite for ``sqlite://``, asyncpg for
    ``postgresql://`` and ``postgres://``), and the dialect's profile is applied:

    * SQLite: foreign keys on (``sqlite_foreign_keys=False`` turns them off), WAL for file
      databases, a busy timeout, and real transactions: one whose first statement reads
      begins deferred on a snapshot and never waits while it reads; writers take turns
      in-process at their first write; a declared unit of work (``Session.begin()``) begins
      ``BEGIN IMMEDIATE``. Concurrent read-modify-write transactions neither lose updates
      nor fail with "database is locked" (a stale snapshot's write raises
      :class:`~asyncorm.WriteConflictError`). ``sqlite://`` is an in-memory database shared
      by the engine's connections, each with its own transaction (there, without WAL, reads
      run outside the transaction until its first write).
    * PostgreSQL: asyncpg with ``pool_pre_ping=True``, BEGIN deferred past plain reads;
      behind pgbouncer's transaction pooling pass ``pgbouncer=True`` (or add
      ``?pgbouncer=true`` to the URL): no prepared statement is kept on a connection.

    Both pause Python's cyclic garbage collector while a session builds the objects of a
    result of 1,000 rows or more (up to 4x faster large loads; docs/performance.md, "Large
    results and the garbage collector"); ``pause_gc=False`` leaves it alone.

    Keyword arguments go to :func:`sqlalchemy.ext.asyncio.create_async_engine` and win over
    the profile's defaults.

    Example::

        engine = asyncorm.create_engine("sqlite:///app.db")
        engine = asyncorm.create_engine("postgresql://app@localhost/app", pool_size=10)
        engine = asyncorm.create_engine("postgresql://app@pooler:6432/app", pgbouncer=True)

    Raises :class:`ConfigurationError` for an unsupported URL or a missing driver package.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 ``pgbouncer=True`` and ``?pgbouncer=true``; ``pause_gc``.
    """
    kwargs = dict(kwargs)
    pause_gc = kwargs.pop("pause_gc", True)
    parsed = _parse(url)
    shown = redact_url(parsed)
    backend_name = parsed.get_backend_name()
    if backend_name not in _BACKENDS:
        raise ConfigurationError(
            f"Unsupported database URL {shown!r}: asyncorm supports SQLite and PostgreSQL. "
            f"Use one of: {SUPPORTED}."
        )
    backend, driver, extra = _BACKENDS[backend_name]
    given_driver = parsed.drivername.partition("+")[2]
    if given_driver and given_driver != driver:
        raise ConfigurationError(
            f"Unsupported driver {given_driver!r} in {shown!r}: asyncorm runs {backend} "
            f"through the async driver {driver}. Write {backend}+{driver}:// or just "
            f"{backend}:// and asyncorm picks it."
        )
    _require_driver(driver, extra, shown)
    if not isinstance(pause_gc, bool):
        raise ConfigurationError(
            f"pause_gc={pause_gc!r} for {shown!r}: pass True (pause the garbage collector "
            f"while a session builds the objects of a large result, the default) or False."
        )
    parsed = parsed.set(drivername=f"{backend}+{driver}")
    # the profile's module imports its driver: imported only once the driver is known present
    profile = importlib.import_module(f"asyncorm._{backend}")
    parsed, engine_kwargs, install = profile.prepare(parsed, dict(kwargs))
    if "pool" not in engine_kwargs and engine_kwargs.get("poolclass") in (
        None,
        AsyncAdaptedQueuePool,
    ):
        engine_kwargs["poolclass"] = _pool.QueuePool  # its timeout error says what to do
    # reset-on-return is done by asyncorm's listener, which survives a cancellation
    # without discarding the connection (see _cancellation)
    hooks = _cancellation.EngineHooks(engine_kwargs)
    engine = _create_async_engine(parsed, engine_kwargs)
    _loops.install(engine, shown)  # first: no other checkout listener may touch a foreign loop
    install(engine)
    hooks.install(engine)
    if pause_gc:
        _gcpause.install(engine.sync_engine.dialect)
    if isinstance(engine.pool, _pool.QueuePool):
        engine.pool.label = repr(shown)
    return engine


def _create_async_engine(url: URL, kwargs: dict[str, Any]) -> AsyncEngine:
    """Create the engine, turning SQLAlchemy's argument errors into ConfigurationError."""
    try:
        return create_async_engine(url, **kwargs)
    except sa_exc.ArgumentError as exc:
        raise ConfigurationError(
            f"Could not create an engine for {redact_url(url)!r}: {redact_url(str(exc))}"
        ) from None
    except TypeError as exc:
        raise ConfigurationError(
            f"Invalid create_engine() argument for {redact_url(url)!r}: {exc}"
        ) from None
