"""What the service layer needs from persistence, as protocols.

The SQLAlchemy adapters implement these; unit tests use in-memory fakes.
Repositories add, query and flush. Only the service layer commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Protocol, Self

from controlplane.domain.commits import CommitIntent, CommitState, StagedBatch, TableInfo
from controlplane.domain.ingestion import Ingestion, IngestionState
from controlplane.domain.leases import Lease, LeasedFile, RecordedResults, ReportedResult
from controlplane.domain.runs import File, FileAttempt, FileState, ListedFile, Run, RunState


@dataclass(frozen=True)
class IdempotencyRecord:
    method: str
    fingerprint: str
    response: dict[str, Any] | None


class IngestionRepository(Protocol):
    def add(self, ingestion: Ingestion) -> None: ...

    def get(self, tenant: str, ingestion_id: str, *, for_update: bool = False) -> Ingestion | None: ...

    def get_by_pk(self, pk: uuid.UUID) -> Ingestion | None: ...

    def list_after(
        self, tenant: str, *, states: Collection[IngestionState], after: str | None, limit: int
    ) -> Sequence[Ingestion]: ...

    def save(self, ingestion: Ingestion) -> Ingestion: ...

    def delete(self, ingestion: Ingestion) -> None: ...

    def writing_to(self, table: str, *, excluding: uuid.UUID) -> list[str]:
        """The names of other ingestions (any tenant) whose destination is this table."""
        ...

    def next_stale(self, state: IngestionState, stale_after: timedelta) -> Ingestion | None:
        """One ingestion in `state` (a saga's) for longer than `stale_after`, locked (skipping those others hold)."""
        ...

    def with_file_counts(self, ingestions: Sequence[Ingestion]) -> list[Ingestion]: ...


class IdempotencyRepository(Protocol):
    def claim(self, tenant: str, request_id: str, method: str, fingerprint: str) -> IdempotencyRecord | None:
        """Reserves request_id for this transaction; returns the earlier record if there is one.

        A concurrent claim of the same id waits until the first transaction ends.
        """
        ...

    def find(self, tenant: str, request_id: str) -> IdempotencyRecord | None: ...

    def complete(self, tenant: str, request_id: str, response: dict[str, Any]) -> None: ...

    def purge(self, older_than: timedelta, limit: int) -> int:
        """Deletes up to `limit` records older than `older_than`; returns how many."""
        ...


class RunRepository(Protocol):
    def add(self, run: Run) -> Run: ...

    def get(
        self, ingestion_pk: uuid.UUID, ingestion_id: str, run_id: str, *, for_update: bool = False
    ) -> Run | None: ...

    def active(self, ingestion_pk: uuid.UUID, ingestion_id: str, *, for_update: bool = False) -> Run | None: ...

    def list_before(
        self, ingestion_pk: uuid.UUID, ingestion_id: str, states: Sequence[RunState], before: str | None, limit: int
    ) -> list[Run]: ...

    def claim_discovery(self, owner: str, stale_after: timedelta) -> tuple[Run, str | None] | None: ...

    def heartbeat_discovery(self, run_pk: uuid.UUID, owner: str, cursor: str | None) -> bool: ...

    def release_discovery(self, run_pk: uuid.UUID, owner: str) -> None: ...

    def end_discovery(self, run_pk: uuid.UUID, owner: str, error: str | None = None) -> bool: ...

    def finished_running(self, limit: int) -> list[uuid.UUID]: ...

    def finalize_if_done(self, run_pk: uuid.UUID) -> RunState | None: ...

    def cancel(self, run_pk: uuid.UUID) -> bool: ...

    def set_last_run(self, ingestion_pk: uuid.UUID, run_id: str) -> None: ...

    def fail(self, run_pk: uuid.UUID, reason: str) -> bool: ...


class FileRepository(Protocol):
    def upsert_discovered(self, ingestion_pk: uuid.UUID, run_pk: uuid.UUID, files: Sequence[ListedFile]) -> int: ...

    def list_after(
        self,
        ingestion_pk: uuid.UUID,
        ingestion_id: str,
        *,
        states: Collection[FileState],
        run_pk: uuid.UUID | None,
        path_prefix: str,
        modified_after: datetime | None,
        modified_before: datetime | None,
        after_id: int | None,
        limit: int,
    ) -> list[File]: ...

    def get(self, ingestion_pk: uuid.UUID, ingestion_id: str, file_id: int) -> File | None: ...

    def states_of(self, ingestion_pk: uuid.UUID, file_ids: Collection[int]) -> dict[int, FileState]: ...

    def select_for_retry(
        self,
        ingestion_pk: uuid.UUID,
        *,
        file_ids: Collection[int],
        states: Collection[FileState],
        modified_after: datetime | None,
        modified_before: datetime | None,
    ) -> list[int]: ...

    def totals(self, ingestion_pk: uuid.UUID, states: Collection[FileState]) -> tuple[int, int]: ...

    def requeue(self, file_ids: Sequence[int], run_pk: uuid.UUID) -> int: ...

    def attempts(self, file_pk: int) -> list[FileAttempt]: ...


class LeaseRepository(Protocol):
    def touch_agent(self, agent_id: str, tenant: str, hostname: str) -> None: ...

    def claimable_ingestions(self, tenant: str, only: str | None) -> list[tuple[uuid.UUID, str]]: ...

    def quarantine_lease_killers(self, ingestion_pk: uuid.UUID, max_expiries: int) -> set[uuid.UUID]: ...

    def claim(
        self,
        lease_id: uuid.UUID,
        agent_id: str,
        ingestion_pk: uuid.UUID,
        ingestion_id: str,
        *,
        max_files: int,
        max_bytes: int,
        ttl: timedelta,
        max_expiries: int,
    ) -> tuple[Lease, list[LeasedFile]] | None: ...

    def get(self, lease_id: uuid.UUID) -> Lease | None: ...

    def extend(self, lease_id: uuid.UUID, ttl: timedelta) -> datetime | None: ...

    def record_results(
        self, lease_id: uuid.UUID, agent_id: str, results: list[ReportedResult], commit: uuid.UUID | None = None
    ) -> RecordedResults | None: ...

    def recorded_results(self, lease_id: uuid.UUID, attempts: dict[int, int]) -> dict[int, Any]: ...

    def release(self, lease: Lease, file_ids: list[int]) -> list[uuid.UUID]: ...

    def advance_schema_version(self, ingestion_pk: uuid.UUID, version: int) -> None: ...

    def list_agents(self, tenant: str) -> list[Any]: ...


class CommitRepository(Protocol):
    def lock_files(self, file_ids: list[int]) -> dict[int, Any]: ...

    def add(self, intent: CommitIntent) -> None: ...

    def state(self, commit_id: uuid.UUID) -> CommitState | None: ...

    def pending_tables(self, limit: int = 100) -> list[str]: ...

    def own_table(self, table: str, owner: str, stale_after: timedelta) -> bool: ...

    def linger_left(self, table: str, linger: timedelta) -> float: ...

    def pending_for_ingestion(self, ingestion_pk: uuid.UUID) -> bool: ...

    def pending(self, table: str, limit: int) -> list[CommitIntent]: ...

    def leases_pending(self, table: str) -> set[str]: ...

    def named_before(self, lease_id: uuid.UUID, paths: list[str]) -> list[str]: ...

    def unmark_files(self, commit_id: uuid.UUID) -> None: ...

    def settle(self, commit_id: uuid.UUID, state: CommitState, error: str = "") -> bool: ...


class TableStore(Protocol):
    """The catalog, as the committer needs it (adapters/iceberg_tables.py). Tables are opaque here."""

    def describe(self, name: str) -> TableInfo: ...

    def load(self, name: str) -> Any: ...

    def committed(self, table: Any, commit_ids: Collection[str], since_ms: int) -> set[str]: ...

    def commit(
        self,
        name: str,
        batches: Sequence[StagedBatch],
        partition_by: Sequence[tuple[str, str]],
        still_owner: Callable[[], bool],
        table: Any = None,
    ) -> int: ...

    def discard_files(self, paths: Collection[str]) -> None: ...

    def cleanup_orphans(self, name: str, older_than_seconds: float, keep: Collection[str] = ()) -> int: ...

    def drop(self, name: str) -> bool:
        """Drops the table and removes its files; False if it did not exist."""
        ...

    def row_count(self, name: str) -> int:
        """The rows the table's current snapshot holds (0 if there is no table)."""
        ...

    def empty(self, name: str, properties: dict[str, str]) -> None:
        """Deletes every row (a snapshot carrying `properties`); nothing if there is no table or no row."""
        ...


class UnitOfWork(Protocol):
    # Read-only properties, so implementations may hold concrete repository types.
    @property
    def ingestions(self) -> IngestionRepository: ...

    @property
    def runs(self) -> RunRepository: ...

    @property
    def files(self) -> FileRepository: ...

    @property
    def leases(self) -> LeaseRepository: ...

    @property
    def idempotency(self) -> IdempotencyRepository: ...

    @property
    def commits(self) -> CommitRepository: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...
