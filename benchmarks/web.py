"""Requests per second of one web endpoint: the middleware, a session by hand, the raw driver.

Run it from the repository root::

    python -m benchmarks.web                      # SQLite and PostgreSQL, a few minutes
    python -m benchmarks.web --quick              # tiny and one repeat: a smoke run
    python -m benchmarks.web --backend sqlite --repeats 9 --requests 4000

One endpoint, ``GET /items/{id}``: get one row by primary key and return it as JSON, served by
three Starlette apps that differ only in how the handler reaches the database:

* ``middleware``: ``SessionMiddleware(registry=db)`` (the default policy, ``commit=None``) and
  ``await db.get(Item, id)`` in the handler;
* ``by hand``: no middleware, ``async with Session() as session: await session.get(Item, id)``;
* ``raw``: no ORM, one connection from the raw driver's pool (asyncpg's own pool; a small
  pool of aiosqlite connections) and one ``SELECT``.

The three apps run under uvicorn (httptools when installed), each on its own loopback port,
in one child process with one event loop; the client runs in this process (aiohttp's client,
keep-alive connections, ``--concurrency`` requests in flight) and speaks real HTTP to them.
Each repeat measures every app once, in an order that rotates between repeats, so that load
from elsewhere on the machine lands on all of them alike; the report gives the median
requests per second and the median of the per-repeat ratios (middleware / by hand, by hand /
raw). Pools: 20 connections for every contender, opened before any timing.

Then the same three apps are called in this process as plain ASGI apps, one request at a
time, with no server and no HTTP (:func:`measure_asgi`): microseconds per request, whose
difference between the middleware and by hand is the middleware's own cost, free of the
server's, the client's and a loaded machine's scheduling noise. Nothing here asserts a
timing; ``tests/test_web_bench.py`` runs ``--quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import String, insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import asyncorm
from asyncorm import redact_url
from benchmarks._bench import AiosqliteRaw, AsyncpgRaw, RawDB

__all__ = ["CONTENDERS", "Figures", "main", "measure"]

MIDDLEWARE, BY_HAND, RAW = "middleware", "by hand", "raw"
CONTENDERS = (MIDDLEWARE, BY_HAND, RAW)
NO_IO = {MIDDLEWARE: "middleware, no IO", BY_HAND: "by hand, no IO"}
"""The in-process pair whose handlers take a session and never use it: the fixed costs."""
POOL = 16
"""Connections per contender's pool: one per request in flight (``--concurrency``'s default)."""
ROWS = 1_000
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test_b"
SELECT_ONE = "SELECT id, name, value FROM bench_web_items WHERE id = ?"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_web_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    value: Mapped[int]


# -- the server side (a child process) --------------------------------------------------


def _apps(engine: Any, raw: RawDB) -> dict[str, Any]:
    """The three Starlette apps serving ``GET /items/{id}``."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from asyncorm.starlette import SessionMiddleware

    Session = asyncorm.async_sessionmaker(engine)
    db = asyncorm.async_scoped_session(Session)
    select_one = raw.sql(SELECT_ONE)

    def as_json(item: Item | None) -> JSONResponse:
        assert item is not None
        return JSONResponse({"id": item.id, "name": item.name, "value": item.value})

    async def with_middleware(request: Request) -> JSONResponse:
        return as_json(await db.get(Item, request.path_params["item_id"]))

    async def by_hand(request: Request) -> JSONResponse:
        async with Session() as session:
            item = await session.get(Item, request.path_params["item_id"])
        return as_json(item)

    async def raw_driver(request: Request) -> JSONResponse:
        async with raw.connection() as conn:
            rows = await conn.fetch(select_one, request.path_params["item_id"])
        item_id, name, value = rows[0]
        return JSONResponse({"id": item_id, "name": name, "value": value})

    async def middleware_no_io(request: Request) -> JSONResponse:
        db()  # the request's session, never used: no connection, no SQL
        return JSONResponse({"id": request.path_params["item_id"]})

    async def by_hand_no_io(request: Request) -> JSONResponse:
        async with Session():
            pass
        return JSONResponse({"id": request.path_params["item_id"]})

    def app(handler: Callable[[Request], Awaitable[JSONResponse]], **kw: Any) -> Starlette:
        return Starlette(routes=[Route("/items/{item_id:int}", handler)], **kw)

    middleware = [Middleware(SessionMiddleware, registry=db)]
    return {
        MIDDLEWARE: app(with_middleware, middleware=middleware),
        BY_HAND: app(by_hand),
        RAW: app(raw_driver),
        NO_IO[MIDDLEWARE]: app(middleware_no_io, middleware=middleware),
        NO_IO[BY_HAND]: app(by_hand_no_io),
    }


