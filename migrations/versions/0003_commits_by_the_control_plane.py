"""commits by the control plane: commit intents, table committers, crash isolation

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 23:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "commits",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("ingestion_pk", sa.UUID(), nullable=False),
        sa.Column("lease_pk", sa.UUID(), nullable=False),
        sa.Column("table_name", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("results", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("data_files", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("error", sa.Text(), server_default="", nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["ingestion_pk"], ["ingestions.id"], name=op.f("fk_commits_ingestion_pk_ingestions"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commits")),
    )
    op.create_index(
        "ix_commits_pending",
        "commits",
        ["table_name", "create_time"],
        unique=False,
        postgresql_where=sa.text("state = 'PENDING'"),
    )
    op.create_table(
        "table_committers",
        sa.Column("table_name", sa.Text(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("heartbeat_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("table_name", name=op.f("pk_table_committers")),
    )
    op.add_column("files", sa.Column("solo_expiries", sa.Integer(), server_default="0", nullable=False))
    op.add_column("files", sa.Column("commit_pk", sa.UUID(), nullable=True))
    op.create_foreign_key(
        op.f("fk_files_commit_pk_commits"), "files", "commits", ["commit_pk"], ["id"], ondelete="SET NULL"
    )
    op.add_column("leases", sa.Column("file_count", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("leases", "file_count")
    op.drop_constraint(op.f("fk_files_commit_pk_commits"), "files", type_="foreignkey")
    op.drop_column("files", "commit_pk")
    op.drop_column("files", "solo_expiries")
    op.drop_table("table_committers")
    op.drop_index("ix_commits_pending", table_name="commits", postgresql_where=sa.text("state = 'PENDING'"))
    op.drop_table("commits")
