"""The Session Basics tour, awaited: tables, add, query, identity map, rollback, a savepoint.

Run it on a SQLite file (the default) or PostgreSQL:

    python examples/quickstart.py
    python examples/quickstart.py --url postgresql://postgres@127.0.0.1/test
    ASYNCORM_URL=postgresql://postgres@127.0.0.1/test python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import asyncio
import os

from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

import asyncorm


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "quickstart_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    addresses: Mapped[list[Address]] = relationship(cascade="all, delete-orphan")


class Address(Base):
    __tablename__ = "quickstart_addresses"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[int] = mapped_column(ForeignKey("quickstart_users.id"))


async def tour(url: str) -> None:
    engine = asyncorm.create_engine(url)
    Session = asyncorm.async_sessionmaker(engine)
    async with engine.begin() as conn:  # create the tables
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)

    async with Session() as session:
        ann = User(name="ann", addresses=[Address(email="ann@example.com")])
        session.add(ann)
        session.add_all([User(name="bob"), User(name="cat")])
        print("pending (session.new):", sorted(u.name for u in session.new if isinstance(u, User)))
        await session.commit()
        ann_id = ann.id  # readable after commit: this factory does not expire on commit
        print("committed; ann has id", ann_id)

        # the identity map: one object per primary key, and get() of a present one is free
        same = await session.get(User, ann_id)
        print("identity map returns the same object:", same is ann)

        # the legacy Query, awaited, and 2.0 select()
        names = await session.query(User.name).order_by(User.name).all()
        print("query(User.name):", [row.name for row in names])
        bob = await session.scalar(select(User).where(User.name == "bob"))
        assert bob is not None

        # dirty tracking, then rollback undoes the change
        bob.name = "robert"
        print("dirty:", [u.name for u in session.dirty if isinstance(u, User)])
        await session.rollback()  # expires every object: reload before reading again
        await session.refresh(bob)
        print("after rollback bob is", bob.name)

        # delete cascades to the user's addresses
        loaded = await session.scalar(
            select(User).where(User.id == ann_id).options(selectinload(User.addresses))
        )
        await session.delete(loaded)
        await session.commit()
        print("addresses left after deleting ann:", await session.query(Address).count())

        # a savepoint: the inner rollback keeps the outer work
        session.add(User(name="dan"))
        savepoint = await session.begin_nested()
        session.add(User(name="eve"))
        await savepoint.rollback()
        await session.commit()
        print("users:", [u.name for u in await session.query(User).order_by(User.id).all()])

    await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("ASYNCORM_URL", "sqlite:///quickstart.db"),
        help="database URL (default: $ASYNCORM_URL or sqlite:///quickstart.db)",
    )
    asyncio.run(tour(parser.parse_args().url))


if __name__ == "__main__":
    main()
