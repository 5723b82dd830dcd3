"""asyncorm's pytest plugin: each test in a transaction rolled back at its end.

Registered through the ``pytest11`` entry point, so installing asyncorm makes the fixtures
available; it does nothing until a test uses one of them (no engine, no database driver
imported). The fixtures, all prefixed ``asyncorm_`` (docs/testing.md):

========================  =========  ======================================================
fixture                   scope      what
========================  =========  ======================================================
``asyncorm_url``          session    ``$ASYNCORM_TEST_URL``, else a temporary SQLite file
``asyncorm_metadata``     session    the ``MetaData`` whose tables are created once per run
``asyncorm_engine``       session    ``asyncorm.create_engine(asyncorm_url)``, tables created
``asyncorm_transaction``  function   the test's outer transaction (:class:`OuterTransaction`)
``asyncorm_connection``   function   its connection
``asyncorm_session``      function   a session joined to it: commit/rollback use savepoints
``asyncorm_app_registry`` function   the registry under test (override: return your ``db``)
``asyncorm_registry``     function   that registry, bound: ``db()`` is ``asyncorm_session``
``asyncorm_asgi_client``  function   ``async with asyncorm_asgi_client(app) as client:``
``asyncorm_aiohttp_client`` function ``async with asyncorm_aiohttp_client(app) as client:``
========================  =========  ======================================================

The async fixture (``asyncorm_transaction``) is a pytest-asyncio fixture, so it works in
strict and auto mode; it runs in the loop of ``asyncio_default_fixture_loop_scope``, and a
test running in another loop fails at its start with :class:`~asyncorm.EventLoopMismatchError`
saying which scopes to align.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - asyncorm[test] installs it
    pytest_asyncio = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import httpx
    from aiohttp.test_utils import TestClient
    from sqlalchemy import MetaData
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from . import AsyncSession, async_scoped_session
    from .testing import OuterTransaction

__all__: list[str] = []  # fixtures only

_TRANSACTION = pytest.StashKey["OuterTransaction"]()


# -- the database ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def asyncorm_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The database the tests run against: ``$ASYNCORM_TEST_URL``, else a temporary SQLite
    file (one per test run). Override it to choose another way.

    .. versionadded:: 0.2
    """
    url = os.environ.get("ASYNCORM_TEST_URL")
    if url:
        return url
    path: Path = tmp_path_factory.mktemp("asyncorm") / "test.db"
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def asyncorm_metadata() -> MetaData:
    """The ``MetaData`` whose tables ``asyncorm_engine`` creates (once per run) and drops
    at the end. Empty unless overridden: return your ``Base.metadata``.

    .. versionadded:: 0.2
    """
    from sqlalchemy import MetaData

    return MetaData()


@pytest.fixture(scope="session")
def asyncorm_engine(asyncorm_url: str, asyncorm_metadata: MetaData) -> Iterator[AsyncEngine]:
    """The engine of the test run: ``asyncorm.create_engine(asyncorm_url)``, with the tables
    of ``asyncorm_metadata`` dropped and created once, dropped and disposed at the end.

    It serves any event loop: the connections opened in a loop are closed when that loop
    shuts down (see docs/testing.md, "Event loops").

    .. versionadded:: 0.2
    """
    from sqlalchemy import event

    import asyncorm

    from ._outer import watch_loop

    engine = asyncorm.create_engine(asyncorm_url)
    # the connections opened in a loop are returned when that loop shuts down
    event.listen(engine.sync_engine, "checkout", lambda *args: watch_loop(engine))

    async def create() -> None:
        async with engine.begin() as conn:
            await conn.run_sync(asyncorm_metadata.drop_all)
            await conn.run_sync(asyncorm_metadata.create_all)
        await engine.dispose()

    async def drop() -> None:
        await engine.dispose()  # connections of a loop still open (then closed by that loop)
        async with engine.begin() as conn:
            await conn.run_sync(asyncorm_metadata.drop_all)
        await engine.dispose()

    _run_in_own_loop(create(), "asyncorm_engine")
    yield engine
    _run_in_own_loop(drop(), "asyncorm_engine")


