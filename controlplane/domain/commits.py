"""Commits of staged data: the intent a report leaves, and what settles it.

A report's successful files and their staged data files become one intent
(PENDING), written in the transaction that checks the lease still holds every
file; the files are then claimable by nobody. The table's committer settles
the intent: COMMITTED with the files' results once a snapshot carries it, or
ABORTED (the files fail with the error) when the data cannot be committed.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

from controlplane.domain.errors import Unavailable

# Staged data files live under {table location}/data/_staging/{lease}/.
STAGING = "_staging"


class CommitState(enum.StrEnum):
    PENDING = "PENDING"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"


@dataclass(frozen=True)
class CommittedFile:
    """A successful file of an intent, as its agent reported it."""

    file_id: int
    path: str  # the source URI: its rows in the table carry it as _source_file
    attempt: int
    records: int
    size: int


@dataclass(frozen=True)
class StagedFile:
    path: str
    record_count: int
    size_bytes: int


@dataclass(frozen=True)
class CommitIntent:
    id: uuid.UUID
    ingestion_pk: uuid.UUID
    lease_id: uuid.UUID
    agent_id: str
    table_name: str
    files: tuple[CommittedFile, ...]
    data_files: tuple[StagedFile, ...]
    create_time: datetime


class FenceLost(Exception):
    """The committer no longer owns the table: another replica commits its pending work."""


@dataclass(frozen=True)
class TableInfo:
    """What an agent needs to know of a table to write data for it."""

    name: str
    exists: bool
    location: str
    columns: tuple[tuple[str, str], ...]  # (name, Spark SQL type)
    schema_version: int  # Iceberg schema id + 1; 0: no table yet

    def staging_location(self, lease_id: str) -> str:
        return f"{self.location.rstrip('/')}/data/{STAGING}/{lease_id}"


@dataclass(frozen=True)
class StagedBatch:
    """One intent's data: replace the rows of `sources` with the rows of `data_files`."""

    commit_id: str
    lease: str  # "leases/{lease}"
    sources: tuple[str, ...]
    data_files: tuple[str, ...]


class CommitInProgress(Unavailable):
    """The batch's data is still being committed; retry the call to get its answer."""

    reason = "COMMIT_IN_PROGRESS"
