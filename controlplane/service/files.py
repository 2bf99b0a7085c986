"""File use cases: list, retry, attempt history."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any

from controlplane.domain.errors import InvalidArgument, NotFound, WrongState
from controlplane.domain.idempotency import RequestKey
from controlplane.domain.paging import next_page_token, page_request
from controlplane.domain.runs import File, FileAttempt, FileState, Run, Trigger
from controlplane.service.changes import ChangeFeed
from controlplane.service.idempotency import commit_once
from controlplane.service.lookups import require_ingestion, require_run
from controlplane.service.ports import UnitOfWork
from controlplane.service.runs import open_run

log = logging.getLogger(__name__)

# A retry never touches files that are still queued or held by an agent.
RETRIABLE = frozenset({FileState.SUCCEEDED, FileState.FAILED, FileState.QUARANTINED, FileState.SKIPPED})
DEFAULT_RETRY_STATES = frozenset({FileState.FAILED, FileState.QUARANTINED})


class FileService:
    def __init__(self, uow_factory: Callable[[], UnitOfWork], run_changes: ChangeFeed) -> None:
        self._uow_factory = uow_factory
        self._run_changes = run_changes

    def list_files(
        self,
        tenant: str,
        ingestion_id: str,
        *,
        page_size: int,
        page_token: str,
        states: Sequence[FileState] = (),
        run_id: str = "",
        path_prefix: str = "",
        modified_after: datetime | None = None,
        modified_before: datetime | None = None,
    ) -> tuple[list[File], str]:
        query = "|".join(
            [
                tenant,
                ingestion_id,
                ",".join(sorted(states)),
                run_id,
                path_prefix,
                str(modified_after),
                str(modified_before),
            ]
        )
        page = page_request(page_size, page_token, query)
        try:
            after = int(page.after) if page.after is not None else None
        except ValueError:
            raise InvalidArgument.field("page_token", "is not a token this API returned") from None
        with self._uow_factory() as uow:
            ingestion = require_ingestion(uow, tenant, ingestion_id)
            run_pk = require_run(uow, ingestion, run_id).id if run_id else None
            files = uow.files.list_after(
                ingestion.id,
                ingestion_id,
                states=states,
                run_pk=run_pk,
                path_prefix=path_prefix,
                modified_after=modified_after,
                modified_before=modified_before,
                after_id=after,
                limit=page.size + 1,
            )
        token = next_page_token(str(files[page.size - 1].id), query) if len(files) > page.size else ""
        return files[: page.size], token

    def retry(
        self,
        tenant: str,
        ingestion_id: str,
        *,
        file_ids: Sequence[int] = (),
        states: Sequence[FileState] = (),
        modified_after: datetime | None = None,
        modified_before: datetime | None = None,
        key: RequestKey | None = None,
    ) -> tuple[str, int]:
        """Queues the chosen files again in the active run (or a new RETRY run); returns (run name, count)."""
        bad = [s for s in states if s not in RETRIABLE]
        if bad:
            raise InvalidArgument.field(
                "states", f"{', '.join(bad)} files are already queued; retry FAILED, QUARANTINED, SKIPPED or SUCCEEDED"
            )
        chosen = bool(file_ids) or modified_after is not None or modified_before is not None
        selected_states = set(states) or (RETRIABLE if chosen else DEFAULT_RETRY_STATES)

        def work() -> tuple[str, int]:
            ingestion = require_ingestion(uow, tenant, ingestion_id, for_update=True)
            if file_ids:
                _check_named(ingestion.name, file_ids, uow.files.states_of(ingestion.id, file_ids), RETRIABLE)
            ids = uow.files.select_for_retry(
                ingestion.id,
                file_ids=file_ids,
                states=selected_states,
                modified_after=modified_after,
                modified_before=modified_before,
            )
            if not ids:
                return "", 0
            run: Run | None = uow.runs.active(ingestion.id, ingestion_id, for_update=True)
            if run is None:
                run = open_run(uow, ingestion, Trigger.RETRY, discovering=False)
            queued = uow.files.requeue(ids, run.id)
            return run.name, queued

        def dump(result: tuple[str, int]) -> dict[str, Any]:
            return {"run": result[0], "queued": result[1]}

        def load(data: dict[str, Any]) -> tuple[str, int]:
            return str(data["run"]), int(data["queued"])

        with self._uow_factory() as uow:
            outcome = commit_once(uow, tenant, "RetryFiles", key, work, dump, load)
        if not outcome.replayed and outcome.result[1]:
            self._run_changes.notify()
            log.info(
                "files queued again",
                extra={"action": "files.retry", "run": outcome.result[0], "files": outcome.result[1]},
            )
        return outcome.result

    def attempts(self, tenant: str, ingestion_id: str, file_id: int) -> list[FileAttempt]:
        with self._uow_factory() as uow:
            ingestion = require_ingestion(uow, tenant, ingestion_id)
            if uow.files.get(ingestion.id, ingestion_id, file_id) is None:
                name = f"{ingestion.name}/files/{file_id}"
                raise NotFound(f"{name} does not exist", metadata={"file": name})
            return uow.files.attempts(file_id)


def _check_named(
    ingestion_name: str, file_ids: Sequence[int], states: dict[int, FileState], allowed: Collection[FileState]
) -> None:
    """Every named file must exist and be retriable: nothing named is silently ignored."""
    missing = sorted(set(file_ids) - states.keys())
    if missing:
        names = ", ".join(f"{ingestion_name}/files/{i}" for i in missing[:5])
        raise NotFound(f"no such file: {names}", metadata={"file": f"{ingestion_name}/files/{missing[0]}"})
    wrong = sorted(i for i, state in states.items() if state not in allowed)
    if wrong:
        details = ", ".join(f"{ingestion_name}/files/{i} is {states[i].value}" for i in wrong[:5])
        raise WrongState(
            f"cannot retry: {details} (queued or leased files are already on their way)",
            metadata={"file": f"{ingestion_name}/files/{wrong[0]}", "state": states[wrong[0]].value},
        )
