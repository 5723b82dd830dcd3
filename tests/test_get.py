"""``get()`` answers from the identity map without a greenlet or SQL, otherwise as SQLAlchemy.

Each edge case runs twice from the same starting state, through asyncorm's ``get()`` and
through plain SQLAlchemy's ``AsyncSession.get()``; what comes back (nothing, an object already
in the session, or another object, with its identity) and the SQL sent must be the same.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import greenlet  # type: ignore[import-untyped]
import pytest
from sqlalchemy import String, delete, inspect, select
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, selectinload

import asyncorm
from asyncorm._lazyload import SyncSession
from tests.conftest import capture_sql
from tests.models import Address, User

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]
Objects = dict[str, Any]
Setup = Callable[[sa_asyncio.AsyncSession], Awaitable[Objects]]
Call = Callable[[sa_asyncio.AsyncSession, Objects], Awaitable[Any]]


@pytest.fixture(autouse=True)
async def seed(Session: SessionFactory) -> None:
    async with Session.begin() as session:
        session.add_all(
            [
                User(id=1, name="ann", addresses=[Address(id=1, email="ann@example.org")]),
                User(id=2, name="bob"),
            ]
        )


@contextmanager
def no_greenlet_switch() -> Iterator[list[str]]:
    """Record greenlet switches; SQLAlchemy's bridge switches into a new greenlet per call."""
    events: list[str] = []
    previous = greenlet.settrace(lambda event, args: events.append(event))
    try:
        yield events
    finally:
        greenlet.settrace(previous)


async def test_a_hit_needs_no_greenlet_and_no_sql(
    engine: AsyncEngine, Session: SessionFactory
) -> None:
    async with Session() as session:
        ann = await session.get_one(User, 1)
        with capture_sql(engine) as statements, no_greenlet_switch() as switches:
            assert await session.get(User, 1) is ann
            assert await session.get(User, (1,)) is ann
            assert await session.get(User, [1]) is ann
            assert await session.get_one(User, 1) is ann
            assert await session.get(User, 1, options=[selectinload(User.addresses)]) is ann
            assert await session.query(User).get(1) is ann
        assert statements == []
        assert switches == []
        # SQLAlchemy's own get() switches into a greenlet for the same answer
        with no_greenlet_switch() as switches:
            assert await sa_asyncio.AsyncSession.get(session, User, 1) is ann
        assert switches != []


async def load(session: sa_asyncio.AsyncSession, *names: str) -> Objects:
    users = (await session.scalars(select(User).where(User.name.in_(names)))).all()
    return {user.name: user for user in users}


async def ann_and_bob(session: sa_asyncio.AsyncSession) -> Objects:
    return await load(session, "ann", "bob")


async def deleted_not_flushed(session: sa_asyncio.AsyncSession) -> Objects:
    objects = await ann_and_bob(session)
    await session.delete(objects["bob"])
    return objects


async def deleted_and_flushed(session: sa_asyncio.AsyncSession) -> Objects:
    objects = await deleted_not_flushed(session)
    await session.flush()
    return objects


async def expired(session: sa_asyncio.AsyncSession) -> Objects:
    objects = await ann_and_bob(session)
    session.expire(objects["bob"])
    return objects


async def expired_then_deleted_behind_its_back(session: sa_asyncio.AsyncSession) -> Objects:
    objects = await expired(session)
    await session.execute(
        delete(User).where(User.id == 2), execution_options={"synchronize_session": False}
    )
    return objects


async def partly_expired(session: sa_asyncio.AsyncSession) -> Objects:
    objects = await ann_and_bob(session)
    session.expire(objects["bob"], ["name"])
    return objects


async def pending(session: sa_asyncio.AsyncSession) -> Objects:
    cat = User(id=3, name="cat")
    session.add(cat)
    return {"cat": cat}


async def nothing(session: sa_asyncio.AsyncSession) -> Objects:
    return {}


