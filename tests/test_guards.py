"""The concurrent-use guard: a second task gets ConcurrentSessionUseError before any IO.

Task "first" is held inside an operation at its first SQL statement (a ``before_cursor_execute``
hook awaits an event), so it is provably in flight when task "second" calls another member;
then it is released and must finish with its normal result.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from sqlalchemy import Connection, event, func, select
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncResult
from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession
from sqlalchemy.util import await_

import asyncorm
from tests.conftest import capture_sql
from tests.models import Address, User

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]
Operation = Callable[[asyncorm.AsyncSession, User], Coroutine[Any, Any, Any]]


class Gate:
    """Holds the next SQL statement the engine sends until released."""

    def __init__(self) -> None:
        self.armed = False
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    def hook(self, conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if self.armed:
            self.armed = False
            self.reached.set()
            await_(self.release.wait())


@contextmanager
def gate_on(engine: AsyncEngine) -> Iterator[Gate]:
    gate = Gate()
    event.listen(engine.sync_engine, "before_cursor_execute", gate.hook)
    try:
        yield gate
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", gate.hook)


async def begin_block(session: asyncorm.AsyncSession, user: User) -> None:
    async with session.begin():
        pass


async def begin_nested_block(session: asyncorm.AsyncSession, user: User) -> None:
    async with session.begin_nested():
        pass


async def iterate_query(session: asyncorm.AsyncSession, user: User) -> list[User]:
    return [u async for u in session.query(User)]


# what the second task attempts -> the session member named in the error
ATTEMPTS: dict[str, tuple[Operation, str]] = {
    "execute": (lambda s, u: s.execute(select(User)), "execute"),
    "scalar": (lambda s, u: s.scalar(select(func.count(User.id))), "scalar"),
    "scalars": (lambda s, u: s.scalars(select(User)), "scalars"),
    "get (in the identity map)": (lambda s, u: s.get(User, u.id), "get"),
    "get (not in the identity map)": (lambda s, u: s.get(User, u.id + 1000), "get"),
    "get_one": (lambda s, u: s.get_one(User, u.id), "get_one"),
    "stream": (lambda s, u: s.stream(select(User)), "stream"),
    "stream_scalars": (lambda s, u: s.stream_scalars(select(User)), "stream_scalars"),
    "flush": (lambda s, u: s.flush(), "flush"),
    "commit": (lambda s, u: s.commit(), "commit"),
    "rollback": (lambda s, u: s.rollback(), "rollback"),
    "refresh": (lambda s, u: s.refresh(u), "refresh"),
    "merge": (lambda s, u: s.merge(User(id=u.id, name="merged")), "merge"),
    "merge_all": (lambda s, u: s.merge_all([User(id=u.id, name="merged")]), "merge_all"),
    "delete": (lambda s, u: s.delete(u), "delete"),
    "delete_all": (lambda s, u: s.delete_all([u]), "delete_all"),
    "close": (lambda s, u: s.close(), "close"),
    "aclose": (lambda s, u: s.aclose(), "close"),
    "reset": (lambda s, u: s.reset(), "reset"),
    "invalidate": (lambda s, u: s.invalidate(), "invalidate"),
    "run_sync": (lambda s, u: s.run_sync(lambda sync: sync.flush()), "run_sync"),
    "connection": (lambda s, u: s.connection(), "connection"),
    "begin": (begin_block, "begin"),
    "begin_nested": (begin_nested_block, "begin"),
    "query().all": (lambda s, u: s.query(User).all(), "execute"),
    "query().first": (lambda s, u: s.query(User).first(), "execute"),
    "query().one": (lambda s, u: s.query(User).filter_by(id=u.id).one(), "execute"),
    "query().one_or_none": (lambda s, u: s.query(User).filter_by(id=u.id).one_or_none(), "execute"),
    "query().scalar": (lambda s, u: s.query(User.id).filter_by(id=u.id).scalar(), "execute"),
    "query().count": (lambda s, u: s.query(User).count(), "scalar"),
    "query().exists": (lambda s, u: s.query(User).exists(), "scalar"),
    "query().get": (lambda s, u: s.query(User).get(u.id), "get"),
    "query().delete": (lambda s, u: s.query(User).filter_by(id=-1).delete(), "execute"),
    "query().update": (
        lambda s, u: s.query(User).filter_by(id=-1).update({"name": "x"}),
        "execute",
    ),
    "async for in query()": (iterate_query, "execute"),
}


async def seed(Session: SessionFactory) -> int:
    async with Session.begin() as session:
        user = User(name="ann", addresses=[Address(email="ann@example.org")])
        session.add(user)
    return user.id


@pytest.fixture
async def session(Session: SessionFactory) -> AsyncIterator[asyncorm.AsyncSession]:
    await seed(Session)
    async with Session() as session:
        yield session


async def load_ann(session: asyncorm.AsyncSession) -> User:
    return (await session.scalars(select(User).filter_by(name="ann"))).one()


@pytest.mark.parametrize("attempt", list(ATTEMPTS))
async def test_second_task_is_refused_before_any_io(
    engine: AsyncEngine, session: asyncorm.AsyncSession, attempt: str
) -> None:
    user = await load_ann(session)
    await session.commit()  # the connection goes back: "second" would have to check one out
    operation, member = ATTEMPTS[attempt]

    async def first() -> list[str]:
        return list((await session.execute(select(User.name).order_by(User.id))).scalars())

    with gate_on(engine) as gate, capture_sql(engine) as statements:
        gate.armed = True
        holder = asyncio.create_task(first(), name="first")
        await gate.reached.wait()  # held in the gate, before the capture sees its statement
        checked_out = engine.pool.checkedout()  # type: ignore[attr-defined]
        second = asyncio.create_task(operation(session, user), name="second")
        with pytest.raises(
            asyncorm.ConcurrentSessionUseError,
            match=(
                rf"^Session <AsyncSession 0x[0-9a-f]+> is in use by task 'first' "
                rf"\(execute\(\)\); task 'second' tried to call {member}\(\) on it at the "
                rf"same time\. A session runs one operation at a time: give each "
                rf"concurrent task its own session"
            ),
        ):
            await second
        assert statements == []
        assert engine.pool.checkedout() == checked_out  # type: ignore[attr-defined]
        gate.release.set()
        assert await holder == ["ann"]
    # the session is unharmed, and the second task may use it now, in turn
    assert await asyncio.create_task(session.scalar(select(func.count(User.id)))) == 1


async def ids(result: Any) -> list[int]:
    """The ids of a result of any shape the in-flight operations below return."""
    if isinstance(result, AsyncResult):
        return sorted(await result.scalars().all())
    if isinstance(result, Result):
        return sorted(result.scalars())
    return sorted(u.id if isinstance(u, User) else u for u in result)


# what the first task has in flight when it is held at its first statement, and what it must
# return once released: "ann" is loaded and "bob" pending, so autoflush sends bob first
IN_FLIGHT: dict[str, tuple[Operation, str]] = {
    "execute": (lambda s, u: s.execute(select(User.id)), "execute"),
    "scalar": (lambda s, u: s.scalar(select(func.count(User.id))), "scalar"),
    "scalars": (lambda s, u: s.scalars(select(User.id)), "scalars"),
    "get": (lambda s, u: s.get(User, u.id + 1000), "get"),
    "stream": (lambda s, u: s.stream(select(User.id)), "stream"),
    "flush": (lambda s, u: s.flush(), "flush"),
    "commit": (lambda s, u: s.commit(), "commit"),
    "refresh": (lambda s, u: s.refresh(u), "refresh"),
    "merge": (lambda s, u: s.merge(User(id=u.id + 1000, name="new")), "merge"),
    "run_sync": (lambda s, u: s.run_sync(lambda sync: sync.execute(select(User.id))), "run_sync"),
    "query().all": (lambda s, u: s.query(User).all(), "execute"),
}


@pytest.mark.parametrize("in_flight", list(IN_FLIGHT))
async def test_error_names_the_operation_in_flight_which_then_completes(
    engine: AsyncEngine, session: asyncorm.AsyncSession, in_flight: str
) -> None:
    user = await load_ann(session)
    bob = User(name="bob")
    session.add(bob)  # something for flush() and commit() to send
    operation, member = IN_FLIGHT[in_flight]
    with gate_on(engine) as gate:
        gate.armed = True
        holder = asyncio.create_task(operation(session, user), name="first")
        await gate.reached.wait()
        with pytest.raises(
            asyncorm.ConcurrentSessionUseError,
            match=rf"in use by task 'first' \({member}\(\)\); task 'second' tried to call flush",
        ):
            await asyncio.create_task(session.flush(), name="second")
        gate.release.set()
        result = await holder
    if in_flight in ("execute", "scalars", "stream", "run_sync", "query().all"):
        assert await ids(result) == [user.id, bob.id]
    elif in_flight == "scalar":
        assert result == 2
    elif in_flight == "merge":
        assert (result.id, result.name) == (user.id + 1000, "new")
    elif in_flight == "refresh":
        assert user.name == "ann"
    else:
        assert result is None
    await session.flush()
    assert await session.scalar(select(func.count(User.id))) == (3 if in_flight == "merge" else 2)


async def test_handing_a_session_from_task_to_task_in_turn(Session: SessionFactory) -> None:
    async with Session() as session:

        async def add(name: str) -> None:
            session.add(User(name=name))
            await session.flush()

        for name in ("ann", "bob", "cat"):
            await asyncio.create_task(add(name), name=name)
        await asyncio.create_task(session.commit())
        names = await asyncio.create_task(session.scalars(select(User.name).order_by(User.name)))
        assert list(names) == ["ann", "bob", "cat"]


async def test_concurrent_flushes_do_not_corrupt_the_session(Session: SessionFactory) -> None:
    """SQLAlchemy alone: "Session is already flushing" and a broken session; here: one error."""
    async with Session() as session:
        session.add_all([User(name=f"user{i}") for i in range(50)])
        results = await asyncio.gather(
            *(asyncio.create_task(session.flush(), name=f"flusher{i}") for i in range(5)),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 4
        assert all(isinstance(e, asyncorm.ConcurrentSessionUseError) for e in errors)
        await session.commit()
        assert await session.scalar(select(func.count(User.id))) == 50


async def test_concurrent_first_use_without_a_connection(Session: SessionFactory) -> None:
    """SQLAlchemy alone: "This session is provisioning a new connection" then IllegalStateChange."""
    await seed(Session)
    async with Session() as session:
        results = await asyncio.gather(
            session.scalar(select(User.name)),
            session.scalar(select(User.name)),
            return_exceptions=True,
        )
        assert results[0] == "ann"
        assert isinstance(results[1], asyncorm.ConcurrentSessionUseError)
    # leaving the block closed the session cleanly: the engine fixture checks the pool


async def test_one_task_may_nest_operations(Session: SessionFactory) -> None:
    """scalars() calls execute(), the query terminals call execute()/scalar()/get()."""
    await seed(Session)
    async with Session() as session:
        assert [u.name for u in await session.scalars(select(User))] == ["ann"]
        assert await session.query(User).count() == 1
        user = await session.query(User).filter_by(name="ann").one()
        assert await session.query(User).get(user.id) is user
        await session.aclose()


async def test_sessionmaker_begin_is_guarded(engine: AsyncEngine, Session: SessionFactory) -> None:
    await seed(Session)
    with gate_on(engine) as gate:
        async with Session.begin() as session:
            gate.armed = True
            holder = asyncio.create_task(session.scalar(select(User.name)), name="first")
            await gate.reached.wait()
            with pytest.raises(asyncorm.ConcurrentSessionUseError, match="tried to call begin"):
                async with session.begin_nested():
                    pass
            gate.release.set()
            assert await holder == "ann"


async def test_the_error_is_a_runtime_and_sqlalchemy_error() -> None:
    assert issubclass(asyncorm.ConcurrentSessionUseError, RuntimeError)
    assert issubclass(asyncorm.ConcurrentSessionUseError, asyncorm.AsyncORMError)


async def test_patching_sqlalchemys_session_class_reaches_asyncorms_sessions(
    Session: asyncorm.async_sessionmaker[asyncorm.AsyncSession],
) -> None:
    """Tests of applications patch ``sqlalchemy.ext.asyncio.AsyncSession.scalar`` (and the
    like); a drop-in subclass must see the patch, as SQLAlchemy's own sessions do."""
    with mock.patch.object(SAAsyncSession, "scalar", side_effect=ValueError("patched")):
        async with Session() as session:
            with pytest.raises(ValueError, match="patched"):
                await session.scalar(select(User.id))
    async with Session() as session:  # unpatched again
        assert await session.scalar(select(User.id)) is None
