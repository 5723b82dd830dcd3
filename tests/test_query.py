"""The awaitable legacy ``session.query()``: builders, terminals, bulk operations, rows.

Where it is cheap, a query is run twice, through asyncorm and through the sync ``Query`` in
``run_sync`` on the same session, and the results must be equal (the same objects, since both
share the identity map).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import Exists, bindparam, func, select, text, update
from sqlalchemy.exc import (
    DBAPIError,
    InvalidRequestError,
    LegacyAPIWarning,
    MultipleResultsFound,
    NoResultFound,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Bundle, aliased, joinedload, with_parent
from sqlalchemy.orm import Session as SyncSession

import asyncorm
from tests.conftest import Backend, capture_sql
from tests.models import Account, Address, User

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


# -- what the sync Query also has: params, constructs, slicing, yield_per -----------------
# Each result is compared with the same query written as a 2.0 select() and run by the session.


async def select_all(
    session: asyncorm.AsyncSession, statement: Any, params: dict[str, Any] | None = None
) -> list[Any]:
    """``statement``'s results as the legacy Query shapes them: objects for one entity."""
    result = await session.execute(statement, params)
    if result._attributes.get("is_single_entity", False):
        return list(result.unique().scalars().all())
    return list(result.all())


async def add_users(Session: SessionFactory, count: int) -> None:
    async with Session.begin() as seeding:
        seeding.add_all([User(name=f"user{i:02}") for i in range(count)])


async def test_params_bind_values_to_bindparams_as_select(
    session: asyncorm.AsyncSession,
) -> None:
    ours = session.query(User).filter(User.name != bindparam("skip")).order_by(User.id)
    theirs = select(User).where(User.name != bindparam("skip")).order_by(User.id)
    assert names(await ours.params(skip="bob").all()) == ["ann", "cat"]
    assert await ours.params(skip="bob").all() == await select_all(
        session, theirs, {"skip": "bob"}
    )
    # a dict, keywords, and later calls adding to earlier ones, as the sync Query
    texts = session.query(User.name).filter(text("name >= :low AND name <= :high"))
    rows = await texts.params({"low": "b"}).params(high="c").all()
    assert rows == await select_all(
        session, select(User.name).where(text("name >= :low AND name <= :high")),
        {"low": "b", "high": "c"},
    )
    assert [tuple(row) for row in rows] == [("bob",)]


async def test_params_apply_to_every_terminal_and_construct(
    session: asyncorm.AsyncSession,
) -> None:
    query = session.query(User).filter(User.name == bindparam("who")).params(who="cat")
    cat = await user(session, "cat")
    assert await query.first() is cat
    assert await query.one() is cat
    assert await query.count() == 1
    assert await query.exists() is True
    assert await query[0] is cat
    assert await session.scalars(query.statement) is not None
    assert list(await session.scalars(query.statement)) == [cat]
    in_subquery = select(User.name).where(User.id.in_(select(query.subquery().c.id)))
    assert list(await session.scalars(in_subquery)) == ["cat"]
    # "auto" synchronises the session's objects with "fetch" here: "evaluate" cannot see
    # the values of params() (the sync Query's "auto" picks it, and leaves cat stale)
    assert await query.update({User.fullname: "Cat"}) == 1
    assert cat.fullname == "Cat"
    assert await query.delete() == 1
    assert cat not in session
    assert names(await session.query(User).order_by(User.id).all()) == ["ann", "bob"]
    by_text = session.query(User).filter(text("name = :who")).params(who="bob")
    assert await by_text.update({User.fullname: "Bob"}) == 1
    assert (await user(session, "bob")).fullname == "Bob"


