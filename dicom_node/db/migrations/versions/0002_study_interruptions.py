"""studies: open associations and interruptions (an association that ended abnormally)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("open_associations", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("interrupted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("interruption_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("interruption_reason")
        batch_op.drop_column("interrupted_at")
        batch_op.drop_column("open_associations")
