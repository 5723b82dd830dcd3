"""Alembic's async env.py with asyncorm.create_engine: examples/alembic/ on both backends.

Each test copies the example project to a temporary directory and runs Alembic's command
API (in a worker thread: env.py runs its own event loop with ``asyncio.run``, as under the
``alembic`` command), then looks at the database with an engine of the application's
kind (SQLite foreign keys on).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, Engine, String, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

import asyncorm
from tests.conftest import Backend

EXAMPLE = Path(__file__).parent.parent / "examples" / "alembic"
TABLES = ("books", "authors", "reviews", "alembic_version")

AUTHORS = [(1, "ann"), (2, "bob"), (3, "cat")]
BOOKS = [(n, f"book {n}", n % 3 + 1) for n in range(1, 61)]


@dataclass
class Project:
    """A copy of examples/alembic and the Alembic Config for it."""

    path: Path
    config: Config
    url: str

    def add_revision(self, rev: str, down: str, body: str) -> None:
        """Write versions/<rev>_extra.py with ``body`` as its upgrade()."""
        source = (
            f'"""extra revision {rev}"""\n\n'
            "import sqlalchemy as sa\nfrom alembic import op\n\n"
            f"revision = {rev!r}\ndown_revision = {down!r}\n"
            "branch_labels = None\ndepends_on = None\n\n\n"
            f"def upgrade() -> None:\n{body}\n\n\ndef downgrade() -> None:\n    pass\n"
        )
        (self.path / "migrations" / "versions" / f"{rev}_extra.py").write_text(source)

    async def run(self, name: str, *args: Any, **kwargs: Any) -> None:
        """``alembic <name> <args>`` through the command API, off the event loop."""
        await asyncio.to_thread(getattr(command, name), self.config, *args, **kwargs)


async def drop_tables(url: str) -> None:
    engine = asyncorm.create_engine(url)
    try:
        async with engine.begin() as conn:
            for table in TABLES:
                await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    finally:
        await engine.dispose()


@pytest.fixture
def project(backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    path = tmp_path / "project"
    shutil.copytree(EXAMPLE, path, ignore=shutil.ignore_patterns("__pycache__", "*.db"))
    monkeypatch.setenv("ASYNCORM_URL", backend.url)
    monkeypatch.setattr(sys, "path", list(sys.path))  # Alembic prepends the project's path
    config = Config(str(path / "alembic.ini"))
    config.attributes["configure_logger"] = False  # keep pytest's logging as it is
    if not backend.is_sqlite:
        asyncio.run(drop_tables(backend.url))
    try:
        yield Project(path, config, backend.url)
    finally:
        sys.modules.pop("models", None)  # the copy's models module, imported by env.py
        if not backend.is_sqlite:
            asyncio.run(drop_tables(backend.url))


@pytest.fixture
async def app_engine(project: Project) -> AsyncIterator[Any]:
    """An engine as the application makes it (on SQLite: foreign keys enforced)."""
    engine = asyncorm.create_engine(project.url)
    try:
        yield engine
    finally:
        await engine.dispose()


def _schema(conn: Connection) -> dict[str, Any]:
    inspector = inspect(conn)
    tables = set(inspector.get_table_names()) & set(TABLES)  # not the other tests' tables
    schema: dict[str, Any] = {"tables": tables}
    if "authors" in tables:
        columns = {c["name"]: c["type"] for c in inspector.get_columns("authors")}
        assert isinstance(columns["name"], String)
        schema["name_length"] = columns["name"].length
        schema["columns"] = set(columns)
        schema["checks"] = {c["name"] for c in inspector.get_check_constraints("authors")}
        foreign_keys = inspector.get_foreign_keys("books")
        schema["books_refer_to"] = [fk["referred_table"] for fk in foreign_keys]
    if "alembic_version" in tables:
        schema["version"] = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return schema


async def schema(engine: Any) -> dict[str, Any]:
    async with engine.connect() as conn:
        result: dict[str, Any] = await conn.run_sync(_schema)
        return result


async def seed(engine: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO authors (id, name) VALUES (:id, :name)"),
            [{"id": i, "name": name} for i, name in AUTHORS],
        )
        await conn.execute(
            text("INSERT INTO books (id, title, author_id) VALUES (:id, :title, :author)"),
            [{"id": i, "title": title, "author": author} for i, title, author in BOOKS],
        )


async def books(engine: Any) -> list[tuple[int, str, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT id, title, author_id FROM books ORDER BY id"))
        return [(row[0], row[1], row[2]) for row in rows]


def differences_with_the_models(conn: Connection) -> list[Any]:
    """What `alembic revision --autogenerate` would write, for this project's tables only
    (the shared PostgreSQL test database holds other tests' tables)."""
    models = sys.modules["models"]  # the project's models.py, imported by its env.py

    def ours(name: str | None, type_: str, parent_names: Any) -> bool:
        return type_ != "table" or name in TABLES

    context = MigrationContext.configure(conn, opts={"include_name": ours})
    return list(compare_metadata(context, models.Base.metadata))


async def test_upgrade_head_matches_the_models_and_downgrade_base_empties(
    project: Project, app_engine: Any, backend: Backend
) -> None:
    await project.run("upgrade", "head")
    after = await schema(app_engine)
    assert after["tables"] == {"authors", "books", "alembic_version"}
    assert after["version"] == "0003"
    assert after["columns"] == {"id", "name", "email"}
    assert after["name_length"] == 200
    assert after["checks"] == {"ck_authors_name_not_empty"}
    assert after["books_refer_to"] == ["authors"]
    async with app_engine.connect() as conn:  # autogenerate: no difference with models.py
        assert await conn.run_sync(differences_with_the_models) == []
    if backend.is_sqlite:  # the database holds nothing else: `alembic check` compares it all
        await project.run("check")

    await project.run("downgrade", "0002")
    before = await schema(app_engine)
    assert (before["version"], before["name_length"], before["checks"]) == ("0002", 50, set())
    async with app_engine.connect() as conn:  # authors.name is VARCHAR(50) again
        assert [diff[0][0] for diff in await conn.run_sync(differences_with_the_models)] == [
            "modify_type"
        ]

    await project.run("downgrade", "base")
    assert (await schema(app_engine))["tables"] == {"alembic_version"}


async def test_batch_rebuild_of_a_parent_table_keeps_every_child_row(
    project: Project, app_engine: Any, backend: Backend
) -> None:
    await project.run("upgrade", "0002")
    await seed(app_engine)

    await project.run("upgrade", "head")  # on SQLite: authors rebuilt under its 60 books

    assert await books(app_engine) == BOOKS
    after = await schema(app_engine)
    assert (after["name_length"], after["books_refer_to"]) == (200, ["authors"])
    if backend.is_sqlite:
        async with app_engine.connect() as conn:
            sql = await conn.scalar(text("SELECT sql FROM sqlite_master WHERE name='authors'"))
        assert sql.startswith('CREATE TABLE "authors"')  # the renamed copy: it was rebuilt
    # the references still hold, and still cascade, in the application's engine
    async with app_engine.connect() as conn:
        with pytest.raises(IntegrityError, match=r"(?i)foreign key"):
            await conn.execute(text("INSERT INTO books VALUES (99, 'orphan', 99)"))
    async with app_engine.begin() as conn:
        await conn.execute(text("DELETE FROM authors WHERE id = 1"))
    assert await books(app_engine) == [book for book in BOOKS if book[2] != 1]

    await project.run("downgrade", "0002")  # the rebuild back keeps them too
    assert await books(app_engine) == [book for book in BOOKS if book[2] != 1]
    assert (await schema(app_engine))["name_length"] == 50


async def test_without_foreign_keys_off_the_sqlite_rebuild_deletes_the_children(
    project: Project, app_engine: Any, backend: Backend
) -> None:
    """Why env.py passes sqlite_foreign_keys=False: what the rebuild does without it."""
    if not backend.is_sqlite:
        pytest.skip("SQLite only: PostgreSQL alters the table in place")
    env = project.path / "migrations" / "env.py"
    source = env.read_text()
    turned_off = '        options["sqlite_foreign_keys"] = False\n'
    assert turned_off in source
    env.write_text(source.replace(turned_off, "        pass\n"))
    await project.run("upgrade", "0002")
    await seed(app_engine)

    await project.run("upgrade", "head")

    # DROP TABLE authors, with foreign keys on, deleted the books (ON DELETE CASCADE)
    assert await books(app_engine) == []
    assert (await schema(app_engine))["version"] == "0003"


async def test_migrations_on_the_applications_own_connection(
    project: Project, app_engine: Any, backend: Backend
) -> None:
    """Alembic's connection sharing: env.py migrates a connection handed to it, here one of
    the application's engine, with SQLite foreign keys turned off on it first."""
    await project.run("upgrade", "0002")
    await seed(app_engine)

    def upgrade(connection: Connection) -> None:
        project.config.attributes["connection"] = connection
        command.upgrade(project.config, "head")

    async with app_engine.connect() as conn:
        if backend.is_sqlite:
            await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # before any transaction
            await conn.commit()
        await conn.run_sync(upgrade)
        if backend.is_sqlite:
            await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            await conn.commit()
            assert await conn.scalar(text("PRAGMA foreign_keys")) == 1

    assert await books(app_engine) == BOOKS
    assert (await schema(app_engine))["version"] == "0003"


FAILING_REBUILD = """\
    op.create_table("reviews", sa.Column("id", sa.Integer(), primary_key=True))
    with op.batch_alter_table("authors") as batch:  # 'ann' violates it: the copy fails
        batch.create_check_constraint("ck_no_ann", "name <> 'ann'")"""


async def test_a_failing_migration_rolls_back_all_its_ddl(
    project: Project, app_engine: Any
) -> None:
    await project.run("upgrade", "0003")
    await seed(app_engine)
    project.add_revision("0004", "0003", FAILING_REBUILD)

    with pytest.raises(IntegrityError, match=r"(?i)check constraint.*ck_no_ann"):
        await project.run("upgrade", "head")

    after = await schema(app_engine)
    assert after["tables"] == {"authors", "books", "alembic_version"}  # no reviews, no tmp
    assert after["version"] == "0003"
    assert after["checks"] == {"ck_authors_name_not_empty"}
    assert await books(app_engine) == BOOKS
    # nothing is left holding a lock: the application writes at once
    async with app_engine.begin() as conn:
        await conn.execute(text("INSERT INTO authors (id, name) VALUES (4, 'dan')"))


async def test_a_failing_upgrade_from_base_leaves_nothing(
    project: Project, app_engine: Any
) -> None:
    project.add_revision("0004", "0003", '    op.execute("SELECT * FROM no_such_table")')

    with pytest.raises(Exception, match="no_such_table"):
        await project.run("upgrade", "head")

    # 0001 to 0003 ran in the same transaction: the database is as it was
    assert (await schema(app_engine))["tables"] == set()


OUTSIDE_THE_TRANSACTION = """\
    op.create_table("reviews", sa.Column("id", sa.Integer(), primary_key=True))
    with op.get_context().autocommit_block():  # commits what came before
        if op.get_bind().dialect.name == "sqlite":
            op.execute("VACUUM")
        else:
            op.execute("CREATE INDEX CONCURRENTLY ix_books_title ON books (title)")
    op.execute("INSERT INTO reviews (id) VALUES (1)")
    op.execute("SELECT * FROM no_such_table")"""


async def test_statements_refused_in_a_transaction_run_in_an_autocommit_block(
    project: Project, app_engine: Any, backend: Backend
) -> None:
    """VACUUM (SQLite) and CREATE INDEX CONCURRENTLY (PostgreSQL) run outside the
    migration's transaction; what follows the block is transactional again."""
    await project.run("upgrade", "0003")
    project.add_revision("0004", "0003", OUTSIDE_THE_TRANSACTION)

    with pytest.raises(Exception, match="no_such_table"):
        await project.run("upgrade", "head")

    after = await schema(app_engine)
    assert after["version"] == "0003"
    assert "reviews" in after["tables"]  # committed by the autocommit block
    async with app_engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM reviews")) == 0  # rolled back
        if not backend.is_sqlite:
            found = await conn.scalar(text("SELECT to_regclass('ix_books_title')::text"))
            assert found == "ix_books_title"


async def test_sqlite_orphans_left_by_a_migration_roll_it_back(
    project: Project, app_engine: Any, backend: Backend
) -> None:
    if not backend.is_sqlite:
        pytest.skip("SQLite only: PostgreSQL enforces foreign keys during migrations")
    await project.run("upgrade", "0003")
    await seed(app_engine)
    project.add_revision("0004", "0003", '    op.execute("DELETE FROM authors WHERE id = 2")')

    orphans = r"left 20 row\(s\) referring to missing parents \(books rowid 1 -> authors, books"
    with pytest.raises(RuntimeError, match=orphans):
        await project.run("upgrade", "head")

    assert (await schema(app_engine))["version"] == "0003"
    assert await books(app_engine) == BOOKS
    async with app_engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM authors")) == 3


async def test_sqlite_migration_holds_the_write_lock_from_its_first_statement(
    project: Project, app_engine: Any, backend: Backend
) -> None:
    """Another process cannot write between the migration's first read and its first
    write: that write would make the migration's snapshot stale and its DDL fail."""
    if not backend.is_sqlite:
        pytest.skip("SQLite only: PostgreSQL locks per table")
    await project.run("upgrade", "0002")
    other = sqlite3.connect(
        str(make_url(project.url).database),
        timeout=0,
        isolation_level=None,
        check_same_thread=False,
    )
    sent: list[str] = []
    refused: list[str] = []

    def after_statement(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if conn.engine is app_engine.sync_engine:
            return
        sent.append(statement)
        if len(sent) == 1:  # another process writes after the migration's first statement
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("INSERT INTO authors (name) VALUES ('from another process')")
                other.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                refused.append(str(exc))

    event.listen(Engine, "after_cursor_execute", after_statement)
    try:
        await project.run("upgrade", "head")
    finally:
        event.remove(Engine, "after_cursor_execute", after_statement)
        other.close()
    assert sent[0] == "BEGIN IMMEDIATE"
    assert refused == ["database is locked"]
    assert (await schema(app_engine))["version"] == "0003"


def test_the_alembic_command_line(project: Project, backend: Backend) -> None:
    """`alembic upgrade head` as a user types it (logging from alembic.ini, -W error)."""

    def alembic(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-W", "error", "-m", "alembic", *args],
            cwd=project.path,
            env={**os.environ, "ASYNCORM_URL": backend.url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done

    online = alembic("upgrade", "head")
    assert "Running upgrade 0002 -> 0003, widen author name" in online.stderr
    assert "Will assume transactional DDL" in online.stderr

    # offline: the SQL for a DBA, no connection (SQLite's batch copies the live table: to
    # 0002 only)
    target = "base:0002" if backend.is_sqlite else "base:head"
    offline = alembic("upgrade", target, "--sql").stdout
    assert re.search(r"CREATE TABLE authors \(", offline)
    assert "ALTER TABLE authors ADD COLUMN email VARCHAR(200)" in offline
    assert offline.rstrip().endswith("COMMIT;")


def test_the_env_py_shown_in_the_docs_is_the_examples() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "alembic.md").read_text()
    shown = re.findall(r"```python\n(.*?)```", docs, re.S)[0]
    env = (EXAMPLE / "migrations" / "env.py").read_text()
    for line in shown.splitlines():
        code = line.split("#")[0].strip()
        if code and "..." not in code:
            assert code in env, line