async def _serve(backend: str, url: str, pipe: Connection) -> None:
    import uvicorn

    engine = asyncorm.create_engine(url, pool_size=POOL, max_overflow=0)
    raw: RawDB
    if backend == "sqlite":
        raw = await AiosqliteRaw.open(Path(url.removeprefix("sqlite:///")), POOL)
    else:
        raw = await AsyncpgRaw.open(url, POOL)
    async with AsyncExitStack() as warm:  # open every pooled connection now
        for _ in range(POOL):
            await warm.enter_async_context(engine.connect())
    servers, ports = [], {}
    apps = _apps(engine, raw)
    for name in CONTENDERS:
        app = apps[name]
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, lifespan="off", log_level="warning", access_log=False
        )
        server = uvicorn.Server(config)
        config.load()
        sock = config.bind_socket()
        sock.listen(config.backlog)  # connections queue from now on, until uvicorn accepts
        ports[name] = sock.getsockname()[1]
        servers.append((server, asyncio.create_task(server.serve(sockets=[sock]))))
    pipe.send(("ready", ports))
    await asyncio.to_thread(pipe.recv)  # "stop"
    for server, _ in servers:
        server.should_exit = True
    for _, task in servers:
        await task
    await raw.close()
    await engine.dispose()


def _server_process(backend: str, url: str, pipe: Connection) -> None:
    try:
        asyncio.run(_serve(backend, url, pipe))
    except BaseException as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


@asynccontextmanager
async def _server(backend: str, url: str) -> AsyncIterator[dict[str, int]]:
    """Start the child process serving the three apps; yield their ports; stop it."""
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=_server_process, args=(backend, url, theirs), daemon=True
    )
    process.start()
    try:
        kind, payload = await asyncio.to_thread(ours.recv)
        if kind != "ready":
            raise RuntimeError(f"the benchmark's server process failed to start: {payload}")
        yield payload
    finally:
        if process.is_alive():
            ours.send("stop")
        await asyncio.to_thread(process.join, 60)
        if process.is_alive():
            process.kill()
        ours.close()


# -- the client side ----------------------------------------------------------------------


async def _run(client: aiohttp.ClientSession, port: int, requests: int, concurrency: int) -> float:
    """Requests per second of ``requests`` GETs spread over ``concurrency`` workers."""
    base = f"http://127.0.0.1:{port}/items/"
    counter = iter(range(requests))

    async def worker() -> None:
        for n in counter:
            item_id = n % ROWS + 1
            async with client.get(f"{base}{item_id}") as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["id"] == item_id

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - start)


async def _asgi_run(app: Any, requests: int) -> float:
    """Microseconds per request calling ``app`` directly as ASGI, one request at a time."""
    received = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, Any]:
        return received

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message

    start = time.perf_counter()
    for n in range(requests):
        path = f"/items/{n % ROWS + 1}"
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        await app(scope, receive, send)
    return (time.perf_counter() - start) / requests * 1e6


