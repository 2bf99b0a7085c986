"""Tables, as SQLAlchemy 2 declarative models.

The naming convention gives every constraint and index a stable name, so
Alembic migrations can refer to them and autogenerate finds no spurious diffs.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Timestamp = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class IngestionRow(Base):
    __tablename__ = "ingestions"
    __table_args__ = (
        UniqueConstraint("tenant", "ingestion_id"),
        Index("ix_ingestions_tenant_state", "tenant", "state"),
    )
    # Server-side defaults (timestamps) come back through RETURNING.
    __mapper_args__: dict[str, Any] = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tenant: Mapped[str] = mapped_column(Text)
    ingestion_id: Mapped[str] = mapped_column(Text)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB)
    state: Mapped[str] = mapped_column(Text)
    state_message: Mapped[str] = mapped_column(Text, server_default="")
    schema_version: Mapped[int] = mapped_column(BigInteger, server_default="0")
    version: Mapped[int] = mapped_column(BigInteger, server_default="1")
    last_run_id: Mapped[str | None] = mapped_column(Text)
    next_run_time: Mapped[datetime | None] = mapped_column(Timestamp)
    prefect_deployment_id: Mapped[str | None] = mapped_column(Text)
    # Set with state DELETING: the deletion drops the Iceberg table too (the reconciler reads it).
    drop_table_on_delete: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # Set with state REFRESHING: FULL or NEW_ONLY (the reconciler finishes a refresh a crash cut short).
    refresh_mode: Mapped[str | None] = mapped_column(Text)
    refresh_run_id: Mapped[str | None] = mapped_column(Text)  # the run it starts, chosen with the intent
    create_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    update_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now(), onupdate=func.now())


class RunRow(Base):
    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("ingestion_pk", "run_id"),
        # At most one active run per ingestion, enforced by the database.
        Index(
            "uq_runs_one_active_per_ingestion",
            "ingestion_pk",
            unique=True,
            postgresql_where=text("state IN ('DISCOVERING', 'RUNNING')"),
        ),
        # Discovery work any replica may claim.
        Index("ix_runs_discovering", "create_time", postgresql_where=text("state = 'DISCOVERING'")),
    )
    __mapper_args__: dict[str, Any] = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    ingestion_pk: Mapped[uuid.UUID] = mapped_column(ForeignKey("ingestions.id", ondelete="CASCADE"))
    run_id: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text)
    trigger: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text, server_default="")
    # Where a crashed listing resumes (last path of the last committed chunk).
    discovery_cursor: Mapped[str | None] = mapped_column(Text(collation="C"))
    # The replica listing the source, and when it last proved it is alive; a
    # stale heartbeat lets another replica take the discovery over.
    discovery_owner: Mapped[str | None] = mapped_column(Text)
    discovery_heartbeat_time: Mapped[datetime | None] = mapped_column(Timestamp)
    # Counts by file state, frozen when the run ends (files may later move to newer runs).
    final_counts: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    create_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    discovery_end_time: Mapped[datetime | None] = mapped_column(Timestamp)
    end_time: Mapped[datetime | None] = mapped_column(Timestamp)


class FileRow(Base):
    __tablename__ = "files"
    __table_args__ = (
        UniqueConstraint("ingestion_pk", "path"),
        # The claim query scans only claimable files, oldest first.
        Index(
            "ix_files_claimable",
            "ingestion_pk",
            "next_attempt_at",
            "id",
            postgresql_where=text("state IN ('PENDING', 'FAILED', 'LEASED')"),
        ),
        Index("ix_files_run_state", "run_pk", "state"),
        Index("ix_files_ingestion_state", "ingestion_pk", "state"),
        Index("ix_files_lease", "lease_pk", postgresql_where=text("lease_pk IS NOT NULL")),
    )
    __mapper_args__: dict[str, Any] = {"eager_defaults": True}

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    ingestion_pk: Mapped[uuid.UUID] = mapped_column(ForeignKey("ingestions.id", ondelete="CASCADE"))
    run_pk: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    # Byte order ("C"): listing order, resume cursors and prefix filters agree.
    path: Mapped[str] = mapped_column(Text(collation="C"))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    modified_time: Mapped[datetime | None] = mapped_column(Timestamp)
    etag: Mapped[str] = mapped_column(Text, server_default="")
    state: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # Leases of this file that expired (its agent died): each makes its next batch smaller.
    lease_expiries: Mapped[int] = mapped_column(Integer, server_default="0")
    # Of those, the ones where it was leased alone: only these can blame the file.
    solo_expiries: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    lease_pk: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    lease_expire_time: Mapped[datetime | None] = mapped_column(Timestamp)
    # Set while the file's staged data is being committed (in doubt): no one may claim it.
    commit_pk: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("commits.id", ondelete="SET NULL"))
    last_error: Mapped[str] = mapped_column(Text, server_default="")
    records: Mapped[int] = mapped_column(BigInteger, server_default="0")
    discover_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    update_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now(), onupdate=func.now())


class FileAttemptRow(Base):
    """Append-only history: one row per attempt at a file."""

    __tablename__ = "file_attempts"
    __table_args__ = (Index("ix_file_attempts_file_pk_attempt", "file_pk", "attempt"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    file_pk: Mapped[int] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    agent_id: Mapped[str | None] = mapped_column(Text)
    lease_pk: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    outcome: Mapped[str] = mapped_column(Text)
    start_time: Mapped[datetime | None] = mapped_column(Timestamp)
    end_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    records: Mapped[int] = mapped_column(BigInteger, server_default="0")
    bytes: Mapped[int] = mapped_column(BigInteger, server_default="0")
    error_type: Mapped[str] = mapped_column(Text, server_default="")
    error_message: Mapped[str] = mapped_column(Text, server_default="")
    retryable: Mapped[bool] = mapped_column(Boolean, server_default="false")


class AgentRow(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant: Mapped[str] = mapped_column(Text)
    hostname: Mapped[str] = mapped_column(Text, server_default="")
    create_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    last_seen_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class LeaseRow(Base):
    __tablename__ = "leases"
    __table_args__ = (Index("ix_leases_agent_id_state", "agent_id", "state"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"))
    ingestion_pk: Mapped[uuid.UUID] = mapped_column(ForeignKey("ingestions.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    expire_time: Mapped[datetime] = mapped_column(Timestamp)
    # Files the lease was claimed with: an expiry of a one-file lease blames that file.
    file_count: Mapped[int] = mapped_column(Integer, server_default="0")


class CommitRow(Base):
    """A batch's staged data on its way into the table: the intent, then its outcome.

    Written (PENDING) in the transaction that accepts the data, with the files
    marked by commit_pk; settled (COMMITTED or ABORTED) in the transaction that
    records the files' results. The Iceberg snapshot names the commit, so one
    left PENDING by a crash is settled by whoever owns the table next.
    """

    __tablename__ = "commits"
    __table_args__ = (
        Index("ix_commits_pending", "table_name", "create_time", postgresql_where=text("state = 'PENDING'")),
    )
    __mapper_args__: dict[str, Any] = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    ingestion_pk: Mapped[uuid.UUID] = mapped_column(ForeignKey("ingestions.id", ondelete="CASCADE"))
    lease_pk: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    table_name: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text)
    # [{"file": id, "attempt": n, "records": n, "bytes": n}] of the successful files.
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    # [{"path": uri, "record_count": n, "size_bytes": n}], under the lease's staging location.
    data_files: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    error: Mapped[str] = mapped_column(Text, server_default="")
    create_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    end_time: Mapped[datetime | None] = mapped_column(Timestamp)


class TableCommitterRow(Base):
    """Which control-plane replica commits to a table: one at a time, taken over when silent."""

    __tablename__ = "table_committers"

    table_name: Mapped[str] = mapped_column(Text, primary_key=True)
    owner: Mapped[str] = mapped_column(Text)
    heartbeat_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())


class IdempotencyRow(Base):
    """The first answer to a request_id, written in the same transaction as its effect."""

    __tablename__ = "idempotency_records"
    __table_args__ = (Index("ix_idempotency_records_create_time", "create_time"),)

    tenant: Mapped[str] = mapped_column(Text, primary_key=True)
    request_id: Mapped[str] = mapped_column(Text, primary_key=True)
    method: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(Text)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    create_time: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
