"""Implicit IO on attribute access becomes :class:`~asyncorm.LazyLoadError`.

Reading a lazy relationship, an expired attribute or a deferred column makes SQLAlchemy run
a query from inside the attribute access. Under asyncio that query can only run inside an
awaited session call (SQLAlchemy's greenlet bridge); outside one it fails deep in the driver
with ``MissingGreenlet`` wrapped in a ``StatementError``, after the driver call was already
created (hence "coroutine was never awaited" warnings on aiosqlite).

:class:`SyncSession`, the ``sync_session_class`` of :class:`asyncorm.AsyncSession`, checks
before anything else in ``execute()``, the entry point of every ORM load: outside the greenlet
bridge it raises :class:`~asyncorm.LazyLoadError` naming the attribute and the fixes, before
any autoflush, connection checkout or driver call.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, event, inspect
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import ORMExecuteState, QueryableAttribute, RelationshipProperty, Session
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.util.concurrency import in_greenlet

from . import _gcpause
from ._errors import LazyLoadError, commit_in_unit_error
from ._unsaved import note_flush, note_write

__all__ = ["SyncSession"]


class SyncSession(Session):
    """The :class:`~sqlalchemy.orm.Session` proxied by :class:`asyncorm.AsyncSession`.

    SQLAlchemy's Session, except that ``execute()`` called outside an awaited session call
    (an attribute access that needs a query) raises :class:`~asyncorm.LazyLoadError`
    instead of reaching the driver. It also remembers which transaction executed a statement
    that may write, or flushed (:mod:`asyncorm._unsaved`).
    """

    _asyncorm_connections: list[Connection] | None = None
    """The Connections this session's transactions began with (``after_begin``)."""

    _asyncorm_unit: str | None = None
    """The transactional unit whose function runs in this session (see ``_transaction``):
    a commit from inside it, e.g. through ``run_sync()``, is refused."""

    def commit(self) -> None:
        """SQLAlchemy's ``commit()``, refused inside a transactional unit's function."""
        if self._asyncorm_unit is not None:
            raise commit_in_unit_error(self._asyncorm_unit)
        super().commit()

    def transaction_connections(self) -> list[Connection]:
        """The connections the current transaction began with (closed ones included)."""
        return self._asyncorm_connections or []

    if not TYPE_CHECKING:  # keep SQLAlchemy's overloaded signature for type checkers

        def execute(self, statement, *args, **kwargs):
            if not in_greenlet():
                raise _implicit_io_error(self, statement, args, kwargs)
            return self._run_statement(super().execute, statement, args, kwargs)

        def scalar(self, statement, *args, **kwargs):
            return self._run_statement(super().scalar, statement, args, kwargs)

        def scalars(self, statement, *args, **kwargs):
            return self._run_statement(super().scalars, statement, args, kwargs)

    def _run_statement(
        self, run: Callable[..., Any], statement: Any, args: tuple[Any, ...], kwargs: Any
    ) -> Any:
        """``run(statement, ...)``: one of SQLAlchemy's execute methods, inside the garbage
        collector's pause scope (:mod:`asyncorm._gcpause`), noting a statement that writes."""
        load = _gcpause.enter()
        try:
            result = run(statement, *args, **kwargs)
        finally:
            _gcpause.leave(load)
        note_write(self, statement)
        return result


event.listen(SyncSession, "after_flush", note_flush)


@event.listens_for(SyncSession, "after_begin")
def _remember_connection(session: SyncSession, transaction: Any, connection: Connection) -> None:
    # those of ended transactions are closed: drop them, so a long-lived session keeps none
    known = [c for c in session._asyncorm_connections or () if not c.closed]
    if connection not in known:
        known.append(connection)
    session._asyncorm_connections = known


class _Captured(Exception):
    """Stops the execution the error message was built from."""

    def __init__(self, state: ORMExecuteState) -> None:
        self.relationship_load = state.is_relationship_load
        self.column_load = state.is_column_load
        self.path = state.loader_strategy_path
        self.instance_state = state.lazy_loaded_from