async def test_subquery_joins_like_a_select_subquery(session: asyncorm.AsyncSession) -> None:
    counts = (
        session.query(Address.user_id, func.count().label("n"))
        .group_by(Address.user_id).subquery("counts")
    )
    theirs = (
        select(Address.user_id, func.count().label("n"))
        .group_by(Address.user_id).subquery("counts")
    )
    rows = await (
        session.query(User.name, counts.c.n)
        .join(counts, counts.c.user_id == User.id).order_by(User.id).all()
    )
    assert rows == await select_all(
        session,
        select(User.name, theirs.c.n).join(theirs, theirs.c.user_id == User.id).order_by(User.id),
    )
    assert [tuple(row) for row in rows] == [("ann", 2), ("bob", 1)]
    assert "counts" in str(select(counts))
    labelled = session.query(User.id, User.name).subquery(with_labels=True)
    assert list(labelled.c.keys()) == ["users_id", "users_name"]
    joined = session.query(User.id, Address.id).filter(Address.id == User.id)
    theirs_joined = select(User.id, Address.id).where(Address.id == User.id)
    assert list(joined.subquery(reduce_columns=True).c.keys()) == ["id"]
    assert list(joined.subquery(reduce_columns=True).c.keys()) == list(
        theirs_joined.reduce_columns().subquery().c.keys()
    )


async def test_cte_is_usable_in_another_query(session: asyncorm.AsyncSession) -> None:
    ann = session.query(User.id).filter_by(name="ann").cte("ann_ids")
    theirs = select(User.id).filter_by(name="ann").cte("ann_ids")
    query = session.query(Address.email).join(ann, ann.c.id == Address.user_id)
    rows = await query.order_by(Address.id).all()
    assert rows == await select_all(
        session,
        select(Address.email).join(theirs, theirs.c.id == Address.user_id).order_by(Address.id),
    )
    assert [row.email for row in rows] == ["a1@ann.org", "a2@ann.org"]
    assert str(query).startswith("WITH ann_ids AS")


async def test_scalar_subquery_and_label_give_a_column(session: asyncorm.AsyncSession) -> None:
    def counted(q: Any) -> Any:
        return q.filter(Address.user_id == User.id)

    ours = counted(session.query(func.count(Address.id)))
    theirs = select(func.count(Address.id)).where(Address.user_id == User.id)
    rows = await session.query(User.name, ours.scalar_subquery()).order_by(User.id).all()
    assert rows == await select_all(
        session, select(User.name, theirs.scalar_subquery()).order_by(User.id)
    )
    assert [tuple(row) for row in rows] == [("ann", 2), ("bob", 1), ("cat", 0)]
    labelled = await session.query(User.name, ours.label("n")).order_by(User.id).all()
    assert [(row.name, row.n) for row in labelled] == [("ann", 2), ("bob", 1), ("cat", 0)]


async def test_exists_is_an_awaitable_exists_construct(session: asyncorm.AsyncSession) -> None:
    has_address = session.query(Address).filter(Address.user_id == User.id).exists()
    assert isinstance(has_address, Exists)
    ours = await session.query(User.name).filter(has_address).order_by(User.id).all()
    theirs = select(User.name).where(
        select(Address).where(Address.user_id == User.id).exists()
    ).order_by(User.id)
    assert ours == await select_all(session, theirs)
    assert [row.name for row in ours] == ["ann", "bob"]
    assert await session.query(User).filter_by(name="ann").exists() is True
    assert await session.query(User).filter_by(name="zed").exists() is False
    # the sync idiom session.query(q.exists()).scalar(), and in a plain select()
    ann = session.query(User).filter_by(name="ann").exists()
    assert await session.query(ann).scalar() is True
    assert await session.scalar(select(session.query(User).filter_by(name="zed").exists())) is False
    assert await ann is True  # awaitable again, and after generative use of the construct
    assert await ann.where(User.name == "zed") is False
    # still a coroutine for asyncio, as when exists() was a coroutine function
    assert await asyncio.create_task(session.query(User).filter_by(name="bob").exists()) is True


async def test_query_goes_where_a_select_is_expected(session: asyncorm.AsyncSession) -> None:
    with_address = session.query(Address.user_id)
    # as the sync Query; its type is not one SQLAlchemy's in_() annotation names
    in_ = User.id.in_(with_address)  # type: ignore[arg-type]
    ours = await session.query(User).filter(in_).order_by(User.id).all()
    theirs = select(User).where(User.id.in_(select(Address.user_id))).order_by(User.id)
    assert ours == await select_all(session, theirs)
    assert names(ours) == ["ann", "bob"]
    assert list(await session.scalars(select(func.count()).select_from(
        session.query(User).selectable.subquery()
    ))) == [3]


