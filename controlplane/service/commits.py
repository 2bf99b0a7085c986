"""The committer: staged data into Iceberg together with the files' results, one replica per table.

The write protocol (docs/write-path.md):

1. Accept (LeaseService, one transaction): the report's successful files are
   locked and must all still be LEASED by the lease with their attempts; the
   intent (data files, results) is written and the files are marked with it,
   so nobody can claim them until it is settled.
2. Commit (here, no transaction open): the replica that owns the table loads
   it, settles intents a snapshot already carries, checks it still owns the
   table, and commits every pending intent of the table at once: delete their
   sources' rows, add their data files, name the intents in the snapshot.
3. Settle (one transaction): each intent becomes COMMITTED and its files
   SUCCEEDED, fenced on the intent; the reporting calls return.

A crash anywhere leaves a PENDING intent. The table's next owner (this
replica's loop, or another once this one's heartbeat is stale) recognises a
landed commit by the snapshot property and settles it, or commits it. A
committer paused between its ownership check and its commit cannot land the
commit once anyone else committed: pyiceberg requires the branch to be where
the transaction loaded it. Commit conflicts are retried here, never reported
to a file; data that cannot be committed (a schema conflict, a missing file)
fails its files, each intent alone.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta

from autoloader.faults import crash_point
from controlplane.domain.commits import CommitIntent, CommitState, FenceLost, StagedBatch, TableInfo
from controlplane.domain.ingestion import ErrorMode, Ingestion
from controlplane.domain.leases import ReportedResult, failure_result
from controlplane.domain.runs import FileState
from controlplane.service.changes import ChangeFeed
from controlplane.service.ports import TableStore, UnitOfWork

log = logging.getLogger(__name__)

# The error type of files whose data could not be committed.
COMMIT_FAILED = "CommitFailed"
# Intents per snapshot: bounds the snapshot's manifest and the settle transaction.
MAX_INTENTS_PER_COMMIT = 200
CONFLICT_BACKOFF_MAX = 2.0


def _transient(error: BaseException) -> bool:
    """Errors that say nothing about the data: the catalog or storage is down, or the outcome is unknown.

    The intent stays PENDING and is tried again (and recognised, if it landed).
    """
    from pyiceberg.exceptions import CommitStateUnknownException
    from sqlalchemy.exc import DBAPIError

    if isinstance(error, FileNotFoundError | PermissionError):
        return False  # a staged file is gone or unreadable: retrying cannot help
    return isinstance(error, CommitStateUnknownException | DBAPIError | ConnectionError | TimeoutError | OSError)


@dataclass
class CommitStats:
    """What this replica's committer did since it started (benchmarks and tests read it)."""

    commits: int = 0  # Iceberg transactions that landed
    batches: int = 0  # intents they carried
    files: int = 0  # source files they carried
    conflicts: int = 0  # commits that lost a race with another writer and were retried
    recognised: int = 0  # intents found already committed (a crash between commit and settle)
    aborted: int = 0  # intents whose data could not be committed


