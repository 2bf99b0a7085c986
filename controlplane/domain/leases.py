"""Leases: who holds which files until when, and what a reported result does to a file."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from controlplane.domain.errors import FailedPrecondition, PermissionDenied
from controlplane.domain.ingestion import ErrorPolicy
from controlplane.domain.runs import FileState

# A file whose leases keep expiring while it is leased alone (it kills its agents) is quarantined
# after this many such expiries; expiries in larger batches only make its next batch smaller.
MAX_LEASE_EXPIRIES = 3


class LeaseLost(FailedPrecondition):
    """The lease expired and its files were taken over, or the file is no longer held by it."""

    reason = "LEASE_LOST"


class LeaseNotOwned(PermissionDenied):
    """The lease belongs to another agent."""

    reason = "LEASE_NOT_OWNED"


@dataclass(frozen=True)
class Lease:
    id: uuid.UUID
    agent_id: str
    ingestion_pk: uuid.UUID
    expire_time: datetime
    ttl: timedelta
    create_time: datetime | None = None

    @property
    def name(self) -> str:
        return f"leases/{self.id}"

    @property
    def heartbeat_interval(self) -> timedelta:
        return self.ttl / 3


@dataclass(frozen=True)
class LeasedFile:
    id: int
    ingestion_id: str
    run_id: str
    path: str
    size_bytes: int
    etag: str
    modified_time: datetime | None
    attempt: int


@dataclass(frozen=True)
class ReportedResult:
    """One file's reported result, with the state it leads to."""

    file_id: int
    attempt: int
    state: FileState
    records: int = 0
    size: int = 0
    error_type: str = ""
    error_message: str = ""
    retryable: bool = True
    next_attempt_at: datetime | None = None


@dataclass(frozen=True)
class RecordedResults:
    agent_id: str
    ingestion_pk: uuid.UUID
    ingestion_id: str
    runs: dict[int, uuid.UUID | None]  # recorded file -> its run
    # Runs with open files besides the reported ones, as the recording statement saw them.
    runs_with_others_open: set[uuid.UUID | None]

    def file_name(self, file_id: int) -> str:
        return f"ingestions/{self.ingestion_id}/files/{file_id}"


def retry_delay(attempt: int, initial: timedelta, maximum: timedelta, rng: random.Random | None = None) -> timedelta:
    """Exponential backoff with full jitter in its upper half: initial * 2^(attempt-1), capped, times [0.5, 1)."""
    # In float seconds with a bounded exponent: timedelta * 2**99 overflows.
    seconds = min(initial.total_seconds() * 2.0 ** min(max(attempt - 1, 0), 64), maximum.total_seconds())
    base = timedelta(seconds=seconds)
    jitter: float = 0.5 + 0.5 * (rng or random).random()
    return base * jitter


def state_after_failure(attempt: int, max_attempts: int, retryable: bool) -> FileState:
    return FileState.FAILED if retryable and attempt < max_attempts else FileState.QUARANTINED


def failure_result(
    file_id: int,
    attempt: int,
    max_attempts: int,
    policy: ErrorPolicy,
    error_type: str,
    error_message: str,
    *,
    retryable: bool,
    records: int = 0,
    size: int = 0,
) -> ReportedResult:
    """A failed attempt's result: FAILED with its retry time (backoff with jitter), or QUARANTINED."""
    state = state_after_failure(attempt, max_attempts, retryable)
    next_at = None
    if state is FileState.FAILED:
        next_at = datetime.now(UTC) + retry_delay(attempt, policy.retry_backoff_initial, policy.retry_backoff_max)
    return ReportedResult(
        file_id, attempt, state, records=records, size=size, error_type=error_type, error_message=error_message,
        retryable=retryable, next_attempt_at=next_at,
    )  # fmt: skip