async def test_slicing_awaits_the_rows_of_the_slice_as_select_slice(
    engine: AsyncEngine, session: asyncorm.AsyncSession
) -> None:
    await add_users_in(session, 7)  # ten users: ann, bob, cat, user00..user06
    query = session.query(User).order_by(User.id)
    every = await select_all(session, select(User).order_by(User.id))
    with capture_sql(engine) as statements:
        assert await query[2:5] == await select_all(
            session, select(User).order_by(User.id).slice(2, 5)
        )
    assert "LIMIT" in statements[0]
    assert "OFFSET" in statements[0]
    assert await query[2:5] == every[2:5]
    assert await query[7:] == every[7:]
    assert await query[:2] == every[:2]
    assert await query[:] == every
    assert await query[1:9:3] == every[1:9:3]
    assert await query[8:2:-1] == []  # as list slicing and the sync Query: stop <= start
    assert await query[1:30] == every[1:]
    # the bounds count from an offset already set, as sync Query.slice() and Select.slice()
    assert await query.offset(2)[1:3] == every[3:5]
    rows = await session.query(User.id, User.name).order_by(User.id)[1:3]
    assert rows == (await select_all(session, select(User.id, User.name).order_by(User.id)))[1:3]


async def add_users_in(session: asyncorm.AsyncSession, count: int) -> None:
    session.add_all([User(name=f"user{i:02}") for i in range(count)])
    await session.flush()


async def test_index_awaits_one_result_or_raises_index_error(
    session: asyncorm.AsyncSession,
) -> None:
    query = session.query(User).order_by(User.id)
    every = await select_all(session, select(User).order_by(User.id))
    assert await query[1] is every[1]
    assert await query[0] is every[0]
    row = await session.query(User.name).order_by(User.id)[2]
    assert tuple(row) == ("cat",)
    with pytest.raises(IndexError, match=r"AsyncQuery\[3\]: index out of range, .* offset 3"):
        await query[3]


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(-1, id="[-1]"),
        pytest.param(-3, id="[-3]"),
        pytest.param(slice(-2, None), id="[-2:]"),
        pytest.param(slice(None, -1), id="[:-1]"),
    ],
)
async def test_negative_indexes_raise_at_once_as_sync(
    engine: AsyncEngine, session: asyncorm.AsyncSession, item: Any
) -> None:
    def sync_index(sync_session: SyncSession) -> Any:
        return sync_session.query(User).order_by(User.id)[item]

    with pytest.raises(IndexError, match="negative indexes are not accepted") as theirs:
        await session.run_sync(sync_index)
    ours = pytest.raises(IndexError, match=re.escape(str(theirs.value)))
    with capture_sql(engine) as statements, ours:
        _ = session.query(User).order_by(User.id)[item]  # raised before anything is awaited
    assert statements == []


@pytest.mark.parametrize(
    "item", [pytest.param(slice(1, -1), id="[1:-1]"), pytest.param(slice(-1, -3), id="[-1:-3]")]
)
async def test_negative_bounds_raise_where_sync_returns_nothing(
    session: asyncorm.AsyncSession, item: Any
) -> None:
    # the sync Query checks for an empty range first: [] where a list would give rows
    assert await session.run_sync(lambda s: s.query(User)[item]) == []
    with pytest.raises(IndexError, match="negative indexes are not accepted"):
        _ = session.query(User)[item]


async def test_empty_slice_runs_no_sql_as_sync(
    engine: AsyncEngine, session: asyncorm.AsyncSession
) -> None:
    with capture_sql(engine) as statements:
        assert await session.query(User)[3:1] == []
        assert await session.query(User)[2:2] == []
    assert statements == []
    assert await session.run_sync(lambda s: s.query(User)[3:1]) == []


async def test_index_must_be_an_integer_or_a_slice(session: asyncorm.AsyncSession) -> None:
    with pytest.raises(TypeError, match="AsyncQuery indices must be integers or slices, not str"):
        session.query(User)["ann"]  # type: ignore[call-overload]


