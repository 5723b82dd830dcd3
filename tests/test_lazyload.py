"""Implicit IO on attribute access raises LazyLoadError, before anything reaches the driver."""

from __future__ import annotations

import gc
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import String, select
from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    deferred,
    mapped_column,
    selectinload,
    undefer,
)

import asyncorm
from asyncorm.testing import OuterTransaction
from tests.conftest import capture_sql
from tests.models import Address, User

# These tests run in the pytest plugin's rolled-back transaction (asyncorm_transaction).


@pytest.fixture
def engine(asyncorm_engine: AsyncEngine) -> AsyncEngine:
    return asyncorm_engine


@pytest.fixture
async def user_id(asyncorm_session: asyncorm.AsyncSession) -> int:
    user = User(name="ann", bio="likes tea", addresses=[Address(email="ann@example.org")])
    asyncorm_session.add(user)
    await asyncorm_session.commit()  # a savepoint of the test's transaction
    return user.id


@pytest.fixture
async def session(asyncorm_transaction: OuterTransaction) -> AsyncIterator[asyncorm.AsyncSession]:
    """Another session in the test's transaction, with nothing loaded yet."""
    async with asyncorm_transaction.sessionmaker() as session:
        yield session


@contextmanager
def no_io_and_no_warnings(engine: AsyncEngine) -> Iterator[None]:
    """Nothing reaches the database and no warning (e.g. "never awaited") escapes."""
    with warnings.catch_warnings():  # what earlier tests left to the garbage collector
        warnings.simplefilter("ignore")  # is theirs, not this test's
        gc.collect()
    with warnings.catch_warnings(record=True) as caught, capture_sql(engine) as statements:
        warnings.simplefilter("always")
        checked_out = engine.pool.checkedout()  # type: ignore[attr-defined]
        yield
        gc.collect()
        assert statements == []
        assert engine.pool.checkedout() == checked_out  # type: ignore[attr-defined]
    assert [str(w.message) for w in caught] == []


async def test_lazy_relationship(
    engine: AsyncEngine, session: asyncorm.AsyncSession, user_id: int
) -> None:
    user = await session.get_one(User, user_id)
    with (
        no_io_and_no_warnings(engine),
        pytest.raises(
            asyncorm.LazyLoadError,
            match=(
                rf"^User\.addresses is not loaded on <User id={user_id}>, and loading it lazily "
                r"needs a query, which cannot run implicitly on attribute access under asyncio\. "
                r"Load it in the query with `\.options\(selectinload\(User\.addresses\)\)`, or "
                r'explicitly with `await session\.refresh\(user, \["addresses"\]\)` or '
                r"`await user\.awaitable_attrs\.addresses`\.$"
            ),
        ) as caught,
    ):
        _ = user.addresses
    assert isinstance(caught.value, MissingGreenlet)


async def test_lazy_many_to_one(
    engine: AsyncEngine, session: asyncorm.AsyncSession, user_id: int
) -> None:
    address = (await session.scalars(select(Address))).one()
    with (
        no_io_and_no_warnings(engine),
        pytest.raises(
            asyncorm.LazyLoadError,
            match=(
                r"^Address\.user is not loaded on <Address id=\d+>, .*"
                r"selectinload\(Address\.user\)"
            ),
        ),
    ):
        _ = address.user
    # with the user in the identity map, SQLAlchemy needs no query and there is no error
    user = await session.get_one(User, user_id)
    assert address.user is user


async def test_replacing_an_unloaded_collection(
    engine: AsyncEngine, session: asyncorm.AsyncSession, user_id: int
) -> None:
    user = await session.get_one(User, user_id)
    with (
        no_io_and_no_warnings(engine),
        pytest.raises(asyncorm.LazyLoadError, match=r"^User\.addresses is not loaded"),
    ):
        user.addresses = []


