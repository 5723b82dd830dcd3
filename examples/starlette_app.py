"""Users and their addresses over HTTP: a Starlette app with one session per request.

Run it with uvicorn on a SQLite file (the default, ``users.db``) or on PostgreSQL:

    pip install "asyncorm[starlette,sqlite]" uvicorn
    python examples/starlette_app.py                      # http://127.0.0.1:8000
    uvicorn --app-dir examples starlette_app:app          # the same, with uvicorn's options
    DATABASE_URL=postgresql://postgres@127.0.0.1/test python examples/starlette_app.py

Then:

    curl -X POST localhost:8000/users \
         -d '{"name": "ann", "email": "ann@example.com", "addresses": ["1 Main St"]}'
    curl localhost:8000/users
    curl -X PATCH localhost:8000/users/1 -d '{"name": "Ann"}'
    curl localhost:8000/stats
    curl -X DELETE localhost:8000/users/1

``SessionMiddleware`` opens one registry scope per request: ``db()`` in a handler (and in
anything it awaits) is the request's session. With ``commit="auto"`` the session is committed
when the response status is below 400, before the response is sent, and rolled back
otherwise; GET requests run read-only. A missing user is a 404 (``NoResultFound``), a taken
email a 409 (``IntegrityError``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.exc import IntegrityError, NoResultFound
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import asyncorm
from asyncorm.starlette import DEFAULT_READ_ONLY_METHODS, SessionMiddleware


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


def as_json(user: User) -> dict[str, Any]:
    addresses = [{"id": a.id, "street": a.street} for a in user.addresses]
    return {"id": user.id, "name": user.name, "email": user.email, "addresses": addresses}


async def get_user(request: Request) -> User:
    """The user of the URL, addresses loaded; NoResultFound (a 404) if there is none."""
    user_id = request.path_params["user_id"]
    return await db.get_one(User, user_id, options=[selectinload(User.addresses)])


async def list_users(request: Request) -> JSONResponse:
    query = select(User).options(selectinload(User.addresses)).order_by(User.id)
    return JSONResponse([as_json(user) for user in await db.scalars(query)])


async def create_user(request: Request) -> JSONResponse:
    data = await request.json()
    addresses = [Address(street=street) for street in data.get("addresses", [])]
    user = User(name=data["name"], email=data["email"], addresses=addresses)
    db.add(user)
    await db.flush()  # a taken email raises IntegrityError here: a 409
    return JSONResponse(as_json(user), status_code=201)


async def read_user(request: Request) -> JSONResponse:
    return JSONResponse(as_json(await get_user(request)))


async def update_user(request: Request) -> JSONResponse:
    user = await get_user(request)
    data = await request.json()
    user.name = data.get("name", user.name)
    user.email = data.get("email", user.email)
    await db.flush()
    return JSONResponse(as_json(user))


async def delete_user(request: Request) -> Response:
    await db.delete(await get_user(request))
    return Response(status_code=204)


async def count(model: type[Base]) -> int:
    # runs in a task of its own (see stats): db() is that task's session, not the request's
    return await db.scalar(select(func.count()).select_from(model)) or 0


async def stats(request: Request) -> JSONResponse:
    users, addresses = await asyncio.gather(count(User), count(Address))
    return JSONResponse({"users": users, "addresses": addresses})


async def not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "No such user."}, status_code=404)


async def conflict(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "A user with this email already exists."}, status_code=409)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield
    await engine.dispose()


app = Starlette(
    routes=[
        Route("/users", list_users, methods=["GET"]),
        Route("/users", create_user, methods=["POST"]),
        Route("/users/{user_id:int}", read_user, methods=["GET"]),
        Route("/users/{user_id:int}", update_user, methods=["PATCH"]),
        Route("/users/{user_id:int}", delete_user, methods=["DELETE"]),
        Route("/stats", stats, methods=["GET"]),
    ],
    middleware=[
        Middleware(
            SessionMiddleware,
            registry=db,
            commit="auto",  # commit below 400, before the response is sent
            read_only_methods=DEFAULT_READ_ONLY_METHODS,  # GET, HEAD, OPTIONS: no writes
        )
    ],
    exception_handlers={NoResultFound: not_found, IntegrityError: conflict},
    lifespan=lifespan,
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=8000)
