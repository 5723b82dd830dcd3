"""The command line: ``python -m asyncorm check URL``.

Example::

    $ python -m asyncorm check postgresql://app@db/app?sslmode=require
    url         postgresql+asyncpg://app@db/app?sslmode=require
    driver      asyncpg 0.30.0, SQLAlchemy 2.1.0
    ...

.. versionadded:: 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ._check import check


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m asyncorm",
        description="asyncorm's command line.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser(
        "check",
        help="connect to a database and report the engine's settings",
        description="Connect to URL with asyncorm.create_engine() and report the driver, "
        "server, TLS, pooler, pool settings, SQLite pragmas and round-trip latency. "
        "Exits 1 with one line on stderr when it cannot connect, 2 for a bad URL.",
    )
    check_parser.add_argument("url", help="database URL, e.g. postgresql://app@db/app")
    args = parser.parse_args(argv)
    return asyncio.run(check(args.url, sys.stdout, sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
