"""Runs: creation, claims of discovery work, counts derived from file rows, finalization.

Never commits or rolls back (the service owns the transaction).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controlplane.adapters.orm import FileRow, IngestionRow, RunRow
from controlplane.domain.runs import (
    OPEN_FILE_STATES,
    FileError,
    FileState,
    Run,
    RunCounts,
    RunInProgress,
    RunState,
    Trigger,
    final_state,
)

FIRST_ERRORS = 5


def _to_run(row: RunRow, ingestion_id: str) -> Run:
    return Run(
        id=row.id,
        ingestion_pk=row.ingestion_pk,
        ingestion_id=ingestion_id,
        run_id=row.run_id,
        state=RunState(row.state),
        trigger=Trigger(row.trigger),
        error=row.error,
        create_time=row.create_time,
        discovery_end_time=row.discovery_end_time,
        end_time=row.end_time,
    )


class SqlRunRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, run: Run) -> Run:
        row = RunRow(
            id=run.id,
            ingestion_pk=run.ingestion_pk,
            run_id=run.run_id,
            state=run.state.value,
            trigger=run.trigger.value,
            discovery_end_time=run.discovery_end_time,
        )
        self._session.add(row)
        try:
            self._session.flush()
        except IntegrityError as exc:
            constraint = getattr(getattr(exc.orig, "diag", None), "constraint_name", None)
            if constraint == "uq_runs_one_active_per_ingestion":
                raise RunInProgress(f"ingestions/{run.ingestion_id} already has an active run") from exc
            raise
        return run.model_copy(update={"create_time": row.create_time})

    def get(self, ingestion_pk: uuid.UUID, ingestion_id: str, run_id: str, *, for_update: bool = False) -> Run | None:
        query = select(RunRow).where(RunRow.ingestion_pk == ingestion_pk, RunRow.run_id == run_id)
        if for_update:
            query = query.with_for_update()
        row = self._session.scalars(query).one_or_none()
        return self._with_counts(row, ingestion_id) if row else None

    def active(self, ingestion_pk: uuid.UUID, ingestion_id: str, *, for_update: bool = False) -> Run | None:
        query = select(RunRow).where(
            RunRow.ingestion_pk == ingestion_pk, RunRow.state.in_([RunState.DISCOVERING, RunState.RUNNING])
        )
        if for_update:
            query = query.with_for_update()
        row = self._session.scalars(query).one_or_none()
        return _to_run(row, ingestion_id) if row else None

    def list_before(
        self, ingestion_pk: uuid.UUID, ingestion_id: str, states: Sequence[RunState], before: str | None, limit: int
    ) -> list[Run]:
        query = select(RunRow).where(RunRow.ingestion_pk == ingestion_pk)
        if states:
            query = query.where(RunRow.state.in_([s.value for s in states]))
        if before is not None:
            query = query.where(RunRow.run_id < before)
        rows = self._session.scalars(query.order_by(RunRow.run_id.desc()).limit(limit)).all()
        return [self._with_counts(row, ingestion_id) for row in rows]

    def counts(self, run_pk: uuid.UUID) -> RunCounts:
        """Counts by state from the file rows (index files(run_pk, state))."""
        rows = self._session.execute(
            select(
                FileRow.state,
                func.count(),
                func.coalesce(func.sum(FileRow.records), 0),
                func.coalesce(func.sum(FileRow.size_bytes), 0),
            )
            .where(FileRow.run_pk == run_pk)
            .group_by(FileRow.state)
        ).all()
        values: dict[str, int] = {"records": 0, "bytes": 0}
        for state, count, records, size in rows:
            values[state.lower()] = int(count)
            if state == FileState.SUCCEEDED:
                values["records"], values["bytes"] = int(records), int(size)
        return RunCounts(**values)

    def _with_counts(self, row: RunRow, ingestion_id: str) -> Run:
        """An ended run shows the snapshot taken when it ended (its files may since
        have moved to newer runs); an active one is counted now."""
        run = _to_run(row, ingestion_id)
        if row.final_counts is not None:
            snapshot = dict(row.final_counts)
            errors = snapshot.pop("first_errors", [])
            return run.model_copy(
                update={"counts": RunCounts(**snapshot), "first_errors": tuple(FileError(**e) for e in errors)}
            )
        return run.model_copy(update={"counts": self.counts(run.id), "first_errors": self._first_errors(run.id)})

    def _first_errors(self, run_pk: uuid.UUID) -> tuple[FileError, ...]:
        errors = self._session.execute(
            select(FileRow.id, FileRow.path, FileRow.last_error)
            .where(FileRow.run_pk == run_pk, FileRow.last_error != "")
            .order_by(FileRow.update_time, FileRow.id)
            .limit(FIRST_ERRORS)
        ).all()
        return tuple(FileError(file_id=i, path=p, error=e) for i, p, e in errors)

    def _snapshot(self, run_pk: uuid.UUID, counts: RunCounts | None = None) -> dict[str, Any]:
        snapshot: dict[str, Any] = (counts or self.counts(run_pk)).model_dump()
        snapshot["first_errors"] = [e.model_dump() for e in self._first_errors(run_pk)]
        return snapshot

    # Discovery work, claimed by any replica.

    def claim_discovery(self, owner: str, stale_after: timedelta) -> tuple[Run, str | None] | None:
        """Takes the oldest DISCOVERING run nobody is working on (or whose worker went quiet)."""
        candidate = (
            select(RunRow.id)
            .where(
                RunRow.state == RunState.DISCOVERING,
                or_(
                    RunRow.discovery_owner.is_(None),
                    RunRow.discovery_heartbeat_time < func.now() - stale_after,
                ),
            )
            .order_by(RunRow.create_time)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        row = self._session.execute(
            update(RunRow)
            .where(RunRow.id == candidate)
            .values(discovery_owner=owner, discovery_heartbeat_time=func.now())
            .returning(RunRow)
        ).scalar_one_or_none()
        if row is None:
            return None
        ingestion_id = self._session.execute(
            select(IngestionRow.ingestion_id).where(IngestionRow.id == row.ingestion_pk)
        ).scalar_one()
        return _to_run(row, ingestion_id), row.discovery_cursor

    def heartbeat_discovery(self, run_pk: uuid.UUID, owner: str, cursor: str | None) -> bool:
        """Records progress; False if the run was cancelled or another replica took it over."""
        values: dict[str, Any] = {"discovery_heartbeat_time": func.now()}
        if cursor is not None:
            values["discovery_cursor"] = cursor
        done = self._session.execute(
            update(RunRow)
            .where(RunRow.id == run_pk, RunRow.discovery_owner == owner, RunRow.state == RunState.DISCOVERING)
            .values(**values)
            .returning(RunRow.id)
        ).first()
        return done is not None

    def release_discovery(self, run_pk: uuid.UUID, owner: str) -> None:
        self._session.execute(
            update(RunRow)
            .where(RunRow.id == run_pk, RunRow.discovery_owner == owner)
            .values(discovery_owner=None, discovery_heartbeat_time=None)
        )

    def end_discovery(self, run_pk: uuid.UUID, owner: str, error: str | None = None) -> bool:
        done = self._session.execute(
            update(RunRow)
            .where(RunRow.id == run_pk, RunRow.discovery_owner == owner, RunRow.state == RunState.DISCOVERING)
            .values(
                state=RunState.FAILED if error else RunState.RUNNING,
                error=error or "",
                discovery_end_time=func.now(),
                end_time=func.now() if error else None,
            )
            .returning(RunRow.id)
        ).first()
        if done is not None and error:
            # Files found before the failure are not processed in a failed run.
            self._skip_open_files(run_pk)
            self._freeze_counts(run_pk)
        return done is not None

    def _skip_open_files(self, run_pk: uuid.UUID) -> None:
        self._session.execute(
            update(FileRow)
            .where(
                FileRow.run_pk == run_pk,
                FileRow.state.in_([s.value for s in OPEN_FILE_STATES]),
                # A file whose data is being committed is settled by its committer, cancelled or not.
                FileRow.commit_pk.is_(None),
            )
            .values(state=FileState.SKIPPED, lease_pk=None, lease_expire_time=None)
        )

    def _freeze_counts(self, run_pk: uuid.UUID) -> None:
        self._session.execute(update(RunRow).where(RunRow.id == run_pk).values(final_counts=self._snapshot(run_pk)))

    def finished_running(self, limit: int) -> list[uuid.UUID]:
        """RUNNING runs with no open file left: ones whose last report did not end them."""
        open_file = select(FileRow.id).where(
            FileRow.run_pk == RunRow.id, FileRow.state.in_([s.value for s in OPEN_FILE_STATES])
        )
        return list(
            self._session.execute(
                select(RunRow.id).where(RunRow.state == RunState.RUNNING, ~open_file.exists()).limit(limit)
            ).scalars()
        )

    def finalize_if_done(self, run_pk: uuid.UUID) -> RunState | None:
        """Ends a RUNNING run that has no open file left; exactly one caller wins.

        Callers that just closed a file call this after committing, in a new
        transaction, so that of two concurrent last reports the later one sees
        both. The run row is locked before counting, so a concurrent retry that
        adds files to the run serializes with us; the update is conditional.
        """
        # Cheap first: while any file is open (the common case) neither lock nor count.
        if self._session.execute(
            select(FileRow.id)
            .where(FileRow.run_pk == run_pk, FileRow.state.in_([s.value for s in OPEN_FILE_STATES]))
            .limit(1)
        ).first():
            return None
        locked = self._session.execute(
            select(RunRow.id).where(RunRow.id == run_pk, RunRow.state == RunState.RUNNING).with_for_update()
        ).first()
        if locked is None:
            return None
        counts = self.counts(run_pk)
        if counts.open:
            return None
        state = final_state(counts)
        self._session.execute(
            update(RunRow)
            .where(RunRow.id == run_pk, RunRow.state == RunState.RUNNING)
            .values(state=state, end_time=func.now(), final_counts=self._snapshot(run_pk, counts))
        )
        return state

    def cancel(self, run_pk: uuid.UUID) -> bool:
        """Cancels an active run: its open files become SKIPPED (a late report is fenced)."""
        done = self._session.execute(
            update(RunRow)
            .where(RunRow.id == run_pk, RunRow.state.in_([RunState.DISCOVERING, RunState.RUNNING]))
            .values(state=RunState.CANCELLED, end_time=func.now())
            .returning(RunRow.id)
        ).first()
        if done is None:
            return False
        self._skip_open_files(run_pk)
        self._freeze_counts(run_pk)
        return True

    def fail(self, run_pk: uuid.UUID, reason: str) -> bool:
        """Ends an active run as FAILED (error policy FAIL_RUN); its open files are skipped."""
        done = self._session.execute(
            update(RunRow)
            .where(RunRow.id == run_pk, RunRow.state.in_([RunState.DISCOVERING, RunState.RUNNING]))
            .values(state=RunState.FAILED, error=reason, end_time=func.now())
            .returning(RunRow.id)
        ).first()
        if done is None:
            return False
        self._skip_open_files(run_pk)
        self._freeze_counts(run_pk)
        return True

    def set_last_run(self, ingestion_pk: uuid.UUID, run_id: str) -> None:
        self._session.execute(update(IngestionRow).where(IngestionRow.id == ingestion_pk).values(last_run_id=run_id))
