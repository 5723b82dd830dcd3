"""The awaitable legacy ``session.query()``: builders, terminals, bulk operations, rows.

Where it is cheap, a query is run twice, through asyncorm and through the sync ``Query`` in
``run_sync`` on the same session, and the results must be equal (the same objects, since both
share the identity map).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import (
    DBAPIError,
    InvalidRequestError,
    LegacyAPIWarning,
    MultipleResultsFound,
    NoResultFound,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Bundle, joinedload
from sqlalchemy.orm import Session as SyncSession

import asyncorm
from tests.conftest import Backend, capture_sql
from tests.models import Address, User

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]
Build = Callable[[Any], Any]
"""Applies builder methods to a query, the async one or the sync one alike."""


@pytest.fixture
async def session(Session: SessionFactory) -> AsyncIterator[asyncorm.AsyncSession]:
    """A session over three users: ann (two addresses), bob (one address), cat (none)."""
    async with Session.begin() as seeding:
        seeding.add_all([
            User(name="ann", addresses=[Address(email="a1@ann.org"), Address(email="a2@ann.org")]),
            User(name="bob", addresses=[Address(email="b1@bob.org")]),
            User(name="cat"),
        ])
    async with Session() as session:
        yield session


async def same_as_sync(
    session: asyncorm.AsyncSession, entities: tuple[Any, ...], build: Build, terminal: str = "all"
) -> Any:
    """Run ``build(query(*entities)).terminal()`` through asyncorm and the sync Query."""
    ours = await getattr(build(session.query(*entities)), terminal)()

    def run(sync_session: SyncSession) -> Any:
        return getattr(build(sync_session.query(*entities)), terminal)()

    theirs = await session.run_sync(run)
    assert ours == theirs
    return ours


async def user(session: asyncorm.AsyncSession, name: str) -> User:
    return await session.query(User).filter_by(name=name).one()


def names(users: list[User]) -> list[str]:
    return [u.name for u in users]


# -- builders -----------------------------------------------------------------------------


async def test_filter_joins_criteria_with_and(session: asyncorm.AsyncSession) -> None:
    def build(q: Any) -> Any:
        return q.filter(User.name != "ann", User.name != "cat")

    assert names(await same_as_sync(session, (User,), build)) == ["bob"]


async def test_filter_by_matches_keywords(session: asyncorm.AsyncSession) -> None:
    assert names(await session.query(User).filter_by(name="cat").all()) == ["cat"]


async def test_where_is_filter(session: asyncorm.AsyncSession) -> None:
    assert names(await session.query(User).where(User.name == "bob").all()) == ["bob"]


async def test_order_by_sorts_and_order_by_none_cancels(session: asyncorm.AsyncSession) -> None:
    query = session.query(User).order_by(User.name.desc())
    assert names(await query.all()) == ["cat", "bob", "ann"]
    assert "ORDER BY" in str(query)
    assert "ORDER BY" not in str(query.order_by(None))


async def test_join_filters_on_the_joined_entity_without_duplicates(
    session: asyncorm.AsyncSession,
) -> None:
    def build(q: Any) -> Any:
        return q.join(User.addresses).filter(Address.email.like("%.org")).order_by(User.id)

    assert names(await same_as_sync(session, (User,), build)) == ["ann", "bob"]


async def test_outerjoin_keeps_rows_without_a_match(session: asyncorm.AsyncSession) -> None:
    def build(q: Any) -> Any:
        return q.outerjoin(User.addresses).group_by(User.name).order_by(User.name)

    rows = await same_as_sync(session, (User.name, func.count(Address.id)), build)
    assert [tuple(row) for row in rows] == [("ann", 2), ("bob", 1), ("cat", 0)]


async def test_group_by_and_having_aggregate(session: asyncorm.AsyncSession) -> None:
    query = (
        session.query(Address.user_id, func.count(Address.id))
        .group_by(Address.user_id)
        .having(func.count(Address.id) > 1)
    )
    ann = await user(session, "ann")
    assert [tuple(row) for row in await query.all()] == [(ann.id, 2)]


async def test_options_joinedload_loads_collections_without_duplicate_parents(
    engine: AsyncEngine, session: asyncorm.AsyncSession
) -> None:
    def build(q: Any) -> Any:
        return q.options(joinedload(User.addresses)).order_by(User.id)

    users = await same_as_sync(session, (User,), build)
    with capture_sql(engine) as statements:
        emails = [[a.email for a in u.addresses] for u in users]
    assert statements == []
    assert emails == [["a1@ann.org", "a2@ann.org"], ["b1@bob.org"], []]


async def test_limit_and_offset_page_through_results(session: asyncorm.AsyncSession) -> None:
    def build(q: Any) -> Any:
        return q.order_by(User.name).offset(1).limit(1)

    assert names(await same_as_sync(session, (User,), build)) == ["bob"]


async def test_distinct_removes_duplicate_rows(session: asyncorm.AsyncSession) -> None:
    query = session.query(Address.user_id).order_by(Address.user_id)
    assert len(await query.all()) == 3
    assert len(await query.distinct().all()) == 2


async def test_with_for_update_locks_the_selected_rows(
    backend: Backend, engine: AsyncEngine, session: asyncorm.AsyncSession
) -> None:
    query = session.query(User).filter_by(name="ann").with_for_update()
    with capture_sql(engine) as statements:
        assert names(await query.all()) == ["ann"]
    if backend.is_sqlite:  # SQLite has no row locks; its transactions hold the write lock
        assert "FOR UPDATE" not in statements[-1]
        return
    assert "FOR UPDATE" in statements[-1]
    async with engine.connect() as other:
        nowait = select(User).filter_by(name="ann").with_for_update(nowait=True)
        with pytest.raises(DBAPIError, match="could not obtain lock"):
            await other.execute(nowait)


# -- terminals ----------------------------------------------------------------------------


async def test_all_returns_the_objects_of_the_identity_map(
    session: asyncorm.AsyncSession,
) -> None:
    users = await same_as_sync(session, (User,), lambda q: q.order_by(User.id))
    assert names(users) == ["ann", "bob", "cat"]
    assert all(u in session for u in users)


async def test_first_limits_to_one_row(
    engine: AsyncEngine, session: asyncorm.AsyncSession
) -> None:
    with capture_sql(engine) as statements:
        first = await session.query(User).order_by(User.name.desc()).first()
    assert first is not None
    assert first.name == "cat"
    assert "LIMIT" in statements[-1]
    assert await session.query(User).filter_by(name="zed").first() is None


async def test_first_with_joinedload_loads_the_whole_collection(
    session: asyncorm.AsyncSession,
) -> None:
    def build(q: Any) -> Any:
        return q.options(joinedload(User.addresses)).filter_by(name="ann")

    ann = await same_as_sync(session, (User,), build, "first")
    assert len(ann.addresses) == 2


async def test_one_returns_the_only_result(session: asyncorm.AsyncSession) -> None:
    bob = await same_as_sync(session, (User,), lambda q: q.filter_by(name="bob"), "one")
    assert bob.name == "bob"


async def test_one_raises_when_there_is_no_row(session: asyncorm.AsyncSession) -> None:
    with pytest.raises(NoResultFound, match="No row was found"):
        await session.query(User).filter_by(name="zed").one()


async def test_one_raises_when_there_are_several_rows(session: asyncorm.AsyncSession) -> None:
    with pytest.raises(MultipleResultsFound, match="Multiple rows were found"):
        await session.query(User).one()


async def test_one_or_none(session: asyncorm.AsyncSession) -> None:
    assert await session.query(User).filter_by(name="zed").one_or_none() is None
    cat = await session.query(User).filter_by(name="cat").one_or_none()
    assert cat is not None
    assert cat.name == "cat"
    with pytest.raises(MultipleResultsFound, match="Multiple rows were found"):
        await session.query(User).one_or_none()


async def test_scalar_returns_the_first_column_or_the_object(
    session: asyncorm.AsyncSession,
) -> None:
    ann = await user(session, "ann")
    by_name = session.query(User).filter_by(name="ann")
    by_id = await same_as_sync(session, (User.id,), lambda q: q.filter_by(name="ann"), "scalar")
    assert by_id == ann.id
    assert await by_name.scalar() is ann
    assert await session.query(User.id).filter_by(name="zed").scalar() is None
    with pytest.raises(MultipleResultsFound, match="Multiple rows were found"):
        await session.query(User.id).scalar()


async def test_count_counts_rows_as_the_sync_query(session: asyncorm.AsyncSession) -> None:
    assert await same_as_sync(session, (User,), lambda q: q, "count") == 3
    # rows, not distinct objects: ann is counted once per address, as documented for Query
    joined = await same_as_sync(session, (User,), lambda q: q.join(User.addresses), "count")
    assert joined == 3
    eager = await same_as_sync(
        session, (User,), lambda q: q.options(joinedload(User.addresses)), "count"
    )
    assert eager == 3


async def test_exists(session: asyncorm.AsyncSession) -> None:
    assert await session.query(User).filter_by(name="ann").exists() is True
    assert await session.query(User).filter_by(name="zed").exists() is False


async def test_get_of_a_present_object_emits_no_sql(
    engine: AsyncEngine, session: asyncorm.AsyncSession
) -> None:
    ann = await user(session, "ann")
    with capture_sql(engine) as statements:
        assert await session.query(User).get(ann.id) is ann
    assert statements == []
    with capture_sql(engine) as statements:
        assert await session.query(User).get(ann.id + 100) is None
    assert len(statements) == 1


async def test_get_with_for_update_selects_even_a_present_object(
    backend: Backend, engine: AsyncEngine, session: asyncorm.AsyncSession
) -> None:
    ann = await user(session, "ann")
    with capture_sql(engine) as statements:
        assert await session.query(User).with_for_update().get(ann.id) is ann
    assert len(statements) == 1
    assert ("FOR UPDATE" in statements[0]) is not backend.is_sqlite


async def test_get_with_populate_existing_reloads_a_present_object(
    session: asyncorm.AsyncSession,
) -> None:
    ann = await user(session, "ann")
    await session.execute(
        update(User).values(fullname="Ann Smith"), execution_options={"synchronize_session": False}
    )
    assert (await session.query(User).get(ann.id)) is ann
    assert ann.fullname is None
    await session.query(User).populate_existing().get(ann.id)
    assert ann.fullname == "Ann Smith"


async def test_get_on_a_query_with_criteria_raises_as_sync(
    session: asyncorm.AsyncSession,
) -> None:
    ann = await user(session, "ann")
    with pytest.raises(InvalidRequestError, match="existing criterion"), pytest.warns(
        LegacyAPIWarning  # asyncorm keeps query().get() without the warning: it is its API
    ):
        await session.run_sync(lambda s: s.query(User).filter_by(name="bob").get(ann.id))
    with pytest.raises(InvalidRequestError, match=r"query\(\)\.get\(\) .* has criteria"):
        await session.query(User).filter_by(name="bob").get(ann.id)


@pytest.mark.parametrize("strategy", ["auto", "evaluate", "fetch"])
async def test_delete_removes_matched_rows_and_their_objects(
    session: asyncorm.AsyncSession, strategy: Any
) -> None:
    cat, bob = await user(session, "cat"), await user(session, "bob")
    assert await session.query(User).filter_by(name="cat").delete(strategy) == 1
    assert cat not in session
    assert bob in session
    assert names(await session.query(User).order_by(User.name).all()) == ["ann", "bob"]


async def test_delete_without_synchronize_leaves_objects_in_the_session(
    session: asyncorm.AsyncSession,
) -> None:
    cat = await user(session, "cat")
    assert await session.query(User).filter_by(name="cat").delete(False) == 1
    assert cat in session
    assert await session.query(User).count() == 2


@pytest.mark.parametrize("strategy", ["auto", "evaluate", "fetch"])
async def test_update_sets_values_and_synchronizes_objects(
    engine: AsyncEngine, session: asyncorm.AsyncSession, strategy: Any
) -> None:
    ann, bob = await user(session, "ann"), await user(session, "bob")
    query = session.query(User).filter(User.name.in_(["ann", "cat"]))
    assert await query.update({User.fullname: "Someone"}, strategy) == 2
    with capture_sql(engine) as statements:
        assert (ann.fullname, bob.fullname) == ("Someone", None)
    assert statements == []


async def test_update_without_synchronize_leaves_stale_values(
    session: asyncorm.AsyncSession,
) -> None:
    ann = await user(session, "ann")
    assert await session.query(User).update({"fullname": "Someone"}, False) == 3
    assert ann.fullname is None
    assert await session.query(User.fullname).filter_by(name="ann").scalar() == "Someone"


async def test_async_for_iterates_the_results(session: asyncorm.AsyncSession) -> None:
    seen = []
    async for u in session.query(User).order_by(User.id):
        # the results are buffered, so the loop body may use the session
        seen.append((u.name, await session.query(Address).filter_by(user_id=u.id).count()))
    assert seen == [("ann", 2), ("bob", 1), ("cat", 0)]


# -- rows ---------------------------------------------------------------------------------


async def test_several_entities_give_rows(session: asyncorm.AsyncSession) -> None:
    def build(q: Any) -> Any:
        return q.join(User.addresses).order_by(Address.id)

    rows = await same_as_sync(session, (User, Address), build)
    assert [(row.User.name, row.Address.email) for row in rows] == [
        ("ann", "a1@ann.org"), ("ann", "a2@ann.org"), ("bob", "b1@bob.org")
    ]
    assert rows[0].User is rows[1].User


async def test_columns_give_rows_with_named_fields(session: asyncorm.AsyncSession) -> None:
    rows = await same_as_sync(session, (User.id, User.name), lambda q: q.order_by(User.id))
    assert [row.name for row in rows] == ["ann", "bob", "cat"]
    single = await same_as_sync(session, (User.name,), lambda q: q.order_by(User.id))
    assert [tuple(row) for row in single] == [("ann",), ("bob",), ("cat",)]


async def test_entity_with_a_column_gives_rows(session: asyncorm.AsyncSession) -> None:
    def build(q: Any) -> Any:
        return q.outerjoin(User.addresses).filter(User.name != "ann").order_by(User.id)

    rows = await same_as_sync(session, (User, Address.email), build)
    assert [(row.User.name, row.email) for row in rows] == [("bob", "b1@bob.org"), ("cat", None)]


async def test_bundles_shape_rows_as_sync(session: asyncorm.AsyncSession) -> None:
    def build(q: Any) -> Any:
        return q.order_by(User.id)

    rows = await same_as_sync(session, (Bundle("user", User.id, User.name),), build)
    assert [row.user.name for row in rows] == ["ann", "bob", "cat"]
    bare = await same_as_sync(
        session, (Bundle("user", User.id, User.name, single_entity=True),), build
    )
    assert [bundle.name for bundle in bare] == ["ann", "bob", "cat"]


async def test_with_entities_keeps_the_criteria(session: asyncorm.AsyncSession) -> None:
    query = session.query(User).filter_by(name="bob").with_entities(User.id, User.name)
    bob = await user(session, "bob")
    assert [tuple(row) for row in await query.all()] == [(bob.id, "bob")]


# -- misuse -------------------------------------------------------------------------------


async def test_query_without_an_entity_raises(session: asyncorm.AsyncSession) -> None:
    with pytest.raises(InvalidRequestError, match="needs at least one entity or column"):
        session.query()


async def test_bulk_operations_need_one_entity(session: asyncorm.AsyncSession) -> None:
    with pytest.raises(InvalidRequestError, match=r"delete\(\) works on one mapped entity"):
        await session.query(User, Address).delete()
    with pytest.raises(InvalidRequestError, match=r"update\(\) works on one mapped entity"):
        await session.query(User.name).update({"name": "x"})
    assert await session.query(User).count() == 3


# Each builder whose state a bulk DELETE/UPDATE would silently drop, with the words the sync
# Query's refusal uses for it.
REFUSED_BULK_BUILDS: list[tuple[str, Build, str]] = [
    ("limit", lambda q: q.limit(1), "limit()"),
    ("offset", lambda q: q.offset(1), "offset()"),
    ("order_by", lambda q: q.order_by(User.id), "order_by()"),
    ("group_by", lambda q: q.group_by(User.id), "group_by()"),
    ("distinct", lambda q: q.distinct(), "distinct()"),
    ("join", lambda q: q.join(User.addresses), "join(), outerjoin(), select_from()"),
    ("outerjoin", lambda q: q.outerjoin(User.addresses), "join(), outerjoin(), select_from()"),
    ("select_from", lambda q: q.select_from(User), "join(), outerjoin(), select_from()"),
]


async def users_table(session: asyncorm.AsyncSession) -> list[tuple[Any, ...]]:
    rows = await session.execute(select(User.id, User.name, User.fullname).order_by(User.id))
    return [tuple(row) for row in rows]


@pytest.mark.parametrize(
    ("build", "words"),
    [pytest.param(build, words, id=name) for name, build, words in REFUSED_BULK_BUILDS],
)
async def test_bulk_operations_refuse_what_they_would_drop_as_sync(
    engine: AsyncEngine, session: asyncorm.AsyncSession, build: Build, words: str
) -> None:
    before = await users_table(session)
    message = rf"^Can't call Query\.update\(\) or Query\.delete\(\) when {re.escape(words)}"
    with capture_sql(engine) as statements:
        with pytest.raises(InvalidRequestError, match=message) as ours_delete:
            await build(session.query(User).filter(User.name != "zed")).delete()
        with pytest.raises(InvalidRequestError, match=message) as ours_update:
            await build(session.query(User)).update({User.fullname: "Someone"})
    assert statements == []
    assert await users_table(session) == before  # nothing deleted nor updated

    terminals: list[Build] = [
        lambda q: q.delete(),
        lambda q: q.update({User.fullname: "Someone"}),
    ]
    for terminal in terminals:
        with pytest.raises(InvalidRequestError) as theirs:
            await session.run_sync(lambda s: terminal(build(s.query(User))))  # noqa: B023
        assert str(theirs.value) == str(ours_delete.value) == str(ours_update.value)
    assert await users_table(session) == before


async def test_limit_1_delete_deletes_nothing(session: asyncorm.AsyncSession) -> None:
    # the data loss found in review: this used to delete every matching row
    query = session.query(User).filter(User.name != "zed").order_by(User.id).limit(1)
    with pytest.raises(InvalidRequestError, match=r"when limit\(\) has been called"):
        await query.delete()
    assert await session.query(User).count() == 3


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda q: q.limit(1).limit(None), id="limit(None)"),
        pytest.param(lambda q: q.offset(1).offset(None), id="offset(None)"),
        pytest.param(lambda q: q.order_by(User.id).order_by(None), id="order_by(None)"),
        pytest.param(lambda q: q.group_by(User.id).group_by(None), id="group_by(None)"),
    ],
)
async def test_bulk_operations_run_once_the_builder_is_cancelled_as_sync(
    session: asyncorm.AsyncSession, build: Build
) -> None:
    def sync_update(sync_session: SyncSession) -> Any:
        return build(sync_session.query(User).filter_by(name="ann")).update({"fullname": "A"})

    assert await build(session.query(User).filter_by(name="cat")).delete() == 1
    assert await session.run_sync(sync_update) == 1
    assert await build(session.query(User).filter_by(name="bob")).update({"fullname": "B"}) == 1
    rows = await users_table(session)
    assert [(name, fullname) for _, name, fullname in rows] == [("ann", "A"), ("bob", "B")]


async def test_bulk_refusal_is_kept_by_derived_queries(session: asyncorm.AsyncSession) -> None:
    query = session.query(User).limit(1).filter_by(name="cat").order_by()
    with pytest.raises(InvalidRequestError, match=r"when limit\(\) has been called"):
        await query.delete()
    with pytest.raises(InvalidRequestError, match=r"when order_by\(\) has been called"):
        await session.query(User).order_by(User.id).order_by().update({"fullname": "x"})
    assert await session.query(User).count() == 3
