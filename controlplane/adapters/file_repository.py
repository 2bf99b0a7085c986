"""Files: discovered in chunks, listed, retried; their attempt history.

Never commits or rolls back (the service owns the transaction).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
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
        "next_attempt_at": func.now(),
        "lease_pk": None,
        "lease_expire_time": None,
        "last_error": "",
        "records": 0,
        "update_time": func.now(),
    }


class SqlFileRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def upsert_discovered(self, ingestion_pk: uuid.UUID, run_pk: uuid.UUID, files: Sequence[ListedFile]) -> int:
        """Records one chunk of a listing; returns how many files were queued in this run.

        New files are inserted PENDING. A file whose size, mtime or etag changed
        goes back to PENDING (its previous result stays in the attempt history
        as SUPERSEDED). A file skipped by a cancelled run is queued again.
        Unchanged files are not touched. Idempotent: replaying a chunk after a
        crash queues nothing twice.
        """
        if not files:
            return 0
        existing = {
            row.path: row
            for row in self._session.execute(
                select(
                    FileRow.id,
                    FileRow.path,
                    FileRow.size_bytes,
                    FileRow.modified_time,
                    FileRow.etag,
                    FileRow.state,
                    FileRow.attempts,
                    FileRow.records,
                    FileRow.run_pk,
                )
                .where(FileRow.ingestion_pk == ingestion_pk, FileRow.path.in_([f.path for f in files]))
                .with_for_update()
            )
        }
        new = [f for f in files if f.path not in existing]
        changed, resumed = [], []
        for listed in files:
            row = existing.get(listed.path)
            if row is None:
                continue
            if (row.size_bytes, row.modified_time, row.etag) != (listed.size_bytes, listed.modified_time, listed.etag):
                changed.append((row, listed))
            elif row.state == FileState.SKIPPED and row.run_pk != run_pk:
                resumed.append(row.id)
        if new:
            self._session.execute(
                pg_insert(FileRow)
                .values(
                    [
                        {
                            "ingestion_pk": ingestion_pk,
                            "run_pk": run_pk,
                            "path": f.path,
                            "size_bytes": f.size_bytes,
                            "modified_time": f.modified_time,
                            "etag": f.etag,
                            "state": FileState.PENDING,
                        }
                        for f in new
                    ]
                )
                .on_conflict_do_nothing(index_elements=["ingestion_pk", "path"])
            )
        if changed:
            self._session.execute(
                insert(FileAttemptRow),
                [
                    {
                        "file_pk": row.id,
                        "attempt": row.attempts,
                        "outcome": "SUPERSEDED",
                        "records": row.records,
                        "error_message": (
                            f"source changed: size {row.size_bytes} -> {listed.size_bytes}, "
                            f"etag {row.etag or '-'} -> {listed.etag or '-'}; was {row.state}"
                        ),
                    }
                    for row, listed in changed
                ],
            )
            for row, listed in changed:
                self._session.execute(
                    update(FileRow)
                    .where(FileRow.id == row.id)
                    .values(
                        size_bytes=listed.size_bytes,
                        modified_time=listed.modified_time,
                        etag=listed.etag,
                        **_requeue_values(run_pk),
                    )
                )
        if resumed:
            self._session.execute(update(FileRow).where(FileRow.id.in_(resumed)).values(**_requeue_values(run_pk)))
        return len(new) + len(changed) + len(resumed)

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
