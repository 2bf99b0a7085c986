"""Files: discovered in chunks, listed, retried; their attempt history.

Never commits or rolls back (the service owns the transaction).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.orm import Session

from controlplane.adapters.orm import FileAttemptRow, FileRow, RunRow
from controlplane.domain.runs import File, FileAttempt, FileState, ListedFile


def _to_file(row: Any, ingestion_id: str, run_id: str | None) -> File:
    return File(
        id=row.id,
        ingestion_id=ingestion_id,
        run_id=run_id or "",
        path=row.path,
        size_bytes=row.size_bytes,
        etag=row.etag,
        modified_time=row.modified_time,
        state=FileState(row.state),
        attempts=row.attempts,
        lease_expiries=row.lease_expiries,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        records=row.records,
        discover_time=row.discover_time,
        update_time=row.update_time,
    )


# Reset of a file queued again: a fresh start in its new run.
def _requeue_values(run_pk: uuid.UUID) -> dict[str, Any]:
    return {
        "run_pk": run_pk,
        "state": FileState.PENDING,
        "attempts": 0,
        "lease_expiries": 0,
        "solo_expiries": 0,
        "next_attempt_at": func.now(),
        "lease_pk": None,
        "lease_expire_time": None,
        "last_error": "",
        "records": 0,
        "update_time": func.now(),
    }


_UPSERT = text(
    """
    WITH listed AS (
        SELECT l.path, l.size_bytes, to_timestamp(l.mtime_us / 1e6) AS modified_time, l.etag
        FROM unnest(CAST(:paths AS text[]), CAST(:sizes AS bigint[]), CAST(:mtimes AS float8[]),
                    CAST(:etags AS text[])) AS l(path, size_bytes, mtime_us, etag)
    ),
    inserted AS (
        INSERT INTO files (ingestion_pk, run_pk, path, size_bytes, modified_time, etag, state)
        SELECT :ingestion, :run, path, size_bytes, modified_time, etag, 'PENDING' FROM listed
        ON CONFLICT (ingestion_pk, path) DO NOTHING
        RETURNING 1
    ),
    -- Sees only rows that existed before this statement: the inserted ones are new by definition.
    changed AS (
        SELECT f.id, f.attempts, f.records, f.state, f.size_bytes, f.etag,
               l.size_bytes AS new_size, l.modified_time AS new_mtime, l.etag AS new_etag,
               (f.size_bytes, f.modified_time, f.etag) IS DISTINCT FROM (l.size_bytes, l.modified_time, l.etag)
                   AS is_changed
        FROM files f JOIN listed l ON f.path = l.path
        WHERE f.ingestion_pk = :ingestion
          -- a file whose data is being committed is seen as changed by the next discovery
          AND f.commit_pk IS NULL
          AND ((f.size_bytes, f.modified_time, f.etag) IS DISTINCT FROM (l.size_bytes, l.modified_time, l.etag)
               OR (f.state = 'SKIPPED' AND f.run_pk IS DISTINCT FROM :run))
        FOR UPDATE OF f
    )
    -- One row even when nothing changed; the insert count rides on every row.
    SELECT (SELECT count(*) FROM inserted) AS inserted, c.*
    FROM (SELECT 1) AS one LEFT JOIN changed c ON true
    """
)
_REQUEUE_CHANGED = text(
    """
    UPDATE files f
    SET size_bytes = c.size_bytes, modified_time = c.modified_time, etag = c.etag,
        run_pk = :run, state = 'PENDING', attempts = 0, lease_expiries = 0, solo_expiries = 0, next_attempt_at = now(),
        lease_pk = NULL, lease_expire_time = NULL, last_error = '', records = 0, update_time = now()
    FROM unnest(CAST(:ids AS bigint[]), CAST(:sizes AS bigint[]), CAST(:mtimes AS timestamptz[]),
                CAST(:etags AS text[])) AS c(id, size_bytes, modified_time, etag)
    WHERE f.id = c.id
    """
)


def _epoch_us(value: datetime | None) -> float | None:
    if value is None:
        return None
    return float((value - _EPOCH) // timedelta(microseconds=1))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SqlFileRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def upsert_discovered(self, ingestion_pk: uuid.UUID, run_pk: uuid.UUID, files: Sequence[ListedFile]) -> int:
        """Records one chunk of a listing; returns how many files were queued in this run.

        New files are inserted PENDING. A file whose size, mtime or etag changed
        goes back to PENDING (its previous result stays in the attempt history
        as SUPERSEDED). A file skipped by an earlier cancelled run is queued
        again. Unchanged files are not touched. Idempotent: replaying a chunk
        after a crash queues nothing twice.

        Two statements whatever the chunk size, with the chunk passed as arrays:
        no per-row SQL to build, parse or plan.
        """
        if not files:
            return 0
        arrays = {
            "ingestion": ingestion_pk,
            "run": run_pk,
            "paths": [f.path for f in files],
            "sizes": [f.size_bytes for f in files],
            # Microseconds as float8: exact (below 2**53) and far cheaper to send than timestamps.
            "mtimes": [_epoch_us(f.modified_time) for f in files],
            "etags": [f.etag for f in files],
        }
        # A discovery chunk commits together with its resume cursor, so losing the
        # last few chunks in a database crash only means listing them again: no
        # need to wait for the WAL flush on every chunk.
        self._session.execute(text("SET LOCAL synchronous_commit TO OFF"))
        rows = self._session.execute(_UPSERT, arrays).all()
        inserted = int(rows[0].inserted)
        changed = [row for row in rows if row.id is not None]
        if not changed:
            return inserted
        superseded = [
            {
                "file_pk": row.id,
                "attempt": row.attempts,
                "outcome": "SUPERSEDED",
                "records": row.records,
                "error_message": (
                    f"source changed: size {row.size_bytes} -> {row.new_size}, "
                    f"etag {row.etag or '-'} -> {row.new_etag or '-'}; was {row.state}"
                ),
            }
            for row in changed
            if row.is_changed
        ]
        if superseded:
            self._session.execute(insert(FileAttemptRow), superseded)
        self._session.execute(
            _REQUEUE_CHANGED,
            {
                "run": run_pk,
                "ids": [row.id for row in changed],
                "sizes": [row.new_size for row in changed],
                "mtimes": [row.new_mtime for row in changed],
                "etags": [row.new_etag for row in changed],
            },
        )
        return inserted + len(changed)

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
    ) -> list[File]:
        query = (
            select(FileRow, RunRow.run_id)
            .outerjoin(RunRow, RunRow.id == FileRow.run_pk)
            .where(FileRow.ingestion_pk == ingestion_pk)
        )
        if states:
            query = query.where(FileRow.state.in_([s.value for s in states]))
        if run_pk is not None:
            query = query.where(FileRow.run_pk == run_pk)
        if path_prefix:
            # "C" collation: a prefix is a byte range, served by the (ingestion_pk, path) index.
            query = query.where(FileRow.path >= path_prefix, FileRow.path < path_prefix + "\U0010ffff")
        if modified_after is not None:
            query = query.where(FileRow.modified_time >= modified_after)
        if modified_before is not None:
            query = query.where(FileRow.modified_time < modified_before)
        if after_id is not None:
            query = query.where(FileRow.id > after_id)
        rows = self._session.execute(query.order_by(FileRow.id).limit(limit)).all()
        return [_to_file(row, ingestion_id, run_id) for row, run_id in rows]

    def get(self, ingestion_pk: uuid.UUID, ingestion_id: str, file_id: int) -> File | None:
        found = self._session.execute(
            select(FileRow, RunRow.run_id)
            .outerjoin(RunRow, RunRow.id == FileRow.run_pk)
            .where(FileRow.ingestion_pk == ingestion_pk, FileRow.id == file_id)
        ).first()
        return _to_file(found[0], ingestion_id, found[1]) if found else None

    def states_of(self, ingestion_pk: uuid.UUID, file_ids: Collection[int]) -> dict[int, FileState]:
        rows = self._session.execute(
            select(FileRow.id, FileRow.state).where(
                FileRow.ingestion_pk == ingestion_pk, FileRow.id.in_(list(file_ids))
            )
        )
        return {file_id: FileState(state) for file_id, state in rows}

    def select_for_retry(
        self,
        ingestion_pk: uuid.UUID,
        *,
        file_ids: Collection[int],
        states: Collection[FileState],
        modified_after: datetime | None,
        modified_before: datetime | None,
    ) -> list[int]:
        """Ids of the matching files in `states`, locked until the transaction ends."""
        query = select(FileRow.id).where(
            FileRow.ingestion_pk == ingestion_pk, FileRow.state.in_([s.value for s in states])
        )
        if file_ids:
            query = query.where(FileRow.id.in_(list(file_ids)))
        if modified_after is not None:
            query = query.where(FileRow.modified_time >= modified_after)
        if modified_before is not None:
            query = query.where(FileRow.modified_time < modified_before)
        return list(self._session.scalars(query.order_by(FileRow.id).with_for_update()))

    def totals(self, ingestion_pk: uuid.UUID, states: Collection[FileState]) -> tuple[int, int]:
        """How many of the ingestion's files are in `states`, and their bytes."""
        row = self._session.execute(
            select(func.count(), func.coalesce(func.sum(FileRow.size_bytes), 0)).where(
                FileRow.ingestion_pk == ingestion_pk, FileRow.state.in_([s.value for s in states])
            )
        ).one()
        return int(row[0]), int(row[1])

    def requeue(self, file_ids: Sequence[int], run_pk: uuid.UUID) -> int:
        """Puts the files back to PENDING in run_pk with a fresh attempt budget."""
        if not file_ids:
            return 0
        result = self._session.execute(
            update(FileRow).where(FileRow.id.in_(list(file_ids))).values(**_requeue_values(run_pk))
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def attempts(self, file_pk: int) -> list[FileAttempt]:
        rows = self._session.scalars(
            select(FileAttemptRow).where(FileAttemptRow.file_pk == file_pk).order_by(FileAttemptRow.id)
        ).all()
        return [
            FileAttempt(
                attempt=r.attempt,
                agent_id=r.agent_id or "",
                lease_id=r.lease_pk,
                outcome=r.outcome,
                start_time=r.start_time,
                end_time=r.end_time,
                records=r.records,
                error_type=r.error_type,
                error_message=r.error_message,
                retryable=r.retryable,
            )
            for r in rows
        ]
