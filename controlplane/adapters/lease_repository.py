"""Leases: batch claims with FOR UPDATE SKIP LOCKED, extensions, fenced results, releases.

Never commits or rolls back (the service owns the transaction). Every write
by a lease holder is fenced on (lease, attempt, state LEASED): a holder whose
lease expired and was taken over changes nothing.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from controlplane.adapters.orm import AgentRow, FileAttemptRow, FileRow, LeaseRow
from controlplane.domain.leases import Lease, LeasedFile, RecordedResults, ReportedResult
from controlplane.domain.runs import FileState

_CLAIMABLE = """
    (f.state = 'PENDING'
     OR (f.state = 'FAILED' AND f.next_attempt_at <= now())
     -- a file whose data is being committed (commit_pk) belongs to its committer
     OR (f.state = 'LEASED' AND f.lease_expire_time < now() AND f.commit_pk IS NULL))
"""
_ACTIVE_RUN = "JOIN runs r ON r.id = f.run_pk AND r.state IN ('DISCOVERING', 'RUNNING')"

# Ingestions with claimable work, the least busy first (fair across ingestions), ties at random.
_PICK_INGESTIONS = text(
    f"""
    SELECT i.id, i.ingestion_id FROM ingestions i
    WHERE i.tenant = :tenant AND i.state = 'ACTIVE'
      AND (CAST(:only AS text) IS NULL OR i.ingestion_id = :only)
      AND EXISTS (SELECT 1 FROM files f {_ACTIVE_RUN} WHERE f.ingestion_pk = i.id AND {_CLAIMABLE})
    -- live leases only: files under dead leases are work to hand out, not load
    ORDER BY (SELECT count(*) FROM files f
              WHERE f.ingestion_pk = i.id AND f.state = 'LEASED' AND f.lease_expire_time > now()),
             random()
    LIMIT 3
    """
)

# One statement: lock up to :max_files claimable files oldest-first (skipping rows another
# claimer holds), keep as many as fit in :max_bytes (at least one), lease them.
#
# Crashes are isolated as failures are: a file whose lease expired (its agent died) is leased
# again in a batch half as large per expiry (at most :max_files >> expiries), so a file that kills
# agents ends up leased alone; only expiries while alone (solo_expiries) count toward quarantine.
_CLAIM = text(
    f"""
    WITH picked AS MATERIALIZED (
        SELECT f.id, f.size_bytes, f.state AS old_state, f.lease_pk AS old_lease,
               f.next_attempt_at, f.lease_expiries, f.solo_expiries,
               f.state = 'LEASED' AS expired,
               f.state = 'LEASED' AND (SELECT l.file_count FROM leases l WHERE l.id = f.lease_pk) = 1 AS was_alone
        FROM files f {_ACTIVE_RUN}
        WHERE f.ingestion_pk = :ingestion AND {_CLAIMABLE}
        ORDER BY f.next_attempt_at, f.id
        LIMIT :max_files
        FOR UPDATE OF f SKIP LOCKED
    ),
    sized AS (
        SELECT *, sum(size_bytes) OVER w - size_bytes AS bytes_before, row_number() OVER w AS position,
               -- the smallest batch any file so far allows
               min(greatest(1, CAST(:max_files AS integer)
                               >> least(lease_expiries + CASE WHEN expired THEN 1 ELSE 0 END, 30))) OVER w AS cap
        FROM picked
        WINDOW w AS (ORDER BY next_attempt_at, id ROWS UNBOUNDED PRECEDING)
    ),
    chosen AS (
        SELECT * FROM sized
        WHERE (bytes_before + size_bytes <= :max_bytes OR bytes_before = 0)  -- a larger file goes alone
          AND position <= cap
          -- a file that keeps killing agents when leased alone is quarantined below, not leased again
          AND NOT (was_alone AND solo_expiries + 1 >= :max_expiries)
    )
    UPDATE files f SET
        state = 'LEASED', lease_pk = :lease, lease_expire_time = now() + :ttl, update_time = now(),
        -- an expired lease is a crash, not the file's fault: it costs no attempt
        attempts = CASE WHEN c.expired THEN f.attempts ELSE f.attempts + 1 END,
        lease_expiries = CASE WHEN c.expired THEN f.lease_expiries + 1 ELSE f.lease_expiries END,
        solo_expiries = CASE WHEN c.was_alone THEN f.solo_expiries + 1 ELSE f.solo_expiries END
    FROM chosen c
    WHERE f.id = c.id
    RETURNING f.id, f.path, f.size_bytes, f.etag, f.modified_time, f.attempts, f.run_pk,
              c.old_state, c.old_lease
    """
)

# Files that killed their agents while leased alone too often: quarantined, with the expiry recorded.
_QUARANTINE_KILLERS = text(
    """
    UPDATE files f SET state = 'QUARANTINED', lease_expiries = f.lease_expiries + 1,
        solo_expiries = f.solo_expiries + 1,
        last_error = 'lease expired ' || (f.solo_expiries + 1)
                     || ' times while leased alone: the file may crash its agents',
        lease_pk = NULL, lease_expire_time = NULL, update_time = now()
    FROM leases l
    WHERE f.ingestion_pk = :ingestion AND f.state = 'LEASED' AND f.lease_expire_time < now()
      AND f.commit_pk IS NULL AND l.id = f.lease_pk AND l.file_count = 1
      AND f.solo_expiries + 1 >= :max_expiries
    RETURNING f.id, f.attempts, f.run_pk, f.lease_pk
    """
)


# Fenced results of one lease: a file changes only while this lease holds it LEASED with the
# reported attempt, and only if the lease is the reporting agent's. Every change appends its
# attempt row. Answers one row per recorded file, or one row with a NULL file_id if none was
# (so an unknown lease, which answers no row, is told apart from a lost one).
_RECORD_RESULTS = text(
    """
    WITH l AS (
        SELECT l.id, l.agent_id, l.ingestion_pk, l.create_time, i.ingestion_id
        FROM leases l JOIN ingestions i ON i.id = l.ingestion_pk WHERE l.id = :lease
    ),
    r AS (
        SELECT * FROM unnest(
            CAST(:file_ids AS bigint[]), CAST(:attempts AS integer[]), CAST(:states AS text[]),
            CAST(:records AS bigint[]), CAST(:sizes AS bigint[]), CAST(:error_types AS text[]),
            CAST(:error_messages AS text[]), CAST(:retryables AS boolean[]), CAST(:next_ats AS timestamptz[])
        ) AS r(file_id, attempt, state, records, size, error_type, error_message, retryable, next_at)
    ),
    u AS (
        UPDATE files f SET
            state = r.state, lease_pk = NULL, lease_expire_time = NULL, commit_pk = NULL, update_time = now(),
            last_error = CASE WHEN r.error_message <> '' THEN r.error_type || ': ' || r.error_message ELSE '' END,
            records = CASE WHEN r.state = 'SUCCEEDED' THEN r.records ELSE f.records END,
            next_attempt_at = COALESCE(r.next_at, f.next_attempt_at)
        FROM r, l
        WHERE f.id = r.file_id AND f.lease_pk = l.id AND l.agent_id = :agent
          AND f.attempts = r.attempt AND f.state = 'LEASED'
          -- results of files in a commit come from its committer (:commit), never from an agent
          AND f.commit_pk IS NOT DISTINCT FROM CAST(:commit AS uuid)
        RETURNING f.id, f.run_pk,
            -- in the statement's snapshot: is any file of the run still open, besides this call's files?
            EXISTS (SELECT 1 FROM files o WHERE o.run_pk = f.run_pk AND o.state IN ('PENDING', 'LEASED', 'FAILED')
                    AND o.id <> ALL(CAST(:file_ids AS bigint[]))) AS run_open
    ),
    a AS (
        INSERT INTO file_attempts (file_pk, attempt, agent_id, lease_pk, outcome, start_time, records, bytes,
                                   error_type, error_message, retryable)
        SELECT u.id, r.attempt, l.agent_id, l.id,
               CASE WHEN r.state = 'SUCCEEDED' THEN 'SUCCEEDED' ELSE 'FAILED' END,
               l.create_time, r.records, r.size, r.error_type, r.error_message, r.retryable
        FROM u JOIN r ON r.file_id = u.id CROSS JOIN l
        RETURNING file_pk
    )
    SELECT l.agent_id, l.ingestion_pk, l.ingestion_id, u.id AS file_id, u.run_pk, u.run_open
    FROM l LEFT JOIN u ON true
    """
)


class SqlLeaseRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def touch_agent(self, agent_id: str, tenant: str, hostname: str) -> None:
        self._session.execute(
            pg_insert(AgentRow)
            .values(id=agent_id, tenant=tenant, hostname=hostname)
            .on_conflict_do_update(index_elements=["id"], set_={"last_seen_time": func.now()})
        )

    def claimable_ingestions(self, tenant: str, only: str | None) -> list[tuple[uuid.UUID, str]]:
        rows = self._session.execute(_PICK_INGESTIONS, {"tenant": tenant, "only": only}).all()
        return [(row.id, row.ingestion_id) for row in rows]

    def quarantine_lease_killers(self, ingestion_pk: uuid.UUID, max_expiries: int) -> set[uuid.UUID]:
        """Returns the runs whose files were quarantined (they may be done now)."""
        rows = self._session.execute(
            _QUARANTINE_KILLERS, {"ingestion": ingestion_pk, "max_expiries": max_expiries}
        ).all()
        if rows:
            self._session.execute(
                insert(FileAttemptRow),
                [
                    {
                        "file_pk": r.id,
                        "attempt": r.attempts,
                        "outcome": "LEASE_EXPIRED",
                        "error_type": "LeaseExpired",
                        "error_message": "lease expired; quarantined after repeated expiries",
                    }
                    for r in rows
                ],
            )
        return {r.run_pk for r in rows if r.run_pk is not None}

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
    ) -> tuple[Lease, list[LeasedFile]] | None:
        rows = self._session.execute(
            _CLAIM,
            {
                "ingestion": ingestion_pk, "lease": lease_id, "max_files": max_files, "max_bytes": max_bytes,
                "ttl": ttl, "max_expiries": max_expiries,
            },
        ).all()  # fmt: skip
        if not rows:
            return None
        expired = [r for r in rows if r.old_state == FileState.LEASED]
        if expired:
            self._record_expiries([(r.id, r.attempts, r.old_lease) for r in expired])
        row = self._session.execute(
            insert(LeaseRow)
            .values(
                id=lease_id, agent_id=agent_id, ingestion_pk=ingestion_pk, state="ACTIVE",
                expire_time=func.now() + ttl, file_count=len(rows),
            )
            .returning(LeaseRow.expire_time, LeaseRow.create_time)
        ).one()  # fmt: skip
        run_ids: dict[uuid.UUID, str] = dict(
            self._session.execute(
                text("SELECT id, run_id FROM runs WHERE id = ANY(:ids)"), {"ids": list({r.run_pk for r in rows})}
            ).all()
        )
        files = [
            LeasedFile(
                id=r.id, ingestion_id=ingestion_id, run_id=run_ids[r.run_pk], path=r.path, size_bytes=r.size_bytes,
                etag=r.etag, modified_time=r.modified_time, attempt=r.attempts,
            )
            for r in sorted(rows, key=lambda r: r.id)
        ]  # fmt: skip
        return Lease(lease_id, agent_id, ingestion_pk, row.expire_time, ttl, row.create_time), files

    def _record_expiries(self, expired: list[tuple[int, int, uuid.UUID | None]]) -> None:
        agents = dict(
            self._session.execute(
                select(LeaseRow.id, LeaseRow.agent_id).where(LeaseRow.id.in_([lease for _, _, lease in expired]))
            ).all()
        )
        self._session.execute(
            insert(FileAttemptRow),
            [
                {
                    "file_pk": file_id,
                    "attempt": attempt,
                    "agent_id": agents.get(lease) if lease else None,
                    "lease_pk": lease,
                    "outcome": "LEASE_EXPIRED",
                    "error_type": "LeaseExpired",
                    "error_message": "lease expired",
                }
                for file_id, attempt, lease in expired
            ],
        )

    def get(self, lease_id: uuid.UUID) -> Lease | None:
        row = self._session.get(LeaseRow, lease_id)
        if row is None:
            return None
        return Lease(row.id, row.agent_id, row.ingestion_pk, row.expire_time, row.expire_time - row.create_time,
                     row.create_time)  # fmt: skip

    def extend(self, lease_id: uuid.UUID, ttl: timedelta) -> datetime | None:
        """New expiry for the files still held; None if any file of the lease was taken over."""
        taken = self._session.execute(
            select(func.count())
            .select_from(FileAttemptRow)
            .where(FileAttemptRow.lease_pk == lease_id, FileAttemptRow.outcome == "LEASE_EXPIRED")
        ).scalar_one()
        if taken:
            return None
        self._session.execute(
            update(FileRow)
            .where(FileRow.lease_pk == lease_id, FileRow.state == FileState.LEASED)
            .values(lease_expire_time=func.now() + ttl)
        )
        return self._session.execute(
            update(LeaseRow)
            .where(LeaseRow.id == lease_id)
            .values(expire_time=func.now() + ttl)
            .returning(LeaseRow.expire_time)
        ).scalar_one()

    def record_results(
        self, lease_id: uuid.UUID, agent_id: str, results: list[ReportedResult], commit: uuid.UUID | None = None
    ) -> RecordedResults | None:
        """The fenced updates and their attempt rows, in one statement.

        Each result only changes its file while the file is LEASED by this lease with
        the reported attempt (and the lease is the agent's). None if the lease does
        not exist.
        """
        rows = self._session.execute(
            _RECORD_RESULTS,
            {
                "lease": lease_id, "agent": agent_id, "commit": commit,
                "file_ids": [r.file_id for r in results], "attempts": [r.attempt for r in results],
                "states": [r.state.value for r in results], "records": [r.records for r in results],
                "sizes": [r.size for r in results], "error_types": [r.error_type for r in results],
                "error_messages": [r.error_message for r in results], "retryables": [r.retryable for r in results],
                "next_ats": [r.next_attempt_at for r in results],
            },
        ).all()  # fmt: skip
        if not rows:
            return None
        return RecordedResults(
            agent_id=rows[0].agent_id,
            ingestion_pk=rows[0].ingestion_pk,
            ingestion_id=rows[0].ingestion_id,
            runs={r.file_id: r.run_pk for r in rows if r.file_id is not None},
            runs_with_others_open={r.run_pk for r in rows if r.run_open},
        )

    def recorded_results(self, lease_id: uuid.UUID, attempts: dict[int, int]) -> dict[int, Any]:
        """The results this lease already recorded for these files (file -> attempt), by file.

        Each row has the attempt's outcome and retryable flag, and the file's retry
        time while the file still waits on that failed attempt (else None).
        """
        rows = self._session.execute(
            select(
                FileAttemptRow.file_pk, FileAttemptRow.attempt, FileAttemptRow.outcome, FileAttemptRow.retryable,
                FileAttemptRow.error_type,
                case(
                    (and_(FileRow.state == FileState.FAILED, FileRow.attempts == FileAttemptRow.attempt),
                     FileRow.next_attempt_at),
                    else_=None,
                ).label("next_attempt_at"),
            )
            .join(FileRow, FileRow.id == FileAttemptRow.file_pk)
            .where(
                FileAttemptRow.lease_pk == lease_id,
                FileAttemptRow.file_pk.in_(list(attempts)),
                FileAttemptRow.outcome.in_(["SUCCEEDED", "FAILED"]),
            )
        ).all()  # fmt: skip
        return {row.file_pk: row for row in rows if attempts.get(row.file_pk) == row.attempt}

    def release(self, lease: Lease, file_ids: list[int]) -> list[uuid.UUID]:
        """Unreported files back to PENDING, their attempt refunded; returns their runs."""
        query = update(FileRow).where(
            FileRow.lease_pk == lease.id, FileRow.state == FileState.LEASED, FileRow.commit_pk.is_(None)
        )
        if file_ids:
            query = query.where(FileRow.id.in_(file_ids))
        rows = self._session.execute(
            query.values(
                state=FileState.PENDING, lease_pk=None, lease_expire_time=None, attempts=FileRow.attempts - 1,
                update_time=func.now(),
            ).returning(FileRow.id, FileRow.attempts, FileRow.run_pk)
        ).all()  # fmt: skip
        if rows:
            self._session.execute(
                insert(FileAttemptRow),
                [
                    {
                        "file_pk": r.id,
                        "attempt": r.attempts + 1,
                        "agent_id": lease.agent_id,
                        "lease_pk": lease.id,
                        "outcome": "RELEASED",
                    }
                    for r in rows
                ],
            )
        if not file_ids:
            self._session.execute(update(LeaseRow).where(LeaseRow.id == lease.id).values(state="RELEASED"))
        return [r.run_pk for r in rows]

    def advance_schema_version(self, ingestion_pk: uuid.UUID, version: int) -> None:
        self._session.execute(
            text("UPDATE ingestions SET schema_version = :v WHERE id = :id AND schema_version < :v"),
            {"id": ingestion_pk, "v": version},
        )

    def list_agents(self, tenant: str) -> list[Any]:
        return list(
            self._session.execute(
                text(
                    """
                    SELECT a.id, a.hostname, a.create_time, a.last_seen_time,
                           (SELECT count(DISTINCT f.lease_pk) FROM files f JOIN leases l ON l.id = f.lease_pk
                             WHERE l.agent_id = a.id AND f.state = 'LEASED' AND f.lease_expire_time > now())
                              AS active_leases,
                           (SELECT count(*) FROM files f JOIN leases l ON l.id = f.lease_pk
                             WHERE l.agent_id = a.id AND f.state = 'LEASED') AS leased_files
                    FROM agents a WHERE a.tenant = :tenant ORDER BY a.id
                    """
                ),
                {"tenant": tenant},
            ).all()
        )