class CommitService:
    def __init__(
        self,
        uow_factory: Callable[[], UnitOfWork],
        tables: TableStore,
        run_changes: ChangeFeed,
        *,
        owner: str | None = None,
        stale_after: timedelta = timedelta(seconds=10),
        is_conflict: Callable[[BaseException], bool] = lambda e: False,
        orphan_age: float = 6 * 3600.0,
        orphan_every: float = 3600.0,
        linger: timedelta = timedelta(0),
    ) -> None:
        self._uow_factory = uow_factory
        self.tables = tables
        self._run_changes = run_changes
        self.owner = owner or f"committer-{uuid.uuid4().hex[:12]}"
        self._stale = stale_after
        self._is_conflict = is_conflict
        self._orphan_age = orphan_age
        self._orphan_every = orphan_every
        self._linger = linger
        self.next_due: float | None = None  # monotonic: when a lingering table's commit is due
        self._swept: dict[str, float] = {}
        self.stats = CommitStats()
        self.wakeup = ChangeFeed()  # new intents on this replica
        self._settled = ChangeFeed()  # intents settled by this replica

    # --- the reporting side -----------------------------------------------------------------------------------------

    def describe(self, table: str) -> TableInfo:
        return self.tables.describe(table)

    def wait(self, commit_ids: Collection[uuid.UUID], until: float) -> bool:
        """Waits until none of the intents is PENDING (True) or the monotonic time `until` passes (False).

        Woken by this replica's committer; another replica's settles are seen by a short poll.
        """
        self.wakeup.notify()
        pending = set(commit_ids)
        while True:
            seen = self._settled.version
            with self._uow_factory() as uow:
                pending = {c for c in pending if uow.commits.state(c) is CommitState.PENDING}
            remaining = until - time.monotonic()
            if not pending or remaining <= 0:
                return not pending
            self._settled.wait(seen, min(remaining, 0.2))

    def discard(self, paths: Collection[str]) -> None:
        try:
            self.tables.discard_files(paths)
        except Exception:
            log.exception("could not remove staged files", extra={"action": "commit.discard"})

    # --- the committer ----------------------------------------------------------------------------------------------

    def commit_round(self) -> int:
        """Commits the pending intents of every table this replica owns or may take over; returns how many.

        Sets `next_due` when a table's intents linger for other agents' batches.
        """
        self.next_due = None
        with self._uow_factory() as uow:
            tables = uow.commits.pending_tables()
        return sum(self.commit_table(name) for name in tables)

    def _own(self, table: str) -> bool:
        with self._uow_factory() as uow:
            owned = uow.commits.own_table(table, self.owner, self._stale)
            uow.commit()
        return owned

    def commit_table(self, name: str) -> int:
        if not self._own(name):
            return 0  # another replica commits to this table
        with self._uow_factory() as uow:
            # Group commit: while other agents are still working on the table, the first intent
            # waits (up to `linger`) for theirs, so that one snapshot carries them all.
            left = uow.commits.linger_left(name, self._linger) if self._linger else 0.0
            if left > 0:
                due = time.monotonic() + left
                self.next_due = due if self.next_due is None else min(self.next_due, due)
                return 0
            intents = uow.commits.pending(name, MAX_INTENTS_PER_COMMIT)
            ingestions = {i.ingestion_pk: uow.ingestions.get_by_pk(i.ingestion_pk) for i in intents}
        if not intents:
            return 0
        settled = self._commit(name, intents, ingestions)
        self._sweep_orphans(name)
        return settled

    def _commit(self, name: str, intents: list[CommitIntent], ingestions: dict[uuid.UUID, Ingestion | None]) -> int:
        """Commits the intents as one snapshot (retrying conflicts); splits a group that fails on its data."""
        conflicts = 0
        settled = 0
        while intents:
            table = self.tables.load(name)
            if table is not None:
                landed = self.tables.committed(
                    table, [str(i.id) for i in intents], int(min(i.create_time for i in intents).timestamp() * 1000)
                )
                if landed:
                    self.stats.recognised += len(landed)
                    log.info("%d commits of %s found in its snapshots", len(landed), name,
                             extra={"action": "commit.recognised", "table": name})  # fmt: skip
                    version = table.schema().schema_id + 1
                    settled += self._settle([i for i in intents if str(i.id) in landed], version, ingestions)
                    intents = [i for i in intents if str(i.id) not in landed]
                    continue
            if table is None and not any(i.data_files for i in intents):
                # No table and no rows: nothing to delete, nothing to add.
                return settled + self._settle(intents, 0, ingestions)
            batches = [
                StagedBatch(str(i.id), f"leases/{i.lease_id}", tuple(f.path for f in i.files),
                            tuple(d.path for d in i.data_files))
                for i in intents
            ]  # fmt: skip
            partition_by = self._partition_by(intents, ingestions)
            started = time.monotonic()
            try:
                version = self.tables.commit(name, batches, partition_by, lambda: self._own(name), table)
            except FenceLost:
                log.warning("another control plane took over the commits of %s", name,
                            extra={"action": "commit.fenced", "table": name})  # fmt: skip
                return settled
            except Exception as error:
                if self._is_conflict(error):
                    conflicts += 1
                    self.stats.conflicts += 1
                    pause = random.uniform(0, min(0.05 * 2**conflicts, CONFLICT_BACKOFF_MAX))  # noqa: S311
                    log.info("commit conflict on %s (%d); retrying in %.2fs", name, conflicts, pause,
                             extra={"action": "commit.conflict", "table": name})  # fmt: skip
                    time.sleep(pause)
                    continue
                if _transient(error):
                    log.warning(
                        "commit of %d batches to %s failed (%s: %s); will retry", len(intents), name,
                        type(error).__name__, error, extra={"action": "commit.retry", "table": name},
                    )  # fmt: skip
                    return settled
                if len(intents) > 1:
                    log.info("commit of %d batches to %s failed (%s); committing each alone", len(intents), name,
                             type(error).__name__, extra={"action": "commit.split", "table": name})  # fmt: skip
                    return settled + sum(self._commit(name, [i], ingestions) for i in intents)
                return settled + self._abort(intents[0], error, ingestions.get(intents[0].ingestion_pk))
            crash_point("plane_after_iceberg_commit")
            files = sum(len(i.files) for i in intents)
            self.stats.commits += 1
            self.stats.batches += len(intents)
            self.stats.files += files
            log.info("committed %d batches (%d files) to %s in %.2fs", len(intents), files, name,
                     time.monotonic() - started, extra={"action": "commit.done", "table": name})  # fmt: skip
            return settled + self._settle(intents, version, ingestions)
        return settled

    @staticmethod
    def _partition_by(
        intents: Sequence[CommitIntent], ingestions: dict[uuid.UUID, Ingestion | None]
    ) -> list[tuple[str, str]]:
        """The partition spec a new table gets: its first intent's ingestion's."""
        ingestion = ingestions.get(intents[0].ingestion_pk)
        if ingestion is None:
            return []
        return [(p.column, p.transform or "identity") for p in ingestion.spec.destination.partition_by]

    def _settle(
        self, intents: Sequence[CommitIntent], version: int, ingestions: dict[uuid.UUID, Ingestion | None]
    ) -> int:
        """COMMITTED, with every file's result, in one transaction; runs left without open files end."""
        runs: set[uuid.UUID] = set()
        settled = 0
        with self._uow_factory() as uow:
            for intent in intents:
                if not uow.commits.settle(intent.id, CommitState.COMMITTED):
                    continue  # a replica that took over settled it
                rows = [
                    ReportedResult(f.file_id, f.attempt, FileState.SUCCEEDED, records=f.records, size=f.size)
                    for f in intent.files
                ]
                recorded = uow.leases.record_results(intent.lease_id, intent.agent_id, rows, commit=intent.id)
                uow.commits.unmark_files(intent.id)
                if recorded is not None:
                    runs.update(r for r in recorded.runs.values() if r is not None)
                if version:
                    uow.leases.advance_schema_version(intent.ingestion_pk, version)
                settled += 1
            uow.commit()
        self._finish(runs)
        return settled

    def _abort(self, intent: CommitIntent, error: BaseException, ingestion: Ingestion | None) -> int:
        """The data cannot be committed: its files fail with the error (retried with backoff), its files go."""
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"[:1000]
        log.error(
            "commit of %s to %s failed: %s", intent.id, intent.table_name, message,
            extra={"action": "commit.abort", "table": intent.table_name, "lease": f"leases/{intent.lease_id}"},
        )  # fmt: skip
        runs: set[uuid.UUID] = set()
        with self._uow_factory() as uow:
            if not uow.commits.settle(intent.id, CommitState.ABORTED, message):
                return 0
            self.stats.aborted += 1
            if ingestion is None:
                uow.commits.unmark_files(intent.id)
                uow.commit()
                return 1
            rows = [
                failure_result(
                    f.file_id,
                    f.attempt,
                    ingestion.spec.limits.max_attempts,
                    ingestion.spec.error_policy,
                    COMMIT_FAILED,
                    message,
                    retryable=True,
                )
                for f in intent.files
            ]
            recorded = uow.leases.record_results(intent.lease_id, intent.agent_id, rows, commit=intent.id)
            uow.commits.unmark_files(intent.id)
            if recorded is not None:
                runs.update(r for r in recorded.runs.values() if r is not None)
                if ingestion.spec.error_policy.mode is ErrorMode.FAIL_RUN:
                    for row in rows:
                        run_pk = recorded.runs.get(row.file_id)
                        if row.state is FileState.QUARANTINED and run_pk is not None:
                            uow.runs.fail(
                                run_pk, f"file {row.file_id} was quarantined and the error policy is FAIL_RUN"
                            )
            uow.commit()
        self.discard([d.path for d in intent.data_files])
        self._finish(runs)
        return 1

    def _finish(self, runs: set[uuid.UUID]) -> None:
        """Ends the runs the settled files were the last open ones of; wakes whoever waits."""
        for run_pk in runs:
            with self._uow_factory() as uow:
                if uow.runs.finalize_if_done(run_pk) is not None:
                    uow.commit()
        self._settled.notify()
        self._run_changes.notify()

    def _sweep_orphans(self, name: str) -> None:
        """Hourly per table: staged files of batches that never reached a commit (agents that died)."""
        now = time.monotonic()
        if now - self._swept.get(name, -self._orphan_every) < self._orphan_every:
            return
        self._swept[name] = now
        try:
            with self._uow_factory() as uow:
                pending = uow.commits.leases_pending(name)
            removed = self.tables.cleanup_orphans(name, self._orphan_age, keep=pending)
        except Exception:
            log.exception("could not remove orphaned staging files", extra={"action": "commit.orphans"})
            return
        if removed:
            log.info("removed %d orphaned staging directories of %s", removed, name,
                     extra={"action": "commit.orphans", "table": name})  # fmt: skip


class CommitLoop:
    """Background thread: commit pending intents; sleep until woken or `poll` passes.

    The poll finds intents written on other replicas for tables this one owns,
    and tables whose owner went silent.
    """

    def __init__(self, service: CommitService, poll: float = 0.5) -> None:
        self.service = service
        self._poll = poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="committer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.service.wakeup.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        seen = self.service.wakeup.version
        while not self._stop.is_set():
            try:
                while not self._stop.is_set() and self.service.commit_round():
                    pass
            except Exception:
                log.exception("committer error; retrying", extra={"action": "commit.error"})
                self._stop.wait(self._poll)
            due = self.service.next_due
            wait = self._poll if due is None else min(self._poll, max(due - time.monotonic(), 0.01))
            seen = self.service.wakeup.wait(seen, wait)
