"""sagas on an ingestion: a deletion remembers whether the table goes too, a refresh its mode and run

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 05:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "ingestions", sa.Column("drop_table_on_delete", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.add_column("ingestions", sa.Column("refresh_mode", sa.Text(), nullable=True))
    op.add_column("ingestions", sa.Column("refresh_run_id", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("ingestions", "refresh_run_id")
    op.drop_column("ingestions", "refresh_mode")
    op.drop_column("ingestions", "drop_table_on_delete")
