"""Runs and files: their states and the rules that move them."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from controlplane.domain.errors import FailedPrecondition


class RunState(StrEnum):
    DISCOVERING = "DISCOVERING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    PARTIALLY_SUCCEEDED = "PARTIALLY_SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


ACTIVE_RUN_STATES = frozenset({RunState.DISCOVERING, RunState.RUNNING})


class Trigger(StrEnum):
    MANUAL = "MANUAL"
    SCHEDULED = "SCHEDULED"
    RETRY = "RETRY"
    REFRESH = "REFRESH"


class FileState(StrEnum):
    PENDING = "PENDING"
    LEASED = "LEASED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    QUARANTINED = "QUARANTINED"
    SKIPPED = "SKIPPED"


# Files a run still waits for; a run with none of these left can end.
OPEN_FILE_STATES = frozenset({FileState.PENDING, FileState.LEASED, FileState.FAILED})
RETRYABLE_FILE_STATES = frozenset({FileState.FAILED, FileState.QUARANTINED, FileState.SKIPPED})


class RunInProgress(FailedPrecondition):
    """The ingestion already has an active run."""

    reason = "RUN_IN_PROGRESS"


class RunCounts(BaseModel):
    model_config = ConfigDict(frozen=True)

    pending: int = 0
    leased: int = 0
    succeeded: int = 0
    failed: int = 0
    quarantined: int = 0
    skipped: int = 0
    records: int = 0
    bytes: int = 0

    @property
    def total(self) -> int:
        return self.pending + self.leased + self.succeeded + self.failed + self.quarantined + self.skipped

    @property
    def open(self) -> int:
        return self.pending + self.leased + self.failed


def final_state(counts: RunCounts) -> RunState:
    """How a run with no open files ended."""
    if counts.quarantined == 0:
        return RunState.SUCCEEDED
    if counts.succeeded > 0:
        return RunState.PARTIALLY_SUCCEEDED
    return RunState.FAILED


class FileError(BaseModel):
    model_config = ConfigDict(frozen=True)

    file_id: int
    path: str
    error: str


class Run(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    ingestion_pk: uuid.UUID
    ingestion_id: str
    run_id: str
    state: RunState
    trigger: Trigger
    error: str = ""
    create_time: datetime | None = None
    discovery_end_time: datetime | None = None
    end_time: datetime | None = None
    counts: RunCounts = RunCounts()
    first_errors: tuple[FileError, ...] = ()

    @property
    def name(self) -> str:
        return f"ingestions/{self.ingestion_id}/runs/{self.run_id}"

    @property
    def terminal(self) -> bool:
        return self.state not in ACTIVE_RUN_STATES


def new_run_id(now: datetime | None = None) -> str:
    """Sortable by start time (to the millisecond), readable, unique: "20261129-160400-123f9c1"."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}{secrets.token_hex(2)}"


class File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int
    ingestion_id: str
    run_id: str = ""
    path: str
    size_bytes: int
    etag: str = ""
    modified_time: datetime | None = None
    state: FileState
    attempts: int = 0
    lease_expiries: int = 0
    next_attempt_at: datetime | None = None
    last_error: str = ""
    records: int = 0
    discover_time: datetime | None = None
    update_time: datetime | None = None

    @property
    def name(self) -> str:
        return f"ingestions/{self.ingestion_id}/files/{self.id}"


class FileAttempt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attempt: int
    agent_id: str = ""
    lease_id: uuid.UUID | None = None
    outcome: str
    start_time: datetime | None = None
    end_time: datetime | None = None
    records: int = 0
    error_type: str = ""
    error_message: str = ""
    retryable: bool = False


@dataclass(frozen=True, slots=True)
class ListedFile:
    """One file as the source listing saw it (a plain dataclass: listings make millions)."""

    path: str
    size_bytes: int
    modified_time: datetime | None
    etag: str = ""