async def measure_asgi(
    backend: str, url: str, *, requests: int, repeats: int
) -> dict[str, list[float]]:
    """The three apps called in this process as ASGI apps: no server, no HTTP, no client.

    What is left is the handler's path to the database and back, one request at a time:
    the difference between the middleware's figure and by hand's is the middleware's cost
    per request, without the noise of a server, a client and a loaded machine's scheduler.
    """
    engine = asyncorm.create_engine(url, pool_size=POOL, max_overflow=0)
    raw: RawDB
    if backend == "sqlite":
        raw = await AiosqliteRaw.open(Path(url.removeprefix("sqlite:///")), POOL)
    else:
        raw = await AsyncpgRaw.open(url, POOL)
    names = (*CONTENDERS, *NO_IO.values())
    micros: dict[str, list[float]] = {name: [] for name in names}
    try:
        apps = _apps(engine, raw)
        for name in names:
            await _asgi_run(apps[name], max(requests // 4, 1))
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                micros[name].append(await _asgi_run(apps[name], requests))
    finally:
        await raw.close()
        await engine.dispose()
    return micros


@dataclass(frozen=True)
class Figures:
    """One backend's measurements: requests per second per contender, one per repeat; and
    microseconds per request of the same apps called in-process (:func:`measure_asgi`)."""

    backend: str
    rps: dict[str, list[float]]
    micros: dict[str, list[float]]

    def median(self, contender: str) -> float:
        return statistics.median(self.rps[contender])

    def added(self, top: str, bottom: str) -> float:
        """Median over the repeats of ``top``'s microseconds - ``bottom``'s, in-process."""
        pairs = zip(self.micros[top], self.micros[bottom], strict=True)
        return statistics.median(a - b for a, b in pairs)

    def ratio(self, top: str, bottom: str) -> float:
        """Median over the repeats of ``top``'s rate / ``bottom``'s rate in the same repeat."""
        pairs = zip(self.rps[top], self.rps[bottom], strict=True)
        return statistics.median(a / b for a, b in pairs)


async def _load(url: str) -> None:
    engine = asyncorm.create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
        rows = [{"id": i, "name": f"item {i}", "value": i * 7} for i in range(1, ROWS + 1)]
        await conn.execute(insert(Item), rows)
    await engine.dispose()


async def _drop(url: str) -> None:
    engine = asyncorm.create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
    await engine.dispose()


async def measure(
    backend: str, url: str, *, requests: int, repeats: int, concurrency: int
) -> Figures:
    """Load the table, serve the three apps, and measure them in interleaved repeats."""
    await _load(url)
    rps: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    try:
        async with _server(backend, url) as ports:
            connector = aiohttp.TCPConnector(limit=concurrency * len(CONTENDERS))
            async with aiohttp.ClientSession(connector=connector) as client:
                for name in CONTENDERS:  # warm-up: connections, caches, the JIT-less paths
                    await _run(client, ports[name], max(requests // 4, concurrency), concurrency)
                for repeat in range(repeats):
                    shift = repeat % len(CONTENDERS)
                    for name in CONTENDERS[shift:] + CONTENDERS[:shift]:
                        rate = await _run(client, ports[name], requests, concurrency)
                        rps[name].append(rate)
        micros = await measure_asgi(backend, url, requests=requests, repeats=repeats)
    finally:
        await _drop(url)
    return Figures(backend, rps, micros)


def render(figures: Figures) -> str:
    lines = [
        f"### {figures.backend}",
        "",
        "| contender | req/s (median) | repeats (req/s) |",
        "|---|---:|---|",
    ]
    for name in CONTENDERS:
        each = ", ".join(f"{r:,.0f}" for r in figures.rps[name])
        lines.append(f"| {name} | {figures.median(name):,.0f} | {each} |")
    lines += [
        "",
        f"- middleware / by hand: {figures.ratio(MIDDLEWARE, BY_HAND):.3f}x "
        f"(target: >= 0.97x, the middleware costing under 3%)",
        f"- by hand / raw: {figures.ratio(BY_HAND, RAW):.3f}x",
        f"- middleware / raw: {figures.ratio(MIDDLEWARE, RAW):.3f}x",
        "",
        "The same apps called in-process as ASGI (no server, no HTTP), one request at a time:",
        "",
        "| contender | us/request (median) | repeats (us) |",
        "|---|---:|---|",
    ]
    for name in figures.micros:
        each = ", ".join(f"{m:,.0f}" for m in figures.micros[name])
        lines.append(f"| {name} | {statistics.median(figures.micros[name]):,.0f} | {each} |")
    by_hand = statistics.median(figures.micros[BY_HAND])
    added = figures.added(MIDDLEWARE, BY_HAND)
    fixed = figures.added(NO_IO[MIDDLEWARE], NO_IO[BY_HAND])
    lines += [
        "",
        f"- with the query: the middleware adds {added:,.1f} us per request "
        f"({added / by_hand:+.1%} of by hand's request)",
        f"- no IO: the middleware's fixed cost over a session by hand is {fixed:,.1f} us per "
        f"request ({fixed / by_hand:+.1%} of by hand's request with its query)",
        "",
        "(differences: the median of the per-repeat differences)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.web", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny: 60 requests, one repeat")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], action="append")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("ASYNCORM_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="default: $ASYNCORM_BENCH_POSTGRES_URL or " + DEFAULT_POSTGRES_URL,
    )
    parser.add_argument("--requests", type=int, default=3_000, help="per app and repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    args = parser.parse_args(argv)
    requests, repeats = (60, 1) if args.quick else (args.requests, args.repeats)
    print(
        f"GET /items/{{id}} under uvicorn, Python {sys.version.split()[0]}, {requests} "
        f"requests x {repeats} repeats per app, {args.concurrency} in flight\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"sqlite": f"sqlite:///{Path(tmp) / 'web.db'}", "postgresql": args.postgres_url}
        for backend in args.backend or ["sqlite", "postgresql"]:
            print(f"{backend}: {redact_url(urls[backend])}", file=sys.stderr)
            figures = asyncio.run(
                measure(
                    backend,
                    urls[backend],
                    requests=requests,
                    repeats=repeats,
                    concurrency=args.concurrency,
                )
            )
            print(render(figures) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
