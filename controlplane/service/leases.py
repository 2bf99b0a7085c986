"""Leasing use cases: claim a batch (long-poll), extend, report each file, release, list agents.

Every call is its own short transaction, committed before the reply: no
transaction is ever open while an agent holds a lease.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from autoloader.faults import crash_point
from controlplane.domain.commits import CommitInProgress, CommitIntent, CommittedFile, StagedFile, TableInfo
from controlplane.domain.errors import InvalidArgument, NotFound, Unavailable
from controlplane.domain.ingestion import ErrorMode, Ingestion
from controlplane.domain.leases import (
    MAX_LEASE_EXPIRIES,
    Lease,
    LeasedFile,
    LeaseLost,
    LeaseNotOwned,
    RecordedResults,
    ReportedResult,
    failure_result,
    state_after_failure,
)
from controlplane.domain.runs import FileState
from controlplane.service.changes import ChangeFeed
from controlplane.service.commits import COMMIT_FAILED, CommitService
from controlplane.service.ports import UnitOfWork

log = logging.getLogger(__name__)

MAX_FILES_PER_CALL = 10_000
MAX_WAIT = timedelta(seconds=60)
# How long a report waits for its data's commit when the caller set no deadline (seconds).
DEFAULT_REPORT_WAIT = 25.0


@dataclass(frozen=True)
class Claim:
    lease: Lease
    files: list[LeasedFile]
    ingestion: Ingestion
    target: TableInfo | None = None  # where the agent stages the data (None without a committer)


@dataclass(frozen=True)
class ReportAnswer:
    """A file's state after its report; None if the lease no longer holds it (LEASE_LOST)."""

    file_id: int
    file_name: str  # "ingestions/{ingestion}/files/{file}"
    state: FileState | None
    next_attempt_at: datetime | None = None


@dataclass(frozen=True)
class FileOutcome:
    succeeded: bool
    records: int = 0
    bytes: int = 0
    error_type: str = ""
    error_message: str = ""
    retryable: bool = True


@dataclass(frozen=True)
class FileReport:
    file_id: int
    attempt: int
    outcome: FileOutcome


# Leases this replica remembers the ingestion of (about 100 bytes each).
LEASES_REMEMBERED = 100_000