async def test_slice_builder_limits_and_offsets_as_select_slice(
    session: asyncorm.AsyncSession,
) -> None:
    query = session.query(User).order_by(User.id).slice(1, 3)
    theirs = select(User).order_by(User.id).slice(1, 3)
    assert await query.all() == await select_all(session, theirs)
    assert names(await query.all()) == ["bob", "cat"]
    assert str(query.statement) == str(select(User).order_by(User.id).slice(1, 3))
    # LIMIT/OFFSET: a bulk operation would drop them, so it refuses, as after limit()
    with pytest.raises(InvalidRequestError, match=r"when limit\(\) has been called"):
        await session.query(User).slice(0, 1).delete()
    with pytest.raises(InvalidRequestError, match=r"when offset\(\) has been called"):
        await session.query(User).slice(1, None).update({User.fullname: "x"})
    assert await session.query(User).count() == 3


async def test_yield_per_streams_in_batches(
    Session: SessionFactory, session: asyncorm.AsyncSession
) -> None:
    await add_users(Session, 10)
    in_identity_map, emails = [], []
    async for u in session.query(User).order_by(User.id).yield_per(4):
        in_identity_map.append(len(session.identity_map))
        # the loop body may use the session between batches
        emails.append(await session.query(Address.email).filter_by(user_id=u.id).count())
    # objects are built four rows at a time, and dropped once the loop let go of them
    assert in_identity_map[0] == 4
    assert max(in_identity_map) < 13
    buffered = []
    async for _ in session.query(User).order_by(User.id):
        buffered.append(len(session.identity_map))
    assert buffered[0] == 13
    streamed = [u.id async for u in session.query(User).order_by(User.id).yield_per(4)]
    theirs = await session.stream_scalars(
        select(User).order_by(User.id).execution_options(yield_per=4)
    )
    assert streamed == [u.id async for u in theirs]
    assert emails == [2, 1, 0] + [0] * 10


async def test_yield_per_terminals_return_every_row_as_select(
    Session: SessionFactory, session: asyncorm.AsyncSession
) -> None:
    await add_users(Session, 5)
    query = session.query(User).order_by(User.id).yield_per(2)
    theirs = select(User).order_by(User.id)
    assert await query.all() == await select_all(session, theirs)
    assert len(await query.all()) == 8
    assert await query.first() == (await select_all(session, theirs))[0]
    assert await query.filter_by(name="bob").one() is await user(session, "bob")
    assert await query[2:4] == (await select_all(session, theirs))[2:4]
    rows = await session.query(User.id, User.name).order_by(User.id).yield_per(3).all()
    assert rows == await select_all(session, select(User.id, User.name).order_by(User.id))
    assert await query.count() == 8


async def test_yield_per_refuses_joined_collection_loading_as_select(
    session: asyncorm.AsyncSession,
) -> None:
    message = "Can't use yield_per with eager loaders that require uniquing"
    theirs = select(User).options(joinedload(User.addresses)).execution_options(yield_per=2)
    with pytest.raises(InvalidRequestError, match=message):
        await session.stream(theirs)
    query = session.query(User).options(joinedload(User.addresses)).yield_per(2)
    with pytest.raises(InvalidRequestError, match=message):
        await query.all()
    with pytest.raises(InvalidRequestError, match=message):
        async for _ in query:
            pass


async def test_yield_per_stopped_early_releases_the_cursor(
    Session: SessionFactory, session: asyncorm.AsyncSession
) -> None:
    await add_users(Session, 10)
    async with contextlib.aclosing(aiter(session.query(User).yield_per(2))) as users:
        async for _ in users:
            break
    async for _ in session.query(User).yield_per(2):
        break
    assert await session.query(User).count() == 13
    session.add(User(name="dan"))
    await session.commit()
    assert await session.query(User).filter_by(name="dan").count() == 1


@pytest.mark.parametrize("count", [0, -1, True])
async def test_yield_per_takes_a_positive_count(
    session: asyncorm.AsyncSession, count: Any
) -> None:
    with pytest.raises(ValueError, match=rf"yield_per\(\) takes .* a positive int; got {count}"):
        session.query(User).yield_per(count)


async def test_autoflush_false_does_not_flush_as_the_select_option(
    session: asyncorm.AsyncSession,
) -> None:
    session.add(User(name="dan"))
    ours = await session.query(User).filter_by(name="dan").autoflush(False).all()
    theirs = select(User).filter_by(name="dan").execution_options(autoflush=False)
    assert ours == await select_all(session, theirs) == []
    assert names(await session.query(User).filter_by(name="dan").all()) == ["dan"]


