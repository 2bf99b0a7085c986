"""RefreshIngestion: empty the table, then load again (FULL: every known file; NEW_ONLY: what is new from now on).

The table lives in the catalog, the file states in PostgreSQL, so this is a saga
whose every step is idempotent and which only ever rolls forward:

1. intent: one transaction marks the ingestion REFRESHING with its mode and the id of
   the run it will start, and records the request's answer. Nothing leases, runs or
   commits for the ingestion from then on;
2. the table is emptied (a delete of every row; again is harmless: nothing loads
   while the ingestion is REFRESHING);
3. finish: one transaction queues the files again (FULL) into the new run, which
   also discovers what is new, and makes the ingestion ACTIVE.

The table and the file states never disagree once it ends: rows come back only
through the new run. A crash between the steps is finished by the reconciler (any
replica) once the saga has been silent for `stale_after`; a catalog that fails at
step 2 leaves the refresh to the reconciler too (the answer says so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from autoloader.faults import crash_point
from controlplane.domain.errors import Unavailable, WrongState
from controlplane.domain.idempotency import RequestKey
from controlplane.domain.ingestion import Ingestion, IngestionState, RefreshMode
from controlplane.domain.runs import FileState, Trigger, new_run_id
from controlplane.service.changes import ChangeFeed
from controlplane.service.idempotency import commit_once
from controlplane.service.lookups import require_ingestion
from controlplane.service.ports import TableStore, UnitOfWork
from controlplane.service.runs import open_run
from controlplane.service.sagas import finish_stale, replay, require_table_to_itself

log = logging.getLogger(__name__)

METHOD = "RefreshIngestion"
# Snapshot property naming the refresh that emptied the table (the ingestion and its run).
REFRESH_PROPERTY = "autoloader.refresh"
# Every state a file can be in outside a lease: a FULL refresh queues them all again.
KNOWN = [s for s in FileState if s is not FileState.LEASED]


@dataclass(frozen=True)
class RefreshPlan:
    table: str
    run: str  # the run the refresh starts ("" on a dry run)
    files: int  # known files queued again
    bytes: int
    table_rows: int  # rows the table held before


class IngestionRefreshes:
    def __init__(
        self,
        uow_factory: Callable[[], UnitOfWork],
        tables: TableStore,
        discovery_wakeup: ChangeFeed,
        *,
        stale_after: timedelta = timedelta(seconds=30),
    ) -> None:
        self._uow_factory = uow_factory
        self._tables = tables
        self._discovery_wakeup = discovery_wakeup
        self._stale = stale_after

    def refresh(
        self, tenant: str, ingestion_id: str, mode: RefreshMode, *, dry_run: bool = False, key: RequestKey | None = None
    ) -> RefreshPlan:
        with self._uow_factory() as uow:
            done, answer = replay(uow, tenant, METHOD, key, _load)
            if done and answer is not None:
                return answer
            table = require_ingestion(uow, tenant, ingestion_id).spec.destination.table
        rows = self._table_rows(table)  # the catalog is a network call: outside the transaction

        marked: list[Ingestion] = []

        def intent() -> RefreshPlan:
            ingestion = require_ingestion(uow, tenant, ingestion_id, for_update=True)
            if ingestion.state is not IngestionState.ACTIVE:
                raise WrongState(
                    f"{ingestion.name} is {ingestion.state.value}; only an ACTIVE ingestion can be refreshed",
                    metadata={"ingestion": ingestion.name, "state": ingestion.state.value},
                )
            require_table_to_itself(uow, ingestion, "refresh it")
            # The files _finish will queue again, counted as it selects them.
            files, size = uow.files.totals(ingestion.id, KNOWN) if mode is RefreshMode.FULL else (0, 0)
            if dry_run:
                return RefreshPlan(table, "", files, size, rows)
            ingestion.state = IngestionState.REFRESHING
            ingestion.refresh_mode = mode
            ingestion.refresh_run_id = new_run_id()
            ingestion = uow.ingestions.save(ingestion)
            marked.append(ingestion)
            return RefreshPlan(table, f"{ingestion.name}/runs/{ingestion.refresh_run_id}", files, size, rows)

        with self._uow_factory() as uow:
            if dry_run:
                return intent()  # and roll back: a dry run changes nothing
            outcome = commit_once(uow, tenant, METHOD, key, intent, asdict, _load)
        if outcome.replayed:
            return outcome.result  # the same request, answered meanwhile
        plan, ingestion = outcome.result, marked[0]
        log.info("refreshing %s (%s): emptying %s (%d rows)", ingestion.name, mode.value, table, rows,
                 extra={"action": "ingestion.refresh", "ingestion": ingestion.name})  # fmt: skip
        crash_point("refresh_after_intent")
        try:
            self._empty(ingestion)
        except Exception as error:
            raise Unavailable(
                f"the refresh of {ingestion.name} was accepted, but {table} could not be emptied yet "
                f"({type(error).__name__}: {error}); it completes once the catalog answers",
                metadata={"ingestion": ingestion.name, "run": plan.run},
            ) from error
        crash_point("refresh_after_empty")
        self._finish(ingestion)
        return plan

    def _table_rows(self, table: str) -> int:
        try:
            return self._tables.row_count(table)
        except Exception as error:
            raise Unavailable(f"the catalog cannot be read ({type(error).__name__}: {error}); retry") from error

    def _empty(self, ingestion: Ingestion) -> None:
        marker = f"{ingestion.name}/runs/{ingestion.refresh_run_id}"
        self._tables.empty(ingestion.spec.destination.table, {REFRESH_PROPERTY: marker})

    def _finish(self, ingestion: Ingestion) -> bool:
        """Queues the files again in the refresh's run and makes the ingestion ACTIVE; False if done before."""
        with self._uow_factory() as uow:
            current = uow.ingestions.get(ingestion.tenant, ingestion.ingestion_id, for_update=True)
            if current is None or current.state is not IngestionState.REFRESHING:
                return False
            current.state = IngestionState.ACTIVE
            run = open_run(uow, current, Trigger.REFRESH, discovering=True, run_id=current.refresh_run_id)
            queued = 0
            if current.refresh_mode is RefreshMode.FULL:
                ids = uow.files.select_for_retry(
                    current.id, file_ids=(), states=KNOWN, modified_after=None, modified_before=None
                )
                queued = uow.files.requeue(ids, run.id)
            current.refresh_mode = None
            current.refresh_run_id = ""
            uow.ingestions.save(current)
            uow.commit()
        self._discovery_wakeup.notify()
        log.info("refreshed %s: %d files queued in %s", ingestion.name, queued, run.name,
                 extra={"action": "ingestion.refreshed", "ingestion": ingestion.name, "run": run.name})  # fmt: skip
        return True

    def reconcile(self) -> int:
        """Finishes refreshes a crash (or the catalog) left half-way; returns how many."""
        return finish_stale(self._uow_factory, IngestionState.REFRESHING, self._stale, self._empty_and_finish)

    def _empty_and_finish(self, ingestion: Ingestion) -> bool:
        self._empty(ingestion)
        return self._finish(ingestion)


def _load(data: dict[str, Any]) -> RefreshPlan:
    return RefreshPlan(**data)
