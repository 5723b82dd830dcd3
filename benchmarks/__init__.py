"""The asyncorm benchmark harness: asyncorm against the raw drivers and plain SQLAlchemy.

Run every workload on SQLite and PostgreSQL, from the repository root::

    python -m benchmarks                 # full run: writes benchmarks/RESULTS.md and results.png
    python -m benchmarks --quick         # CI smoke: tiny sizes, one repeat, under a minute
    python -m benchmarks --backend sqlite --only W1,W2

Layout: :mod:`benchmarks._core` holds the vocabulary (cases, trials, sizes, results),
:mod:`benchmarks._schema` the tables, :mod:`benchmarks._bench` loads the databases and opens
the contenders' pools, :mod:`benchmarks._peers` opens the peers (Tortoise ORM, Piccolo),
:mod:`benchmarks.workloads` defines W1-W6 (and the W7 extension point),
:mod:`benchmarks._report` prints the table and writes RESULTS.md and the chart, and
:mod:`benchmarks.run` is the command line. ``python -m benchmarks.profile`` shows where a
W1/W2 operation spends its Python time. docs/performance.md explains the workloads.
"""
