"""Repositories: translate between ORM rows and domain entities.

They add, query and flush. They never commit or roll back: the service layer
owns the transaction (a test greps this module to keep it so). Driver errors
that mean something to a client are translated here.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controlplane.adapters.orm import FileRow, IdempotencyRow, IngestionRow
from controlplane.domain.errors import AlreadyExists
from controlplane.domain.ingestion import FileCounts, Ingestion, IngestionSpec, IngestionState, RefreshMode
from controlplane.service.ports import IdempotencyRecord

# Unique constraints whose violation is a client's doing, and what to tell it.
_UNIQUE_MESSAGES = {
    "uq_ingestions_tenant_ingestion_id": "an ingestion with this id already exists",
}


@contextmanager
def _translate_integrity_errors() -> Iterator[None]:
    try:
        yield
    except IntegrityError as exc:
        constraint = getattr(getattr(exc.orig, "diag", None), "constraint_name", None)
        if constraint in _UNIQUE_MESSAGES:
            raise AlreadyExists(_UNIQUE_MESSAGES[constraint], metadata={"constraint": constraint}) from exc
        raise


def _to_entity(row: IngestionRow) -> Ingestion:
    return Ingestion(
        id=row.id,
        tenant=row.tenant,
        ingestion_id=row.ingestion_id,
        spec=IngestionSpec.model_validate(row.spec),
        state=IngestionState(row.state),
        state_message=row.state_message,
        schema_version=row.schema_version,
        version=row.version,
        last_run=f"ingestions/{row.ingestion_id}/runs/{row.last_run_id}" if row.last_run_id else "",
        next_run_time=row.next_run_time,
        prefect_deployment_id=row.prefect_deployment_id or "",
        drop_table_on_delete=row.drop_table_on_delete,
        refresh_mode=RefreshMode(row.refresh_mode) if row.refresh_mode else None,
        refresh_run_id=row.refresh_run_id or "",
        create_time=row.create_time,
        update_time=row.update_time,
    )


def _copy_to_row(ingestion: Ingestion, row: IngestionRow) -> None:
    row.spec = ingestion.spec.model_dump(mode="json")
    row.state = ingestion.state.value
    row.state_message = ingestion.state_message
    row.schema_version = ingestion.schema_version
    row.version = ingestion.version
    row.next_run_time = ingestion.next_run_time
    row.prefect_deployment_id = ingestion.prefect_deployment_id or None
    row.drop_table_on_delete = ingestion.drop_table_on_delete
    row.refresh_mode = ingestion.refresh_mode.value if ingestion.refresh_mode else None
    row.refresh_run_id = ingestion.refresh_run_id or None


class SqlIngestionRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, ingestion: Ingestion) -> None:
        row = IngestionRow(id=ingestion.id, tenant=ingestion.tenant, ingestion_id=ingestion.ingestion_id)
        _copy_to_row(ingestion, row)
        self._session.add(row)
        with _translate_integrity_errors():
            self._session.flush()
        ingestion.create_time, ingestion.update_time = row.create_time, row.update_time

    def get(self, tenant: str, ingestion_id: str, *, for_update: bool = False) -> Ingestion | None:
        query = select(IngestionRow).where(IngestionRow.tenant == tenant, IngestionRow.ingestion_id == ingestion_id)
        if for_update:
            query = query.with_for_update()
        row = self._session.scalars(query).one_or_none()
        return _to_entity(row) if row else None

    def get_by_pk(self, pk: uuid.UUID) -> Ingestion | None:
        row = self._session.get(IngestionRow, pk)
        return _to_entity(row) if row else None

    def list_after(
        self, tenant: str, *, states: Collection[IngestionState], after: str | None, limit: int
    ) -> Sequence[Ingestion]:
        query = select(IngestionRow).where(IngestionRow.tenant == tenant)
        if states:
            query = query.where(IngestionRow.state.in_([s.value for s in states]))
        if after is not None:
            query = query.where(IngestionRow.ingestion_id > after)
        rows = self._session.scalars(query.order_by(IngestionRow.ingestion_id).limit(limit))
        return [_to_entity(row) for row in rows]

    def save(self, ingestion: Ingestion) -> Ingestion:
        row = self._session.get_one(IngestionRow, ingestion.id)
        ingestion.version = row.version + 1
        _copy_to_row(ingestion, row)
        self._session.flush()
        ingestion.update_time = row.update_time
        return ingestion

    def delete(self, ingestion: Ingestion) -> None:
        self._session.delete(self._session.get_one(IngestionRow, ingestion.id))
        self._session.flush()

    def writing_to(self, table: str, *, excluding: uuid.UUID) -> list[str]:
        rows = self._session.execute(
            select(IngestionRow.ingestion_id).where(
                IngestionRow.spec["destination"]["table"].astext == table, IngestionRow.id != excluding
            )
        ).scalars()
        return [f"ingestions/{ingestion_id}" for ingestion_id in rows]

    def next_stale(self, state: IngestionState, stale_after: timedelta) -> Ingestion | None:
        row = self._session.scalars(
            select(IngestionRow)
            .where(IngestionRow.state == state.value)
            .where(IngestionRow.update_time < func.now() - stale_after)
            .order_by(IngestionRow.update_time)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        return _to_entity(row) if row is not None else None

    def with_file_counts(self, ingestions: Sequence[Ingestion]) -> list[Ingestion]:
        """The ingestions with their file counts, from one indexed aggregate over file rows."""
        if not ingestions:
            return []
        query = (
            select(FileRow.ingestion_pk, FileRow.state, func.count())
            .where(FileRow.ingestion_pk.in_([i.id for i in ingestions]))
            .group_by(FileRow.ingestion_pk, FileRow.state)
        )
        counts: dict[Any, dict[str, int]] = {}
        for ingestion_pk, state, count in self._session.execute(query):
            counts.setdefault(ingestion_pk, {})[state.lower()] = count
        return [i.model_copy(update={"file_counts": FileCounts(**counts.get(i.id, {}))}) for i in ingestions]


class SqlIdempotencyRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def claim(self, tenant: str, request_id: str, method: str, fingerprint: str) -> IdempotencyRecord | None:
        # INSERT ... ON CONFLICT DO NOTHING blocks on a concurrent uncommitted
        # claim of the same key; once that commits we see its record (READ
        # COMMITTED takes a fresh snapshot per statement), once it rolls back
        # our insert goes through and we do the work.
        inserted = self._session.execute(
            insert(IdempotencyRow)
            .values(tenant=tenant, request_id=request_id, method=method, fingerprint=fingerprint)
            .on_conflict_do_nothing()
            .returning(IdempotencyRow.request_id)
        ).first()
        if inserted is not None:
            return None
        row = self._session.execute(
            select(IdempotencyRow.method, IdempotencyRow.fingerprint, IdempotencyRow.response).where(
                IdempotencyRow.tenant == tenant, IdempotencyRow.request_id == request_id
            )
        ).one()
        return IdempotencyRecord(method=row.method, fingerprint=row.fingerprint, response=row.response)

    def find(self, tenant: str, request_id: str) -> IdempotencyRecord | None:
        """The record of a request, if one was committed (without reserving the id)."""
        row = self._session.execute(
            select(IdempotencyRow.method, IdempotencyRow.fingerprint, IdempotencyRow.response).where(
                IdempotencyRow.tenant == tenant, IdempotencyRow.request_id == request_id
            )
        ).first()
        return IdempotencyRecord(method=row.method, fingerprint=row.fingerprint, response=row.response) if row else None

    def complete(self, tenant: str, request_id: str, response: dict[str, Any]) -> None:
        row = self._session.get_one(IdempotencyRow, (tenant, request_id))
        row.response = response
        self._session.flush()

    def purge(self, older_than: timedelta, limit: int) -> int:
        # Bounded batches keep each delete short; the caller loops.
        expired = (
            select(IdempotencyRow.tenant, IdempotencyRow.request_id)
            .where(IdempotencyRow.create_time < func.now() - older_than)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        result = self._session.execute(
            delete(IdempotencyRow).where(tuple_(IdempotencyRow.tenant, IdempotencyRow.request_id).in_(expired))
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
