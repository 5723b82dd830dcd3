"""An awaitable legacy ``Query`` for code ported from the sync Session.

Builder methods return a new query, as in SQLAlchemy; terminals are awaited. The query is a
2.0 :func:`~sqlalchemy.select` underneath, executed with :meth:`AsyncSession.execute`; bulk
``delete()`` / ``update()`` are 2.0 :func:`~sqlalchemy.delete` / :func:`~sqlalchemy.update`
statements with the same ``synchronize_session`` strategies as the sync Query.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, Self, TypeVar

from sqlalchemy import delete, func, inspect, select, update
from sqlalchemy.engine import Result, Row
from sqlalchemy.exc import InvalidRequestError, NoResultFound
from sqlalchemy.sql import Select

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["AsyncQuery"]

_T = TypeVar("_T")

SynchronizeSession = Literal["auto", "evaluate", "fetch", False]

_JOINED = "join(), outerjoin(), select_from(), or from_self()"
_BULK_REFUSED = ("limit()", "offset()", "order_by()", "group_by()", "distinct()", _JOINED)
"""The builders whose state a bulk DELETE/UPDATE would drop, in the order (and the words)
of the sync Query's ``BulkUD._validate_query_state``."""


def _is_entity(entity: Any) -> bool:
    """True for a mapped class, mapper or aliased class: what legacy Query returns bare."""
    insp = inspect(entity, raiseerr=False)
    return bool(getattr(insp, "is_mapper", False) or getattr(insp, "is_aliased_class", False))


