"""widen author name and forbid empty names

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 20:06:40.552917

SQLite cannot change a column's type or add a CHECK constraint in place, so batch mode
rebuilds ``authors`` there: it creates ``_alembic_tmp_authors``, copies the rows, drops
``authors`` and renames the copy. ``authors`` is the parent of ``books``: env.py turns
foreign keys off for the migration, or dropping ``authors`` would delete every book
(``ON DELETE CASCADE``). On PostgreSQL the same block is two ALTER TABLE statements.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("authors") as batch:
        batch.alter_column(
            "name", existing_type=sa.String(50), type_=sa.String(200), existing_nullable=False
        )
        batch.create_check_constraint("ck_authors_name_not_empty", "length(name) > 0")


def downgrade() -> None:
    """Downgrade schema (names longer than 50 characters must be shortened first)."""
    with op.batch_alter_table("authors") as batch:
        batch.drop_constraint("ck_authors_name_not_empty", type_="check")
        batch.alter_column(
            "name", existing_type=sa.String(200), type_=sa.String(50), existing_nullable=False
        )
