"""``transactional()``: a coroutine function run as one transaction, re-run when that is safe.

Each call of a decorated function is a *unit*: a new session (a registry scope for
``@db.transactional``, a session of the factory for ``asyncorm.transactional(Session)``),
its transaction begun with the isolation level asked for, the function, the commit (the
two-phase commit of :mod:`asyncorm._commit`, then the ``on_commit`` callbacks), the close.
An exception rolls the attempt back (to completion, also when cancelled); if
:func:`is_retryable` says so and retries are left, the whole function runs again, in a new
session, after a pause (:class:`Backoff`). Nothing else is retried: not a cancellation, not a
connection lost during COMMIT (:class:`~asyncorm.TransactionOutcomeUnknownError`), not an
``on_commit`` failure (the data is committed).

A unit called while another unit of the same registry or factory runs in the same task (and,
for a registry, while the task's session is in a transaction) runs in a SAVEPOINT of that
transaction instead, and never retries on its own: the outermost unit retries the whole.

A committed attempt returns normally even if the task was cancelled while COMMIT (or the
``on_commit`` callbacks, or the close) ran: the cancellation is delivered at the caller's next
await, as for ``async with Session.begin()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, NamedTuple, ParamSpec, Protocol, TypeVar

from ._cancellation import deliver_later, hold_cancellations
from ._errors import TransactionalUnitError
from ._lazyload import SyncSession
from ._retry import Backoff, is_retryable
from ._session import AsyncSession

if TYPE_CHECKING:
    from ._registry import async_scoped_session

__all__ = ["Settings", "run_unit", "settings", "transactional"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

PG_LEVELS = ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")
SQLITE_LEVELS = ("DEFERRED", "IMMEDIATE")


OnRetry = Callable[[BaseException, int, float], object]
"""``on_retry(error, attempt, pause)``: called before each retry's pause."""


class UnitDecorator(Protocol):
    """What ``@db.transactional(...)`` with arguments returns: the decorator itself."""

    def __call__(
        self, fn: Callable[_P, Coroutine[Any, Any, _T]], /
    ) -> Callable[_P, Coroutine[Any, Any, _T]]: ...


@dataclass(frozen=True)
class Settings:
    """What a ``transactional`` unit was declared with, validated."""

    retries: int
    isolation_level: str | None
    read_only: bool
    deferrable: bool
    backoff: Callable[[int], float]
    on_retry: OnRetry | None

    def session_kwargs(self) -> dict[str, Any]:
        """The session arguments of an attempt: read-only, or a declared unit of work
        (SQLite: ``BEGIN IMMEDIATE``) unless the level is SQLite's ``DEFERRED``."""
        if self.read_only:
            return {"read_only": True}
        return {"write": self.isolation_level != "DEFERRED"}

    def conflicts_with(self, outer: Settings | None) -> str | None:
        """Why a nested unit with these settings cannot be a savepoint of ``outer``."""
        asked = {
            "isolation_level": self.isolation_level,
            "read_only": self.read_only or None,
            "deferrable": self.deferrable or None,
        }
        for name, value in asked.items():
            if value is None:
                continue
            if outer is None:
                return (
                    f"{name}={value!r} was asked for, and the outer transaction was not begun "
                    f"by a transactional unit, so its {name} is not known"
                )
            had = getattr(outer, name)
            if had != value:
                return f"{name}={value!r} was asked for, and the outer unit has {had!r}"
        return None


