"""Users and their addresses over HTTP: a FastAPI app with one session per request.

Run it on a SQLite file (the default, ``users.db``) or on PostgreSQL:

    pip install "asyncorm[fastapi,sqlite]" uvicorn
    python examples/fastapi_app.py                        # http://127.0.0.1:8000/docs
    uvicorn --app-dir examples fastapi_app:app            # the same, with uvicorn's options
    DATABASE_URL=postgresql://postgres@127.0.0.1/test python examples/fastapi_app.py

Then:

    curl -X POST localhost:8000/users -H 'content-type: application/json' \
         -d '{"name": "ann", "email": "ann@example.com", "addresses": ["1 Main St"]}'
    curl localhost:8000/users
    curl -X PATCH localhost:8000/users/1 -H 'content-type: application/json' -d '{"name": "Ann"}'
    curl localhost:8000/stats
    curl -X DELETE localhost:8000/users/1

``SessionMiddleware`` opens one registry scope per request; the ``SessionDep`` dependency is
that request's session (``db()`` anywhere in the request returns the same one). With
``commit="auto"`` it is committed when the response status is below 400, before the response
is sent, and rolled back otherwise; GET requests run read-only. A missing user is a 404
(``NoResultFound``), a taken email a 409 (``IntegrityError``).
"""

# no `from __future__ import annotations`: FastAPI and pydantic read the annotations at runtime
import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.exc import IntegrityError, NoResultFound
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

import asyncorm
from asyncorm import AsyncSession
from asyncorm.fastapi import session_dependency
from asyncorm.starlette import DEFAULT_READ_ONLY_METHODS, SessionMiddleware


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(200), unique=True)
    addresses: Mapped[list["Address"]] = relationship(
        cascade="all, delete-orphan", order_by="Address.id"
    )


class Address(Base):
    __tablename__ = "addresses"
    id: Mapped[int] = mapped_column(primary_key=True)
    street: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))


class UserIn(BaseModel):
    name: str
    email: str
    addresses: list[str] = []


class UserPatch(BaseModel):
    name: str | None = None
    email: str | None = None


class AddressOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    street: str


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    email: str
    addresses: list[AddressOut]


class Stats(BaseModel):
    users: int
    addresses: int


engine = asyncorm.create_engine(os.environ.get("DATABASE_URL", "sqlite:///users.db"))
db = asyncorm.async_scoped_session(asyncorm.async_sessionmaker(engine))
SessionDep = Annotated[AsyncSession, Depends(session_dependency(db))]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield
    await engine.dispose()


app = FastAPI(title="asyncorm users", lifespan=lifespan)
app.add_middleware(
    SessionMiddleware,
    registry=db,
    commit="auto",  # commit below 400, before the response is sent
    read_only_methods=DEFAULT_READ_ONLY_METHODS,  # GET, HEAD, OPTIONS: no writes
)


@app.exception_handler(NoResultFound)
async def not_found(request: Request, exc: NoResultFound) -> JSONResponse:
    return JSONResponse({"detail": "No such user."}, status_code=404)


@app.exception_handler(IntegrityError)
async def conflict(request: Request, exc: IntegrityError) -> JSONResponse:
    return JSONResponse({"detail": "A user with this email already exists."}, status_code=409)


async def get_user(session: AsyncSession, user_id: int) -> User:
    """The user, addresses loaded; NoResultFound (a 404) if there is none."""
    return await session.get_one(User, user_id, options=[selectinload(User.addresses)])


@app.get("/users")
async def list_users(session: SessionDep) -> list[UserOut]:
    query = select(User).options(selectinload(User.addresses)).order_by(User.id)
    return [UserOut.model_validate(user) for user in await session.scalars(query)]


@app.post("/users", status_code=201)
async def create_user(body: UserIn, session: SessionDep) -> UserOut:
    addresses = [Address(street=street) for street in body.addresses]
    user = User(name=body.name, email=body.email, addresses=addresses)
    session.add(user)
    await session.flush()  # a taken email raises IntegrityError here: a 409
    return UserOut.model_validate(user)


@app.get("/users/{user_id}")
async def read_user(user_id: int, session: SessionDep) -> UserOut:
    return UserOut.model_validate(await get_user(session, user_id))


@app.patch("/users/{user_id}")
async def update_user(user_id: int, body: UserPatch, session: SessionDep) -> UserOut:
    user = await get_user(session, user_id)
    for field, value in body.model_dump(exclude_unset=True).items():
        setattr(user, field, value)
    await session.flush()
    return UserOut.model_validate(user)


@app.delete("/users/{user_id}", status_code=204)
async def delete_user(user_id: int, session: SessionDep) -> None:
    await session.delete(await get_user(session, user_id))


async def count(model: type[Base]) -> int:
    # runs in a task of its own (see stats): db() is that task's session, not the request's
    return await db.scalar(select(func.count()).select_from(model)) or 0


@app.get("/stats")
async def stats() -> Stats:
    users, addresses = await asyncio.gather(count(User), count(Address))
    return Stats(users=users, addresses=addresses)


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=8000)