class AsyncQuery(Generic[_T]):
    """The legacy ``session.query(...)`` API, awaitable.

    Code written for the sync Session ports line by line by adding ``await`` to the
    terminal call. One mapped entity gives objects; several entities or columns give rows,
    as in the sync Query; results with ORM entities are de-duplicated as the sync Query does.

    Example::

        users = await session.query(User).filter(User.name.like("a%")).order_by(User.id).all()
        count = await session.query(User).filter_by(active=True).count()
        async for user in session.query(User):
            print(user.name)

    .. versionadded:: 0.1
    """

    __slots__ = (
        "_bulk_refused", "_entities", "_for_update", "_load_options", "_session", "_statement"
    )

    def __init__(self, session: AsyncSession, entities: Sequence[Any]) -> None:
        if not entities:
            raise InvalidRequestError(
                "session.query() needs at least one entity or column, "
                "e.g. session.query(User) or session.query(User.id, User.name)."
            )
        self._session = session
        self._entities = tuple(entities)
        self._statement: Select[Any] = select(*entities)
        self._load_options: tuple[Any, ...] = ()
        self._for_update: dict[str, Any] | None = None
        # the _BULK_REFUSED builders in effect: delete() / update() refuse to run with them
        self._bulk_refused: frozenset[str] = frozenset()

    # -- plumbing -------------------------------------------------------------------------

    def _derive(self, statement: Select[Any], **changes: Any) -> Self:
        new = object.__new__(type(self))
        new._session = self._session
        new._entities = changes.get("entities", self._entities)
        new._statement = statement
        new._load_options = changes.get("load_options", self._load_options)
        new._for_update = changes.get("for_update", self._for_update)
        new._bulk_refused = changes.get("bulk_refused", self._bulk_refused)
        return new

    def _tracked(self, statement: Select[Any], builder: str, in_effect: bool) -> Self:
        """``_derive``, recording whether ``builder``'s state is now in effect."""
        if in_effect:
            return self._derive(statement, bulk_refused=self._bulk_refused | {builder})
        return self._derive(statement, bulk_refused=self._bulk_refused - {builder})

    def _clauses_in_effect(self, builder: str, clauses: tuple[Any, ...]) -> bool:
        # order_by() / group_by() as in Select: (None,) clears the clauses, () keeps them
        if not clauses:
            return builder in self._bulk_refused
        return not (len(clauses) == 1 and clauses[0] is None)

    @property
    def statement(self) -> Select[Any]:
        """The 2.0 :class:`~sqlalchemy.sql.Select` this query executes."""
        return self._statement

    @property
    def is_single_entity(self) -> bool:
        """True when the query returns objects rather than rows."""
        return len(self._entities) == 1 and _is_entity(self._entities[0])

    @staticmethod
    def _shape(result: Result[Any]) -> Any:
        # exactly what the sync Query._iter() does: the ORM marks its results with whether
        # they hold one entity per row and whether they contain ORM entities to de-duplicate
        shaped: Any = result
        if result._attributes.get("is_single_entity", False):
            shaped = shaped.scalars()
        if result._attributes.get("filtered", False):
            shaped = shaped.unique()
        return shaped

    async def _run(self, statement: Select[Any] | None = None) -> Any:
        result = await self._session.execute(
            self._statement if statement is None else statement
        )
        return self._shape(result)

    def _check_bulk_state(self) -> None:
        # as the sync Query: DELETE/UPDATE keep only the WHERE criteria, so refuse what else
        # would be dropped (LIMIT 1 would otherwise delete every matching row)
        for builder in _BULK_REFUSED:
            if builder in self._bulk_refused:
                raise InvalidRequestError(
                    f"Can't call Query.update() or Query.delete() when {builder} has been called"
                )

    def _bulk_entity(self, operation: str) -> Any:
        if not self.is_single_entity:
            raise InvalidRequestError(
                f"query().{operation}() works on one mapped entity, e.g. "
                f"session.query(User).filter(...).{operation}(...); this query selects "
                f"{len(self._entities)} entities or columns."
            )
        return self._entities[0]

    def __repr__(self) -> str:
        return f"<AsyncQuery {self._statement}>"

    def __str__(self) -> str:
        return str(self._statement)

    # -- builders -------------------------------------------------------------------------

    def filter(self, *criterion: Any) -> Self:
        """Add WHERE criteria, joined by AND: ``query.filter(User.name == "a")``."""
        return self._derive(self._statement.where(*criterion))

    def where(self, *criterion: Any) -> Self:
        """Synonym of :meth:`filter`."""
        return self.filter(*criterion)

    def filter_by(self, **kwargs: Any) -> Self:
        """Add equality criteria by keyword: ``query.filter_by(name="a")``."""
        return self._derive(self._statement.filter_by(**kwargs))

    def order_by(self, *clauses: Any) -> Self:
        """Add ORDER BY; ``order_by(None)`` cancels it."""
        return self._tracked(
            self._statement.order_by(*clauses),
            "order_by()",
            self._clauses_in_effect("order_by()", clauses),
        )

    def join(self, target: Any, onclause: Any = None, *, isouter: bool = False,
             full: bool = False) -> Self:
        """Join ``target``, as ``Query.join``: ``query.join(User.addresses)``."""
        return self._tracked(
            self._statement.join(target, onclause, isouter=isouter, full=full), _JOINED, True
        )

    def outerjoin(self, target: Any, onclause: Any = None, *, full: bool = False) -> Self:
        """LEFT OUTER JOIN ``target``."""
        return self._tracked(
            self._statement.outerjoin(target, onclause, full=full), _JOINED, True
        )

    def select_from(self, *froms: Any) -> Self:
        """Set the FROM clause explicitly."""
        in_effect = bool(froms) or _JOINED in self._bulk_refused
        return self._tracked(self._statement.select_from(*froms), _JOINED, in_effect)

    def options(self, *options: Any) -> Self:
        """Apply loader options: ``query.options(selectinload(User.addresses))``."""
        return self._derive(
            self._statement.options(*options), load_options=self._load_options + options
        )

    def limit(self, limit: int | None) -> Self:
        """LIMIT the rows returned."""
        return self._tracked(self._statement.limit(limit), "limit()", limit is not None)

    def offset(self, offset: int | None) -> Self:
        """Skip ``offset`` rows."""
        return self._tracked(self._statement.offset(offset), "offset()", offset is not None)

    def distinct(self, *expr: Any) -> Self:
        """SELECT DISTINCT (``DISTINCT ON (expr)`` on PostgreSQL when given expressions)."""
        return self._tracked(self._statement.distinct(*expr), "distinct()", True)

    def group_by(self, *clauses: Any) -> Self:
        """Add GROUP BY."""
        return self._tracked(
            self._statement.group_by(*clauses),
            "group_by()",
            self._clauses_in_effect("group_by()", clauses),
        )

    def having(self, *criterion: Any) -> Self:
        """Add HAVING criteria."""
        return self._derive(self._statement.having(*criterion))

    def with_for_update(self, *, nowait: bool = False, read: bool = False, of: Any = None,
                        skip_locked: bool = False, key_share: bool = False) -> Self:
        """SELECT ... FOR UPDATE (ignored by SQLite, whose transactions already serialise)."""
        options = {"nowait": nowait, "read": read, "of": of, "skip_locked": skip_locked,
                   "key_share": key_share}
        return self._derive(self._statement.with_for_update(**options), for_update=options)

    def with_entities(self, *entities: Any) -> AsyncQuery[Any]:
        """Replace what the query selects, keeping its criteria."""
        return self._derive(self._statement.with_only_columns(*entities), entities=entities)

    def add_columns(self, *columns: Any) -> AsyncQuery[Any]:
        """Select more columns or entities; the query then returns rows."""
        return self._derive(
            self._statement.add_columns(*columns), entities=self._entities + columns
        )

    def execution_options(self, **options: Any) -> Self:
        """Set execution options, e.g. ``populate_existing=True``."""
        return self._derive(self._statement.execution_options(**options))

    def populate_existing(self) -> Self:
        """Overwrite objects already in the identity map with the rows loaded."""
        return self.execution_options(populate_existing=True)

    # -- terminals ------------------------------------------------------------------------

    async def all(self) -> list[_T]:
        """All results: objects for one entity, rows otherwise."""
        return list((await self._run()).all())

    async def first(self) -> _T | None:
        """The first result (LIMIT 1), or None."""
        return (await self._run(self._statement.limit(1))).first()  # type: ignore[no-any-return]

    async def one(self) -> _T:
        """Exactly one result; raises NoResultFound or MultipleResultsFound otherwise."""
        return (await self._run()).one()  # type: ignore[no-any-return]

    async def one_or_none(self) -> _T | None:
        """One result or None; raises MultipleResultsFound for more."""
        return (await self._run()).one_or_none()  # type: ignore[no-any-return]

    async def scalar(self) -> Any:
        """The first column of the only row (the object for one entity), or None."""
        try:
            result = await self.one()
        except NoResultFound:
            return None
        return result[0] if isinstance(result, Row) else result

    async def count(self) -> int:
        """``SELECT count(*)`` over this query as a subquery, as the sync Query counts."""
        counted = select(func.count()).select_from(self._statement.subquery())
        return int(await self._session.scalar(counted) or 0)

    async def exists(self) -> bool:
        """True when the query matches at least one row (``SELECT EXISTS (...)``)."""
        return bool(await self._session.scalar(select(self._statement.exists())))

    async def get(self, ident: Any) -> _T | None:
        """The object with primary key ``ident``, from the identity map when present.

        As :meth:`AsyncSession.get`, with this query's loader options, FOR UPDATE and
        execution options (``populate_existing()`` reloads a present object). As in the sync
        Query, a query with criteria raises :class:`~sqlalchemy.exc.InvalidRequestError`.
        """
        entity = self._bulk_entity("get")
        statement = self._statement
        if (
            statement._where_criteria
            or statement._from_obj
            or statement._setup_joins
            or statement._limit_clause is not None
            or statement._offset_clause is not None
            or statement._group_by_clauses
        ):
            raise InvalidRequestError(
                "query().get() looks an object up by primary key alone, but this query has "
                "criteria (filter, join, limit, offset or group_by) it would ignore; call "
                "get() on session.query(Entity) or use one_or_none()."
            )
        return await self._session.get(
            entity,
            ident,
            options=self._load_options,
            with_for_update=self._for_update,
            execution_options=statement.get_execution_options(),
        )

    async def delete(self, synchronize_session: SynchronizeSession = "auto") -> int:
        """Bulk DELETE the rows this query matches; returns the number of rows deleted.

        ``synchronize_session`` keeps the session's objects in sync as in the sync Query.
        As there, a query with ``limit()``, ``offset()``, ``order_by()``, ``group_by()``,
        ``distinct()``, ``join()``, ``outerjoin()`` or ``select_from()`` raises
        :class:`~sqlalchemy.exc.InvalidRequestError` before any SQL is sent.
        """
        self._check_bulk_state()
        entity = self._bulk_entity("delete")
        statement = delete(entity)
        if self._statement.whereclause is not None:
            statement = statement.where(self._statement.whereclause)
        result = await self._session.execute(
            statement,
            execution_options={
                **self._statement.get_execution_options(),
                "synchronize_session": synchronize_session,
            },
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def update(self, values: Mapping[Any, Any],
                     synchronize_session: SynchronizeSession = "auto") -> int:
        """Bulk UPDATE the rows this query matches with ``values``; returns the row count.

        Refuses the same queries as :meth:`delete`, as the sync Query does.
        """
        self._check_bulk_state()
        entity = self._bulk_entity("update")
        statement = update(entity).values(dict(values))
        if self._statement.whereclause is not None:
            statement = statement.where(self._statement.whereclause)
        result = await self._session.execute(
            statement,
            execution_options={
                **self._statement.get_execution_options(),
                "synchronize_session": synchronize_session,
            },
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    def __aiter__(self) -> AsyncIterator[_T]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[_T]:
        # buffered, like the sync Query: the loop body may run other queries on the session
        for item in await self.all():
            yield item
