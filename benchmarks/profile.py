"""Where a request spends its Python time: ``python -m benchmarks.profile``.

Runs W1 (a request read) and W2 (a read-modify-write unit of work) with one task, exactly
as the harness does (:mod:`benchmarks.workloads`), and reports for each contender:

* the event-loop thread's CPU time per operation (``time.thread_time``, no profiler): the
  Python time, without the waits for the server or for aiosqlite's thread, and without
  that thread's own CPU (SQLite's work);
* under cProfile (timed by the same thread clock), the share of that time spent in each
  layer, by the file of the function that spent it (self time): asyncorm's own code,
  SQLAlchemy's session, ORM, SQL compiler, engine, pool, events and greenlet bridge, the
  driver, the event loop.

cProfile charges every Python call a little, so layers made of many small calls read a
little high; the shares are a map, the CPU time per operation is the figure to compare.
The machine this runs on is noisy: read ratios between contenders measured in one run.

    python -m benchmarks.profile --backend sqlite --ops 2000
    python -m benchmarks.profile --backend postgresql --contenders asyncorm,tortoise --top 15
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks._bench import Bench, open_bench
from benchmarks._core import ASYNCORM, LABELS, PEERS, QUICK, RAW, SQLALCHEMY, Case, Trial
from benchmarks.workloads import select_cases

__all__ = ["LAYERS", "layer_of", "main"]

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("asyncorm: session layer", ("asyncorm/_session", "asyncorm/_guards",
        "asyncorm/_cancellation", "asyncorm/_identity", "asyncorm/_lazyload",
        "asyncorm/_query", "asyncorm/_proxy", "asyncorm/_options", "asyncorm/_registry")),
    ("asyncorm: dialect and adapter hooks", ("asyncorm/",)),
    ("SA session: construction, transaction, close", ("sqlalchemy/orm/session.py",
        "sqlalchemy/orm/state.py", "sqlalchemy/orm/identity.py",
        "sqlalchemy/orm/instrumentation.py", "sqlalchemy/orm/scoping.py",
        "sqlalchemy/orm/state_changes.py")),
    ("SA unit of work: flush", ("sqlalchemy/orm/unitofwork.py",
        "sqlalchemy/orm/persistence.py", "sqlalchemy/orm/attributes.py",
        "sqlalchemy/orm/dependency.py", "sqlalchemy/orm/sync.py")),
    ("SA ORM statement and loading", ("sqlalchemy/orm/",)),
    ("SA SQL compiler and cache keys", ("sqlalchemy/sql/",)),
    ("SA execution context and result", ("sqlalchemy/engine/",)),
    ("SA pool checkout and checkin", ("sqlalchemy/pool/",)),
    ("SA events", ("sqlalchemy/event/",)),
    ("greenlet bridge and SA asyncio layer", ("sqlalchemy/util/concurrency",
        "sqlalchemy/util/_concurrency", "sqlalchemy/ext/asyncio/", "greenlet")),
    ("SA driver adapter (dialect)", ("sqlalchemy/dialects/", "sqlalchemy/connectors/")),
    ("SA other", ("sqlalchemy/",)),
    ("Tortoise ORM", ("tortoise/", "pypika")),
    ("Piccolo", ("piccolo/",)),
    ("driver (asyncpg, aiosqlite, sqlite3)", ("asyncpg", "aiosqlite", "sqlite3")),
    ("event loop (asyncio)", ("asyncio/", "selectors", "_asyncio", "select.epoll",
        "threading.py", "queue.py", "concurrent/")),
    ("benchmark harness", ("benchmarks/",)),
)  # fmt: skip
"""(layer, markers): a function belongs to the first layer with a marker in its file name
(or, for a built-in, in its name)."""


def layer_of(filename: str, name: str) -> str:
    """The layer of the function ``name`` defined in ``filename`` ("~" for built-ins)."""
    where = (name if filename == "~" else filename).replace(os.sep, "/")
    for layer, markers in LAYERS:
        if any(marker in where for marker in markers):
            return layer
    return "other (built-ins, typing, contextlib, ...)"


@dataclasses.dataclass(frozen=True)
class Profile:
    """One contender's profile on one case."""

    contender: str
    case: str
    cpu_us: float
    """Event-loop thread CPU per operation, without the profiler (median of the runs)."""
    wall_us: float
    """Wall time per operation in the same runs (median): CPU plus waiting."""
    shares: dict[str, float]
    top: list[tuple[str, float]]
    """The functions with the most self time: (function, share)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--ops", type=int, default=2000, help="operations per run")
    parser.add_argument("--runs", type=int, default=5, help="unprofiled runs (median)")
    parser.add_argument(
        "--contenders",
        default=",".join((RAW, SQLALCHEMY, ASYNCORM, *PEERS)),
        help="comma-separated (default: %(default)s)",
    )
    parser.add_argument("--top", type=int, default=0, help="also list the N costliest functions")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "ASYNCORM_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test_b"
        ),
    )
    return parser


async def _profile(trial: Trial, runs: int, contender: str, case: str) -> Profile:
    await trial.run()  # warm
    cpu, wall = [], []
    for _ in range(runs):
        start, start_wall = time.thread_time(), time.perf_counter()
        done = await trial.run()
        cpu.append((time.thread_time() - start) / done * 1e6)
        wall.append((time.perf_counter() - start_wall) / done * 1e6)
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    await trial.run()
    profiler.disable()
    stats = pstats.Stats(profiler)
    raw_stats: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw_stats = stats.stats  # type: ignore[attr-defined]
    by_layer: dict[str, float] = {}
    by_function: dict[str, float] = {}
    total = 0.0
    for (filename, line, name), (_cc, _nc, tottime, _ct, _callers) in raw_stats.items():
        layer = layer_of(filename, name)
        by_layer[layer] = by_layer.get(layer, 0.0) + tottime
        short = f"{'/'.join(filename.split(os.sep)[-2:])}:{line}({name})"
        by_function[short] = by_function.get(short, 0.0) + tottime
        total += tottime
    shares = {layer: t / total for layer, t in by_layer.items()} if total else {}
    top = sorted(by_function.items(), key=lambda kv: -kv[1])
    return Profile(
        contender,
        case,
        statistics.median(cpu),
        statistics.median(wall),
        shares,
        [(f, t / total) for f, t in top[:50]] if total else [],
    )


async def _main(args: argparse.Namespace) -> int:
    sizes = dataclasses.replace(
        QUICK, items=max(args.ops, 200), requests=args.ops, writes=args.ops, pool=2
    )
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    cases: list[Case] = [c for c in select_cases({"W1", "W2"}) if c.title.endswith("1 task")]
    results: list[Profile] = []
    with tempfile.TemporaryDirectory(prefix="asyncorm-profile-") as tmp:
        bench: Bench = await open_bench(
            args.backend, sizes, postgres_url=args.postgres_url, workdir=Path(tmp)
        )
        try:
            for reason in bench.skipped:
                print(f"Not measured: {reason}", file=sys.stderr)
            for case in cases:
                for contender in contenders:
                    trial = case.build(bench, contender) if contender in case.contenders else None
                    if trial is None:
                        continue
                    print(f"{case.name}: {LABELS.get(contender, contender)}", file=sys.stderr)
                    results.append(await _profile(trial, args.runs, contender, case.name))
        finally:
            await bench.close()
    print(render(results, args.backend, args.top))
    return 0


def render(results: Sequence[Profile], backend: str, top: int = 0) -> str:
    """Markdown: CPU per operation, then each layer's share, one column per contender."""
    out: list[str] = []
    for case in dict.fromkeys(r.case for r in results):
        mine = [r for r in results if r.case == case]
        out += [f"### {backend}: {case}", ""]
        out.append("| | " + " | ".join(LABELS.get(r.contender, r.contender) for r in mine) + " |")
        out.append("|---|" + "---:|" * len(mine))
        out.append(
            "| event-loop thread CPU per operation | "
            + " | ".join(f"{r.cpu_us:,.0f} us" for r in mine)
            + " |"
        )
        out.append(
            "| wall time per operation | " + " | ".join(f"{r.wall_us:,.0f} us" for r in mine) + " |"
        )
        layers = [layer for layer, _ in LAYERS] + ["other (built-ins, typing, contextlib, ...)"]
        for layer in layers:
            if all(r.shares.get(layer, 0.0) < 0.005 for r in mine):
                continue
            cells = [
                f"{r.shares.get(layer, 0.0):.0%}" if r.shares.get(layer, 0.0) >= 0.005 else "-"
                for r in mine
            ]
            out.append(f"| {layer} | " + " | ".join(cells) + " |")
        out.append("")
        if top:
            for r in mine:
                out += [f"{LABELS.get(r.contender, r.contender)}, costliest functions:", ""]
                out += [f"    {share:6.1%}  {name}" for name, share in r.top[:top]]
                out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Profile W1 and W2 with one task on one backend; print the markdown tables."""
    args = _parser().parse_args(argv)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
