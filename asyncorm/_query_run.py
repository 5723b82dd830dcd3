"""The IO half of :class:`~asyncorm.AsyncQuery`: terminals, slicing, iteration, ``exists()``.

:class:`_QueryRunner` is the base class of ``AsyncQuery`` holding what runs the query on its
session; ``asyncorm/_query.py`` holds the builders and the IO-free constructs. Split only to
keep each module readable: the runner has no public name of its own.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import AsyncGenerator, Coroutine, Generator, Mapping
from typing import TYPE_CHECKING, Any, Generic, Literal, Self, SupportsIndex, TypeVar, overload

from sqlalchemy import delete, func, inspect, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import InvalidRequestError, NoResultFound
from sqlalchemy.sql import Select
from sqlalchemy.sql.expression import Exists

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

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


_NEGATIVE_INDEX = (
    "AsyncQuery{item}: negative indexes are not accepted by SQL index / slice operators "
    "(as in the sync Query); reverse the order_by() and index from the start, or index "
    "the list from `await query.all()`."
)


class AwaitableExists(Exists):
    """The ``EXISTS`` construct of :meth:`AsyncQuery.exists`, which can also be awaited.

    Used in another statement, it is SQLAlchemy's :class:`~sqlalchemy.sql.expression.Exists`,
    as the sync ``Query.exists()`` returns; awaited, it runs ``SELECT EXISTS (...)`` on the
    query's session and gives a bool.

    Example::

        if await session.query(User).filter_by(name="ann").exists():
            ...
        has_address = session.query(Address).filter(Address.user_id == User.id).exists()
        users = await session.query(User).filter(has_address).all()

    .. versionadded:: 0.1
    """

    inherit_cache = True

    _asyncorm_session: AsyncSession

    def __await__(self) -> Generator[Any, None, bool]:
        return self._run().__await__()

    async def _run(self) -> bool:
        return bool(await self._asyncorm_session.scalar(select(self)))

    # The coroutine protocol, so that code that took the coroutine this method used to
    # return keeps working: asyncio.create_task(query.exists()) accepts only coroutines.
    # It drives one run of the statement; each `await` starts a fresh one.

    def _driven(self) -> Coroutine[Any, Any, bool]:
        running: Coroutine[Any, Any, bool] | None = self.__dict__.get("_asyncorm_running")
        if running is None:
            running = self.__dict__["_asyncorm_running"] = self._run()
        return running

    def send(self, value: Any) -> Any:
        """Coroutine protocol: advance the run started by a task driving this construct."""
        return self._driven().send(value)

    def throw(self, *args: Any) -> Any:
        """Coroutine protocol: raise an exception inside that run."""
        return self._driven().throw(*args)

    def close(self) -> None:
        """Coroutine protocol: close that run, if any."""
        running = self.__dict__.pop("_asyncorm_running", None)
        if running is not None:
            running.close()


Coroutine.register(AwaitableExists)


class _QueryRunner(Generic[_T]):
    """Runs an :class:`~asyncorm.AsyncQuery`: its state and builders live in the subclass."""

    __slots__ = ()

    if TYPE_CHECKING:
        _session: AsyncSession
        _entities: tuple[Any, ...]
        _statement: Select[Any]
        _load_options: tuple[Any, ...]
        _for_update: dict[str, Any] | None
        _bulk_refused: frozenset[str]
        _params: dict[str, Any]
        _tuples: bool

        @property
        def statement(self) -> Select[Any]: ...

        def slice(self, start: int | None, stop: int | None) -> Self: ...

    def _one_entity(self) -> bool:
        return len(self._entities) == 1 and _is_entity(self._entities[0])

    @property
    def _yield_per(self) -> int | None:
        yield_per: int | None = self._statement.get_execution_options().get("yield_per")
        return yield_per

    def _shape(self, result: Any) -> Any:
        # what the sync Query._iter() does: the ORM marks its results with whether they hold
        # one entity per row and whether they contain ORM entities to de-duplicate; batches
        # of yield_per() are not de-duplicated (that would hold every object seen)
        shaped: Any = result
        if result._attributes.get("is_single_entity", False) and not self._tuples:
            shaped = shaped.scalars()
        if result._attributes.get("filtered", False) and self._yield_per is None:
            shaped = shaped.unique()
        return shaped

    async def _fetch(self, method: str, statement: Select[Any] | None = None) -> Any:
        """Run the query and call ``method`` (``all``, ``first``, ...) on its shaped result.

        After ``yield_per()`` the statement wants a server-side cursor, which
        ``AsyncSession.execute()`` refuses: it runs through ``AsyncSession.stream()``.
        """
        statement = self._statement if statement is None else statement
        params = self._params or None
        if self._yield_per is None:
            result = await self._session.execute(statement, params)
            return getattr(self._shape(result), method)()
        streamed = await self._session.stream(statement, params)
        return await getattr(self._shape(streamed), method)()

    def _check_bulk_state(self) -> None:
        # as the sync Query: DELETE/UPDATE keep only the WHERE criteria, so refuse what else
        # would be dropped (LIMIT 1 would otherwise delete every matching row)
        for builder in _BULK_REFUSED:
            if builder in self._bulk_refused:
                raise InvalidRequestError(
                    f"Can't call Query.update() or Query.delete() when {builder} has been called"
                )

    def _bulk_options(self, synchronize_session: SynchronizeSession) -> dict[str, Any]:
        # "evaluate" matches the session's objects against the criteria in Python, where a
        # bindparam() has no value of params(): it matches nothing and leaves the changed
        # objects stale (so does the sync Query); "auto" would pick it, so use "fetch"
        if synchronize_session == "auto" and self._params:
            synchronize_session = "fetch"
        return {
            **self._statement.get_execution_options(),
            "synchronize_session": synchronize_session,
        }

    def _bulk_entity(self, operation: str) -> Any:
        if not self._one_entity():
            raise InvalidRequestError(
                f"query().{operation}() works on one mapped entity, e.g. "
                f"session.query(User).filter(...).{operation}(...); this query selects "
                f"{len(self._entities)} entities or columns."
            )
        return self._entities[0]

    def exists(self) -> AwaitableExists:
        """``EXISTS (query)``: awaited, True when the query matches at least one row.

        Not awaited, it is the :class:`~sqlalchemy.sql.expression.Exists` construct the sync
        ``Query.exists()`` returns, for use in another query; awaiting it runs ``SELECT
        EXISTS (...)`` on this query's session.

        Example::

            if await session.query(User).filter_by(name="ann").exists():
                ...
            found = await session.query(session.query(User).filter_by(name="ann").exists()).scalar()
        """
        construct = AwaitableExists(self.statement)
        construct._asyncorm_session = self._session
        return construct

    # -- terminals ------------------------------------------------------------------------

    async def all(self) -> list[_T]:
        """All results: objects for one entity, rows otherwise."""
        return list(await self._fetch("all"))

    async def first(self) -> _T | None:
        """The first result (LIMIT 1), or None."""
        return await self._fetch("first", self._statement.limit(1))  # type: ignore[no-any-return]

    async def one(self) -> _T:
        """Exactly one result; raises NoResultFound or MultipleResultsFound otherwise."""
        return await self._fetch("one")  # type: ignore[no-any-return]

    async def one_or_none(self) -> _T | None:
        """One result or None; raises MultipleResultsFound for more."""
        return await self._fetch("one_or_none")  # type: ignore[no-any-return]

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
        return int(await self._session.scalar(counted, self._params or None) or 0)

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

        ``synchronize_session`` keeps the session's objects in sync as in the sync Query;
        after ``params()``, ``"auto"`` means ``"fetch"`` (``"evaluate"`` cannot see the
        values, and the sync Query's ``"auto"`` leaves the objects stale).
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
            self._params or None,
            execution_options=self._bulk_options(synchronize_session),
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
            self._params or None,
            execution_options=self._bulk_options(synchronize_session),
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    @overload
    def __getitem__(self, item: builtins.slice) -> Coroutine[Any, Any, list[_T]]: ...

    @overload
    def __getitem__(self, item: SupportsIndex) -> Coroutine[Any, Any, _T]: ...

    def __getitem__(self, item: builtins.slice | SupportsIndex) -> Coroutine[Any, Any, Any]:
        """``await query[start:stop]`` is the list of those results, ``await query[i]`` one.

        The sync ``query[10:20]`` runs the query; here the IO is awaited, so indexing returns
        a coroutine to await. A slice runs with LIMIT/OFFSET (see :meth:`slice`) and gives
        a list (a step is applied to that list, as in sync); an index gives the object or
        row at that position, or raises :class:`IndexError` when the query has fewer rows.
        Negative indexes raise :class:`IndexError` at once, as in the sync Query (SQL
        cannot count from the end without loading every row), also in a slice such as
        ``[1:-1]`` for which the sync Query returns ``[]``.

        Example::

            page = await session.query(User).order_by(User.id)[10:20]
            third = await session.query(User).order_by(User.id)[2]
        """
        if isinstance(item, slice):
            start, stop, step = (_index(x) for x in (item.start, item.stop, item.step))
            # any negative bound raises; the sync Query returns [] for some ([1:-1]) where
            # a list would not, as it checks for an empty range first
            if (start is not None and start < 0) or (stop is not None and stop < 0):
                raise IndexError(_NEGATIVE_INDEX.format(
                    item=f"[{'' if start is None else start}:{'' if stop is None else stop}]"
                ))
            if start is not None and stop is not None and stop <= start:
                return self._nothing()
            return self._slice_list(start, stop, step)
        index = _index(item)
        if index is None or index < 0:
            raise IndexError(_NEGATIVE_INDEX.format(item=f"[{index}]"))
        return self._item(index)

    async def _nothing(self) -> list[_T]:
        return []

    async def _slice_list(self, start: int | None, stop: int | None,
                          step: int | None) -> list[_T]:
        rows = await self.slice(start, stop).all()
        return rows if step is None else rows[::step]

    async def _item(self, index: int) -> _T:
        rows = await self._slice_list(index, index + 1, None)
        if not rows:
            raise IndexError(
                f"AsyncQuery[{index}]: index out of range, the query has no row at "
                f"offset {index}."
            )
        return rows[0]

    def __aiter__(self) -> AsyncGenerator[_T, None]:
        """``async for`` over the results: buffered first, or streamed after ``yield_per()``.

        Without ``yield_per()`` the results are loaded first, as the sync Query does, and
        the loop body may use the session freely. After ``yield_per(n)`` they stream through
        a server-side cursor n rows at a time; the loop body may still run other queries on
        the session. A loop left early closes the cursor when the iterator is finalized;
        close it at once with ``contextlib.aclosing``.

        Example::

            async with contextlib.aclosing(aiter(query.yield_per(500))) as users:
                async for user in users:
                    if done(user):
                        break
        """
        return self._iterate()

    async def _iterate(self) -> AsyncGenerator[_T, None]:
        if self._yield_per is None:
            # buffered, like the sync Query: the loop body may run other queries on the session
            for item in await self.all():
                yield item
            return
        # streamed in batches of yield_per rows through a server-side cursor
        result = await self._session.stream(self._statement, self._params or None)
        try:
            async for item in self._shape(result):
                yield item
        finally:
            await result.close()


def _index(value: Any) -> int | None:
    """An index or slice bound as an int (None stays None), as ``list`` indexing reads it."""
    if value is None:
        return None
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"AsyncQuery indices must be integers or slices, not {type(value).__name__}"
        ) from None
