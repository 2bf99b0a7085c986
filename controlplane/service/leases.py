"""Leasing use cases: claim a batch (long-poll), extend, report each file, release, list agents.

Every call is its own short transaction, committed before the reply: no
transaction is ever open while an agent holds a lease.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from controlplane.domain.errors import InvalidArgument, NotFound
from controlplane.domain.ingestion import ErrorMode, Ingestion
from controlplane.domain.leases import (
    MAX_LEASE_EXPIRIES,
    Lease,
    LeasedFile,
    LeaseLost,
    LeaseNotOwned,
    RecordedResults,
    ReportedResult,
    retry_delay,
    state_after_failure,
)
from controlplane.domain.runs import FileState
from controlplane.service.changes import ChangeFeed
from controlplane.service.ports import UnitOfWork

log = logging.getLogger(__name__)

MAX_FILES_PER_CALL = 10_000
MAX_WAIT = timedelta(seconds=60)


@dataclass(frozen=True)
class Claim:
    lease: Lease
    files: list[LeasedFile]
    ingestion: Ingestion


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


class LeaseService:
    def __init__(
        self,
        uow_factory: Callable[[], UnitOfWork],
        changes: ChangeFeed,
        *,
        ttl: timedelta = timedelta(seconds=60),
        poll: float = 1.0,
    ) -> None:
        self._uow_factory = uow_factory
        self._changes = changes
        self._ttl = ttl
        self._poll = poll

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
            remaining = deadline - time.monotonic()
            if claim is not None or remaining <= 0 or not still_wanted():
                return claim
            # Woken at once by work added on this replica; other replicas' work is found by the
            # jittered poll (spread so that many idle agents do not query in lockstep).
            self._changes.wait(seen, min(remaining, self._poll * random.uniform(0.5, 1.5)))  # noqa: S311

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
        self, tenant: str, agent_id: str, lease_id: uuid.UUID, file_id: int, attempt: int, outcome: FileOutcome
    ) -> tuple[FileState, datetime | None]:
        """Records one file's result; LEASE_LOST if the lease no longer holds it with this attempt."""
        (answer,) = self._record(agent_id, lease_id, [FileReport(file_id, attempt, outcome)], indexed=False)
        if answer.state is None:
            raise LeaseLost(
                f"{answer.file_name} is no longer held by leases/{lease_id} with attempt {attempt}",
                metadata={"lease": f"leases/{lease_id}", "file": answer.file_name},
            )
        return answer.state, answer.next_attempt_at

    def report_many(
        self, tenant: str, agent_id: str, lease_id: uuid.UUID, reports: list[FileReport], schema_version: int = 0
    ) -> list[ReportAnswer]:
        """Records results of one lease in one transaction, committed before returning.

        Each is fenced on its own (lease, attempt, state LEASED): a file the lease no
        longer holds changes nothing and is answered lost, unless this exact result was
        already recorded (a retried call), which gets the recorded answer.
        """
        if schema_version < 0:
            raise InvalidArgument.field("schema_version", "must not be negative")
        return self._record(agent_id, lease_id, reports, indexed=True, schema_version=schema_version)

    def _record(
        self, agent_id: str, lease_id: uuid.UUID, reports: list[FileReport], *, indexed: bool, schema_version: int = 0
    ) -> list[ReportAnswer]:
        self._check_reports(reports, indexed)
        with self._uow_factory() as uow:
            ingestion = None
            if not all(r.outcome.succeeded for r in reports):
                # Only failures need the ingestion's retry policy; successes cost one statement.
                ingestion = self._ingestion_by_pk(uow, self._own_lease(uow, agent_id, lease_id).ingestion_pk)
            rows = [self._result_row(ingestion, r) for r in reports]
            recorded = uow.leases.record_results(lease_id, agent_id, rows)
            if recorded is None:
                raise NotFound(f"leases/{lease_id} does not exist", metadata={"lease": f"leases/{lease_id}"})
            if recorded.agent_id != agent_id:
                raise LeaseNotOwned(
                    f"leases/{lease_id} belongs to agents/{recorded.agent_id}",
                    metadata={"lease": f"leases/{lease_id}"},
                )
            answers = [
                ReportAnswer(row.file_id, recorded.file_name(row.file_id), row.state, row.next_attempt_at)
                if row.file_id in recorded.runs
                else None
                for row in rows
            ]
            replays = {r.file_id: r for r, a in zip(reports, answers, strict=True) if a is None}
            if replays:
                replayed = self._replayed(
                    uow, lease_id, replays, recorded, ingestion or self._ingestion_by_pk(uow, recorded.ingestion_pk)
                )
                answers = [a or replayed[r.file_id] for r, a in zip(reports, answers, strict=True)]
            if schema_version and recorded.runs:
                uow.leases.advance_schema_version(recorded.ingestion_pk, schema_version)
            fail_run = ingestion is not None and ingestion.spec.error_policy.mode is ErrorMode.FAIL_RUN
            for row in rows:
                run_pk = recorded.runs.get(row.file_id)
                if fail_run and row.state is FileState.QUARANTINED and run_pk is not None:
                    uow.runs.fail(run_pk, f"file {row.file_id} was quarantined and the error policy is FAIL_RUN")
            uow.commit()
            self._finalize_if_last(uow, rows, recorded)
        return [a for a in answers if a is not None]

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
            state, next_at = FileState.SUCCEEDED, None
        else:
            assert ingestion is not None
            state, next_at = self._next_state(ingestion, report.attempt, outcome)
        return ReportedResult(
            report.file_id, report.attempt, state, records=outcome.records, size=outcome.bytes,
            error_type=outcome.error_type, error_message=outcome.error_message, retryable=outcome.retryable,
            next_attempt_at=next_at,
        )  # fmt: skip

    @staticmethod
    def _next_state(ingestion: Ingestion, attempt: int, outcome: FileOutcome) -> tuple[FileState, datetime | None]:
        state = state_after_failure(attempt, ingestion.spec.limits.max_attempts, outcome.retryable)
        if state is not FileState.FAILED:
            return state, None
        policy = ingestion.spec.error_policy
        return state, datetime.now(UTC) + retry_delay(attempt, policy.retry_backoff_initial, policy.retry_backoff_max)

    @staticmethod
    def _replayed(
        uow: UnitOfWork,
        lease_id: uuid.UUID,
        reports: dict[int, FileReport],
        recorded_now: RecordedResults,
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
            answers[file_id] = ReportAnswer(file_id, recorded_now.file_name(file_id), state, next_at)
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