def settings(
    *,
    retries: int,
    isolation_level: str | None,
    read_only: bool,
    deferrable: bool,
    backoff: Callable[[int], float] | None,
    on_retry: OnRetry | None,
) -> Settings:
    """Validate a unit's arguments (at decoration time: mistakes show at import)."""
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0 (0: never retry), got {retries!r}.")
    level = None
    if isinstance(isolation_level, str):
        level = " ".join(isolation_level.upper().replace("_", " ").split())
    elif isolation_level is not None:
        raise TypeError(f"isolation_level must be a str or None, got {isolation_level!r}.")
    if level == "AUTOCOMMIT":
        raise ValueError(
            "isolation_level='AUTOCOMMIT' runs each statement as its own transaction; a "
            "transactional unit is one transaction. Leave isolation_level=None (the "
            "connection's default) or name a level."
        )
    if level is not None and level not in PG_LEVELS + SQLITE_LEVELS:
        raise ValueError(
            f"Unknown isolation_level {isolation_level!r}: PostgreSQL takes "
            f"{', '.join(map(repr, PG_LEVELS))}, SQLite {', '.join(map(repr, SQLITE_LEVELS))} "
            f"(and the PostgreSQL names, as IMMEDIATE)."
        )
    if read_only and level == "IMMEDIATE":
        raise ValueError(
            "isolation_level='IMMEDIATE' takes SQLite's write lock, and read_only=True never "
            "writes: drop one of them (a read-only SQLite unit reads a snapshot)."
        )
    if deferrable and not (read_only and level == "SERIALIZABLE"):
        raise ValueError(
            "deferrable=True only means something for a SERIALIZABLE READ ONLY transaction: "
            "pass isolation_level='SERIALIZABLE', read_only=True, deferrable=True."
        )
    if backoff is not None and not callable(backoff):
        raise TypeError(f"backoff must be callable (retry number -> seconds), got {backoff!r}.")
    if on_retry is not None and not callable(on_retry):
        raise TypeError(f"on_retry must be callable, got {on_retry!r}.")
    return Settings(retries, level, read_only, deferrable, backoff or Backoff(), on_retry)


# -- the unit running in the current task ---------------------------------------------------


class _Unit(NamedTuple):
    owner: asyncio.Task[Any]
    key: object  # the registry or factory of the unit
    session: AsyncSession
    settings: Settings


_current: ContextVar[_Unit | None] = ContextVar("asyncorm_unit", default=None)


def _check_coroutine_function(fn: object, how: str) -> None:
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"{how} decorates coroutine functions (async def); {fn!r} is not one. A unit "
            f"may be run again after a retryable error, so it must be a function to call."
        )