def _implicit_io_error(
    session: Session, statement: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> LazyLoadError:
    accessed = _accessed_attribute(sys._getframe(2))
    if accessed is not None:
        attribute, instance = accessed
        return _attribute_error(instance, attribute.key)
    # no attribute access on the stack (e.g. ``user.addresses = [...]`` loading the old
    # collection): ask SQLAlchemy what this execution loads, stopping it before it runs
    captured = _capture(session, statement, args, kwargs)
    if captured is not None and captured.relationship_load and captured.path is not None:
        prop = captured.path.path[-1]
        owner = captured.instance_state
        if isinstance(prop, RelationshipProperty) and owner is not None:
            instance = owner.obj()
            if instance is not None:
                return _attribute_error(instance, prop.key)
    what = "an expired or deferred attribute" if captured and captured.column_load else "data"
    return LazyLoadError(
        f"Loading {what} needed a query outside an awaited session call, and implicit IO "
        f"cannot run under asyncio. Load what you need in the query (selectinload(), "
        f"undefer()), or await it: `await session.refresh(obj, [name])`, "
        f"`await obj.awaitable_attrs.name`, or `await session.run_sync(fn)` for sync code."
    )


def _accessed_attribute(frame: FrameType | None) -> tuple[QueryableAttribute[Any], object] | None:
    """The innermost ``obj.attribute`` read on the stack: the attribute that needs IO."""
    try:
        while frame is not None:
            if frame.f_code.co_name == "__get__":
                owner = frame.f_locals.get("self")
                instance = frame.f_locals.get("instance")
                if isinstance(owner, QueryableAttribute) and instance is not None:
                    return owner, instance
            frame = frame.f_back
        return None
    finally:
        del frame


def _capture(
    session: Session, statement: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _Captured | None:
    def capture(state: ORMExecuteState) -> None:
        raise _Captured(state)

    event.listen(session, "do_orm_execute", capture, insert=True)
    try:
        Session.execute(session, statement, *args, **kwargs)
    except _Captured as captured:
        return captured
    except Exception:
        return None
    finally:
        event.remove(session, "do_orm_execute", capture)
    return None


def _attribute_error(instance: object, key: str) -> LazyLoadError:
    state: InstanceState[Any] = inspect(instance)
    cls = type(instance)
    name = f"{cls.__name__}.{key}"
    var = _variable_name(cls.__name__)
    shown = _describe(state)
    if isinstance(instance, AsyncAttrs):
        awaitable = f"`await {var}.awaitable_attrs.{key}`"
    else:
        awaitable = (
            f"`await {var}.awaitable_attrs.{key}` (with asyncorm.AsyncAttrs as a base class)"
        )
    io = "needs a query, which cannot run implicitly on attribute access under asyncio"
    if key in state.mapper.relationships:
        return LazyLoadError(
            f"{name} is not loaded on {shown}, and loading it lazily {io}. Load it in the "
            f"query with `.options(selectinload({name}))`, or explicitly with "
            f'`await session.refresh({var}, ["{key}"])` or {awaitable}.'
        )
    if key in state.expired_attributes:
        return LazyLoadError(
            f"{name} of {shown} is expired (by commit() with expire_on_commit=True, "
            f"rollback() or expire()), and reloading it {io}. Reload the object with "
            f"`await session.refresh({var})` or read it with {awaitable}; "
            f"expire_on_commit=False (asyncorm's default) keeps objects loaded after commit."
        )
    return LazyLoadError(
        f"{name} of {shown} is deferred (not loaded by the query), and loading it {io}. "
        f"Load it in the query with `.options(undefer({name}))`, or explicitly with "
        f'`await session.refresh({var}, ["{key}"])` or {awaitable}.'
    )


def _describe(state: InstanceState[Any]) -> str:
    """``<User id=1>``, from the identity key only (reading attributes could need IO)."""
    cls_name = state.class_.__name__
    identity = state.identity
    if identity is None:
        return f"<{cls_name} (pending)>"
    mapper = state.mapper
    names = [mapper.get_property_by_column(column).key for column in mapper.primary_key]
    return "<{} {}>".format(
        cls_name, " ".join(f"{n}={v!r}" for n, v in zip(names, identity, strict=False))
    )


def _variable_name(class_name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", class_name).lower()
