"""Smoke test of the web benchmark (benchmarks/web.py): it serves, measures and reports.

``--quick`` on each backend: three apps under uvicorn in a child process, a real HTTP client
here, then the same apps called in-process as ASGI. No timing is asserted, only that every
contender was measured and the ratios printed.
"""

from __future__ import annotations

import pytest

from benchmarks.web import main
from tests.conftest import postgres_url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_quick_run_measures_every_contender(
    backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--quick", "--backend", backend]
    if backend == "postgresql":
        args += ["--postgres-url", postgres_url()]

    assert main(args) == 0

    out = capsys.readouterr().out
    assert f"### {backend}" in out
    for contender in ("middleware", "by hand", "raw"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {contender} |"))
        assert float(row.split("|")[2].replace(",", "")) > 0, row
    assert "- middleware / by hand: " in out
    assert "- by hand / raw: " in out
    assert "| contender | us/request (median) | repeats (us) |" in out
    assert "- with the query: the middleware adds " in out
    assert "- no IO: the middleware's fixed cost over a session by hand is " in out
