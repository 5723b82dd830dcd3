"""Sessions leave no reference cycles: reference counting frees them, not the collector.

A cycle per session (a transaction kept by its session, which it refers to) costs every
request work in the cyclic garbage collector: its objects survive the young generation's
collections and are found only by the next one's. Each case here drops its session with the
collector disabled and checks that the session and the transactions it ran are gone.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import Session as SyncSession
from sqlalchemy.orm import SessionTransaction

import asyncorm
from tests.models import User

SessionFactory = asyncorm.async_sessionmaker[asyncorm.AsyncSession]


@contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def add_user(Session: SessionFactory) -> None:
    async with Session() as session:
        session.add(User(name="ann"))
        await session.commit()


async def unit_of_work(Session: SessionFactory) -> None:
    async with Session.begin() as session:
        user = await session.get(User, 1)
        assert user is not None
        user.name = "bob"


async def text_write(Session: SessionFactory) -> None:
    async with Session.begin() as session:
        await session.execute(text("UPDATE users SET name = 'cy' WHERE id = 1"))


async def rolled_back(Session: SessionFactory) -> None:
    async with Session() as session:
        await session.execute(text("UPDATE users SET name = 'dee' WHERE id = 1"))
        await session.rollback()


async def read(Session: SessionFactory) -> None:
    async with Session() as session:
        assert await session.get(User, 1) is not None


CASES: dict[str, Callable[[SessionFactory], Awaitable[None]]] = {
    "add and commit": add_user,
    "Session.begin(), get, change": unit_of_work,
    "text() that writes": text_write,
    "a write rolled back": rolled_back,
    "a read": read,
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_session_is_freed_without_the_garbage_collector(
    Session: SessionFactory, case: str
) -> None:
    await add_user(Session)  # the row the other cases read and change
    sessions: list[weakref.ref[SyncSession]] = []
    transactions: list[weakref.ref[SessionTransaction]] = []

    def began(session: SyncSession, transaction: SessionTransaction) -> None:
        sessions.append(weakref.ref(session))
        transactions.append(weakref.ref(transaction))

    sync_class: Any = asyncorm.AsyncSession.sync_session_class
    event.listen(sync_class, "after_transaction_create", began)
    try:
        with collector_off():
            await CASES[case](Session)
            assert transactions, "the case ran no transaction"
            assert [ref() for ref in transactions] == [None] * len(transactions)
            assert [ref() for ref in sessions] == [None] * len(sessions)
    finally:
        event.remove(sync_class, "after_transaction_create", began)
