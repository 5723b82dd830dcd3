"""The command line: ``python -m benchmarks [--quick] [--backend B] [--only W1,W2] ...``.

For each backend: load the data, open and warm every contender's pool, then for each case
run one untimed warm-up and ``repeats`` timed repeats per contender, interleaving the
contenders (their order rotates every repeat) so that a burst of load on the machine
lands on all of them alike. Prints the tables, writes RESULTS.md and the chart.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from asyncorm import redact_url
from benchmarks._bench import open_bench, postgres_problem, postgres_version
from benchmarks._core import (
    BACKENDS,
    FULL,
    LABELS,
    POSTGRESQL,
    QUICK,
    Case,
    Counters,
    Result,
    Sizes,
    Trial,
)
from benchmarks._report import (
    BACKEND_TITLES,
    command_line,
    machine_info,
    ratios,
    render_backend,
    write_chart,
    write_results_md,
)
from benchmarks.workloads import all_cases, select_cases

__all__ = ["main"]

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test_b"
HERE = Path(__file__).resolve().parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Benchmark asyncorm against the raw drivers (asyncpg, aiosqlite) and plain "
            "SQLAlchemy AsyncSession on SQLite and PostgreSQL. Prints a table of ops/s and "
            "ratios, writes RESULTS.md and results.png."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and one repeat (CI smoke, under a minute); writes its files to a "
        "temporary directory unless --out is given",
    )
    parser.add_argument("--backend", choices=BACKENDS, help="run one backend only")
    parser.add_argument(
        "--only", metavar="W1,W2", help="run only these workloads (comma-separated keys)"
    )
    parser.add_argument("--repeats", type=int, metavar="N", help="timed repeats per contender")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where RESULTS.md and results.png go (default: the benchmarks directory)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("ASYNCORM_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="PostgreSQL database to use; its bench_* tables are created and dropped "
        "(default: $ASYNCORM_BENCH_POSTGRES_URL or %(default)s)",
    )
    return parser


class Progress:
    """Progress lines on stderr: one per finished case, live updates on a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.live = sys.stderr.isatty()
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        self._clear()
        print(text, file=sys.stderr, flush=True)

    def update(self, text: str) -> None:
        if self.live:
            sys.stderr.write("\r\x1b[2K" + text[:150])
            sys.stderr.flush()

    def _clear(self) -> None:
        if self.live:
            sys.stderr.write("\r\x1b[2K")

    def prefix(self, backend: str) -> str:
        return f"[{self.done + 1:>2}/{self.total}] {backend:<10}"

    def finished(self, backend: str, case: Case, results: Sequence[Result], took: float) -> None:
        rel = ratios(results)
        parts = []
        for result in results:
            label = LABELS.get(result.contender, result.contender)
            if result.error:
                parts.append(f"{label} failed")
            elif result.median is not None:
                ratio = rel.get((case.name, result.contender))
                shown = f" ({ratio:.2f}x)" if ratio is not None and ratio != 1.0 else ""
                parts.append(f"{label} {result.median:,.0f}/s{shown}")
        self.say(f"{self.prefix(backend)} {case.name:<34} {' | '.join(parts)}  [{took:.1f}s]")
        self.done += 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:240]


async def _repeat(trial: Trial, limit: float) -> tuple[float, Counters | None]:
    """Run a trial once: untimed setup, the timed run, untimed teardown and check."""
    if trial.setup is not None:
        await trial.setup()
    try:
        gc.collect()
        async with asyncio.timeout(limit):
            start = time.perf_counter()
            ops = await trial.run()
            elapsed = time.perf_counter() - start
    finally:
        if trial.teardown is not None:
            await trial.teardown()
    counters = await trial.check() if trial.check is not None else None
    return ops / elapsed, counters


async def _run_case(
    bench_backend: str,
    case: Case,
    trials: dict[str, Trial],
    results: dict[str, Result],
    sizes: Sizes,
    progress: Progress,
    limit: float,
) -> None:
    order = [c for c in case.contenders if c in trials]
    repeats = case.repeats(sizes)
    for repeat in range(-1, repeats):  # -1: the untimed warm-up
        shift = max(repeat, 0) % max(len(order), 1)
        for contender in order[shift:] + order[:shift]:
            result = results[contender]
            if result.error is not None:
                continue
            what = "warm-up" if repeat < 0 else f"repeat {repeat + 1}/{repeats}"
            progress.update(
                f"{progress.prefix(bench_backend)} {case.name}: "
                f"{LABELS.get(contender, contender)} {what}"
            )
            try:
                rate, counters = await _repeat(trials[contender], limit)
            except TimeoutError:
                result.error = f"timed out after {limit:g}s"
                continue
            except Exception as exc:
                result.error = _first_line(exc)
                continue
            if repeat >= 0:
                result.samples.append(rate)
                if counters is not None:
                    result.counters.append(counters)