class LeaseService:
    def __init__(
        self,
        uow_factory: Callable[[], UnitOfWork],
        changes: ChangeFeed,
        *,
        ttl: timedelta = timedelta(seconds=60),
        poll: float = 1.0,
        commits: CommitService | None = None,
    ) -> None:
        self._uow_factory = uow_factory
        self._changes = changes
        self._ttl = ttl
        self._poll = poll
        # None: results are recorded as reported, and nothing is committed (tests of leasing alone).
        self._commits = commits
        self._table_names: dict[uuid.UUID, str] = {}  # ingestion -> its table (fixed once created)
        # lease -> its ingestion, for the leases this replica granted: a report then finds its table
        # without a read of its own (the recording transaction checks the lease as it always does).
        self._lease_ingestions: dict[uuid.UUID, uuid.UUID] = {}
        self._lease_ingestions_lock = threading.Lock()

    def lease_files(
        self,
        tenant: str,
        agent_id: str,
        *,
        max_files: int = 0,
        max_bytes: int = 0,
        wait: timedelta = timedelta(0),
        ingestion_id: str | None = None,
        hostname: str = "",
        still_wanted: Callable[[], bool] = lambda: True,
    ) -> Claim | None:
        """A batch of files, or None after waiting up to `wait` with nothing claimable."""
        if not 0 <= max_files <= MAX_FILES_PER_CALL:
            raise InvalidArgument.field("max_files", f"must be 0 (the ingestion's limit) to {MAX_FILES_PER_CALL}")
        if max_bytes < 0:
            raise InvalidArgument.field("max_bytes", "must not be negative")
        if not timedelta(0) <= wait <= MAX_WAIT:
            raise InvalidArgument.field("wait", f"must be 0 to {int(MAX_WAIT.total_seconds())}s")
        deadline = time.monotonic() + wait.total_seconds()
        while True:
            seen = self._changes.version
            claim = self._try_claim(tenant, agent_id, hostname, max_files, max_bytes, ingestion_id)
            if claim is not None:
                return self._with_target(tenant, claim)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not still_wanted():
                return None
            # Woken at once by work added on this replica; other replicas' work is found by the
            # jittered poll (spread so that many idle agents do not query in lockstep).
            self._changes.wait(seen, min(remaining, self._poll * random.uniform(0.5, 1.5)))  # noqa: S311

    def _with_target(self, tenant: str, claim: Claim) -> Claim:
        """The claim with its table's description, read after the claim's commit (the catalog is a network call).

        If the catalog cannot be read the files go back at once, unspent, and the agent retries.
        """
        if self._commits is None:
            return claim
        table = claim.ingestion.spec.destination.table
        self._table_names[claim.ingestion.id] = table
        with self._lease_ingestions_lock:
            self._lease_ingestions[claim.lease.id] = claim.ingestion.id
            while len(self._lease_ingestions) > LEASES_REMEMBERED:
                del self._lease_ingestions[next(iter(self._lease_ingestions))]  # the oldest
        try:
            target = self._commits.describe(table)
        except Exception as error:
            self.release(tenant, claim.lease.agent_id, claim.lease.id, [])
            raise Unavailable(f"the catalog cannot be read ({type(error).__name__}); retry") from error
        return Claim(claim.lease, claim.files, claim.ingestion, target)

    def _try_claim(
        self, tenant: str, agent_id: str, hostname: str, max_files: int, max_bytes: int, only: str | None
    ) -> Claim | None:
        with self._uow_factory() as uow:
            uow.leases.touch_agent(agent_id, tenant, hostname)
            for ingestion_pk, _ in uow.leases.claimable_ingestions(tenant, only):
                ingestion = uow.ingestions.get_by_pk(ingestion_pk)
                if ingestion is None:
                    continue
                for run_pk in uow.leases.quarantine_lease_killers(ingestion_pk, MAX_LEASE_EXPIRIES):
                    uow.runs.finalize_if_done(run_pk)
                limits = ingestion.spec.limits
                claimed = uow.leases.claim(
                    uuid.uuid4(),
                    agent_id,
                    ingestion_pk,
                    ingestion.ingestion_id,
                    max_files=min(max_files or limits.max_files_per_lease, limits.max_files_per_lease),
                    max_bytes=min(max_bytes or limits.max_bytes_per_lease, limits.max_bytes_per_lease),
                    ttl=self._ttl,
                    max_expiries=MAX_LEASE_EXPIRIES,
                )
                if claimed is not None:
                    uow.commit()
                    lease, files = claimed
                    log.info(
                        "leased %d files",
                        len(files),
                        extra={"action": "lease.claim", "lease": lease.name, "agent": agent_id,
                               "ingestion": ingestion.name},
                    )  # fmt: skip
                    return Claim(lease, files, ingestion)
            uow.commit()  # the agent's last contact
        return None

    def _own_lease(self, uow: UnitOfWork, agent_id: str, lease_id: uuid.UUID) -> Lease:
        lease = uow.leases.get(lease_id)
        if lease is None:
            raise NotFound(f"leases/{lease_id} does not exist", metadata={"lease": f"leases/{lease_id}"})
        if lease.agent_id != agent_id:
            raise LeaseNotOwned(
                f"leases/{lease_id} belongs to agents/{lease.agent_id}", metadata={"lease": f"leases/{lease_id}"}
            )
        return lease

    def extend(self, tenant: str, agent_id: str, lease_id: uuid.UUID) -> Lease:
        with self._uow_factory() as uow:
            lease = self._own_lease(uow, agent_id, lease_id)
            uow.leases.touch_agent(agent_id, tenant, "")
            expire_time = uow.leases.extend(lease_id, self._ttl)
            if expire_time is None:
                raise LeaseLost(f"{lease.name} expired and its files were taken over", metadata={"lease": lease.name})
            uow.commit()
        return Lease(lease.id, lease.agent_id, lease.ingestion_pk, expire_time, self._ttl, lease.create_time)

    def report(
        self, tenant: str, agent_id: str, lease_id: uuid.UUID, file_id: int, attempt: int, outcome: FileOutcome,
        *, until: float | None = None,
    ) -> tuple[FileState, datetime | None]:  # fmt: skip
        """Records one file's result; LEASE_LOST if the lease no longer holds it with this attempt."""
        (answer,) = self._record(agent_id, lease_id, [FileReport(file_id, attempt, outcome)], (), indexed=False,
                                 until=until)  # fmt: skip
        if answer.state is None:
            raise LeaseLost(
                f"{answer.file_name} is no longer held by leases/{lease_id} with attempt {attempt}",
                metadata={"lease": f"leases/{lease_id}", "file": answer.file_name},
            )
        return answer.state, answer.next_attempt_at

    def report_many(
        self, tenant: str, agent_id: str, lease_id: uuid.UUID, reports: list[FileReport],
        data_files: Sequence[StagedFile] = (), *, until: float | None = None,
    ) -> list[ReportAnswer]:  # fmt: skip
        """Records results of one lease, with the staged data of the successful ones; returns once durable.

        Failures are fenced one by one (lease, attempt, state LEASED): a file the lease
        no longer holds changes nothing and is answered lost, unless this exact result
        was already recorded (a retried call), which gets the recorded answer. The
        successes and their data are committed together (service/commits.py), only
        while the lease holds every one of them.
        """
        return self._record(agent_id, lease_id, reports, data_files, indexed=True, until=until)

    def _record(
        self, agent_id: str, lease_id: uuid.UUID, reports: list[FileReport], data_files: Sequence[StagedFile], *,
        indexed: bool, until: float | None,
    ) -> list[ReportAnswer]:  # fmt: skip
        self._check_reports(reports, indexed)
        until = time.monotonic() + DEFAULT_REPORT_WAIT if until is None else until
        successes = [r for r in reports if r.outcome.succeeded]
        target = self._commit_target(agent_id, lease_id, data_files) if successes else None
        committed = successes if target is not None else []
        direct = [r for r in reports if not (r.outcome.succeeded and target is not None)]
        answers: dict[int, ReportAnswer] = {}
        waiting: set[uuid.UUID] = set()
        fenced_data = False
        with self._uow_factory() as uow:
            has_failures = not all(r.outcome.succeeded for r in reports)
            # Read once: failures need the ingestion's retry policy, data needs the lease to fence it;
            # successes without data cost one statement.
            lease = self._own_lease(uow, agent_id, lease_id) if has_failures or committed else None
            ingestion = self._ingestion_by_pk(uow, lease.ingestion_pk) if has_failures and lease else None
            rows = [self._result_row(ingestion, r) for r in direct]
            recorded = self._record_direct(uow, agent_id, lease_id, rows, direct, answers, ingestion)
            if committed:
                assert target is not None
                assert lease is not None
                waiting, fenced_data = self._accept(uow, lease, target, committed, data_files, answers)
            if ingestion is not None and ingestion.spec.error_policy.mode is ErrorMode.FAIL_RUN and recorded:
                for row in rows:
                    run_pk = recorded.runs.get(row.file_id)
                    if row.state is FileState.QUARANTINED and run_pk is not None:
                        uow.runs.fail(run_pk, f"file {row.file_id} was quarantined and the error policy is FAIL_RUN")
            uow.commit()
            if recorded is not None:
                self._finalize_if_last(uow, rows, recorded)
        if fenced_data:
            log.warning("lease lost before its data was committed; %d staged files removed", len(data_files),
                        extra={"action": "lease.fenced", "lease": f"leases/{lease_id}", "agent": agent_id})  # fmt: skip
            assert self._commits is not None
            self._commits.discard([d.path for d in data_files])
        if waiting:
            crash_point("plane_after_intent")
            assert self._commits is not None
            if not self._commits.wait(waiting, until):
                raise CommitInProgress(
                    f"the data of leases/{lease_id} is still being committed; retry to get the results",
                    metadata={"lease": f"leases/{lease_id}"},
                )
            crash_point("plane_after_settle")
        if committed:
            with self._uow_factory() as uow:
                answers.update(self._settled_answers(uow, lease_id, committed, answers))
        return [answers[r.file_id] for r in reports]

    def _commit_target(self, agent_id: str, lease_id: uuid.UUID, data_files: Sequence[StagedFile]) -> TableInfo | None:
        """The table the successes' data goes to, or None when there is nothing to commit (no table, no data).

        Read before the recording transaction: the catalog is a network call.
        """
        if self._commits is None:
            return None
        with self._lease_ingestions_lock:
            ingestion_pk = self._lease_ingestions.get(lease_id)
        table_name = self._table_names.get(ingestion_pk) if ingestion_pk is not None else None
        if table_name is None:
            with self._uow_factory() as uow:
                lease = self._own_lease(uow, agent_id, lease_id)
                table_name = self._table_names.get(lease.ingestion_pk)
                if table_name is None:
                    table_name = self._ingestion_by_pk(uow, lease.ingestion_pk).spec.destination.table
                    self._table_names[lease.ingestion_pk] = table_name  # fixed once the ingestion is created
        target = self._commits.describe(table_name)
        staging = target.staging_location(str(lease_id)) + "/"
        for i, data_file in enumerate(data_files):
            where = f"data_files[{i}].path"
            if not data_file.path.startswith(staging) or "/../" in data_file.path or "/./" in data_file.path:
                raise InvalidArgument.field(where, f"must be under the lease's staging location {staging}")
            if data_file.record_count < 0 or data_file.size_bytes < 0:
                raise InvalidArgument.field(f"data_files[{i}]", "record_count and size_bytes must not be negative")
        if not data_files and not target.exists:
            return None  # empty files and no table: their results are all there is
        return target

    def _record_direct(
        self, uow: UnitOfWork, agent_id: str, lease_id: uuid.UUID, rows: list[ReportedResult],
        reports: list[FileReport], answers: dict[int, ReportAnswer], ingestion: Ingestion | None,
    ) -> RecordedResults | None:  # fmt: skip
        """Results without data (failures; successes when there is no table), fenced one by one."""
        if not rows:
            return None
        recorded = uow.leases.record_results(lease_id, agent_id, rows)
        if recorded is None:
            raise NotFound(f"leases/{lease_id} does not exist", metadata={"lease": f"leases/{lease_id}"})
        if recorded.agent_id != agent_id:
            raise LeaseNotOwned(
                f"leases/{lease_id} belongs to agents/{recorded.agent_id}", metadata={"lease": f"leases/{lease_id}"}
            )
        replays = {}
        for row, report in zip(rows, reports, strict=True):
            if row.file_id in recorded.runs:
                answers[row.file_id] = ReportAnswer(
                    row.file_id, recorded.file_name(row.file_id), row.state, row.next_attempt_at
                )
            else:
                replays[row.file_id] = report
        if replays:
            policy = ingestion or self._ingestion_by_pk(uow, recorded.ingestion_pk)
            answers.update(self._replayed(uow, lease_id, replays, recorded.ingestion_id, policy))
        return recorded

    def _accept(
        self, uow: UnitOfWork, lease: Lease, target: TableInfo, successes: list[FileReport],
        data_files: Sequence[StagedFile], answers: dict[int, ReportAnswer],
    ) -> tuple[set[uuid.UUID], bool]:  # fmt: skip
        """The fence of the data: an intent if the lease holds every success; returns (intents to wait for, fenced).

        A retried call finds its own intent (wait for it) or its recorded results.
        """
        files = uow.commits.lock_files([r.file_id for r in successes])
        held = [
            (f := files.get(r.file_id)) is not None and f.state == FileState.LEASED and f.lease_pk == lease.id
            and f.attempts == r.attempt
            for r in successes
        ]  # fmt: skip
        if all(held) and all(files[r.file_id].commit_pk is None for r in successes):
            # A data file is committed once: naming it again (a misbehaving agent) would add its rows twice.
            if repeated := uow.commits.named_before(lease.id, [d.path for d in data_files]):
                index = [d.path for d in data_files].index(repeated[0])
                raise InvalidArgument.field(f"data_files[{index}].path", "was already committed by this lease")
            intent = CommitIntent(
                id=uuid.uuid4(), ingestion_pk=lease.ingestion_pk, lease_id=lease.id, agent_id=lease.agent_id,
                table_name=target.name,
                files=tuple(
                    CommittedFile(r.file_id, files[r.file_id].path, r.attempt, r.outcome.records, r.outcome.bytes)
                    for r in successes
                ),
                data_files=tuple(data_files), create_time=datetime.now(UTC),
            )  # fmt: skip
            uow.commits.add(intent)
            return {intent.id}, False
        if all(held):
            return {files[r.file_id].commit_pk for r in successes}, False  # this lease's intent, in progress
        # Some success is no longer ours: none of the data may go in. The others go back unspent.
        still_ours = [
            r.file_id for r, h in zip(successes, held, strict=True) if h and files[r.file_id].commit_pk is None
        ]
        if still_ours:
            uow.leases.release(lease, still_ours)
        replayed = self._replayed_commits(uow, lease.id, successes)
        fenced = not any(a.state is not None for a in replayed.values())
        answers.update(replayed)
        return set(), fenced

    def _replayed_commits(
        self, uow: UnitOfWork, lease_id: uuid.UUID, successes: list[FileReport]
    ) -> dict[int, ReportAnswer]:
        """Successes this lease already settled (a retried report) get their outcome; the others are lost."""
        recorded = uow.leases.recorded_results(lease_id, {r.file_id: r.attempt for r in successes})
        ingestion_id = self._ingestion_id_of(uow, lease_id)
        answers = {}
        for report in successes:
            previous: Any = recorded.get(report.file_id)
            name = f"ingestions/{ingestion_id}/files/{report.file_id}"
            if previous is None:
                answers[report.file_id] = ReportAnswer(report.file_id, name, None)
            elif previous.outcome == "SUCCEEDED":
                answers[report.file_id] = ReportAnswer(report.file_id, name, FileState.SUCCEEDED)
            elif previous.error_type == COMMIT_FAILED:
                state = FileState.FAILED if previous.next_attempt_at is not None else FileState.QUARANTINED
                answers[report.file_id] = ReportAnswer(report.file_id, name, state, previous.next_attempt_at)
            else:
                answers[report.file_id] = ReportAnswer(report.file_id, name, None)
        return answers

    def _settled_answers(
        self, uow: UnitOfWork, lease_id: uuid.UUID, successes: list[FileReport], answers: dict[int, ReportAnswer]
    ) -> dict[int, ReportAnswer]:
        """After the commit settled: each success's recorded outcome (answers already known are kept)."""
        unanswered = [r for r in successes if r.file_id not in answers]
        return self._replayed_commits(uow, lease_id, unanswered) if unanswered else {}

    @staticmethod
    def _ingestion_id_of(uow: UnitOfWork, lease_id: uuid.UUID) -> str:
        lease = uow.leases.get(lease_id)
        ingestion = uow.ingestions.get_by_pk(lease.ingestion_pk) if lease is not None else None
        if ingestion is None:  # deleted meanwhile, with its leases and files
            raise NotFound(f"leases/{lease_id} does not exist", metadata={"lease": f"leases/{lease_id}"})
        return ingestion.ingestion_id

    @staticmethod
    def _check_reports(reports: list[FileReport], indexed: bool) -> None:
        """Field names in errors are "results[i].field" for report_many, "field" for report."""
        if not 1 <= len(reports) <= MAX_FILES_PER_CALL:
            raise InvalidArgument.field("results", f"must hold 1 to {MAX_FILES_PER_CALL} results")
        seen: set[int] = set()
        for i, report in enumerate(reports):
            where = f"results[{i}]." if indexed else ""
            if report.outcome.records < 0 or report.outcome.bytes < 0:
                field = "records" if report.outcome.records < 0 else "bytes"
                raise InvalidArgument.field(where + field, "must not be negative")
            if report.attempt < 1:
                raise InvalidArgument.field(
                    where + "attempt", "must be the attempt the file was leased with (1 or more)"
                )
            if report.file_id in seen:
                raise InvalidArgument.field(where + "file", "is reported twice in one call")
            seen.add(report.file_id)

    def _finalize_if_last(self, uow: UnitOfWork, rows: list[ReportedResult], recorded: RecordedResults) -> None:
        """Ends the runs this call closed the last open files of, in a new transaction after the commit.

        The recording statement saw whether other files of the run were open. If none
        were, every other file's result was committed before ours and we are the last:
        finalize. If some were, they may be closing concurrently, each of us seeing the
        other open; the finalization sweep (MaintenanceService) ends such a run within
        a second, and also any whose reporter crashed between its commit and this step.
        """
        still_open = {recorded.runs.get(row.file_id) for row in rows if row.state is FileState.FAILED}
        last_of = {
            run
            for run in recorded.runs.values()
            if run is not None and run not in still_open and run not in recorded.runs_with_others_open
        }
        finalized = False
        for run_pk in last_of:
            if uow.runs.finalize_if_done(run_pk) is not None:
                uow.commit()
                finalized = True
        if finalized:
            self._changes.notify()

    @staticmethod
    def _ingestion_by_pk(uow: UnitOfWork, pk: uuid.UUID) -> Ingestion:
        ingestion = uow.ingestions.get_by_pk(pk)
        assert ingestion is not None  # leases are deleted with their ingestion
        return ingestion

    def _result_row(self, ingestion: Ingestion | None, report: FileReport) -> ReportedResult:
        outcome = report.outcome
        if outcome.succeeded:
            return ReportedResult(report.file_id, report.attempt, FileState.SUCCEEDED, records=outcome.records,
                                  size=outcome.bytes)  # fmt: skip
        assert ingestion is not None
        return failure_result(
            report.file_id, report.attempt, ingestion.spec.limits.max_attempts, ingestion.spec.error_policy,
            outcome.error_type, outcome.error_message, retryable=outcome.retryable, records=outcome.records,
            size=outcome.bytes,
        )  # fmt: skip

    @staticmethod
    def _replayed(
        uow: UnitOfWork,
        lease_id: uuid.UUID,
        reports: dict[int, FileReport],
        ingestion_id: str,
        ingestion: Ingestion,
    ) -> dict[int, ReportAnswer]:
        """The identical result, already recorded, gets the recorded answer; anything else lost the lease."""
        recorded = uow.leases.recorded_results(lease_id, {f: r.attempt for f, r in reports.items()})
        answers = {}
        for file_id, report in reports.items():
            previous: Any = recorded.get(file_id)
            state: FileState | None = None
            if previous is not None and (previous.outcome == "SUCCEEDED") == report.outcome.succeeded:
                state = (
                    FileState.SUCCEEDED
                    if report.outcome.succeeded
                    else state_after_failure(report.attempt, ingestion.spec.limits.max_attempts, previous.retryable)
                )
            next_at = previous.next_attempt_at if state is FileState.FAILED else None
            answers[file_id] = ReportAnswer(file_id, f"ingestions/{ingestion_id}/files/{file_id}", state, next_at)
        return answers

    def release(self, tenant: str, agent_id: str, lease_id: uuid.UUID, file_ids: list[int]) -> int:
        with self._uow_factory() as uow:
            lease = self._own_lease(uow, agent_id, lease_id)
            released = uow.leases.release(lease, file_ids)
            uow.commit()
        if released:
            self._changes.notify()
        return len(released)

    def list_agents(self, tenant: str) -> list[Any]:
        with self._uow_factory() as uow:
            return uow.leases.list_agents(tenant)
