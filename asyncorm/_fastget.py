"""``get()`` by primary key through a prebuilt statement, when that is SQLAlchemy's own load.

On an identity-map miss SQLAlchemy's ``Session.get()`` builds ``select(mapper)``, attaches the
mapper's primary-key criterion (``pk == :pk_1``), and runs it with ``session.execute()``,
then ``.unique().scalars().one()`` (``NoResultFound`` meaning ``None``). Building that
statement and its cache key is a sizeable part of a request that only reads one row.
:func:`plan` hands the caller a statement built once per mapper with the same criterion,
the same bound parameter name and type, and the same execution options, which
:func:`load` runs through the same ``session.execute()`` and reads the same way, in one
greenlet trip as SQLAlchemy's ``AsyncSession.get()``. So autoflush, the identity map, the
session and engine events, asyncorm's deferred BEGIN (PostgreSQL) and SQLite transaction
model all apply as they do to ``get()``; the SQL sent is the same text.

What SQLAlchemy's ``get()`` does that a plain ``select`` would not, and why each case falls
back to it (:func:`plan` returns ``None``): an identity-map entry, expired or of another
class (it reloads, or finds the row deleted, or answers ``None``); ``options``,
``populate_existing``, ``with_for_update`` (version check), ``identity_token``, any
``execution_options`` (they change the load); identifiers it converts (composites, dicts,
``None``, tuples, floats, bools) or a composite primary key; ``always_refresh``; mappers with
inheritance or polymorphic loading, or eager relationship loaders (the statement and the
loaders' own queries are built from it); a registry with mappers not configured yet (they
may add an eager backref: SQLAlchemy's get() configures when it compiles); a Session
subclass with its own lookup or bind resolution (horizontal sharding, read replicas); and
listeners that can tell the two statements apart: ``do_orm_execute`` on the session (its
``ORMExecuteState`` carries the statement, whose ORM compile options differ) and
``before_execute``/``after_execute`` on its engine or connection, or on a connection the
session's transaction checked out (they receive the statement object; the last is seen
from SQLAlchemy 2.1.7 on).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import NoResultFound, UnboundExecutionError
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.context import QueryContext
from sqlalchemy.sql import Select

from ._identity import SCALAR_IDENTS, runs_sqlalchemys

__all__ = ["FastGetPlan", "load", "plan"]

# relationship loader strategies that add SQL to the primary load
_EAGER = frozenset({"joined", "selectin", "subquery", "immediate"})

# the execution options SQLAlchemy's get() passes to session.execute() for a plain load
_EXECUTION_OPTIONS = {"_sa_orm_load_options": QueryContext.default_load_options}

# the Session methods that must be SQLAlchemy's own (not replaced) for the fast path
_GET_AND_BIND = ("get", "get_one", "_get_impl", "_identity_lookup", "get_bind")


class _MapperPlan(NamedTuple):
    """What is known of a mapper: the statement, or None when it needs the general path."""

    attrs: object  # mapper.attrs when this was computed: a new object once a property is added
    statement: Select[Any] | None
    param: str


# the attribute of a Mapper holding its _MapperPlan: on the mapper, so that it lives as long
# as the mapper (a WeakKeyDictionary would keep it alive: the statement refers to the mapper)
_PLAN_ATTRIBUTE = "_asyncorm_fast_get"

taken = 0
"""How many loads went through :func:`load` (for the tests: which path a get() took)."""


class FastGetPlan(NamedTuple):
    """A load :func:`load` can run: the statement and its parameters."""

    statement: Select[Any]
    params: dict[str, Any]


def _mapper_plan(mapper: Mapper[Any]) -> _MapperPlan:
    attrs = mapper.attrs
    cached: _MapperPlan | None = getattr(mapper, _PLAN_ATTRIBUTE, None)
    if cached is not None and cached.attrs is attrs:
        return cached
    statement: Select[Any] | None = None
    param = "pk_1"
    if (
        len(mapper.primary_key) == 1
        and mapper.inherits is None
        and mapper.polymorphic_on is None
        and not mapper.with_polymorphic
        and not mapper.always_refresh
        and not any(rel.lazy is False or rel.lazy in _EAGER for rel in mapper.relationships)
    ):
        column = mapper.primary_key[0]
        # the criterion SQLAlchemy's get() uses: the parameter's name and type included
        statement = select(mapper).where(column == bindparam(param, type_=column.type))
    cached = _MapperPlan(attrs, statement, param)
    setattr(mapper, _PLAN_ATTRIBUTE, cached)
    return cached


def plan(session: Session, entity: Any, ident: Any) -> FastGetPlan | None:
    """The prebuilt load for ``session.get(entity, ident)`` after an identity-map miss, or
    ``None`` when only SQLAlchemy's ``get()`` gives its exact result (see the module
    docstring). The caller has already ruled out every argument of ``get()`` but these."""
    if type(ident) not in SCALAR_IDENTS:
        return None
    if not runs_sqlalchemys(session, _GET_AND_BIND):
        return None
    mapper: Mapper[Any] | None = getattr(entity, "__mapper__", None)
    if mapper is None or mapper.class_ is not entity:
        return None
    if mapper.registry._new_mappers:
        # classes declared since the registry was configured can still change this mapper
        # (a backref, eager or not) without a new mapper.attrs: SQLAlchemy's get() configures
        # the registry (when it compiles), and the plan is rebuilt after that
        return None
    if session.dispatch.do_orm_execute:
        return None
    mapper_plan = _mapper_plan(mapper)
    statement = mapper_plan.statement
    if statement is None or mapper.with_polymorphic:
        return None
    if session.identity_map.get(mapper.identity_key_from_primary_key((ident,))) is not None:
        return None  # present but expired, or of another class: SQLAlchemy decides
    try:
        bind = session.get_bind(mapper)
    except UnboundExecutionError:
        return None  # SQLAlchemy's get() raises it, after an autoflush attempt
    if not isinstance(bind, (Engine, Connection)):
        return None
    dispatch = bind.dispatch
    if dispatch.before_execute or dispatch.after_execute:
        return None
    transaction = session.get_transaction()
    if transaction is not None:
        # listeners can also be on the Connection the transaction checked out of that engine
        # (SessionTransaction.connections: SQLAlchemy 2.1.7, it acquires nothing)
        for conn in getattr(transaction, "connections", ()):
            if conn.dispatch.before_execute or conn.dispatch.after_execute:
                return None
    return FastGetPlan(statement, {mapper_plan.param: ident})


def load(session: Session, fast: FastGetPlan) -> Any:
    """Run ``fast`` in ``session`` (inside the greenlet bridge) as SQLAlchemy's get() does."""
    global taken
    taken += 1
    result = session.execute(fast.statement, fast.params, execution_options=_EXECUTION_OPTIONS)
    try:  # one(), as SQLAlchemy: several rows raise its "exactly one" MultipleResultsFound
        return result.unique().scalars().one()
    except NoResultFound:
        return None
