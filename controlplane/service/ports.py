"""What the service layer needs from persistence, as protocols.

The SQLAlchemy adapters implement these; unit tests use in-memory fakes.
Repositories add, query and flush. Only the service layer commits.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Protocol, Self

from controlplane.domain.ingestion import Ingestion, IngestionState


@dataclass(frozen=True)
class IdempotencyRecord:
    method: str
    fingerprint: str
    response: dict[str, Any] | None


class IngestionRepository(Protocol):
    def add(self, ingestion: Ingestion) -> None: ...

    def get(self, tenant: str, ingestion_id: str, *, for_update: bool = False) -> Ingestion | None: ...

    def list_after(
        self, tenant: str, *, states: Collection[IngestionState], after: str | None, limit: int
    ) -> Sequence[Ingestion]: ...

    def save(self, ingestion: Ingestion) -> Ingestion: ...

    def delete(self, ingestion: Ingestion) -> None: ...

    def with_file_counts(self, ingestions: Sequence[Ingestion]) -> list[Ingestion]: ...


class IdempotencyRepository(Protocol):
    def claim(self, tenant: str, request_id: str, method: str, fingerprint: str) -> IdempotencyRecord | None:
        """Reserves request_id for this transaction; returns the earlier record if there is one.

        A concurrent claim of the same id waits until the first transaction ends.
        """
        ...

    def complete(self, tenant: str, request_id: str, response: dict[str, Any]) -> None: ...

    def purge(self, older_than: timedelta, limit: int) -> int:
        """Deletes up to `limit` records older than `older_than`; returns how many."""
        ...


class UnitOfWork(Protocol):
    # Read-only properties, so implementations may hold concrete repository types.
    @property
    def ingestions(self) -> IngestionRepository: ...

    @property
    def idempotency(self) -> IdempotencyRepository: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...
