"""SQLAlchemy's "Session Basics" documentation, behaviour by behaviour, awaited on both backends."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Connection, delete, event, func, insert, inspect, select, update
from sqlalchemy.exc import MissingGreenlet, UnboundExecutionError
from sqlalchemy.ext import asyncio as sa_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session as SyncSession
from sqlalchemy.orm import SessionTransaction, selectinload

import asyncorm
from tests.conftest import capture_sql
from tests.models import Address, User

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]


# -- helpers ------------------------------------------------------------------------------


async def add_users(Session: SessionFactory, *names: str) -> list[int]:
    """Commit one user per name; return their ids."""
    async with Session.begin() as session:
        users = [User(name=name) for name in names]
        session.add_all(users)
    return [user.id for user in users]


async def add_user_with_addresses(Session: SessionFactory, name: str, *emails: str) -> int:
    async with Session.begin() as session:
        user = User(name=name, addresses=[Address(email=email) for email in emails])
        session.add(user)
    return user.id


async def user_names(Session: SessionFactory) -> list[str]:
    """The names committed in the database, read by a fresh session."""
    async with Session() as session:
        return list(await session.scalars(select(User.name).order_by(User.name)))


async def address_emails(Session: SessionFactory) -> list[str]:
    async with Session() as session:
        return list(await session.scalars(select(Address.email).order_by(Address.email)))


async def load_user(session: sa_asyncio.AsyncSession, name: str) -> User:
    return (await session.scalars(select(User).filter_by(name=name))).one()


# -- identity map -------------------------------------------------------------------------


async def test_identity_map_gives_one_object_per_primary_key(Session: SessionFactory) -> None:
    [ann_id] = await add_users(Session, "ann")
    async with Session() as session:
        by_query = await load_user(session, "ann")
        by_get = await session.get(User, ann_id)
        by_select = (await session.scalars(select(User).where(User.id == ann_id))).one()
        assert by_get is by_query
        assert by_select is by_query
        assert list(session.identity_map.values()) == [by_query]


async def test_get_of_present_object_emits_no_sql(
    engine: AsyncEngine, Session: SessionFactory
) -> None:
    ann_id, bob_id = await add_users(Session, "ann", "bob")
    async with Session() as session:
        ann = await load_user(session, "ann")
        with capture_sql(engine) as statements:
            assert await session.get(User, ann_id) is ann
        assert statements == []
        with capture_sql(engine) as statements:
            bob = await session.get(User, bob_id)
        assert bob is not None
        assert len(statements) == 1
        assert statements[0].lstrip().upper().startswith("SELECT")


# -- new / dirty / deleted ----------------------------------------------------------------


async def test_new_holds_pending_objects_until_flush(Session: SessionFactory) -> None:
    async with Session() as session:
        ann = User(name="ann")
        session.add(ann)
        assert list(session.new) == [ann]
        assert inspect(ann).pending
        await session.flush()
        assert list(session.new) == []
        assert inspect(ann).persistent


async def test_dirty_holds_modified_persistent_objects(Session: SessionFactory) -> None:
    await add_users(Session, "ann", "bob")
    async with Session() as session:
        ann = await load_user(session, "ann")
        await load_user(session, "bob")
        assert list(session.dirty) == []
        ann.fullname = "Ann Smith"
        assert list(session.dirty) == [ann]
        assert session.is_modified(ann)
        await session.flush()
        assert list(session.dirty) == []


async def test_deleted_holds_objects_marked_for_deletion(Session: SessionFactory) -> None:
    await add_users(Session, "ann")
    async with Session() as session:
        ann = await load_user(session, "ann")
        await session.delete(ann)
        assert list(session.deleted) == [ann]
        assert inspect(ann).persistent  # nothing happens in the database until flush
        await session.flush()
        assert list(session.deleted) == []
        assert inspect(ann).deleted


# -- autoflush and flush ------------------------------------------------------------------


async def test_autoflush_flushes_pending_objects_before_a_query(Session: SessionFactory) -> None:
    async with Session() as session:
        ann = User(name="ann")
        session.add(ann)
        assert await load_user(session, "ann") is ann
        assert list(session.new) == []


async def test_autoflush_false_leaves_pending_objects_unflushed(Session: SessionFactory) -> None:
    async with Session(autoflush=False) as session:
        ann = User(name="ann")
        session.add(ann)
        assert list(await session.scalars(select(User))) == []
        assert list(session.new) == [ann]


async def test_no_autoflush_block_suspends_autoflush(Session: SessionFactory) -> None:
    async with Session() as session:
        session.add(User(name="ann"))
        with session.no_autoflush:
            assert await session.scalar(select(func.count()).select_from(User)) == 0
        assert await session.scalar(select(func.count()).select_from(User)) == 1


async def test_flush_writes_changes_inside_the_open_transaction(Session: SessionFactory) -> None:
    async with Session(autoflush=False) as session:
        ann = User(name="ann")
        session.add(ann)
        await session.flush()
        assert isinstance(ann.id, int)
        assert inspect(ann).persistent
        assert await session.scalar(select(User.name)) == "ann"
        await session.rollback()
    assert await user_names(Session) == []


# -- commit -------------------------------------------------------------------------------


async def test_commit_flushes_then_commits_then_expires(engine: AsyncEngine) -> None:
    steps: list[str] = []
    async with asyncorm.AsyncSession(engine) as session:
        ann = User(name="ann")
        session.add(ann)

        def after_flush(sess: SyncSession, context: Any) -> None:
            steps.append(f"flush, id={ann.id}")

        def on_commit(conn: Connection) -> None:
            steps.append("database commit")

        def after_transaction_end(sess: SyncSession, transaction: SessionTransaction) -> None:
            if transaction.parent is None:  # the session's own transaction, not the flush's
                steps.append(f"end, expired={'name' in inspect(ann).expired_attributes}")

        event.listen(session.sync_session, "after_flush", after_flush)
        event.listen(engine.sync_engine, "commit", on_commit)
        event.listen(session.sync_session, "after_transaction_end", after_transaction_end)
        await session.commit()
        ann_id = inspect(ann).identity[0]  # type: ignore[index]
        assert steps == [f"flush, id={ann_id}", "database commit", "end, expired=True"]
        with pytest.raises(MissingGreenlet):
            ann.name  # noqa: B018 - an expired attribute reloads: implicit IO
        assert await ann.awaitable_attrs.name == "ann"
    assert await user_names(asyncorm.async_sessionmaker(engine)) == ["ann"]


async def test_sessionmaker_commit_keeps_objects_loaded(
    engine: AsyncEngine, Session: SessionFactory
) -> None:
    async with Session() as session:
        ann = User(name="ann")
        session.add(ann)
        await session.commit()
        assert inspect(ann).expired_attributes == set()
        with capture_sql(engine) as statements:
            assert ann.name == "ann"
        assert statements == []


async def test_sessionmaker_with_expire_on_commit_true_expires(engine: AsyncEngine) -> None:
    async with asyncorm.async_sessionmaker(engine, expire_on_commit=True)() as session:
        ann = User(name="ann")
        session.add(ann)
        await session.commit()
        assert "name" in inspect(ann).expired_attributes


# -- rollback -----------------------------------------------------------------------------


async def test_rollback_expunges_pending_objects(Session: SessionFactory) -> None:
    async with Session() as session:
        ann = User(name="ann")
        session.add(ann)
        await session.flush()
        await session.rollback()
        assert inspect(ann).transient
        assert ann not in session
    assert await user_names(Session) == []


async def test_rollback_restores_deleted_objects_to_persistent(Session: SessionFactory) -> None:
    await add_users(Session, "ann")
    async with Session() as session:
        ann = await load_user(session, "ann")
        await session.delete(ann)
        await session.flush()
        assert inspect(ann).deleted
        await session.rollback()
        assert inspect(ann).persistent
        assert ann in session
    assert await user_names(Session) == ["ann"]


async def test_rollback_expires_every_object(Session: SessionFactory) -> None:
    await add_users(Session, "ann")
    async with Session() as session:
        ann = await load_user(session, "ann")
        ann.name = "renamed"
        await session.flush()
        await session.rollback()
        assert "name" in inspect(ann).expired_attributes
        assert await ann.awaitable_attrs.name == "ann"


# -- close --------------------------------------------------------------------------------


async def test_close_expunges_all_and_returns_the_connection(
    engine: AsyncEngine, Session: SessionFactory
) -> None:
    await add_users(Session, "ann")
    session = Session()
    ann = await load_user(session, "ann")
    assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    await session.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert inspect(ann).detached
    assert len(session.identity_map) == 0
    assert (await load_user(session, "ann")) is not ann  # the session is usable again
    await session.close()


# -- add / add_all ------------------------------------------------------------------------


async def test_add_all_persists_transient_objects(Session: SessionFactory) -> None:
    async with Session() as session:
        session.add_all([User(name="ann"), User(name="bob")])
        await session.commit()
    assert await user_names(Session) == ["ann", "bob"]


async def test_add_reattaches_a_detached_object_with_its_changes(Session: SessionFactory) -> None:
    await add_users(Session, "ann")
    async with Session() as first:
        ann = await load_user(first, "ann")
    assert inspect(ann).detached
    ann.name = "anne"
    async with Session() as second:
        second.add(ann)
        assert inspect(ann).persistent
        assert list(second.dirty) == [ann]
        await second.commit()
    assert await user_names(Session) == ["anne"]


async def test_add_all_mixes_detached_and_transient_objects(Session: SessionFactory) -> None:
    await add_users(Session, "ann")
    async with Session() as first:
        ann = await load_user(first, "ann")
    async with Session() as second:
        bob = User(name="bob")
        second.add_all([ann, bob])
        assert inspect(ann).persistent
        assert inspect(bob).pending
        await second.commit()
    assert await user_names(Session) == ["ann", "bob"]


# -- delete and cascades ------------------------------------------------------------------


async def test_delete_removes_the_row_at_flush(Session: SessionFactory) -> None:
    await add_users(Session, "ann", "bob")
    async with Session() as session:
        ann = await load_user(session, "ann")
        await session.delete(ann)
        await session.commit()
        assert ann not in session
        assert inspect(ann).was_deleted
    assert await user_names(Session) == ["bob"]


async def test_delete_cascades_to_related_objects(Session: SessionFactory) -> None:
    await add_user_with_addresses(Session, "ann", "a1@x.org", "a2@x.org")
    await add_user_with_addresses(Session, "bob", "b1@x.org")
    async with Session() as session:
        await session.delete(await load_user(session, "ann"))
        await session.commit()
    assert await address_emails(Session) == ["b1@x.org"]


async def test_delete_orphan_deletes_objects_removed_from_a_collection(
    Session: SessionFactory,
) -> None:
    await add_user_with_addresses(Session, "ann", "a1@x.org", "a2@x.org")
    async with Session() as session:
        statement = select(User).options(selectinload(User.addresses))
        ann = (await session.scalars(statement)).one()
        first_address = ann.addresses[0]
        ann.addresses.remove(first_address)
        await session.commit()
        assert inspect(first_address).was_deleted
    assert await address_emails(Session) == ["a2@x.org"]


# -- bulk UPDATE / DELETE by criterion ----------------------------------------------------


@pytest.mark.parametrize("strategy", ["auto", "evaluate", "fetch"])
async def test_bulk_update_synchronizes_objects_in_the_session(
    engine: AsyncEngine, Session: SessionFactory, strategy: str
) -> None:
    await add_users(Session, "ann", "bob")
    async with Session() as session:
        ann, bob = await load_user(session, "ann"), await load_user(session, "bob")
        statement = update(User).where(User.name == "ann").values(fullname="Ann Smith")
        await session.execute(statement, execution_options={"synchronize_session": strategy})
        with capture_sql(engine) as statements:
            assert (ann.fullname, bob.fullname) == ("Ann Smith", None)
        assert statements == []


async def test_bulk_update_without_synchronize_leaves_objects_stale(
    Session: SessionFactory,
) -> None:
    await add_users(Session, "ann")
    async with Session() as session:
        ann = await load_user(session, "ann")
        statement = update(User).values(fullname="Ann Smith")
        await session.execute(statement, execution_options={"synchronize_session": False})
        assert ann.fullname is None
        assert await session.scalar(select(User.fullname)) == "Ann Smith"


@pytest.mark.parametrize("strategy", ["auto", "evaluate", "fetch"])
async def test_bulk_delete_removes_matched_objects_from_the_session(
    Session: SessionFactory, strategy: str
) -> None:
    await add_users(Session, "ann", "bob")
    async with Session() as session:
        ann, bob = await load_user(session, "ann"), await load_user(session, "bob")
        statement = delete(User).where(User.name == "ann")
        await session.execute(statement, execution_options={"synchronize_session": strategy})
        assert ann not in session
        assert inspect(ann).deleted
        assert bob in session
        await session.commit()
    assert await user_names(Session) == ["bob"]


# -- merge / refresh / expire -------------------------------------------------------------


async def test_merge_copies_state_onto_the_persistent_object(Session: SessionFactory) -> None:
    [ann_id] = await add_users(Session, "ann")
    async with Session() as session:
        ann = await load_user(session, "ann")
        incoming = User(id=ann_id, name="anne")
        merged = await session.merge(incoming)
        assert merged is ann
        assert incoming not in session
        assert ann.name == "anne"
        assert list(session.dirty) == [ann]
        await session.commit()
    assert await user_names(Session) == ["anne"]


async def test_merge_loads_from_the_database_or_creates_a_pending_copy(
    Session: SessionFactory,
) -> None:
    [ann_id] = await add_users(Session, "ann")
    async with Session() as session:
        loaded = await session.merge(User(id=ann_id, name="anne"))
        assert inspect(loaded).persistent
        created = await session.merge(User(id=ann_id + 100, name="zed"))
        assert inspect(created).pending
        await session.commit()
    assert await user_names(Session) == ["anne", "zed"]


async def test_refresh_reloads_attributes_from_the_database(Session: SessionFactory) -> None:
    await add_users(Session, "ann")
    async with Session() as session:
        ann = await load_user(session, "ann")
        await session.execute(
            update(User).values(name="anne"), execution_options={"synchronize_session": False}
        )
        assert ann.name == "ann"
        await session.refresh(ann)
        assert ann.name == "anne"


async def test_refresh_with_attribute_names_loads_only_those(Session: SessionFactory) -> None:
    await add_users(Session, "ann")
    async with Session() as session:
        ann = await load_user(session, "ann")
        await session.execute(
            update(User).values(name="anne", bio="hello"),
            execution_options={"synchronize_session": False},
        )
        assert "bio" in inspect(ann).unloaded  # deferred column
        await session.refresh(ann, ["bio"])
        assert (ann.bio, ann.name) == ("hello", "ann")


async def test_expire_reloads_attributes_on_next_access(Session: SessionFactory) -> None:
    await add_users(Session, "ann")
    async with Session() as session:
        ann = await load_user(session, "ann")
        await session.execute(
            update(User).values(name="anne"), execution_options={"synchronize_session": False}
        )
        session.expire(ann)
        assert {"id", "name", "fullname"} <= inspect(ann).expired_attributes
        assert await ann.awaitable_attrs.name == "anne"


async def test_expire_attribute_names_expires_only_those(Session: SessionFactory) -> None:
    await add_users(Session, "ann")
    async with Session() as session:
        ann = await load_user(session, "ann")
        session.expire(ann, ["fullname"])
        assert inspect(ann).expired_attributes == {"fullname"}


async def test_expire_all_expires_every_object(Session: SessionFactory) -> None:
    await add_users(Session, "ann", "bob")
    async with Session() as session:
        users = [await load_user(session, "ann"), await load_user(session, "bob")]
        session.expire_all()
        assert all("name" in inspect(user).expired_attributes for user in users)


# -- savepoints and external transactions -------------------------------------------------


async def test_savepoint_rollback_keeps_the_outer_work(Session: SessionFactory) -> None:
    async with Session() as session:
        session.add(User(name="outer"))
        savepoint = await session.begin_nested()
        inner = User(name="inner")
        session.add(inner)
        await session.flush()
        await savepoint.rollback()
        assert inner not in session
        await session.commit()
    assert await user_names(Session) == ["outer"]


async def test_savepoint_context_manager_commits_into_the_outer_transaction(
    Session: SessionFactory,
) -> None:
    async with Session() as session:
        session.add(User(name="outer"))
        async with session.begin_nested():
            session.add(User(name="inner"))
        assert session.in_transaction()
        assert not session.in_nested_transaction()
        await session.commit()
    assert await user_names(Session) == ["inner", "outer"]


async def test_session_in_external_transaction_commits_only_a_savepoint(
    engine: AsyncEngine, Session: SessionFactory
) -> None:
    seen: list[str] = []

    def on_commit(conn: Connection) -> None:
        seen.append("commit")

    def on_release(conn: Connection, name: str, context: Any) -> None:
        seen.append("release savepoint")

    event.listen(engine.sync_engine, "commit", on_commit)
    event.listen(engine.sync_engine, "release_savepoint", on_release)
    async with engine.connect() as conn:
        outer = await conn.begin()
        async with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
            session.add(User(name="ann"))
            await session.commit()
        assert seen == ["release savepoint"]
        assert conn.in_transaction()
        assert await conn.scalar(select(User.name)) == "ann"
        await outer.rollback()
    assert await user_names(Session) == []


async def test_session_rollback_in_external_transaction_keeps_the_outer_work(
    engine: AsyncEngine, Session: SessionFactory
) -> None:
    async with engine.connect() as conn:
        outer = await conn.begin()
        await conn.execute(insert(User).values(name="outer"))
        async with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
            session.add(User(name="inner"))
            await session.flush()
            await session.rollback()
        await outer.commit()
    assert await user_names(Session) == ["outer"]


# -- async_sessionmaker and AsyncSession --------------------------------------------------


async def test_configure_binds_an_engine_after_construction(engine: AsyncEngine) -> None:
    factory = asyncorm.async_sessionmaker()
    async with factory() as session:
        with pytest.raises(UnboundExecutionError, match="Could not locate a bind"):
            await session.execute(select(User))
    factory.configure(bind=engine)
    async with factory() as session:
        assert session.bind is engine
        assert list(await session.scalars(select(User))) == []


async def test_call_overrides_the_factory_configuration(
    engine: AsyncEngine, Session: SessionFactory
) -> None:
    async with engine.connect() as conn:
        async with Session(bind=conn, autoflush=False) as session:
            assert session.bind is conn
            assert session.autoflush is False
            session.add(User(name="ann"))
            assert list(await session.scalars(select(User))) == []
        await conn.rollback()
    async with Session() as session:
        assert session.bind is engine
        assert session.autoflush is True


async def test_begin_commits_when_the_block_succeeds(Session: SessionFactory) -> None:
    async with Session.begin() as session:
        session.add(User(name="ann"))
    assert not session.in_transaction()
    assert await user_names(Session) == ["ann"]


async def _fail_inside_begin(Session: SessionFactory) -> None:
    async with Session.begin() as session:
        session.add(User(name="ann"))
        await session.flush()
        raise RuntimeError("handler failed")


async def test_begin_rolls_back_when_the_block_raises(Session: SessionFactory) -> None:
    with pytest.raises(RuntimeError, match="handler failed"):
        await _fail_inside_begin(Session)
    assert await user_names(Session) == []


async def test_sessionmaker_produces_asyncorm_sessions(engine: AsyncEngine) -> None:
    class AppSession(asyncorm.AsyncSession):
        pass

    async with asyncorm.async_sessionmaker(engine)() as session:
        assert type(session) is asyncorm.AsyncSession
        assert session.sync_session.expire_on_commit is False
    async with asyncorm.async_sessionmaker(engine, class_=AppSession)() as custom:
        assert type(custom) is AppSession


async def test_async_session_constructed_directly_keeps_sqlalchemy_defaults(
    engine: AsyncEngine,
) -> None:
    async with asyncorm.AsyncSession(engine) as ours, sa_asyncio.AsyncSession(engine) as theirs:
        assert isinstance(ours, sa_asyncio.AsyncSession)
        assert ours.sync_session.expire_on_commit is True
        for name in ("autoflush", "expire_on_commit", "join_transaction_mode", "twophase"):
            assert getattr(ours.sync_session, name) == getattr(theirs.sync_session, name), name
        assert isinstance(ours.sync_session, type(theirs.sync_session))
        assert ours.bind is engine