async def test_expired_attribute(
    engine: AsyncEngine, asyncorm_transaction: OuterTransaction, user_id: int
) -> None:
    async with asyncorm_transaction.sessionmaker(expire_on_commit=True) as session:
        user = await session.get_one(User, user_id)
        await session.commit()
        with (
            no_io_and_no_warnings(engine),
            pytest.raises(
                asyncorm.LazyLoadError,
                match=(
                    rf"^User\.name of <User id={user_id}> is expired \(by commit\(\) with "
                    r"expire_on_commit=True, rollback\(\) or expire\(\)\), and reloading it needs "
                    r"a query, .* Reload the object with `await session\.refresh\(user\)` or read "
                    r"it with `await user\.awaitable_attrs\.name`; expire_on_commit=False"
                ),
            ),
        ):
            _ = user.name


async def test_expired_by_expire(
    engine: AsyncEngine, session: asyncorm.AsyncSession, user_id: int
) -> None:
    user = await session.get_one(User, user_id)
    session.expire(user, ["fullname"])
    assert user.name == "ann"  # still loaded
    with (
        no_io_and_no_warnings(engine),
        pytest.raises(asyncorm.LazyLoadError, match=r"^User\.fullname of <User id=\d+> is expired"),
    ):
        _ = user.fullname


async def test_deferred_column(
    engine: AsyncEngine, session: asyncorm.AsyncSession, user_id: int
) -> None:
    user = await session.get_one(User, user_id)
    with (
        no_io_and_no_warnings(engine),
        pytest.raises(
            asyncorm.LazyLoadError,
            match=(
                rf"^User\.bio of <User id={user_id}> is deferred \(not loaded by the query\), and "
                r"loading it needs a query, .* Load it in the query with "
                r"`\.options\(undefer\(User\.bio\)\)`, or explicitly with "
                r'`await session\.refresh\(user, \["bio"\]\)` or `await user\.awaitable_attrs\.bio`'
            ),
        ),
    ):
        _ = user.bio


async def test_the_fixes_in_the_message_work(session: asyncorm.AsyncSession, user_id: int) -> None:
    eager = (
        await session.scalars(select(User).options(selectinload(User.addresses), undefer(User.bio)))
    ).one()
    assert [a.email for a in eager.addresses] == ["ann@example.org"]
    assert eager.bio == "likes tea"
    session.expunge_all()

    user = await session.get_one(User, user_id)
    await session.refresh(user, ["addresses", "bio"])
    assert [a.email for a in user.addresses] == ["ann@example.org"]
    assert user.bio == "likes tea"
    session.expunge_all()

    user = await session.get_one(User, user_id)
    assert [a.email for a in await user.awaitable_attrs.addresses] == ["ann@example.org"]
    assert await user.awaitable_attrs.bio == "likes tea"
    session.expire(user)
    assert await user.awaitable_attrs.name == "ann"


async def test_lazy_loads_inside_run_sync_still_work(
    session: asyncorm.AsyncSession, user_id: int
) -> None:
    user = await session.get_one(User, user_id)

    def count_addresses(sync_session: Session) -> int:
        return len(user.addresses)

    assert await session.run_sync(count_addresses) == 1


async def test_asyncattrs_is_exported() -> None:
    assert asyncorm.AsyncAttrs is sa_asyncio.AsyncAttrs
    assert "AsyncAttrs" in asyncorm.__all__


class PlainBase(DeclarativeBase):
    """A declarative base without AsyncAttrs."""


class Note(PlainBase):
    __tablename__ = "asyncorm_test_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = deferred(mapped_column(String(50)))


async def test_message_for_a_class_without_asyncattrs(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(PlainBase.metadata.create_all)
    try:
        Session = asyncorm.async_sessionmaker(engine)
        async with Session.begin() as session:
            session.add(Note(id=1, body="hello"))
        async with Session() as session:
            note = await session.get_one(Note, 1)
            with pytest.raises(
                asyncorm.LazyLoadError,
                match=(
                    r"^Note\.body of <Note id=1> is deferred .* or "
                    r"`await note\.awaitable_attrs\.body` \(with asyncorm\.AsyncAttrs as a base "
                    r"class\)\.$"
                ),
            ):
                _ = note.body
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(PlainBase.metadata.drop_all)


async def test_the_sync_session_is_sqlalchemys(session: asyncorm.AsyncSession) -> None:
    assert isinstance(session.sync_session, Session)
    assert type(session.sync_session).__mro__[1] is Session
