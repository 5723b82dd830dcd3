"""add author email

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 20:05:12.118204
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema: a plain ALTER TABLE ... ADD COLUMN, which SQLite does in place."""
    op.add_column("authors", sa.Column("email", sa.String(200), nullable=True))


def downgrade() -> None:
    """Downgrade schema (SQLite >= 3.35 drops a column in place)."""
    with op.batch_alter_table("authors") as batch:
        batch.drop_column("email")
