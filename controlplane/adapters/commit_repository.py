"""Commit intents and table ownership: the database side of the write path.

Never commits or rolls back (the service owns the transaction). The files of a
PENDING intent carry its id in commit_pk, which every claim, release and
rediscovery skips: a file whose commit is in doubt belongs to its committer.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from controlplane.domain.commits import CommitIntent, CommitState, CommittedFile, StagedFile

# The files a report names, locked until the transaction ends (a claim skips them meanwhile).
_LOCK_FILES = text(
    """
    SELECT f.id, f.path, f.state, f.lease_pk, f.attempts, f.commit_pk
    FROM files f WHERE f.id = ANY(CAST(:ids AS bigint[])) ORDER BY f.id FOR UPDATE
    """
)

_MARK_FILES = text("UPDATE files SET commit_pk = :commit WHERE id = ANY(CAST(:ids AS bigint[]))")

# Tables with intents to commit, oldest first.
_PENDING_TABLES = text(
    """
    SELECT table_name FROM commits WHERE state = 'PENDING'
    GROUP BY table_name ORDER BY min(create_time) LIMIT :limit
    """
)

# One replica commits to a table at a time; a silent one (crashed, paused) is taken over.
_OWN_TABLE = text(
    """
    INSERT INTO table_committers AS t (table_name, owner, heartbeat_time) VALUES (:table, :owner, now())
    ON CONFLICT (table_name) DO UPDATE SET owner = :owner, heartbeat_time = now()
    WHERE t.owner = :owner OR t.heartbeat_time < now() - :stale
    RETURNING t.owner
    """
)

_PENDING = text(
    """
    SELECT c.id, c.ingestion_pk, c.lease_pk, l.agent_id, c.table_name, c.results, c.data_files, c.create_time
    FROM commits c JOIN leases l ON l.id = c.lease_pk
    WHERE c.table_name = :table AND c.state = 'PENDING'
    ORDER BY c.create_time LIMIT :limit
    """
)

# How long the table's oldest intent may still wait for others to join its commit: 0 when it has
# waited `linger`, or when no agent without an intent for the table is still working on it (one
# whose report waits on this commit sends no other first).
_LINGER_LEFT = text(
    """
    SELECT CASE WHEN EXISTS (
               SELECT 1 FROM ingestions i
               JOIN files f ON f.ingestion_pk = i.id AND f.state = 'LEASED'
               JOIN leases l ON l.id = f.lease_pk
               WHERE i.spec #>> '{destination,table}' = :table
                 AND f.commit_pk IS NULL AND f.lease_expire_time > now()
                 AND l.agent_id NOT IN (SELECT pl.agent_id FROM commits pc JOIN leases pl ON pl.id = pc.lease_pk
                                        WHERE pc.table_name = :table AND pc.state = 'PENDING'))
           THEN GREATEST(0, EXTRACT(EPOCH FROM min(c.create_time) + :linger - now()))
           ELSE 0 END
    FROM commits c WHERE c.table_name = :table AND c.state = 'PENDING'
    """
)

_SETTLE = text(
    """
    UPDATE commits SET state = :state, error = :error, end_time = now()
    WHERE id = :id AND state = 'PENDING'
    RETURNING id
    """
)


class SqlCommitRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def lock_files(self, file_ids: list[int]) -> dict[int, Any]:
        """The files' rows (path, state, lease_pk, attempts, commit_pk), locked FOR UPDATE."""
        rows = self._session.execute(_LOCK_FILES, {"ids": file_ids}).all()
        return {row.id: row for row in rows}

    def add(self, intent: CommitIntent) -> None:
        self._session.execute(
            text(
                """
                INSERT INTO commits (id, ingestion_pk, lease_pk, table_name, state, results, data_files)
                VALUES (:id, :ingestion, :lease, :table, 'PENDING', CAST(:results AS jsonb), CAST(:data AS jsonb))
                """
            ),
            {
                "id": intent.id, "ingestion": intent.ingestion_pk, "lease": intent.lease_id,
                "table": intent.table_name,
                "results": json.dumps([
                    {"file": f.file_id, "path": f.path, "attempt": f.attempt, "records": f.records, "bytes": f.size}
                    for f in intent.files
                ]),
                "data": json.dumps([
                    {"path": d.path, "record_count": d.record_count, "size_bytes": d.size_bytes}
                    for d in intent.data_files
                ]),
            },
        )  # fmt: skip
        self._session.execute(_MARK_FILES, {"commit": intent.id, "ids": [f.file_id for f in intent.files]})

    def state(self, commit_id: uuid.UUID) -> CommitState | None:
        value = self._session.execute(text("SELECT state FROM commits WHERE id = :id"), {"id": commit_id}).scalar()
        return CommitState(value) if value is not None else None

    def pending_tables(self, limit: int = 100) -> list[str]:
        return list(self._session.execute(_PENDING_TABLES, {"limit": limit}).scalars())

    def own_table(self, table: str, owner: str, stale_after: timedelta) -> bool:
        """Takes or keeps the table's commits for `owner`, renewing its heartbeat; False if another owns it."""
        row = self._session.execute(_OWN_TABLE, {"table": table, "owner": owner, "stale": stale_after}).first()
        return row is not None

    def linger_left(self, table: str, linger: timedelta) -> float:
        """Seconds the table's pending intents may still wait for other agents' batches to join them."""
        value = self._session.execute(_LINGER_LEFT, {"table": table, "linger": linger}).scalar()
        return float(value or 0)

    def pending_for_ingestion(self, ingestion_pk: uuid.UUID) -> bool:
        query = text("SELECT EXISTS (SELECT 1 FROM commits WHERE ingestion_pk = :pk AND state = 'PENDING')")
        return bool(self._session.execute(query, {"pk": ingestion_pk}).scalar())

    def pending(self, table: str, limit: int) -> list[CommitIntent]:
        rows = self._session.execute(_PENDING, {"table": table, "limit": limit}).all()
        return [
            CommitIntent(
                id=row.id, ingestion_pk=row.ingestion_pk, lease_id=row.lease_pk, agent_id=row.agent_id,
                table_name=row.table_name,
                files=tuple(
                    CommittedFile(r["file"], r["path"], r["attempt"], r["records"], r["bytes"]) for r in row.results
                ),
                data_files=tuple(StagedFile(d["path"], d["record_count"], d["size_bytes"]) for d in row.data_files),
                create_time=row.create_time,
            )
            for row in rows
        ]  # fmt: skip

    def leases_pending(self, table: str) -> set[str]:
        """Leases with intents still to commit to the table: their staged data is not orphaned, however old."""
        rows = self._session.execute(
            text("SELECT DISTINCT lease_pk FROM commits WHERE table_name = :table AND state = 'PENDING'"),
            {"table": table},
        ).scalars()
        return {str(lease) for lease in rows}

    def named_before(self, lease_id: uuid.UUID, paths: list[str]) -> list[str]:
        """Which of these data files an earlier intent of the lease already carried."""
        rows = self._session.execute(
            text(
                """
                SELECT DISTINCT d->>'path' FROM commits c, jsonb_array_elements(c.data_files) d
                WHERE c.lease_pk = :lease AND d->>'path' = ANY(CAST(:paths AS text[]))
                """
            ),
            {"lease": lease_id, "paths": paths},
        ).scalars()
        return sorted(rows)

    def unmark_files(self, commit_id: uuid.UUID) -> None:
        """Files the intent's results did not reach (no longer LEASED by its lease) are free again."""
        self._session.execute(text("UPDATE files SET commit_pk = NULL WHERE commit_pk = :id"), {"id": commit_id})

    def settle(self, commit_id: uuid.UUID, state: CommitState, error: str = "") -> bool:
        """Ends a PENDING intent; False if it was already settled (by a replica that took over)."""
        row = self._session.execute(_SETTLE, {"id": commit_id, "state": state.value, "error": error}).first()
        return row is not None
