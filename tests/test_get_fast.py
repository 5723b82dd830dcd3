"""``get()``'s fast path (a select prebuilt per mapper) against SQLAlchemy's own ``get()``.

Each case runs from the same starting state in three sessions: asyncorm's (``fast_get``
on, the default), asyncorm's with ``fast_get=False``, and plain SQLAlchemy's
``AsyncSession``. What comes back (its identity, which object, its loaded attributes), the
session afterwards (identity map, each object's loaded and expired attributes, new, dirty
and deleted), the SQL sent (text, parameters and execution options) and any error must be
the same in all three; ``asyncorm._fastget.taken`` says which path asyncorm's get() took, so
every case also asserts that the fast path was, or was not, used.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from sqlalchemy import ForeignKey, String, delete, event, func, inspect, select, text, update
from sqlalchemy.engine import Connection, Engine, ExecutionContext
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    ORMExecuteState,
    Session,
    backref,
    column_property,
    mapped_column,
    query_expression,
    relationship,
    selectinload,
)
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

import asyncorm
from asyncorm import _fastget
from asyncorm._lazyload import SyncSession
from tests.conftest import Backend, postgres_url
from tests.models import Address, User

Objects = dict[str, Any]
Setup = Callable[[sa_asyncio.AsyncSession], Awaitable[Objects]]
Call = Callable[[sa_asyncio.AsyncSession, Objects], Awaitable[Any]]


class OddBase(DeclarativeBase):
    pass


class Tag(OddBase):  # a string primary key: fast
    __tablename__ = "asyncorm_fast_tags"

    name: Mapped[str] = mapped_column(String(20), primary_key=True)
    hits: Mapped[int]


class Pair(OddBase):  # a composite primary key
    __tablename__ = "asyncorm_fast_pairs"

    a: Mapped[int] = mapped_column(primary_key=True)
    b: Mapped[int] = mapped_column(primary_key=True)


class Parent(OddBase):  # eager relationships
    __tablename__ = "asyncorm_fast_parents"

    id: Mapped[int] = mapped_column(primary_key=True)
    kids: Mapped[list[Kid]] = relationship(lazy="selectin", order_by="Kid.id")


class Kid(OddBase):
    __tablename__ = "asyncorm_fast_kids"

    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("asyncorm_fast_parents.id"))
    parent: Mapped[Parent] = relationship(lazy="joined", overlaps="kids")


class Crowd(OddBase):  # lazy=False means joined
    __tablename__ = "asyncorm_fast_crowds"

    id: Mapped[int] = mapped_column(primary_key=True)
    members: Mapped[list[Member]] = relationship(lazy=False, order_by="Member.id")


class Member(OddBase):
    __tablename__ = "asyncorm_fast_members"

    id: Mapped[int] = mapped_column(primary_key=True)
    crowd_id: Mapped[int] = mapped_column(ForeignKey("asyncorm_fast_crowds.id"))


class Fresh(OddBase):
    __tablename__ = "asyncorm_fast_fresh"

    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int]
    __mapper_args__: Any = MappingProxyType({"always_refresh": True})


class Person(OddBase):  # polymorphic loading
    __tablename__ = "asyncorm_fast_people"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__: Any = MappingProxyType(
        {"polymorphic_on": "kind", "polymorphic_identity": "person"}
    )


class Boss(Person):
    __mapper_args__: Any = MappingProxyType({"polymorphic_identity": "boss"})


class Versioned(OddBase):  # a version counter does not change a plain get()
    __tablename__ = "asyncorm_fast_versioned"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column()
    __mapper_args__: Any = MappingProxyType({"version_id_col": version})


class CaseInsensitive(TypeDecorator[str]):
    """A string compared case-insensitively (SQLAlchemy's documented comparator recipe):
    ``pk == :pk_1`` renders ``lower(pk) = lower(:pk_1)``, which several rows can match."""

    impl = String(20)
    cache_ok = True

    class comparator_factory(String.Comparator[str]):
        def __eq__(self, other: Any) -> ColumnElement[bool]:  # type: ignore[override]
            return func.lower(self.expr) == func.lower(other)


class Word(OddBase):  # a key whose criterion matches more than one row
    __tablename__ = "asyncorm_fast_words"

    spelling: Mapped[str] = mapped_column(CaseInsensitive, primary_key=True)


class Rich(OddBase):  # mapper-level loading choices the prebuilt select(Rich) must keep
    __tablename__ = "asyncorm_fast_rich"

    ident: Mapped[int] = mapped_column("rich_id", primary_key=True)
    a: Mapped[str] = mapped_column(String(10), deferred=True, deferred_group="g")
    b: Mapped[str] = mapped_column(String(10), deferred=True, deferred_group="g")
    c: Mapped[str] = mapped_column(String(10), deferred=True, deferred_raiseload=True)
    n: Mapped[int] = mapped_column()
    doubled: Mapped[int] = column_property(n * 2)
    extra: Mapped[int | None] = query_expression()


class Keyed(OddBase):  # a UUID primary key
    __tablename__ = "asyncorm_fast_keyed"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    n: Mapped[int]


KEY = uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.fixture(autouse=True)
async def seed(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(OddBase.metadata.drop_all)
        await conn.run_sync(OddBase.metadata.create_all)
    async with asyncorm.AsyncSession(engine) as session:
        session.add_all(
            [
                User(id=1, name="ann", bio="ann's", addresses=[Address(id=1, email="a@x.org")]),
                User(id=2, name="bob"),
                Tag(name="red", hits=3),
                Pair(a=1, b=2),
                Parent(id=1, kids=[Kid(id=1), Kid(id=2)]),
                Crowd(id=1, members=[Member(id=1)]),
                Fresh(id=1, value=1),
                Person(id=1),
                Boss(id=2),
                Versioned(id=1),
                Word(spelling="red"),
                Word(spelling="RED"),
                Rich(ident=1, a="a", b="b", c="c", n=3),
                Keyed(id=KEY, n=1),
            ]
        )
        await session.commit()


@contextmanager
def sent(engine: AsyncEngine) -> Iterator[list[Any]]:
    """The statements ``engine`` sends: text, parameters and execution options' names."""
    statements: list[Any] = []

    def record(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: ExecutionContext,
        executemany: bool,
    ) -> None:
        options = sorted(context.execution_options) if context is not None else []
        statements.append((statement, repr(parameters), options))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


def shown(value: Any, objects: Objects) -> Any:
    """A value as comparable across sessions: mapped objects by class and identity."""
    if isinstance(value, list):
        return [shown(v, objects) for v in value]
    if hasattr(value, "_sa_instance_state"):
        state = inspect(value)
        known = [name for name, obj in objects.items() if obj is value]
        return (type(value).__name__, state.identity, known)
    return value


def described(session: sa_asyncio.AsyncSession, objects: Objects) -> Any:
    """The session's contents: each object's identity, state and loaded attributes."""
    contents = []
    for obj in list(session.identity_map.values()) + list(session.new):
        state = inspect(obj)
        loaded = {
            k: shown(v, objects) for k, v in sorted(state.dict.items()) if k != "_sa_instance_state"
        }
        contents.append(
            (shown(obj, objects), loaded, sorted(state.expired_attributes), state.deleted)
        )
    contents.sort(key=repr)
    return (
        contents,
        sorted(repr(shown(o, objects)) for o in session.dirty),
        sorted(repr(shown(o, objects)) for o in session.deleted),
    )


async def outcome(
    engine: AsyncEngine, session: sa_asyncio.AsyncSession, setup: Setup, call: Call
) -> tuple[Any, int]:
    """What ``call`` does after ``setup`` in ``session``, and how many fast loads it made."""
    objects = await setup(session)
    before = _fastget.taken
    with sent(engine) as statements:
        try:
            result: Any = shown(await call(session, objects), objects)
            if result is not None:
                result = (result, described(session, objects))
        except Exception as exc:  # the same error is part of the same behaviour
            result = f"raises {type(exc).__name__}: {exc}"
    return (result, statements, described(session, objects)), _fastget.taken - before


async def compared(engine: AsyncEngine, setup: Setup, call: Call, **kw: Any) -> int:
    """Run the case in the three sessions, assert the same outcome; the fast loads taken."""
    async with asyncorm.AsyncSession(engine, **kw) as ours:
        fast, taken = await outcome(engine, ours, setup, call)
    async with asyncorm.AsyncSession(engine, fast_get=False, **kw) as general:
        slow, not_taken = await outcome(engine, general, setup, call)
    async with sa_asyncio.AsyncSession(engine, **kw) as theirs:
        sqlalchemys, _ = await outcome(engine, theirs, setup, call)
    assert fast == slow == sqlalchemys
    assert not_taken == 0
    return taken


async def nothing(session: sa_asyncio.AsyncSession) -> Objects:
    return {}


async def ann_and_bob(session: sa_asyncio.AsyncSession) -> Objects:
    users = (await session.scalars(select(User).order_by(User.id))).all()
    return {user.name: user for user in users}


async def pending(session: sa_asyncio.AsyncSession) -> Objects:
    cat = User(id=3, name="cat")
    session.add(cat)
    return {"cat": cat}


async def duplicate(session: sa_asyncio.AsyncSession) -> Objects:
    other_ann = User(id=1, name="ann again")
    session.add(other_ann)
    return {"other ann": other_ann}


async def dirty(session: sa_asyncio.AsyncSession) -> Objects:
    objects = await ann_and_bob(session)
    objects["ann"].name = "anne"
    return objects


async def bob_deleted(session: sa_asyncio.AsyncSession) -> Objects:
    objects = await ann_and_bob(session)
    await session.delete(objects["bob"])
    return objects


async def bob_deleted_and_flushed(session: sa_asyncio.AsyncSession) -> Objects:
    objects = await bob_deleted(session)
    await session.flush()
    return objects


async def bob_expired(session: sa_asyncio.AsyncSession) -> Objects:
    objects = await ann_and_bob(session)
    session.expire(objects["bob"])
    return objects


async def bob_expired_and_gone(session: sa_asyncio.AsyncSession) -> Objects:
    objects = await bob_expired(session)
    await session.execute(
        delete(User).where(User.id == 2), execution_options={"synchronize_session": False}
    )
    return objects


async def changed_elsewhere(session: sa_asyncio.AsyncSession) -> Objects:
    bind = session.bind
    assert isinstance(bind, AsyncEngine)
    async with bind.begin() as conn:
        await conn.execute(update(User).where(User.id == 2).values(fullname="Robert"))
    return {}


async def bob_renamed_in_this_transaction(session: sa_asyncio.AsyncSession) -> Objects:
    await session.execute(
        update(User).where(User.id == 2).values(name="bobby"),
        execution_options={"synchronize_session": False},
    )
    return {}


async def kid_loaded(session: sa_asyncio.AsyncSession) -> Objects:
    return {"kid": await session.get(Kid, 1)}


FAST: dict[str, tuple[Setup, Call, int]] = {
    "not in the session": (nothing, lambda s, o: s.get(User, 2), 1),
    "deferred column stays unloaded": (nothing, lambda s, o: s.get(User, 1), 1),
    "no such row": (nothing, lambda s, o: s.get(User, 99), 1),
    "others in the session": (ann_and_bob, lambda s, o: s.get(Address, 1), 1),
    "another class, same id": (ann_and_bob, lambda s, o: s.get(Address, 2), 1),
    "pending, autoflushed": (pending, lambda s, o: s.get(User, 3), 1),
    "the autoflush fails": (duplicate, lambda s, o: s.get(User, 2), 1),
    "dirty, autoflushed": (dirty, lambda s, o: s.get(Address, 1), 1),
    "deleted, autoflushed": (bob_deleted, lambda s, o: s.get(Address, 1), 1),
    "deleted and flushed": (bob_deleted_and_flushed, lambda s, o: s.get(User, 2), 1),
    "changed by another connection": (changed_elsewhere, lambda s, o: s.get(User, 2), 1),
    "string key": (nothing, lambda s, o: s.get(Tag, "red"), 1),
    "version counter": (nothing, lambda s, o: s.get(Versioned, 1), 1),
    "get_one": (nothing, lambda s, o: s.get_one(User, 2), 1),
    "get_one, no such row": (nothing, lambda s, o: s.get_one(User, 99), 1),
    "twice": (nothing, lambda s, o: asyncio.gather(s.get(User, 1)), 1),
    "written in this transaction": (
        bob_renamed_in_this_transaction,
        lambda s, o: s.get(User, 2),
        1,
    ),
    "deferred group, column_property, query_expression": (
        nothing,
        lambda s, o: s.get(Rich, 1),
        1,
    ),
    "uuid key": (nothing, lambda s, o: s.get(Keyed, KEY), 1),
    "uuid key as a string": (nothing, lambda s, o: s.get(Keyed, str(KEY)), 1),
    # SQLAlchemy reads the row with one(): MultipleResultsFound says "exactly one"
    "several rows match": (nothing, lambda s, o: s.get(Word, "red"), 1),
}

FALLBACK: dict[str, tuple[Setup, Call]] = {
    "expired": (bob_expired, lambda s, o: s.get(User, 2)),
    "expired, row deleted": (bob_expired_and_gone, lambda s, o: s.get(User, 2)),
    "options": (nothing, lambda s, o: s.get(User, 1, options=[selectinload(User.addresses)])),
    "populate_existing": (ann_and_bob, lambda s, o: s.get(User, 2, populate_existing=True)),
    "populate_existing=False": (nothing, lambda s, o: s.get(User, 2, populate_existing=False)),
    "with_for_update": (nothing, lambda s, o: s.get(User, 2, with_for_update=True)),
    "identity_token": (nothing, lambda s, o: s.get(User, 2, identity_token="x")),
    "execution_options": (
        nothing,
        lambda s, o: s.get(User, 2, execution_options={"populate_existing": False}),
    ),
    "tuple identity": (nothing, lambda s, o: s.get(User, (2,))),
    "list identity": (nothing, lambda s, o: s.get(User, [2])),
    "dict identity": (nothing, lambda s, o: s.get(User, {"id": 2})),
    "bool identity": (nothing, lambda s, o: s.get(User, True)),
    "float identity": (nothing, lambda s, o: s.get(User, 2.0)),
    "composite key": (nothing, lambda s, o: s.get(Pair, (1, 2))),
    "selectin relationship": (nothing, lambda s, o: s.get(Parent, 1)),
    "joined relationship": (nothing, lambda s, o: s.get(Kid, 2)),
    "lazy=False relationship": (nothing, lambda s, o: s.get(Crowd, 1)),
    "always_refresh": (nothing, lambda s, o: s.get(Fresh, 1)),
    "polymorphic base": (nothing, lambda s, o: s.get(Person, 2)),
    "polymorphic subclass": (nothing, lambda s, o: s.get(Boss, 2)),
    "a subclass in the map": (kid_loaded, lambda s, o: s.get(Parent, 1)),
    "not a mapped class": (nothing, lambda s, o: s.get(str, 2)),
}


@pytest.mark.parametrize("case", list(FAST))
async def test_the_fast_path_gives_sqlalchemys_results(engine: AsyncEngine, case: str) -> None:
    setup, call, loads = FAST[case]
    assert await compared(engine, setup, call) == loads


@pytest.mark.parametrize("case", list(FALLBACK))
async def test_sqlalchemys_get_where_the_fast_path_does_not_apply(
    engine: AsyncEngine, case: str
) -> None:
    setup, call = FALLBACK[case]
    assert await compared(engine, setup, call) == 0


@pytest.mark.parametrize(
    "kw",
    [
        {"execution_options": {"populate_existing": True}},
        {"execution_options": {"autoflush": False}},
        {"autoflush": False},
        {"execution_options": {"identity_token": "x"}},
    ],
    ids=["populate_existing", "autoflush option", "autoflush=False", "identity_token"],
)
async def test_session_execution_options(engine: AsyncEngine, kw: dict[str, Any]) -> None:
    """Options set on the session apply to the prebuilt statement as to get()'s."""

    async def setup(session: sa_asyncio.AsyncSession) -> Objects:
        objects = await ann_and_bob(session)
        objects.update(await pending(session))
        objects["bob"].name = "changed"
        return objects

    assert await compared(engine, setup, lambda s, o: s.get(User, 3), **kw) == 1
    assert await compared(engine, setup, lambda s, o: s.get(Address, 1), **kw) == 1


async def test_no_autoflush_block(engine: AsyncEngine) -> None:
    async def call(session: sa_asyncio.AsyncSession, objects: Objects) -> Any:
        with session.no_autoflush:
            return await session.get(User, 3)

    assert await compared(engine, pending, call) == 1


async def test_read_only_and_write_sessions(engine: AsyncEngine) -> None:
    for kw in ({"read_only": True}, {"write": True}):
        async with asyncorm.AsyncSession(engine, **kw) as session:
            before = _fastget.taken
            bob = await session.get(User, 2)
            assert bob is not None
            assert bob.name == "bob"
            assert _fastget.taken == before + 1


async def test_the_sessionmaker_option(engine: AsyncEngine) -> None:
    before = _fastget.taken
    async with asyncorm.async_sessionmaker(engine, fast_get=False)() as session:
        assert (await session.get_one(User, 2)).name == "bob"
        assert session.fast_get is False
    assert _fastget.taken == before
    async with asyncorm.async_sessionmaker(engine)() as session:
        assert session.fast_get is True
        session.fast_get = False
        assert (await session.get_one(User, 1)).name == "ann"
    assert _fastget.taken == before


def seen_by(states: list[Any]) -> Callable[[ORMExecuteState], None]:
    def listener(state: ORMExecuteState) -> None:
        states.append(
            (
                str(state.statement),
                state.is_select,
                state.is_column_load,
                state.is_relationship_load,
                state.lazy_loaded_from,
                state.load_options,
                sorted(state.execution_options),
                repr(state.parameters),
            )
        )

    return listener


async def test_do_orm_execute_listeners_see_sqlalchemys_get(engine: AsyncEngine) -> None:
    """A listener could tell the statements apart (their ORM compile options), so a session
    with one runs SQLAlchemy's get(); whether it is on the session or its class."""
    seen: dict[str, list[Any]] = {}
    sessions: dict[str, Callable[[], sa_asyncio.AsyncSession]] = {
        "ours": lambda: asyncorm.AsyncSession(engine),
        "general": lambda: asyncorm.AsyncSession(engine, fast_get=False),
        "sqlalchemy": lambda: sa_asyncio.AsyncSession(engine),
    }
    for name, make in sessions.items():
        seen[name] = []
        async with make() as session:
            event.listen(session.sync_session, "do_orm_execute", seen_by(seen[name]))
            before = _fastget.taken
            assert (await session.get_one(User, 2)).name == "bob"
            assert await session.get(User, 99) is None
            assert _fastget.taken == before
    assert seen["ours"] == seen["general"] == seen["sqlalchemy"]
    assert len(seen["ours"]) == 2

    class Listened(SyncSession):
        pass

    listener = seen_by([])
    event.listen(Listened, "do_orm_execute", listener)
    before = _fastget.taken
    async with asyncorm.AsyncSession(engine, sync_session_class=Listened) as session:
        assert await session.get(User, 2) is not None
    assert _fastget.taken == before
    event.listen(Session, "do_orm_execute", listener)  # every session
    try:
        async with asyncorm.AsyncSession(engine) as session:
            assert await session.get(User, 2) is not None
        assert _fastget.taken == before
    finally:
        event.remove(Session, "do_orm_execute", listener)
    async with asyncorm.AsyncSession(engine) as session:
        assert await session.get(User, 2) is not None
    assert _fastget.taken == before + 1


async def test_statement_listeners_on_the_engine_see_sqlalchemys_get(
    engine: AsyncEngine,
) -> None:
    """before_execute/after_execute receive the statement object: SQLAlchemy's get()."""
    statements: list[Any] = []

    def before_execute(conn: Connection, clause: Any, *args: Any) -> None:
        statements.append(clause)

    for target in (engine.sync_engine, Engine):  # this engine, or every engine
        for name in ("before_execute", "after_execute"):
            event.listen(target, name, before_execute)
            try:
                before = _fastget.taken
                async with asyncorm.AsyncSession(engine) as session:
                    assert await session.get(User, 2) is not None
                assert _fastget.taken == before
            finally:
                event.remove(target, name, before_execute)
    assert len(statements) == 4


async def test_a_session_class_with_its_own_bind_resolution(engine: AsyncEngine) -> None:
    binds: list[Any] = []

    class Routing(SyncSession):
        def get_bind(self, mapper: Any = None, **kw: Any) -> Any:
            binds.append(kw.get("clause"))
            return super().get_bind(mapper, **kw)

    before = _fastget.taken
    async with asyncorm.AsyncSession(engine, sync_session_class=Routing) as session:
        assert await session.get(User, 2) is not None
    assert _fastget.taken == before
    assert binds


async def test_a_property_added_later_is_seen(engine: AsyncEngine) -> None:
    """The per-mapper plan is rebuilt when the mapper changes (here: an eager loader)."""

    class LocalBase(DeclarativeBase):
        pass

    class Later(LocalBase):
        __tablename__ = "asyncorm_fast_later"

        id: Mapped[int] = mapped_column(primary_key=True)

    class LaterKid(LocalBase):
        __tablename__ = "asyncorm_fast_later_kids"

        id: Mapped[int] = mapped_column(primary_key=True)
        later_id: Mapped[int] = mapped_column(ForeignKey("asyncorm_fast_later.id"))

    async with engine.begin() as conn:
        await conn.run_sync(LocalBase.metadata.create_all)
        await conn.execute(text("INSERT INTO asyncorm_fast_later (id) VALUES (1)"))
    LocalBase.registry.configure()  # as at startup: an unconfigured registry falls back
    try:
        before = _fastget.taken
        async with asyncorm.AsyncSession(engine) as session:
            assert await session.get(Later, 1) is not None
        assert _fastget.taken == before + 1
        inspect(Later).add_property("kids", relationship(LaterKid, lazy="selectin"))
        async with asyncorm.AsyncSession(engine) as session:
            later = await session.get(Later, 1)
            assert later is not None
            assert later.kids == []  # type: ignore[attr-defined]
        assert _fastget.taken == before + 1
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(LocalBase.metadata.drop_all)


async def test_cancelled_while_loading(backend: Backend, engine: AsyncEngine) -> None:
    """A get() cancelled while its SELECT waits leaves the session as SQLAlchemy's get() does:
    nothing loaded, the transaction rolled back or usable, the connection alive."""
    if backend.is_sqlite:
        pytest.skip("needs a SELECT that waits: a table lock on PostgreSQL")
    results = []
    for kw in ({}, {"fast_get": False}):
        async with engine.connect() as locker:
            await locker.execute(text("LOCK TABLE users IN ACCESS EXCLUSIVE MODE"))
            session = asyncorm.AsyncSession(engine, **kw)
            before = _fastget.taken
            task = asyncio.ensure_future(session.get(User, 2))
            for _ in range(1000):  # the server's state, polled: the SELECT waits on the lock
                if await waiting_on_lock(engine):
                    break
                await asyncio.sleep(0.01)
            assert await waiting_on_lock(engine)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            took = _fastget.taken - before
            await locker.rollback()
        state = (list(session.identity_map.keys()), session.in_transaction())
        bob = await session.get(User, 2)
        assert bob is not None
        assert bob.name == "bob"
        await session.close()
        results.append((state, took))
    assert [state for state, _ in results] == [results[1][0]] * 2
    assert [took for _, took in results] == [1, 0]


async def waiting_on_lock(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        waiting = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE 'SELECT users.id%' AND datname = current_database()"
            )
        )
    return bool(waiting)