async def test_with_parent_filters_to_related_objects_as_select(
    session: asyncorm.AsyncSession,
) -> None:
    ann = await user(session, "ann")
    theirs = await select_all(
        session, select(Address).where(with_parent(ann, User.addresses)).order_by(Address.id)
    )
    ours = await session.query(Address).with_parent(ann, User.addresses).order_by(Address.id).all()
    assert ours == theirs
    assert [a.email for a in ours] == ["a1@ann.org", "a2@ann.org"]
    # without the relationship, as the sync Query: the one from User to Address
    assert await session.query(Address).with_parent(ann).order_by(Address.id).all() == theirs
    with pytest.raises(InvalidRequestError, match="User has no relationship to Account"):
        session.query(Account).with_parent(ann)


async def test_add_entity_gives_rows_as_select_add_columns(
    session: asyncorm.AsyncSession,
) -> None:
    ours = await session.query(User).join(User.addresses).add_entity(Address).order_by(
        Address.id
    ).all()
    theirs = select(User).join(User.addresses).add_columns(Address).order_by(Address.id)
    assert ours == await select_all(session, theirs)
    assert (ours[0].User.name, ours[0].Address.email) == ("ann", "a1@ann.org")
    other = aliased(Address)
    aliased_rows = await session.query(User).join(other, User.addresses).add_entity(other).all()
    assert len(aliased_rows) == 3


async def test_tuples_give_rows_for_one_entity_as_select(
    session: asyncorm.AsyncSession,
) -> None:
    theirs = (await session.execute(select(User).order_by(User.id))).all()
    assert await session.query(User).order_by(User.id).tuples().all() == theirs
    rows = await session.query(User).order_by(User.id).only_return_tuples(True).all()
    assert rows == theirs
    assert not session.query(User).tuples().is_single_entity
    assert await session.query(User).filter_by(name="ann").tuples().scalar() is theirs[0][0]


async def test_with_session_runs_on_the_other_session(
    Session: SessionFactory, session: asyncorm.AsyncSession
) -> None:
    query = session.query(User).filter_by(name="ann")
    async with Session() as other:
        ann = await query.with_session(other).one()
        assert ann in other
        assert ann not in session
        assert ann is (await other.scalars(select(User).filter_by(name="ann"))).one()


async def test_with_transformation_applies_the_function(session: asyncorm.AsyncSession) -> None:
    def without(name: str) -> Callable[[Any], Any]:
        return lambda q: q.filter(User.name != name)

    ours = await session.query(User).with_transformation(without("bob")).order_by(User.id).all()
    theirs = select(User).where(User.name != "bob").order_by(User.id)
    assert ours == await select_all(session, theirs)
    assert names(ours) == ["ann", "cat"]


async def test_statement_builders_render_as_select(session: asyncorm.AsyncSession) -> None:
    inner = session.query(func.count(Address.id)).filter(Address.user_id == User.id)
    correlated = inner.correlate(User).scalar_subquery()
    theirs = select(func.count(Address.id)).where(Address.user_id == User.id).correlate(User)
    assert str(select(User.name, correlated)) == str(select(User.name, theirs.scalar_subquery()))
    query = (
        session.query(User)
        .prefix_with("/* first */")
        .suffix_with("/* last */")
        .with_statement_hint("/* hint */")
        .with_hint(User, "/* table hint */", "mssql")
    )
    select_ = (
        select(User)
        .prefix_with("/* first */")
        .suffix_with("/* last */")
        .with_statement_hint("/* hint */")
        .with_hint(User, "/* table hint */", "mssql")
    )
    assert str(query) == str(select_)
    ours = await query.order_by(User.id).all()
    assert ours == await select_all(session, select_.order_by(User.id))


async def test_introspection_matches_select(session: asyncorm.AsyncSession) -> None:
    query = session.query(User, User.id).filter_by(name="ann").yield_per(5)
    select_ = select(User, User.id).filter_by(name="ann").execution_options(yield_per=5)
    assert str(query.whereclause) == str(select_.whereclause)
    assert session.query(User).whereclause is None
    assert query.column_descriptions == select_.column_descriptions
    assert query.get_execution_options() == select_.get_execution_options()
