"""``get()`` from the identity map without the greenlet bridge.

SQLAlchemy's ``AsyncSession.get()`` always spawns a greenlet to run the sync ``Session.get()``,
even when the answer is an object already in the identity map and no IO happens: about five
times the cost of the sync call. :func:`identity_map_hit` answers that case directly, reading
the same identity map with the same key SQLAlchemy's ``Session.get()`` computes, and gives up
(returns ``None``, so the caller runs SQLAlchemy's ``get()``) whenever SQLAlchemy could do
anything but return the object: an expired object (reloaded, or found deleted), a class or
polymorphic mismatch, ``always_refresh`` mappers, or identifiers it would have to convert.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_state

__all__ = ["SCALAR_IDENTS", "identity_map_hit", "runs_sqlalchemys"]

_LOOKUP = ("get", "get_one", "_get_impl", "_identity_lookup")

SCALAR_IDENTS = frozenset(
    {int, str, bytes, uuid.UUID, decimal.Decimal, datetime.date, datetime.datetime}
)
"""Identifier types SQLAlchemy's get() wraps into a one-element primary key as they are."""


_SA_METHODS = {
    name: getattr(Session, name)
    for name in (
        "begin", "_autobegin_t", "close", "_close_impl", "expunge_all",
        "get", "get_one", "_get_impl", "_identity_lookup", "get_bind",
    )
}  # fmt: skip
"""SQLAlchemy's own ``Session`` methods, as imported (before anything could patch them)."""


def runs_sqlalchemys(session: Session, names: tuple[str, ...]) -> bool:
    """Whether calling ``session``'s methods ``names`` runs SQLAlchemy's own code, as
    imported: not replaced on the instance, nor on its class or on ``Session`` itself
    (a subclass, instrumentation, a test's monkeypatch), whenever that happened. Asked at
    each call, not cached: a method may be replaced after the class's first session.
    ``names`` are keys of :data:`_SA_METHODS`."""
    cls = type(session)
    instance = session.__dict__
    for name in names:
        if name in instance or getattr(cls, name) is not _SA_METHODS[name]:
            return False
    return True


def identity_map_hit(session: Session, entity: Any, ident: Any) -> Any:
    """The object ``session.get(entity, ident)`` would return without SQL, or ``None``.

    ``None`` means "ask SQLAlchemy", not "no such row".
    """
    if not runs_sqlalchemys(session, _LOOKUP):
        return None  # its own lookup (a Session subclass, e.g. horizontal sharding; a patch)
    mapper: Mapper[Any] | None = getattr(entity, "__mapper__", None)
    if mapper is None or mapper.class_ is not entity or mapper.always_refresh:
        return None  # not a mapped class itself (a Mapper, an alias, an unmapped subclass)
    ident_type = type(ident)
    if ident_type in SCALAR_IDENTS:
        primary_key: tuple[Any, ...] = (ident,)
    elif ident_type is tuple or ident_type is list:
        primary_key = tuple(ident)
    else:
        return None  # dicts, composites, None: SQLAlchemy converts or rejects them
    if len(primary_key) != len(mapper.primary_key):
        return None
    instance = session.identity_map.get(mapper.identity_key_from_primary_key(primary_key))
    if instance is None or not isinstance(instance, mapper.class_):
        return None
    state = instance_state(instance)
    if state.expired or (mapper.inherits is not None and not state.mapper.isa(mapper)):
        return None
    return instance
