"""DeleteIngestion with drop_table: the ingestion's rows and its Iceberg table go together, or not at all.

The table lives in the catalog, the rows in PostgreSQL: no transaction spans both,
so this is a saga (DESIGN.md, Transactions):

1. intent: one transaction marks the ingestion DELETING, with drop_table_on_delete;
   nothing can lease, run or commit for it from then on;
2. the table is dropped and its files purged (idempotent: a table already gone is fine);
3. outcome: one transaction deletes the rows, recording the request's answer.

If step 2 fails (the catalog is unreachable), the intent is compensated: the
ingestion returns to its earlier state and the caller gets UNAVAILABLE. If the
control plane dies between the steps, the reconciler (any replica, skipping rows
another holds) finishes what was started: the user asked for the deletion, and
it was accepted. A retry of the request finishes it too.

A deletion that drops the table is refused while a run is active or a commit is
pending (a commit landing after the drop would create the table again), and while
another ingestion writes to the same table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from autoloader.faults import crash_point
from controlplane.domain.errors import Unavailable
from controlplane.domain.idempotency import RequestKey
from controlplane.domain.ingestion import Ingestion, IngestionState
from controlplane.service.idempotency import commit_once
from controlplane.service.lookups import check_etag, require_ingestion, require_not_deleting
from controlplane.service.ports import TableStore, UnitOfWork
from controlplane.service.sagas import finish_stale, replay, require_table_to_itself

log = logging.getLogger(__name__)

METHOD = "DeleteIngestion"


class IngestionDeletions:
    def __init__(
        self,
        uow_factory: Callable[[], UnitOfWork],
        tables: TableStore,
        *,
        stale_after: timedelta = timedelta(seconds=30),
    ) -> None:
        self._uow_factory = uow_factory
        self._tables = tables
        self._stale = stale_after

    def delete_with_table(self, tenant: str, ingestion_id: str, etag: str, key: RequestKey | None) -> None:
        with self._uow_factory() as uow:
            if replay(uow, tenant, METHOD, key, _none)[0]:
                return
            ingestion = require_ingestion(uow, tenant, ingestion_id, for_update=True)
            before = ingestion.state
            if before is not IngestionState.DELETING:
                self._check_can_drop(uow, ingestion, etag)
                ingestion.state = IngestionState.DELETING
                ingestion.drop_table_on_delete = True
                ingestion = uow.ingestions.save(ingestion)
                uow.commit()
                log.info("deleting %s with its table %s", ingestion.name, ingestion.spec.destination.table,
                         extra={"action": "ingestion.deleting", "ingestion": ingestion.name})  # fmt: skip
            elif not ingestion.drop_table_on_delete:
                require_not_deleting(ingestion)  # a deletion that keeps the table is not this one to finish
        crash_point("delete_after_intent")
        try:
            self._drop_table(ingestion)
        except Exception as error:
            if before is not IngestionState.DELETING:
                self._compensate(ingestion, before)
            raise Unavailable(
                f"the table {ingestion.spec.destination.table} could not be dropped ({type(error).__name__}: "
                f"{error}); {ingestion.name} was not deleted, retry",
                metadata={"ingestion": ingestion.name},
            ) from error
        crash_point("delete_after_drop")
        with self._uow_factory() as uow:
            commit_once(uow, tenant, METHOD, key, lambda: self._delete_rows(uow, ingestion), _nothing, _none)

    def _check_can_drop(self, uow: UnitOfWork, ingestion: Ingestion, etag: str) -> None:
        check_etag(ingestion, etag)
        require_table_to_itself(uow, ingestion, "delete the table")

    def _drop_table(self, ingestion: Ingestion) -> None:
        table = ingestion.spec.destination.table
        if self._tables.drop(table):
            log.info("dropped table %s", table, extra={"action": "table.drop", "ingestion": ingestion.name})

    def _delete_rows(self, uow: UnitOfWork, ingestion: Ingestion) -> None:
        current = uow.ingestions.get_by_pk(ingestion.id)
        if current is not None and current.state is IngestionState.DELETING:
            uow.ingestions.delete(current)
            log.info("ingestion deleted", extra={"action": "ingestion.delete", "ingestion": ingestion.name})

    def _compensate(self, ingestion: Ingestion, state: IngestionState) -> None:
        """The intent undone: the ingestion as it was (unless someone finished the deletion meanwhile)."""
        with self._uow_factory() as uow:
            current = uow.ingestions.get_by_pk(ingestion.id)
            if current is None or current.state is not IngestionState.DELETING:
                return
            current.state = state
            current.drop_table_on_delete = False
            uow.ingestions.save(current)
            uow.commit()
        log.warning("deletion of %s undone: its table could not be dropped", ingestion.name,
                    extra={"action": "ingestion.delete_undone", "ingestion": ingestion.name})  # fmt: skip

    def reconcile(self) -> int:
        """Finishes deletions a crash left half-way (DELETING for longer than `stale_after`); returns how many."""
        return finish_stale(self._uow_factory, IngestionState.DELETING, self._stale, self._finish)

    def _finish(self, ingestion: Ingestion) -> bool:
        if ingestion.drop_table_on_delete:
            self._drop_table(ingestion)
        with self._uow_factory() as uow:
            self._delete_rows(uow, ingestion)
            uow.commit()
        return True


def _nothing(_: None) -> dict[str, Any]:
    return {}  # DeleteIngestion answers nothing


def _none(_: dict[str, Any]) -> None:
    return None
