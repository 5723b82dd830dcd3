"""Users and their addresses over HTTP: an aiohttp app with one session per request.

Run it on a SQLite file (the default, ``users.db``) or on PostgreSQL:

    pip install "asyncorm[aiohttp,sqlite]"
    python examples/aiohttp_app.py                        # http://127.0.0.1:8080
    DATABASE_URL=postgresql://postgres@127.0.0.1/test python examples/aiohttp_app.py

Then:

    curl -X POST localhost:8080/users \
         -d '{"name": "ann", "email": "ann@example.com", "addresses": ["1 Main St"]}'
    curl localhost:8080/users
    curl -X PATCH localhost:8080/users/1 -d '{"name": "Ann"}'
    curl localhost:8080/stats
    curl -X DELETE localhost:8080/users/1

``asyncorm.aiohttp.setup()`` runs each handler in a registry scope of its own: ``db()`` in a
handler (and in anything it awaits) is the request's session. With ``commit="auto"`` the
session is committed when the response status is below 400, before the response is sent, and
rolled back otherwise; GET requests run read-only. A missing user is a 404
(``NoResultFound``), a taken email a 409 (``IntegrityError``). On shutdown, ``setup()``'s
cleanup closes what is left and disposes of the engine.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.exc import IntegrityError, NoResultFound
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

import asyncorm
import asyncorm.aiohttp


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(200), unique=True)
    addresses: Mapped[list[Address]] = relationship(
        cascade="all, delete-orphan", order_by="Address.id"
    )


class Address(Base):
    __tablename__ = "addresses"
    id: Mapped[int] = mapped_column(primary_key=True)
    street: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))


engine = asyncorm.create_engine(os.environ.get("DATABASE_URL", "sqlite:///users.db"))
db = asyncorm.async_scoped_session(asyncorm.async_sessionmaker(engine))
routes = web.RouteTableDef()


def as_json(user: User) -> dict[str, Any]:
    addresses = [{"id": a.id, "street": a.street} for a in user.addresses]
    return {"id": user.id, "name": user.name, "email": user.email, "addresses": addresses}


async def get_user(request: web.Request) -> User:
    """The user of the URL, addresses loaded; NoResultFound (a 404) if there is none."""
    user_id = int(request.match_info["user_id"])
    return await db.get_one(User, user_id, options=[selectinload(User.addresses)])


@routes.get("/users")
async def list_users(request: web.Request) -> web.Response:
    query = select(User).options(selectinload(User.addresses)).order_by(User.id)
    return web.json_response([as_json(user) for user in await db.scalars(query)])


@routes.post("/users")
async def create_user(request: web.Request) -> web.Response:
    data = await request.json()
    addresses = [Address(street=street) for street in data.get("addresses", [])]
    user = User(name=data["name"], email=data["email"], addresses=addresses)
    db.add(user)
    await db.flush()  # a taken email raises IntegrityError here: a 409
    return web.json_response(as_json(user), status=201)


@routes.get(r"/users/{user_id:\d+}")
async def read_user(request: web.Request) -> web.Response:
    return web.json_response(as_json(await get_user(request)))


@routes.patch(r"/users/{user_id:\d+}")
async def update_user(request: web.Request) -> web.Response:
    user = await get_user(request)
    data = await request.json()
    user.name = data.get("name", user.name)
    user.email = data.get("email", user.email)
    await db.flush()
    return web.json_response(as_json(user))


@routes.delete(r"/users/{user_id:\d+}")
async def delete_user(request: web.Request) -> web.Response:
    await db.delete(await get_user(request))
    return web.Response(status=204)


async def count(model: type[Base]) -> int:
    # runs in a task of its own (see stats): db() is that task's session, not the request's
    return await db.scalar(select(func.count()).select_from(model)) or 0


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    users, addresses = await asyncio.gather(count(User), count(Address))
    return web.json_response({"users": users, "addresses": addresses})


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map the database's answers to HTTP; outside asyncorm's scope, which has rolled back."""
    try:
        return await handler(request)
    except NoResultFound:
        return web.json_response({"detail": "No such user."}, status=404)
    except IntegrityError:
        return web.json_response({"detail": "A user with this email already exists."}, status=409)


async def create_tables(app: web.Application) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


def create_app() -> web.Application:
    app = web.Application(middlewares=[errors])
    app.add_routes(routes)
    app.on_startup.append(create_tables)
    asyncorm.aiohttp.setup(  # its middleware runs inside `errors`; disposes the engine at exit
        app,
        db,
        commit="auto",  # commit below 400, before the response is sent
        read_only_methods=asyncorm.aiohttp.READ_ONLY_METHODS,  # GET, HEAD, OPTIONS: no writes
    )
    return app


if __name__ == "__main__":
    # handler_cancellation: a client that goes away cancels its handler (rolled back)
    web.run_app(create_app(), host="127.0.0.1", port=8080, handler_cancellation=True)
