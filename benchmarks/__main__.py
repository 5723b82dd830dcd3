"""``python -m benchmarks``: run the benchmark harness (see ``--help``)."""

from benchmarks.run import main

raise SystemExit(main())
