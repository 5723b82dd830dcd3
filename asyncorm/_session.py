"""``AsyncSession`` and ``async_sessionmaker``."""

from __future__ import annotations

from typing import Any, TypeVar, overload

from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.orm import Mapper

from ._query import AsyncQuery

__all__ = ["AsyncSession", "async_sessionmaker"]

_O = TypeVar("_O")
_AS = TypeVar("_AS", bound=sa_asyncio.AsyncSession)


class AsyncSession(sa_asyncio.AsyncSession):
    """SQLAlchemy's :class:`~sqlalchemy.ext.asyncio.AsyncSession`, plus the legacy ``query()``.

    A drop-in: constructed directly it takes SQLAlchemy's arguments with SQLAlchemy's
    defaults, and every documented member keeps its meaning. The identity map, unit of
    work, flush and autoflush are SQLAlchemy's own.

    Example::

        async with asyncorm.AsyncSession(engine) as session:
            session.add(User(name="ann"))
            await session.commit()
            ann = await session.query(User).filter_by(name="ann").one()

    .. versionadded:: 0.1
    """

    @overload
    def query(self, entity: type[_O], /) -> AsyncQuery[_O]: ...

    @overload
    def query(self, entity: Mapper[_O], /) -> AsyncQuery[_O]: ...

    @overload
    def query(self, *entities: Any) -> AsyncQuery[Any]: ...

    def query(self, *entities: Any) -> AsyncQuery[Any]:
        """Start a legacy-style query; the terminal methods are awaited.

        Example::

            user = await session.query(User).filter(User.id == 5).one()
            rows = await session.query(User.id, User.name).order_by(User.id).all()
        """
        return AsyncQuery(self, entities)


class async_sessionmaker(sa_asyncio.async_sessionmaker[_AS]):
    """A configured :class:`AsyncSession` factory, as SQLAlchemy's ``async_sessionmaker``.

    Differences from SQLAlchemy's: it produces :class:`asyncorm.AsyncSession`, and
    ``expire_on_commit`` defaults to ``False``. After commit an expired attribute would be
    reloaded on access, which is implicit IO, and implicit IO fails under asyncio; objects
    stay readable after commit instead. Pass ``expire_on_commit=True`` to get SQLAlchemy's
    behaviour back.

    Example::

        Session = asyncorm.async_sessionmaker()      # at import time
        Session.configure(bind=engine)               # at startup

        async with Session() as session:
            ...
        async with Session.begin() as session:       # commits, or rolls back on error
            session.add(User(name="ann"))
        session = Session(autoflush=False)           # per-call overrides

    .. versionadded:: 0.1
    """

    @overload
    def __init__(
        self,
        bind: AsyncEngine | AsyncConnection | None = ...,
        *,
        class_: type[_AS],
        autoflush: bool = ...,
        expire_on_commit: bool = ...,
        info: dict[Any, Any] | None = ...,
        **kw: Any,
    ) -> None: ...

    @overload
    def __init__(
        self: async_sessionmaker[AsyncSession],
        bind: AsyncEngine | AsyncConnection | None = ...,
        *,
        autoflush: bool = ...,
        expire_on_commit: bool = ...,
        info: dict[Any, Any] | None = ...,
        **kw: Any,
    ) -> None: ...

    def __init__(
        self,
        bind: AsyncEngine | AsyncConnection | None = None,
        *,
        class_: type[_AS] = AsyncSession,  # type: ignore[assignment]
        autoflush: bool = True,
        expire_on_commit: bool = False,
        info: dict[Any, Any] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(
            bind,
            class_=class_,
            autoflush=autoflush,
            expire_on_commit=expire_on_commit,
            info=info,
            **kw,
        )