async def run_unit(
    key: async_scoped_session[Any] | Callable[..., AsyncSession],
    registry: async_scoped_session[Any] | None,
    call: Callable[[AsyncSession], Awaitable[_T]],
    s: Settings,
    name: str,
) -> _T:
    """Run ``call(session)`` as a unit of ``key`` (a registry, or a session factory)."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError(f"{name}() is a transactional unit and needs a running asyncio task.")
    outer = _savepoint_of(key, registry, task)
    if outer is not None:
        session, outer_settings = outer
        why = s.conflicts_with(outer_settings)
        if why is not None:
            raise ValueError(
                f"{name}() was called inside another transaction, so it runs in a savepoint "
                f"of it, which cannot change the transaction's characteristics: {why}. Give "
                f"the outer unit these settings, or call {name}() outside it."
            )
        async with session.begin_nested():
            return await call(session)
    attempt = 0
    cancelling = task.cancelling()
    while True:
        attempt += 1
        try:
            return await _attempt(key, registry, call, s, task, name)
        except Exception as exc:
            retryable = is_retryable(exc)
            # a cancellation requested meanwhile (still pending) ends the unit too
            if not retryable or attempt > s.retries or task.cancelling() > cancelling:
                _annotate(exc, name, attempt, s.retries, retryable and attempt > s.retries)
                raise
            pause = s.backoff(attempt)
            if s.on_retry is not None:
                s.on_retry(exc, attempt, pause)
        await asyncio.sleep(pause)  # a cancellation here ends the unit: nothing committed


def _savepoint_of(
    key: object, registry: async_scoped_session[Any] | None, task: asyncio.Task[Any]
) -> tuple[AsyncSession, Settings | None] | None:
    """The session (and its unit's settings, if known) whose transaction a unit nests in."""
    unit = _current.get()
    mine = unit if unit is not None and unit.owner is task else None
    if registry is None:
        if mine is None:
            return None
        # the same factory, or a registry built on it: the unit's session is one it made
        if mine.key is key or getattr(mine.key, "session_factory", None) is key:
            return mine.session, mine.settings
        raise TransactionalUnitError(_foreign_unit_message(mine))
    session = registry._peek(task)
    if mine is not None and mine.session is session:
        return mine.session, mine.settings
    if mine is not None:
        raise TransactionalUnitError(_foreign_unit_message(mine))
    if session is None:
        return None
    if session.in_transaction():
        return session, None
    return None


def _foreign_unit_message(outer: _Unit) -> str:
    marked = outer.session._asyncorm_unit
    name = f"{marked}()" if marked else "the outer unit"
    return (
        f"A transactional unit was called inside the transactional unit {name}, but not "
        f"on its session: it uses another registry or session factory (or runs in a scope "
        f"opened inside the unit), so it would commit on its own, and a retry of {name} "
        f"would apply that part twice. Nothing was committed. Call it with the outer unit's "
        f"registry or factory (it then runs in a savepoint), or after {name} returns."
    )


async def _attempt(
    key: object,
    registry: async_scoped_session[Any] | None,
    call: Callable[[AsyncSession], Awaitable[_T]],
    s: Settings,
    task: asyncio.Task[Any],
    name: str,
) -> _T:
    """One attempt: a new session, begin, ``call``, commit, close."""
    held: list[asyncio.CancelledError] = []
    close: Callable[[], Coroutine[Any, Any, Any]]
    if registry is not None:
        frame = registry.scope(**s.session_kwargs())
        session = await frame.__aenter__()

        def close() -> Coroutine[Any, Any, Any]:
            return frame.__aexit__(None, None, None)
    else:
        assert callable(key)
        session = key(**s.session_kwargs())
        close = session.close
    token = _current.set(_Unit(task, key, session, s))
    try:
        try:
            await _begin(session, s, name)
            _mark(session, name)
            result = await call(session)
            _mark(session, None)
            # the function has returned: an on_commit callback calling a unit runs it in a
            # transaction of its own, not in a savepoint of this committed one (lost)
            _reset(token)
            await session._commit_holding(held)
        except BaseException:
            _reset(token)
            _mark(session, None)
            try:
                # roll back before closing: objects this attempt flushed go back to being
                # new (and those it changed are expired), so that a retry adding them again
                # INSERTs them; close() alone detaches them with their identity keys first,
                # and a retry's add() would then take them as rows that exist
                with contextlib.suppress(Exception):  # close() ends the transaction anyway
                    await session.rollback()
            finally:
                await close()  # to completion
            raise
        _reset(token)
        # committed: nothing after COMMIT may report the unit as cancelled
        await hold_cancellations(close(), held)
        return result
    finally:
        _reset(token)
        deliver_later(held)


def _mark(session: AsyncSession, name: str | None) -> None:
    """Name the unit whose function runs in ``session``: its commits are refused, the
    awaitable ones (``_session``) and the sync session's own (``run_sync``)."""
    session._asyncorm_unit = name
    sync = session.sync_session
    if isinstance(sync, SyncSession):
        sync._asyncorm_unit = name


def _reset(token: Token[_Unit | None]) -> None:
    with contextlib.suppress(RuntimeError):  # reset already: a token is used once
        _current.reset(token)


async def _begin(session: AsyncSession, s: Settings, name: str) -> None:
    """Give the attempt's transaction its isolation level: on PostgreSQL the connection's
    ``isolation_level`` and ``postgresql_deferrable`` options, so that BEGIN names them before
    the first statement (never deferred); on SQLite, through the session's arguments."""
    level = s.isolation_level
    if _autocommit(session) and (level is None or _dialect_name(session) == "sqlite"):
        raise TransactionalUnitError(
            f"{name}() is a transactional unit, and its session's engine runs every "
            f"statement in a transaction of its own (isolation_level='AUTOCOMMIT'): the unit "
            f"would not be one transaction, and a retry would apply the statements committed "
            f"before the error twice. Give the unit's sessions an engine without "
            f"isolation_level='AUTOCOMMIT'"
            + ("" if level is not None else ", or name the unit's isolation_level (PostgreSQL)")
            + "."
        )
    if level is None and not s.deferrable:
        return
    dialect = _dialect_name(session)
    if dialect == "sqlite":
        return  # IMMEDIATE (write=True), DEFERRED, or a read-only snapshot: session_kwargs
    if level in SQLITE_LEVELS:
        raise ValueError(
            f"isolation_level={level!r} is one of SQLite's transaction modes, and this "
            f"session's database is {dialect or 'unknown'}: use one of "
            f"{', '.join(map(repr, PG_LEVELS))}."
        )
    options: dict[str, Any] = {}
    if level is not None:
        options["isolation_level"] = level
    if s.deferrable and dialect == "postgresql":
        options["postgresql_deferrable"] = True
    await session.connection(execution_options=options)


def _autocommit(session: AsyncSession) -> bool:
    """Whether the session's bind is in AUTOCOMMIT: through its execution options, or set on
    each connection as it connects (``create_engine(isolation_level="AUTOCOMMIT")``, which
    SQLAlchemy's ``Connection`` consults the same way)."""
    try:
        bind = session.sync_session.get_bind()
    except Exception:
        return False  # bound per mapper or table: not known before the first statement
    if bind.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return True
    return getattr(bind.dialect, "_on_connect_isolation_level", None) == "AUTOCOMMIT"


def _dialect_name(session: AsyncSession) -> str | None:
    bind = session.bind
    if bind is None:
        try:
            return session.sync_session.get_bind().dialect.name
        except Exception:
            return None
    return bind.dialect.name


def _annotate(
    exc: BaseException, name: str, attempts: int, retries: int, exhausted: bool
) -> None:
    """Attach the attempt count to the error leaving a unit (``asyncorm_attempts``, a note)."""
    exc.asyncorm_attempts = attempts  # type: ignore[attr-defined]
    if exhausted:
        exc.add_note(
            f"asyncorm: {name}() gave up after {attempts} attempt(s) (retries={retries}): "
            f"each failed with a retryable error and was rolled back. Raise retries=, or "
            f"make the transaction shorter so that it conflicts less."
        )
    elif attempts > 1:
        exc.add_note(
            f"asyncorm: raised by attempt {attempts} of {name}(); the {attempts - 1} before "
            f"it failed with retryable errors and were rolled back."
        )


# -- the decorators -------------------------------------------------------------------------


def decorate_for_registry(
    registry: async_scoped_session[Any], fn: Callable[_P, Coroutine[Any, Any, _T]], s: Settings
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """``@db.transactional``: ``fn`` uses ``db()``, the unit's session."""
    _check_coroutine_function(fn, "@db.transactional")
    name = getattr(fn, "__qualname__", repr(fn))

    @functools.wraps(fn)
    async def unit(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await run_unit(registry, registry, lambda _: fn(*args, **kwargs), s, name)

    return unit


def decorate_for_factory(
    factory: Callable[..., AsyncSession],
    fn: Callable[..., Coroutine[Any, Any, _T]],
    s: Settings,
) -> Callable[..., Coroutine[Any, Any, _T]]:
    """``@asyncorm.transactional(Session)``: ``fn`` takes the unit's session first."""
    _check_coroutine_function(fn, "@asyncorm.transactional(factory)")
    name = getattr(fn, "__qualname__", repr(fn))

    @functools.wraps(fn)
    async def unit(*args: Any, **kwargs: Any) -> _T:
        return await run_unit(
            factory, None, lambda session: fn(session, *args, **kwargs), s, name
        )

    with contextlib.suppress(TypeError, ValueError):  # the caller does not pass the session
        signature = inspect.signature(fn)
        parameters = list(signature.parameters.values())[1:]
        unit.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return unit


_AS = TypeVar("_AS", bound=AsyncSession)


def transactional(
    factory: Callable[..., _AS],
    *,
    retries: int = 3,
    isolation_level: str | None = None,
    read_only: bool = False,
    deferrable: bool = False,
    backoff: Callable[[int], float] | None = None,
    on_retry: OnRetry | None = None,
) -> Callable[
    [Callable[Concatenate[_AS, _P], Coroutine[Any, Any, _T]]],
    Callable[_P, Coroutine[Any, Any, _T]],
]:
    """Decorate ``async def fn(session, ...)`` so that each call is one transaction, retried.

    The same as :meth:`async_scoped_session.transactional` for a plain session factory: each
    call creates a session with ``factory()``, passes it as the function's first argument
    (the caller passes the others), commits when the function returns (then runs the
    session's ``on_commit`` callbacks), rolls back when it raises, closes the session, and
    runs the whole function again in a new session after an error :func:`is_retryable` says
    is safe to retry, up to ``retries`` times, pausing ``backoff(n)`` seconds before retry
    ``n`` (default :class:`Backoff`). ``on_retry(error, attempt, pause)`` is called before
    each pause (to log or count). The error that ends the unit carries the number of
    attempts made as ``asyncorm_attempts`` and, after retries, a note.

    ``isolation_level``: PostgreSQL's ``"READ COMMITTED"``, ``"REPEATABLE READ"``,
    ``"SERIALIZABLE"`` (``None``: the connection's default); SQLite's ``"IMMEDIATE"`` (the
    default: the writer turn from the first statement, never a conflict) or ``"DEFERRED"``
    (a read snapshot until the first write, which raises a retryable
    :class:`~asyncorm.WriteConflictError` if another transaction wrote meanwhile); on SQLite
    the PostgreSQL names mean IMMEDIATE (SQLite transactions are serializable).
    ``read_only=True``: a ``READ ONLY`` transaction (SQLite: a snapshot that refuses
    writes); ``deferrable=True`` with SERIALIZABLE and read_only: PostgreSQL's
    ``DEFERRABLE``. See docs/transactions.md.

    A unit called inside another unit of the same factory in the same task (the inner
    function gets the outer's session) runs in a savepoint and never retries by itself.

    Example::

        @asyncorm.transactional(Session, retries=5, isolation_level="SERIALIZABLE")
        async def transfer(session: AsyncSession, src: int, dst: int, amount: int) -> None:
            (await session.get_one(Account, src)).balance -= amount
            (await session.get_one(Account, dst)).balance += amount
            session.on_commit(lambda: print("transferred"))

        await transfer(1, 2, 10)

    .. versionadded:: 0.2
    """
    from ._registry import async_scoped_session

    if isinstance(factory, async_scoped_session):
        raise TypeError(
            "asyncorm.transactional() takes a session factory (an async_sessionmaker); for a "
            "registry, decorate with @db.transactional, whose function uses db()."
        )
    if not callable(factory):
        raise TypeError(f"asyncorm.transactional() takes a session factory, got {factory!r}.")
    s = settings(
        retries=retries,
        isolation_level=isolation_level,
        read_only=read_only,
        deferrable=deferrable,
        backoff=backoff,
        on_retry=on_retry,
    )

    def decorate(
        fn: Callable[Concatenate[_AS, _P], Coroutine[Any, Any, _T]],
    ) -> Callable[_P, Coroutine[Any, Any, _T]]:
        return decorate_for_factory(factory, fn, s)

    return decorate
