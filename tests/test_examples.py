"""Every example in examples/ runs, on both backends, with warnings as errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Backend

EXAMPLES = sorted(
    path
    for path in (Path(__file__).parent.parent / "examples").glob("*.py")
    if not path.name.endswith("_app.py")  # web apps: served by tests/test_example_apps.py
)

# what each example must print, proving it did its work rather than merely exiting 0
EXPECTED = {
    "quickstart.py": [
        "identity map returns the same object: True",
        "after rollback bob is bob",
        "addresses left after deleting ann: 0",
        "users: ['bob', 'cat', 'dan']",
    ],
    "worker.py": [
        "queue: 100 jobs done, 0 pending",
        "queue: every done job applied and notified exactly once: True",
        "queue: connections checked out: 0",
        "table: 100 jobs done, 0 pending, 0 retries",
        "table: every done job applied and notified exactly once: True",
        "table: connections checked out: 0",
    ],
}


def test_every_example_has_expectations() -> None:
    assert {path.name for path in EXAMPLES} == set(EXPECTED)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_runs(example: Path, backend: Backend, tmp_path: Path) -> None:
    env = {**os.environ, "ASYNCORM_URL": backend.url}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(example)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    for line in EXPECTED[example.name]:
        assert line in done.stdout