CASES: dict[str, tuple[Setup, Call]] = {
    "present": (ann_and_bob, lambda s, o: s.get(User, 2)),
    "present, tuple identity": (ann_and_bob, lambda s, o: s.get(User, (2,))),
    "present, options": (
        ann_and_bob,
        lambda s, o: s.get(User, 2, options=[selectinload(User.addresses)]),
    ),
    "not in the session": (nothing, lambda s, o: s.get(User, 2)),
    "no such row": (ann_and_bob, lambda s, o: s.get(User, 99)),
    "deleted, not flushed": (deleted_not_flushed, lambda s, o: s.get(User, 2)),
    "deleted and flushed": (deleted_and_flushed, lambda s, o: s.get(User, 2)),
    "expired": (expired, lambda s, o: s.get(User, 2)),
    "expired, row deleted": (expired_then_deleted_behind_its_back, lambda s, o: s.get(User, 2)),
    "partly expired": (partly_expired, lambda s, o: s.get(User, 2)),
    "pending": (pending, lambda s, o: s.get(User, 3)),
    "wrong class": (ann_and_bob, lambda s, o: s.get(Address, 2)),
    "populate_existing": (ann_and_bob, lambda s, o: s.get(User, 2, populate_existing=True)),
    "with_for_update": (ann_and_bob, lambda s, o: s.get(User, 2, with_for_update=True)),
    "execution_options": (
        ann_and_bob,
        lambda s, o: s.get(User, 2, execution_options={"populate_existing": True}),
    ),
    "dict identity": (ann_and_bob, lambda s, o: s.get(User, {"id": 2})),
    "wrong number of values": (ann_and_bob, lambda s, o: s.get(User, (2, 3))),
    "not a mapped class": (ann_and_bob, lambda s, o: s.get(str, 2)),
    "get_one, no such row": (ann_and_bob, lambda s, o: s.get_one(User, 99)),
}


async def outcome(
    engine: AsyncEngine, session: sa_asyncio.AsyncSession, setup: Setup, call: Call
) -> tuple[Any, list[str]]:
    objects = await setup(session)
    with capture_sql(engine) as statements:
        try:
            result = await call(session, objects)
        except Exception as exc:  # the same error is part of the same behaviour
            return f"raises {type(exc).__name__}", [s.split()[0] for s in statements]
    if result is None:
        shape: Any = None
    else:
        known = any(result is obj for obj in objects.values())
        shape = ("object in the session" if known else "new object", inspect(result).identity)
    return shape, [s.split()[0] for s in statements]


@pytest.mark.parametrize("case", list(CASES))
async def test_get_behaves_as_sqlalchemys(engine: AsyncEngine, case: str) -> None:
    setup, call = CASES[case]
    async with asyncorm.AsyncSession(engine) as ours:
        mine = await outcome(engine, ours, setup, call)
    async with sa_asyncio.AsyncSession(engine) as theirs:
        sqlalchemys = await outcome(engine, theirs, setup, call)
    assert mine == sqlalchemys
    if case.startswith(("present", "deleted, not", "partly")):
        assert mine[1] == []  # answered from the identity map


class PolyBase(DeclarativeBase):
    pass


class Employee(PolyBase):
    __tablename__ = "asyncorm_test_employees"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__: Any = MappingProxyType(
        {"polymorphic_on": "kind", "polymorphic_identity": "employee"}
    )


class Manager(Employee):
    __mapper_args__: Any = MappingProxyType({"polymorphic_identity": "manager"})


async def test_polymorphic_get_behaves_as_sqlalchemys(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(PolyBase.metadata.create_all)
    try:
        async with asyncorm.AsyncSession(engine) as session:
            session.add_all([Employee(id=1), Manager(id=2)])
            await session.commit()
        results = []
        for cls in (asyncorm.AsyncSession, sa_asyncio.AsyncSession):
            async with cls(engine) as session:
                everyone = (await session.scalars(select(Employee).order_by(Employee.id))).all()
                with capture_sql(engine) as statements:
                    found = [
                        await session.get(Employee, 2),  # the Manager, as an Employee
                        await session.get(Manager, 2),
                        await session.get(Manager, 1),  # an Employee is not a Manager
                    ]
                results.append(([everyone.index(f) if f else None for f in found], statements))
        assert results[0] == results[1] == ([1, 1, None], [])
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(PolyBase.metadata.drop_all)


async def test_a_session_class_with_its_own_get_is_always_asked(engine: AsyncEngine) -> None:
    calls: list[Any] = []

    class CountingSession(SyncSession):
        def get(self, entity: Any, ident: Any, **kw: Any) -> Any:
            calls.append(ident)
            return super().get(entity, ident, **kw)

    async with asyncorm.AsyncSession(engine, sync_session_class=CountingSession) as session:
        ann = await session.get_one(User, 1)
        assert await session.get(User, 1) is ann
    assert calls == [1, 1]  # get_one() and get(), both through the override
