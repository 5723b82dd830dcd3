"""The README's commands are the ones CI runs, and its example works."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import Backend

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def _shell_blocks() -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", README, re.S)]


def test_readme_first_screen_has_the_two_setup_commands() -> None:
    quickstart, tests = _shell_blocks()[:2]
    assert quickstart.endswith("examples/quickstart.py")
    assert tests.endswith("-m pytest")


def test_ci_runs_exactly_the_readme_test_command() -> None:
    tests = _shell_blocks()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_readme_example_runs(backend: Backend, tmp_path: Path) -> None:
    code = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    code = code.replace('"sqlite:///app.db"', repr(backend.url))
    table = f"readme_users_{uuid.uuid4().hex[:12]}"  # a fresh table on every run
    code = code.replace('__tablename__ = "users"', f"__tablename__ = {table!r}")
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "User object" in done.stdout
    if not backend.is_sqlite:
        subprocess.run(
            ["psql", backend.url, "-qc", f"drop table {table}"], check=True, timeout=30
        )