async def test_an_eager_backref_declared_after_a_fast_get(engine: AsyncEngine) -> None:
    """A class declared later can give the mapper an eager relationship (a backref): the
    mapper changes only when the registry is configured, which SQLAlchemy's get() does
    when it compiles its statement (not when that is in the compiled cache: then it
    does not see the backref either), so while the registry has new mappers asyncorm's get()
    is SQLAlchemy's, whatever that does."""

    class LocalBase(DeclarativeBase):
        pass

    class Early(LocalBase):
        __tablename__ = "asyncorm_fast_early"

        id: Mapped[int] = mapped_column(primary_key=True)

    async with engine.begin() as conn:
        await conn.run_sync(LocalBase.metadata.create_all)
        await conn.execute(text("INSERT INTO asyncorm_fast_early (id) VALUES (1)"))
    LocalBase.registry.configure()
    try:
        before = _fastget.taken
        async with asyncorm.AsyncSession(engine) as session:
            assert await session.get(Early, 1) is not None
        assert _fastget.taken == before + 1

        class LateKid(LocalBase):
            __tablename__ = "asyncorm_fast_late_kids"

            id: Mapped[int] = mapped_column(primary_key=True)
            early_id: Mapped[int] = mapped_column(ForeignKey("asyncorm_fast_early.id"))
            early: Mapped[Early] = relationship(backref=backref("kids", lazy="selectin"))

        async with engine.begin() as conn:
            await conn.run_sync(LocalBase.metadata.create_all)
        loaded = {}
        sessions: dict[str, Callable[[], sa_asyncio.AsyncSession]] = {
            "ours": lambda: asyncorm.AsyncSession(engine),
            "sqlalchemy": lambda: sa_asyncio.AsyncSession(engine),
        }
        for name, make in sessions.items():
            async with make() as each:
                with sent(engine) as statements:
                    early = await each.get(Early, 1)
                assert early is not None
                loaded[name] = ("kids" in inspect(early).dict, len(statements))
        assert loaded["ours"] == loaded["sqlalchemy"] == (True, 2)
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(LocalBase.metadata.drop_all)


