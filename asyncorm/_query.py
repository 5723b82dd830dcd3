"""An awaitable legacy ``Query`` for code ported from the sync Session.

Builder methods return a new query, as in SQLAlchemy; terminals are awaited. The query is a
2.0 :func:`~sqlalchemy.select` underneath, executed with :meth:`AsyncSession.execute`; bulk
``delete()`` / ``update()`` are 2.0 :func:`~sqlalchemy.delete` / :func:`~sqlalchemy.update`
statements with the same ``synchronize_session`` strategies as the sync Query.

What the sync Query does without IO, this one does too and returns the same SQLAlchemy
constructs (``statement``, ``subquery()``, ``cte()``, ``scalar_subquery()``, ``label()``, and
the query itself wherever a SELECT is expected, e.g. ``User.id.in_(query)``). What the sync
Query does with IO is awaited: the terminals, slicing (``await query[10:20]``) and ``async
for``, which streams through a server-side cursor after ``yield_per(n)``.

This module holds the builders and the IO-free constructs; the terminals, slicing and
iteration are in ``_query_run.py`` (the base class ``_QueryRunner``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeVar

from sqlalchemy import inspect, select
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import aliased, with_parent
from sqlalchemy.sql import Select
from sqlalchemy.sql.expression import CTE, Label, ScalarSelect, Subquery
from sqlalchemy.sql.selectable import LABEL_STYLE_TABLENAME_PLUS_COL

from ._query_run import _JOINED, AwaitableExists, _QueryRunner

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import _ImmutableExecuteOptions
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm.interfaces import ORMColumnDescription
    from sqlalchemy.sql.elements import ColumnElement

__all__ = ["AsyncQuery", "AwaitableExists"]

_T = TypeVar("_T")
_Q = TypeVar("_Q")

class AsyncQuery(_QueryRunner[_T]):
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
        "_bulk_refused", "_entities", "_for_update", "_load_options", "_params", "_session",
        "_statement", "_tuples",
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
        # bound parameter values from params(), passed at execution as the sync Query does
        self._params: dict[str, Any] = {}
        # only_return_tuples(): rows even for one entity
        self._tuples = False

    # -- plumbing -------------------------------------------------------------------------

    def _derive(self, statement: Select[Any], **changes: Any) -> Self:
        new = object.__new__(type(self))
        new._session = self._session
        new._entities = changes.get("entities", self._entities)
        new._statement = statement
        new._load_options = changes.get("load_options", self._load_options)
        new._for_update = changes.get("for_update", self._for_update)
        new._bulk_refused = changes.get("bulk_refused", self._bulk_refused)
        new._params = changes.get("params", self._params)
        new._tuples = changes.get("tuples", self._tuples)
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
        """The 2.0 :class:`~sqlalchemy.sql.Select` this query executes, with its ``params()``.

        Example::

            rows = await session.execute(session.query(User.id).filter_by(name="ann").statement)
        """
        if self._params:
            return self._statement.params(self._params)
        return self._statement

    @property
    def selectable(self) -> Select[Any]:
        """The SELECT used where this query is embedded: :meth:`__clause_element__`.

        Example::

            subquery = session.query(Address.user_id).selectable.subquery()
        """
        return self.__clause_element__()

    def __clause_element__(self) -> Select[Any]:
        """The query as a SELECT, so that it can go where SQLAlchemy expects one.

        As the sync Query, with table-qualified labels; no IO.

        Example::

            with_address = User.id.in_(session.query(Address.user_id))
            users = await session.query(User).filter(with_address).all()
        """
        return self.statement.set_label_style(LABEL_STYLE_TABLENAME_PLUS_COL)

    @property
    def is_single_entity(self) -> bool:
        """True when the query returns objects rather than rows."""
        return not self._tuples and self._one_entity()

    @property
    def whereclause(self) -> ColumnElement[bool] | None:
        """The WHERE criteria so far, joined by AND, or None.

        Example::

            print(session.query(User).filter_by(name="ann").whereclause)  # users.name = :name_1
        """
        return self._statement.whereclause

    @property
    def column_descriptions(self) -> list[ORMColumnDescription]:
        """What each result column is: name, type, expression and entity, as in the sync Query.

        Example::

            [d["name"] for d in session.query(User, User.id).column_descriptions]  # User, id
        """
        descriptions: list[ORMColumnDescription] = self._statement.column_descriptions
        return descriptions

    def get_execution_options(self) -> _ImmutableExecuteOptions:
        """The execution options that take effect when the query runs.

        Example::

            session.query(User).yield_per(100).get_execution_options()["yield_per"]  # 100
        """
        return self._statement.get_execution_options()

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

    def params(self, values: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Self:
        """Give values to the query's :func:`~sqlalchemy.bindparam` placeholders.

        As the sync Query: a dict, keywords or both; later calls add to earlier ones. The
        values are sent with the statement when the query runs, and are part of
        :attr:`statement`, :meth:`subquery` and the other constructs built from the query.

        Example::

            query = session.query(User).filter(text("id < :value and name = :name"))
            users = await query.params(value=224, name="fred").all()
        """
        merged = {**self._params, **(values or {}), **kwargs}
        return self._derive(self._statement, params=merged)

    def slice(self, start: int | None, stop: int | None) -> Self:
        """LIMIT/OFFSET for the rows ``start`` to ``stop`` (excluded), as ``range()``.

        As the sync Query, the bounds count from an offset already set (``offset(5)
        .slice(2, 4)`` is OFFSET 7 LIMIT 2), and None leaves that side open. A builder:
        ``await query[start:stop]`` runs it at once.

        Example::

            page = await session.query(User).order_by(User.id).slice(10, 20).all()
        """
        # Select.slice() is the sync Query's slice(); it takes None for an open side too
        statement = self._statement.slice(start, stop)  # type: ignore[arg-type]
        refused = self._bulk_refused - {"limit()", "offset()"}
        if statement._limit_clause is not None:
            refused |= {"limit()"}
        if statement._offset_clause is not None:
            refused |= {"offset()"}
        return self._derive(statement, bulk_refused=refused)

    def yield_per(self, count: int) -> Self:
        """Load ``count`` rows at a time: ``async for`` then streams instead of buffering.

        As ``yield_per`` in SQLAlchemy: the query runs through a server-side cursor
        (:meth:`AsyncSession.stream`, as SQLAlchemy's asyncio docs recommend) and ``async
        for`` builds and yields objects one batch of ``count`` rows at a time, so memory
        stays flat. Results are not de-duplicated, and joined eager loading of collections
        is refused (use ``selectinload()``), both as in SQLAlchemy. The terminals
        (``all()``, ``first()``, ...) also fetch in batches but still return everything.

        Example::

            async for user in session.query(User).order_by(User.id).yield_per(1000):
                export(user)
        """
        if isinstance(count, bool) or operator.index(count) < 1:
            raise ValueError(
                f"yield_per() takes the number of rows to load per batch, a positive int; "
                f"got {count!r}."
            )
        return self.execution_options(yield_per=operator.index(count))

    def autoflush(self, setting: bool) -> Self:
        """Whether the session flushes pending changes before this query runs.

        Example::

            draft = await session.query(User).autoflush(False).filter_by(name="new").all()
        """
        return self.execution_options(autoflush=setting)

    def correlate(self, *fromclauses: Any) -> Self:
        """Correlate these FROM objects with an enclosing query when used as a subquery.

        Example::

            count = (session.query(func.count(Address.id))
                     .filter(Address.user_id == User.id).correlate(User).scalar_subquery())
        """
        return self._derive(self._statement.correlate(*fromclauses))

    def prefix_with(self, *prefixes: Any, dialect: str = "*") -> Self:
        """Add text after ``SELECT``, e.g. a hint comment.

        Example::

            query = session.query(User).prefix_with("/*+ SeqScan(users) */", dialect="postgresql")
        """
        return self._derive(self._statement.prefix_with(*prefixes, dialect=dialect))

    def suffix_with(self, *suffixes: Any, dialect: str = "*") -> Self:
        """Add text after the whole statement.

        Example::

            query = session.query(User).suffix_with("-- report", dialect="sqlite")
        """
        return self._derive(self._statement.suffix_with(*suffixes, dialect=dialect))

    def with_hint(self, selectable: Any, text: str, dialect_name: str = "*") -> Self:
        """Add an indexing or other hint for ``selectable``, as ``Select.with_hint``.

        Example::

            query = session.query(User).with_hint(User, "WITH (NOLOCK)", "mssql")
        """
        return self._derive(self._statement.with_hint(selectable, text, dialect_name))

    def with_statement_hint(self, text: str, dialect_name: str = "*") -> Self:
        """Add a hint for the whole statement, as ``Select.with_statement_hint``.

        Example::

            query = session.query(User).with_statement_hint("OPTION (MAXDOP 1)", "mssql")
        """
        return self._derive(self._statement.with_statement_hint(text, dialect_name))

    def with_parent(self, instance: object, property: Any = None,
                    from_entity: Any = None) -> Self:
        """Filter to the objects related to ``instance`` through relationship ``property``.

        As the sync Query: without ``property``, the first relationship of ``instance``'s
        class that points to this query's entity (or ``from_entity``) is used.

        Example::

            addresses = await session.query(Address).with_parent(ann, User.addresses).all()
        """
        entity = self._entities[0] if from_entity is None else from_entity
        if property is None:
            target = inspect(entity).mapper
            found = [r for r in inspect(instance).mapper.relationships if r.mapper is target]
            if not found:
                raise InvalidRequestError(
                    f"with_parent(): {type(instance).__name__} has no relationship to "
                    f"{target.class_.__name__}; pass the relationship, e.g. "
                    f"with_parent(obj, {type(instance).__name__}.<relationship>)."
                )
            property = found[0]
        return self.filter(with_parent(instance, property, from_entity))

    def add_entity(self, entity: Any, alias: Any = None) -> AsyncQuery[Any]:
        """Select one more mapped entity (over ``alias`` when given); results become rows.

        Example::

            rows = await session.query(User).join(User.addresses).add_entity(Address).all()
        """
        return self.add_columns(entity if alias is None else aliased(entity, alias))

    def only_return_tuples(self, value: bool) -> AsyncQuery[Any]:
        """With True, return rows even when the query selects one entity.

        Example::

            rows = await session.query(User).only_return_tuples(True).all()  # [(User,), ...]
        """
        return self._derive(self._statement, tuples=value)

    def tuples(self) -> AsyncQuery[tuple[_T]]:
        """Return rows (typed as tuples) even for one entity: ``only_return_tuples(True)``.

        Example::

            for (user,) in await session.query(User).tuples().all():
                ...
        """
        return self.only_return_tuples(True)

    def with_session(self, session: AsyncSession) -> Self:
        """The same query, run by ``session``.

        Example::

            users = await query.with_session(other_session).all()
        """
        new = self._derive(self._statement)
        new._session = session
        return new

    def with_transformation(self, fn: Callable[[Self], _Q]) -> _Q:
        """Return ``fn(self)``: reusable query transformations, as in the sync Query.

        Example::

            def active(query): return query.filter(User.fullname.is_not(None))
            users = await session.query(User).with_transformation(active).all()
        """
        return fn(self)

    # -- constructs (no IO) ---------------------------------------------------------------

    def subquery(self, name: str | None = None, with_labels: bool = False,
                 reduce_columns: bool = False) -> Subquery:
        """The query as a named subquery for a FROM clause, as the sync ``Query.subquery()``.

        ``with_labels`` prefixes column names with their table's; ``reduce_columns`` drops
        same-named columns equated by a foreign key or the WHERE clause.

        Example::

            counts = (session.query(Address.user_id, func.count().label("n"))
                      .group_by(Address.user_id).subquery("counts"))
            rows = await session.query(User.name, counts.c.n).join(
                counts, counts.c.user_id == User.id).all()
        """
        statement = self.statement
        if with_labels:
            statement = statement.set_label_style(LABEL_STYLE_TABLENAME_PLUS_COL)
        if reduce_columns:
            statement = statement.reduce_columns()
        return statement.subquery(name)

    def cte(self, name: str | None = None, recursive: bool = False,
            nesting: bool = False) -> CTE:
        """The query as a common table expression (``WITH``), as the sync ``Query.cte()``.

        Example::

            ann = session.query(User.id).filter_by(name="ann").cte("ann")
            emails = await session.query(Address.email).join(ann, ann.c.id == Address.user_id).all()
        """
        return self.statement.cte(name, recursive=recursive, nesting=nesting)

    def scalar_subquery(self) -> ScalarSelect[Any]:
        """The query as a scalar subquery: a column expression of its one column and row.

        Example::

            n = (session.query(func.count(Address.id))
                 .filter(Address.user_id == User.id).scalar_subquery())
            rows = await session.query(User.name, n).all()
        """
        return self.statement.scalar_subquery()

    def label(self, name: str | None) -> Label[Any]:
        """The query as a scalar subquery labelled ``name``.

        Example::

            n = (session.query(func.count(Address.id))
                 .filter(Address.user_id == User.id).label("n_addresses"))
            rows = await session.query(User.name, n).all()
        """
        return self.statement.label(name)