async def _run_backend(
    backend: str,
    cases: Sequence[Case],
    sizes: Sizes,
    postgres_url: str,
    progress: Progress,
    limit: float,
    skipped: list[str],
) -> list[Result]:
    title = BACKEND_TITLES[backend]
    progress.say(f"{title}: loading {sizes.items:,} rows, warming pools ...")
    out: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="asyncorm-bench-") as tmp:
        try:
            bench = await open_bench(backend, sizes, postgres_url=postgres_url, workdir=Path(tmp))
        except Exception as exc:
            reason = f"{title}: could not load the data or open the pools ({_first_line(exc)})"
            progress.say(f"Skipping {reason}")
            skipped.append(reason)
            progress.done += len(cases)
            return out
        for reason in bench.skipped:
            progress.say(f"Not measured: {reason}")
            skipped.append(reason)
        try:
            for case in cases:
                started = time.monotonic()
                results = {c: Result(backend, case, c) for c in case.contenders}
                trials: dict[str, Trial] = {}
                for contender in case.contenders:
                    try:
                        trial = case.build(bench, contender)
                    except Exception as exc:
                        results[contender].error = _first_line(exc)
                        continue
                    if trial is None:  # does not apply on this backend
                        del results[contender]
                    else:
                        trials[contender] = trial
                await _run_case(backend, case, trials, results, sizes, progress, limit)
                progress.finished(backend, case, list(results.values()), time.monotonic() - started)
                out += results.values()
        finally:
            await bench.close()
    return out


async def _main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    sizes = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            print("--repeats must be at least 1", file=sys.stderr)
            return 2
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    only: set[str] | None = None
    if args.only:
        only = {key.strip().upper() for key in args.only.split(",") if key.strip()}
        known = {case.key for case in all_cases()}
        unknown = only - known
        if unknown:
            print(
                f"--only: unknown workload(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(known))}",
                file=sys.stderr,
            )
            return 2
    if args.out is not None:
        out_dir: Path = args.out
    elif args.quick:
        out_dir = Path(tempfile.mkdtemp(prefix="asyncorm-bench-quick-"))
    else:
        out_dir = HERE
    out_dir.mkdir(parents=True, exist_ok=True)

    backends = [args.backend] if args.backend else list(BACKENDS)
    skipped: list[str] = []
    pg_version: str | None = None
    if POSTGRESQL in backends:
        problem = await postgres_problem(args.postgres_url)
        if problem is not None:
            reason = (
                f"PostgreSQL at {redact_url(args.postgres_url)} is unreachable ({problem}); "
                f"set ASYNCORM_BENCH_POSTGRES_URL or --postgres-url to include it"
            )
            print(f"Skipping PostgreSQL: {reason}", file=sys.stderr)
            skipped.append(reason)
            backends.remove(POSTGRESQL)
        else:
            pg_version = await postgres_version(args.postgres_url)

    cases = select_cases(only)
    plan = [(b, [c for c in cases if b in c.backends]) for b in backends]
    plan = [(b, cs) for b, cs in plan if cs]
    command = command_line(argv)
    machine = machine_info(pg_version, command)
    progress = Progress(sum(len(cs) for _, cs in plan))
    limit = 60.0 if args.quick else 600.0
    results: list[Result] = []
    for backend, backend_cases in plan:
        results += await _run_backend(
            backend, backend_cases, sizes, args.postgres_url, progress, limit, skipped
        )

    for backend, _ in plan:
        mine = [r for r in results if r.backend == backend]
        if not mine:
            continue
        print(f"\n## {BACKEND_TITLES[backend]}\n")
        print(render_backend(backend, mine))
    for reason in skipped:
        print(f"\nSkipped: {reason}")

    chart_name: str | None = None
    if results:
        why_not = write_chart(out_dir / "results.png", results)
        if why_not is None:
            chart_name = "results.png"
        else:
            print(why_not, file=sys.stderr)
    write_results_md(
        out_dir / "RESULTS.md",
        results,
        machine,
        sizes=sizes,
        skipped=skipped,
        chart=chart_name,
    )
    written = ", ".join(str(out_dir / n) for n in ("RESULTS.md", chart_name) if n)
    took = time.monotonic() - progress.started
    print(f"\nWrote {written} ({took:.0f}s in all)", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the harness with command-line arguments ``argv``; return the exit status.

    The status is 1 when a contender failed a case outright (the table says why).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(args_list)
    return asyncio.run(_main(args, args_list))
