"""Run use cases: start, read, list, cancel, watch."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from controlplane.domain.errors import FailedPrecondition, WrongState
from controlplane.domain.idempotency import RequestKey
from controlplane.domain.ingestion import Ingestion, IngestionState
from controlplane.domain.paging import next_page_token, page_request, parse_state_filter
from controlplane.domain.runs import Run, RunInProgress, RunState, Trigger, new_run_id
from controlplane.service.changes import ChangeFeed
from controlplane.service.idempotency import commit_once
from controlplane.service.lookups import require_ingestion, require_run
from controlplane.service.ports import UnitOfWork

log = logging.getLogger(__name__)


def _dump(run: Run) -> dict[str, Any]:
    return run.model_dump(mode="json")


def _load(data: dict[str, Any]) -> Run:
    return Run.model_validate(data)


def open_run(uow: UnitOfWork, ingestion: Ingestion, trigger: Trigger, *, discovering: bool, run_id: str = "") -> Run:
    """Adds a run; RUN_IN_PROGRESS (with the active run's name) if the ingestion has one."""
    active = uow.runs.active(ingestion.id, ingestion.ingestion_id)
    if active is not None:
        raise RunInProgress(
            f"{ingestion.name} already has an active run: {active.name}",
            metadata={"ingestion": ingestion.name, "run": active.name},
        )
    run = Run(
        ingestion_pk=ingestion.id,
        ingestion_id=ingestion.ingestion_id,
        run_id=run_id or new_run_id(),
        state=RunState.DISCOVERING if discovering else RunState.RUNNING,
        trigger=trigger,
    )
    run = uow.runs.add(run)
    uow.runs.set_last_run(ingestion.id, run.run_id)
    return run


class RunService:
    def __init__(
        self, uow_factory: Callable[[], UnitOfWork], run_changes: ChangeFeed, discovery_wakeup: ChangeFeed
    ) -> None:
        self._uow_factory = uow_factory
        self._run_changes = run_changes
        self._discovery_wakeup = discovery_wakeup

    def start(self, tenant: str, ingestion_id: str, trigger: Trigger, key: RequestKey | None = None) -> Run:
        def work() -> Run:
            # The ingestion row lock serializes concurrent starts of one ingestion.
            ingestion = require_ingestion(uow, tenant, ingestion_id, for_update=True)
            if ingestion.state is IngestionState.PAUSED:
                raise WrongState(f"{ingestion.name} is paused; resume it first", metadata={"ingestion": ingestion.name})
            if ingestion.state is not IngestionState.ACTIVE:
                raise WrongState(
                    f"{ingestion.name} is {ingestion.state.value}; runs start only when it is ACTIVE",
                    metadata={"ingestion": ingestion.name, "state": ingestion.state.value},
                )
            return open_run(uow, ingestion, trigger, discovering=True)

        with self._uow_factory() as uow:
            outcome = commit_once(uow, tenant, "StartRun", key, work, _dump, _load)
        if not outcome.replayed:
            self._discovery_wakeup.notify()
            log.info("run started", extra={"action": "run.start", "run": outcome.result.name})
        return outcome.result

    def get(self, tenant: str, ingestion_id: str, run_id: str) -> Run:
        with self._uow_factory() as uow:
            return require_run(uow, require_ingestion(uow, tenant, ingestion_id), run_id)

    def list(
        self, tenant: str, ingestion_id: str, page_size: int, page_token: str, filter_: str
    ) -> tuple[list[Run], str]:
        states = parse_state_filter(filter_, RunState)
        query = f"{tenant}|{ingestion_id}|{','.join(sorted(states))}"
        page = page_request(page_size, page_token, query)
        with self._uow_factory() as uow:
            ingestion = require_ingestion(uow, tenant, ingestion_id)
            runs = uow.runs.list_before(ingestion.id, ingestion_id, sorted(states), page.after, page.size + 1)
        token = next_page_token(runs[page.size - 1].run_id, query) if len(runs) > page.size else ""
        return runs[: page.size], token

    def cancel(self, tenant: str, ingestion_id: str, run_id: str, key: RequestKey | None = None) -> Run:
        def work() -> Run:
            ingestion = require_ingestion(uow, tenant, ingestion_id)
            run = require_run(uow, ingestion, run_id, for_update=True)
            if run.terminal:
                if run.state is RunState.CANCELLED:
                    return run
                raise FailedPrecondition(
                    f"{run.name} already ended ({run.state.value})", metadata={"run": run.name, "state": run.state}
                )
            uow.runs.cancel(run.id)
            return require_run(uow, ingestion, run_id)

        with self._uow_factory() as uow:
            outcome = commit_once(uow, tenant, "CancelRun", key, work, _dump, _load)
        if not outcome.replayed:
            self._run_changes.notify()
            log.info("run cancelled", extra={"action": "run.cancel", "run": outcome.result.name})
        return outcome.result

    def watch(
        self,
        tenant: str,
        ingestion_id: str,
        run_id: str,
        still_wanted: Callable[[], bool],
        poll: float = 1.0,
        min_interval: float = 0.5,
    ) -> Iterator[Run]:
        """Yields the run now and after every change, until it is terminal or the caller goes away.

        Updates come at most every `min_interval` seconds: counting a big run's files
        on every committed chunk would cost the discovery itself a large share of the database.
        """
        seen = self._run_changes.version
        last: Run | None = None
        while still_wanted():
            run = self.get(tenant, ingestion_id, run_id)
            if last is None or run != last:
                yield run
                last = run
            if run.terminal:
                return
            seen = self._run_changes.wait(seen, poll)
            time.sleep(min_interval)