def _run_in_own_loop(coro: Coroutine[Any, Any, None], fixture: str) -> None:
    """Run setup work in a loop of its own, whatever loop the tests use."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        coro.close()
        raise RuntimeError(
            f"{fixture} is set up outside any event loop, and was requested from inside "
            f"one (request.getfixturevalue() in async code?): request it as a fixture "
            f"argument instead."
        )
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(coro)


# -- the test's transaction ----------------------------------------------------------------


async def _transaction(
    request: pytest.FixtureRequest, asyncorm_engine: AsyncEngine
) -> AsyncIterator[OuterTransaction]:
    """The test's outer transaction on a connection of ``asyncorm_engine``, rolled back at
    the end of the test whatever the code under test committed.

    .. versionadded:: 0.2
    """
    from ._outer import OuterTransaction

    item = request.node
    transaction = await OuterTransaction.begin(
        asyncorm_engine, functools.partial(_loop_mismatch, item)
    )
    item.stash[_TRANSACTION] = transaction
    try:
        yield transaction
    finally:
        del item.stash[_TRANSACTION]
        await transaction.end()


if pytest_asyncio is not None:
    asyncorm_transaction = pytest_asyncio.fixture(_transaction, name="asyncorm_transaction")
else:  # pragma: no cover

    @pytest.fixture
    def asyncorm_transaction() -> None:
        """Explains that the asyncorm fixtures need pytest-asyncio."""
        pytest.fail(
            "asyncorm's fixtures run on pytest-asyncio, which is not installed: "
            "pip install pytest-asyncio (or asyncorm[test]).",
            pytrace=False,
        )


@pytest.fixture
def asyncorm_connection(asyncorm_transaction: OuterTransaction) -> AsyncConnection:
    """The test's connection, inside its outer transaction (do not commit it).

    .. versionadded:: 0.2
    """
    return asyncorm_transaction.connection


@pytest.fixture
def asyncorm_session(asyncorm_transaction: OuterTransaction) -> AsyncSession:
    """A session joined to the test's transaction: its ``commit()`` releases a savepoint,
    its ``rollback()`` rolls back to one; all of it is rolled back when the test ends.

    .. versionadded:: 0.2
    """
    return asyncorm_transaction.session


@pytest.fixture
def asyncorm_app_registry() -> async_scoped_session[Any]:
    """The registry ``asyncorm_registry`` binds to the test: override it to return your
    application's registry (``return myapp.db``). By default a new one.

    .. versionadded:: 0.2
    """
    import asyncorm

    return asyncorm.async_scoped_session(asyncorm.async_sessionmaker())


@pytest.fixture
def asyncorm_registry(
    asyncorm_transaction: OuterTransaction, asyncorm_app_registry: async_scoped_session[Any]
) -> async_scoped_session[Any]:
    """``asyncorm_app_registry``, bound to the test: ``db()`` in the test's task is
    ``asyncorm_session``; scopes and other tasks get sessions of their own, joined to the
    test's transaction. Restored when the test ends.

    .. versionadded:: 0.2
    """
    return asyncorm_transaction.bind(asyncorm_app_registry, adopt=True)


@pytest.fixture
def asyncorm_asgi_client(
    asyncorm_transaction: OuterTransaction,
) -> Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]:
    """``async with asyncorm_asgi_client(app) as client:``: an ``httpx.AsyncClient`` calling
    the ASGI app (Starlette, FastAPI) in the test's task, its registry bound to the test.

    .. versionadded:: 0.2
    """
    from ._testclients import asgi_client

    return functools.partial(asgi_client, transaction=asyncorm_transaction)


@pytest.fixture
def asyncorm_aiohttp_client(
    asyncorm_transaction: OuterTransaction,
) -> Callable[..., AbstractAsyncContextManager[TestClient[Any, Any]]]:
    """``async with asyncorm_aiohttp_client(app) as client:``: aiohttp's ``TestClient`` on a
    ``TestServer`` running the app, its registry bound to the test.

    .. versionadded:: 0.2
    """
    from ._testclients import aiohttp_client

    return functools.partial(aiohttp_client, transaction=asyncorm_transaction)


# -- the test's own task --------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Run the test's first step in its own task: check the event loop, and make ``db()``
    of the bound registries return the test's session there."""
    transaction = item.stash.get(_TRANSACTION, None)
    test = getattr(item, "obj", None)
    if transaction is None or not inspect.iscoroutinefunction(test):
        return (yield)
    assert test is not None

    @functools.wraps(test)
    async def in_test_task(*args: Any, **kwargs: Any) -> Any:
        transaction._enter_test_task()
        return await test(*args, **kwargs)

    item.obj = in_test_task  # type: ignore[attr-defined]
    try:
        return (yield)
    finally:
        item.obj = test  # type: ignore[attr-defined]


def _loop_mismatch(item: pytest.Item) -> str:
    config = item.config
    test_scope = getattr(item, "_loop_scope", None) or config.getini(
        "asyncio_default_test_loop_scope"
    )
    fixture_scope = config.getini("asyncio_default_fixture_loop_scope") or "function"
    if fixture_scope == "fixture-scope":
        fixture_scope = "function"
    return (
        f"{item.nodeid}: asyncorm_transaction (behind asyncorm_session, asyncorm_connection "
        f"and asyncorm_registry) was set up in the {fixture_scope}-scoped event loop and is "
        f"used in another one: the test runs in the {test_scope}-scoped loop (or an async "
        f"fixture using it has a loop_scope of its own). A database connection works only "
        f"in the loop that opened it. Give them one loop: set "
        f"asyncio_default_fixture_loop_scope = {test_scope!r} in the pytest configuration "
        f"(asyncorm's fixtures follow it), or run the test in the {fixture_scope}-scoped "
        f"loop (asyncio_default_test_loop_scope, or "
        f"@pytest.mark.asyncio(loop_scope={fixture_scope!r}))."
    )
