"""The results table, RESULTS.md, the chart and the machine description."""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import platform
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._core import (
    ASYNCORM,
    LABELS,
    PICCOLO,
    POSTGRESQL,
    RAW,
    RAW_NO_RESET,
    SQLALCHEMY,
    SQLITE,
    SYNC,
    TORTOISE,
    Case,
    Result,
    Sizes,
    geomean,
)

__all__ = [
    "command_line",
    "machine_info",
    "ratios",
    "render_backend",
    "render_spread",
    "write_chart",
    "write_results_md",
]

BACKEND_TITLES = {SQLITE: "SQLite", POSTGRESQL: "PostgreSQL"}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(postgres_version: str | None, command: str) -> list[tuple[str, str]]:
    """What the figures were measured on, as (label, value) pairs."""
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    return [
        ("date", now.isoformat().replace("+00:00", " UTC")),
        ("command", f"`{command}`"),
        ("CPU", _cpu_model()),
        ("cores", str(os.cpu_count())),
        ("load average at start (1, 5, 15 min)", load),
        ("OS", platform.platform()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("asyncorm", _version("asyncorm")),
        ("SQLAlchemy", _version("sqlalchemy")),
        ("greenlet", _version("greenlet")),
        ("asyncpg", _version("asyncpg")),
        ("aiosqlite", _version("aiosqlite")),
        ("psycopg (sync reference)", _version("psycopg")),
        ("SQLite library", sqlite3.sqlite_version),
        ("Tortoise ORM", _version("tortoise-orm")),
        ("Piccolo", _version("piccolo")),
        ("PostgreSQL server", postgres_version or "not measured"),
    ]


# -- the table ---------------------------------------------------------------------------------


def _fmt_rate(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def _contenders(results: Sequence[Result]) -> list[str]:
    """The contenders with a result, in the order the cases list them."""
    present = {result.contender for result in results}
    seen: list[str] = []
    for result in results:
        for contender in result.case.contenders:
            if contender in present and contender not in seen:
                seen.append(contender)
    return seen


def _cases(results: Sequence[Result]) -> list[Case]:
    seen: list[Case] = []
    for result in results:
        if result.case not in seen:
            seen.append(result.case)
    return seen


def ratios(results: Sequence[Result]) -> dict[tuple[str, str], float]:
    """(case name, contender) -> median ops/s as a ratio to the case's baseline."""
    by_key = {(r.case.name, r.contender): r for r in results}
    out: dict[tuple[str, str], float] = {}
    for r in results:
        base = by_key.get((r.case.name, r.case.baseline))
        if r.median is not None and base is not None and base.median:
            out[(r.case.name, r.contender)] = r.median / base.median
    return out


def _vs(results: Sequence[Result], other: str = SQLALCHEMY) -> dict[str, float]:
    """case name -> asyncorm's median ops/s divided by ``other``'s (plain SQLAlchemy's)."""
    by_key = {(r.case.name, r.contender): r for r in results}
    out: dict[str, float] = {}
    for case in _cases(results):
        ours, theirs = by_key.get((case.name, ASYNCORM)), by_key.get((case.name, other))
        if ours and theirs and ours.median and theirs.median:
            out[case.name] = ours.median / theirs.median
    return out


_VS_COLUMNS = (TORTOISE, PICCOLO, RAW_NO_RESET)
"""Contenders that get an "asyncorm / X" column of their own when they were measured: the
peers (issue 13's targets are asyncorm >= each), and the raw driver without the pool reset."""


def _within_spread(ours: Result | None, theirs: Result | None) -> bool:
    """Whether the two contenders' repeats overlap: their difference is this run's noise."""
    if ours is None or theirs is None or not ours.samples or not theirs.samples:
        return False
    return min(ours.samples) <= max(theirs.samples) and min(theirs.samples) <= max(ours.samples)


def _vs_cell(
    vs: dict[str, float], case: str, by_key: dict[tuple[str, str], Result], other: str
) -> str:
    """An "asyncorm / X" cell: the ratio, "~" when the repeats overlap, "-" when not measured."""
    if case not in vs:
        return "-"
    noise = _within_spread(by_key.get((case, ASYNCORM)), by_key.get((case, other)))
    return f"{vs[case]:.2f}x" + (" ~" if noise else "")


def _counter_note(result: Result) -> str | None:
    """A short description of what a result's checks counted, when it is worth showing."""
    if not result.counters:
        return None
    keys = [k for k in result.counters[0] if k != "expected"]
    interesting = any(k != "errors" for k in keys) or any(c.get("errors") for c in result.counters)
    if not interesting:
        return None
    parts = []
    for key in keys:
        values = [c[key] for c in result.counters if key in c]
        low, high = min(values), max(values)
        text = f"{low:,}" if low == high else f"{low:,}-{high:,}"
        if key == "sum" and "expected" in result.counters[0]:
            text += f" (expected {result.counters[0]['expected']:,})"
        parts.append(f"{key} {text}")
    runs = len(result.counters)
    return ", ".join(parts) + f" over {runs} run{'s' if runs > 1 else ''}"


def render_backend(backend: str, results: Sequence[Result]) -> str:
    """The markdown table (and its notes) of one backend's results."""
    contenders = _contenders(results)
    by_key = {(r.case.name, r.contender): r for r in results}
    rel = ratios(results)
    vs_sa = _vs(results)
    vs_others = {c: _vs(results, c) for c in _VS_COLUMNS if c in contenders}
    vs_others = {c: v for c, v in vs_others.items() if v}
    header = ["workload", "unit/s", *(LABELS.get(c, c) for c in contenders)]
    header += [f"asyncorm / {LABELS[c]}" for c in vs_others]
    header += ["asyncorm / SQLAlchemy", "target for asyncorm"]
    align = ["---", "---", *("---:" for _ in contenders), *("---:" for _ in vs_others)]
    align += ["---:", "---"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    notes: list[str] = []
    for case in _cases(results):
        row = [case.name, case.unit]
        for contender in contenders:
            result = by_key.get((case.name, contender))
            if result is None:
                row.append("-")
            elif result.error is not None:
                row.append("failed")
                notes.append(f"{case.name}, {LABELS.get(contender, contender)}: {result.error}")
            elif result.median is None:
                row.append("-")
            else:
                ratio = rel.get((case.name, contender))
                shown = f" ({ratio:.2f}x)" if ratio is not None else ""
                row.append(_fmt_rate(result.median) + shown)
            note = _counter_note(result) if result is not None else None
            if note:
                notes.append(f"{case.name}, {LABELS.get(contender, contender)}: {note}")
        for other, vs_other in vs_others.items():
            row.append(_vs_cell(vs_other, case.name, by_key, other))
        row.append(_vs_cell(vs_sa, case.name, by_key, SQLALCHEMY))
        ours = rel.get((case.name, ASYNCORM))
        if case.target is None or ours is None:
            row.append("-")
        else:
            verdict = "met" if ours >= case.target else "not met"
            row.append(f">= {case.target:.2f}x: {verdict}")
        lines.append("| " + " | ".join(row) + " |")
    geo = ["**geomean of ratios**", ""]
    for contender in contenders:
        values = [v for (_, c), v in rel.items() if c == contender]
        g = geomean(values)
        geo.append(f"**{g:.2f}x** ({len(values)})" if g is not None else "-")
    for vs_other in vs_others.values():
        g_other = geomean(list(vs_other.values()))
        geo.append(f"**{g_other:.2f}x**" if g_other is not None else "-")
    g_sa = geomean(list(vs_sa.values()))
    geo += [f"**{g_sa:.2f}x**" if g_sa is not None else "-", ""]
    lines.append("| " + " | ".join(geo) + " |")
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


# -- RESULTS.md ---------------------------------------------------------------------------------


def render_spread(results: Sequence[Result]) -> str:
    """Every result's median, fastest and slowest repeat: how noisy the run was."""
    lines = [
        "| backend | workload | contender | median | min | max | repeats |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.median is None:
            continue
        label = LABELS.get(r.contender, r.contender)
        lines.append(
            f"| {BACKEND_TITLES[r.backend]} | {r.case.name} | {label} "
            f"| {_fmt_rate(r.median)} | {_fmt_rate(min(r.samples))} "
            f"| {_fmt_rate(max(r.samples))} | {len(r.samples)} |"
        )
    return "\n".join(lines)


def write_results_md(
    path: Path,
    results: Sequence[Result],
    machine: Sequence[tuple[str, str]],
    *,
    sizes: Sizes,
    skipped: Sequence[str],
    chart: str | None,
) -> None:
    """Write RESULTS.md: the machine, one table per backend, the chart, the spread."""
    short = sorted({r.case.key for r in results if r.case.short})
    repeats = f"{sizes.repeats} timed repeat{'s' if sizes.repeats > 1 else ''}"
    if short and sizes.short_repeats != sizes.repeats:
        repeats += f" ({sizes.short_repeats} for the short runs of {', '.join(short)})"
    out = [
        "# Benchmark results",
        "",
        "Produced by the benchmark harness (`python -m benchmarks`); docs/performance.md",
        "explains the workloads and the figures. Each cell is the median ops/s of",
        f"{repeats} and, in brackets, its ratio to the baseline: the raw",
        "driver (asyncpg / aiosqlite), or for W5 the sync Session. Higher is better.",
        '"asyncorm / SQLAlchemy" above 1.00x means asyncorm is faster than plain SQLAlchemy;',
        '"~" after it: the two contenders\' repeats overlap (slowest to fastest), so the',
        "difference is inside this run's noise.",
        '"asyncorm / Tortoise", "asyncorm / Piccolo" and "asyncorm / raw, no pool reset" are',
        "read the same way (issue 13): the peers as their documentation recommends, and the",
        "asyncpg pool without its reset on release, the driver's physical limit (\"raw",
        "driver\" is asyncpg's default pool, which resets each connection it takes back).",
        "The geomean row is the geometric mean of the ratios (number of cases in brackets).",
        "The sync Session column of W1/W2 is SQLAlchemy's ORM without asyncio (pysqlite,",
        "psycopg) on the same rows: a reference for what any async layer over it can reach.",
        "Targets are issue",
        "5's, never asserted.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {label} | {value} |" for label, value in machine),
    ]
    for backend in (SQLITE, POSTGRESQL):
        mine = [r for r in results if r.backend == backend]
        if mine:
            out += ["", f"## {BACKEND_TITLES[backend]}", "", render_backend(backend, mine)]
    for reason in skipped:
        out += ["", f"Skipped: {reason}"]
    if chart:
        out += ["", "## Chart", "", f"![ratios to the baseline]({chart})"]
    if results:
        out += ["", "## Spread", "", "ops/s of every contender's repeats.", ""]
        out += [render_spread(results)]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


# -- the chart ----------------------------------------------------------------------------------


def write_chart(path: Path, results: Sequence[Result]) -> str | None:
    """Save a bar chart of the ratios to ``path``; return why not if matplotlib is missing."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return "matplotlib is not installed (pip install 'asyncorm[bench]'): no chart"
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    backends = [b for b in (SQLITE, POSTGRESQL) if any(r.backend == b for r in results)]
    rel_all = {b: ratios([r for r in results if r.backend == b]) for b in backends}
    colours = {  # every contender its own: W8's baseline is SQLAlchemy, so raw is a bar there
        RAW: "#17becf",
        SQLALCHEMY: "#8c8c8c",
        ASYNCORM: "#1f77b4",
        SYNC: "#ff7f0e",
        RAW_NO_RESET: "#000000",
        TORTOISE: "#2ca02c",
        PICCOLO: "#9467bd",
    }
    fig, axes = plt.subplots(
        1, len(backends), figsize=(7 * len(backends), 6.5), squeeze=False, sharex=True
    )
    for ax, backend in zip(axes[0], backends, strict=True):
        mine = [r for r in results if r.backend == backend]
        cases = _cases(mine)
        shown = [
            c
            for c in _contenders(mine)
            if any(c != case.baseline and (case.name, c) in rel_all[backend] for case in cases)
        ]
        height = 0.8 / max(len(shown), 1)
        for k, contender in enumerate(shown):
            ys, xs = [], []
            for i, case in enumerate(cases):
                value = rel_all[backend].get((case.name, contender))
                if value is not None and contender != case.baseline:
                    ys.append(i + (k - (len(shown) - 1) / 2) * height)
                    xs.append(value)
            ax.barh(
                ys,
                xs,
                height=height,
                label=LABELS.get(contender, contender),
                color=colours.get(contender),
            )
        ax.axvline(1.0, color="black", linewidth=1)
        ax.axvline(0.5, color="#d62728", linewidth=1, linestyle="--")
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels([case.name for case in cases])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ratio to the raw driver (W5: sync Session, W7: SQLAlchemy)")
        ax.set_title(BACKEND_TITLES[backend])
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize="small")
        ax.grid(axis="x", which="both", alpha=0.3)
    fig.suptitle("asyncorm benchmarks: higher is better; dashed line is the 0.5x target")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def command_line(argv: Sequence[str]) -> str:
    """How this run was started, for RESULTS.md."""
    return " ".join(["python -m benchmarks", *argv]) if argv else "python -m benchmarks"