async def test_statement_listeners_on_the_sessions_connection(engine: AsyncEngine) -> None:
    """A listener on the Connection the session uses receives the statement object, as one
    on the engine does (test_statement_listeners_on_the_engine_see_sqlalchemys_get)."""
    seen: dict[str, list[Any]] = {}
    sessions: dict[str, Callable[[], sa_asyncio.AsyncSession]] = {
        "ours": lambda: asyncorm.AsyncSession(engine),
        "sqlalchemy": lambda: sa_asyncio.AsyncSession(engine),
    }
    for name, make in sessions.items():
        clauses: list[Any] = []

        def before_execute(
            conn: Connection, clause: Any, *args: Any, clauses: list[Any] = clauses
        ) -> None:
            clauses.append(clause)

        async with make() as session:
            conn = await session.connection()
            event.listen(conn.sync_connection, "before_execute", before_execute)
            before = _fastget.taken
            assert await session.get(User, 2) is not None
            assert _fastget.taken == before
        # what a listener can tell apart: SQLAlchemy's get() sends a new statement with the
        # ORM's compile options each time
        seen[name] = [(str(c), type(c._compile_options).__name__) for c in clauses]
    assert seen["ours"] == seen["sqlalchemy"]


async def test_one_statement_on_two_dialects(
    engine: AsyncEngine, backend: Backend, tmp_path: Path
) -> None:
    """The prebuilt statement is compiled per dialect: a SQLite and a PostgreSQL engine,
    picked per class by ``binds``, in turn, each get their own SQL and rows."""
    other_url = postgres_url() if backend.is_sqlite else f"sqlite:///{tmp_path / 'other.db'}"
    other = asyncorm.create_engine(other_url)
    try:
        async with other.begin() as conn:
            await conn.run_sync(OddBase.metadata.drop_all)
            await conn.run_sync(OddBase.metadata.create_all)
            await conn.execute(
                text(
                    "INSERT INTO asyncorm_fast_rich (rich_id, a, b, c, n)"
                    " VALUES (1, 'A', 'B', 'C', 30)"
                )
            )
        for _ in range(2):
            for bind, n in ((engine, 3), (other, 30)):
                async with asyncorm.AsyncSession(engine, binds={Rich: bind}) as session:
                    before = _fastget.taken
                    rich = await session.get(Rich, 1)
                    assert _fastget.taken == before + 1
                    assert rich is not None
                    assert (rich.n, rich.doubled) == (n, 2 * n)
    finally:
        async with other.begin() as conn:
            await conn.run_sync(OddBase.metadata.drop_all)
        await other.dispose()
