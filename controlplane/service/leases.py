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
class FileOutcome:
    succeeded: bool
    records: int = 0
    bytes: int = 0
    error_type: str = ""
    error_message: str = ""
    retryable: bool = True


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
        """Records one file's result in its own transaction; fenced on (lease, attempt, LEASED)."""
        if outcome.records < 0 or outcome.bytes < 0:
            raise InvalidArgument.field("records" if outcome.records < 0 else "bytes", "must not be negative")
        if attempt < 1:
            raise InvalidArgument.field("attempt", "must be the attempt the file was leased with (1 or more)")
        with self._uow_factory() as uow:
            lease = self._own_lease(uow, agent_id, lease_id)
            ingestion = uow.ingestions.get_by_pk(lease.ingestion_pk)
            assert ingestion is not None  # leases are deleted with their ingestion
            state, next_at = self._next_state(ingestion, attempt, outcome)
            run_pk = uow.leases.record_result(
                lease,
                file_id,
                attempt,
                new_state=state,
                records=outcome.records,
                size=outcome.bytes,
                error_type=outcome.error_type,
                error_message=outcome.error_message,
                retryable=outcome.retryable,
                next_attempt_at=next_at,
            )
            if run_pk is None:
                return self._replayed(uow, lease, file_id, attempt, outcome, ingestion)
            if state is FileState.QUARANTINED and ingestion.spec.error_policy.mode is ErrorMode.FAIL_RUN:
                uow.runs.fail(run_pk, f"file {file_id} was quarantined and the error policy is FAIL_RUN")
            uow.commit()
        if state is not FileState.FAILED:
            # After the commit, so that the last of several concurrent reports sees all of them.
            with self._uow_factory() as uow:
                if uow.runs.finalize_if_done(run_pk) is not None:
                    uow.commit()
                    self._changes.notify()
        return state, next_at

    @staticmethod
    def _next_state(ingestion: Ingestion, attempt: int, outcome: FileOutcome) -> tuple[FileState, datetime | None]:
        if outcome.succeeded:
            return FileState.SUCCEEDED, None
        state = state_after_failure(attempt, ingestion.spec.limits.max_attempts, outcome.retryable)
        if state is not FileState.FAILED:
            return state, None
        policy = ingestion.spec.error_policy
        return state, datetime.now(UTC) + retry_delay(attempt, policy.retry_backoff_initial, policy.retry_backoff_max)

    @staticmethod
    def _replayed(
        uow: UnitOfWork, lease: Lease, file_id: int, attempt: int, outcome: FileOutcome, ingestion: Ingestion
    ) -> tuple[FileState, datetime | None]:
        """The identical result, already recorded, gets the recorded answer; anything else lost the lease."""
        recorded: Any = uow.leases.recorded_result(lease.id, file_id, attempt)
        if recorded is not None and (recorded.outcome == "SUCCEEDED") == outcome.succeeded:
            if outcome.succeeded:
                return FileState.SUCCEEDED, None
            return state_after_failure(attempt, ingestion.spec.limits.max_attempts, recorded.retryable), None
        raise LeaseLost(
            f"ingestions/{ingestion.ingestion_id}/files/{file_id} is no longer held by {lease.name} "
            f"with attempt {attempt}",
            metadata={"lease": lease.name, "file": f"ingestions/{ingestion.ingestion_id}/files/{file_id}"},
        )

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
