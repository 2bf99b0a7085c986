"""What the sagas on an ingestion's table share (service/deletions.py, service/refreshes.py).

A saga that empties or drops the table must be alone with it: no run that could
lease and commit, no commit still in flight (it would land after the change), and
no other ingestion whose rows are in the same table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from controlplane.domain.errors import FailedPrecondition
from controlplane.domain.idempotency import RequestKey
from controlplane.domain.ingestion import Ingestion, IngestionState
from controlplane.service.idempotency import commit_once
from controlplane.service.ports import UnitOfWork

log = logging.getLogger(__name__)

T = TypeVar("T")


def require_table_to_itself(uow: UnitOfWork, ingestion: Ingestion, change: str) -> None:
    """FAILED_PRECONDITION unless nothing else can write to the ingestion's table while `change` happens."""
    name, table = ingestion.name, ingestion.spec.destination.table
    run = uow.runs.active(ingestion.id, ingestion.ingestion_id)
    if run is not None:
        raise FailedPrecondition(
            f"{name} has an active run ({run.name}); cancel it before you {change}",
            metadata={"ingestion": name, "run": run.name},
        )
    if uow.commits.pending_for_ingestion(ingestion.id):
        raise FailedPrecondition(
            f"{name} still has data being committed to {table}; retry in a few seconds",
            metadata={"ingestion": name},
        )
    others = uow.ingestions.writing_to(table, excluding=ingestion.id)
    if others:
        raise FailedPrecondition(
            f"{table} is also the destination of {', '.join(others)}; cannot {change}",
            metadata={"ingestion": name, "table": table},
        )


def replay(
    uow: UnitOfWork, tenant: str, method: str, key: RequestKey | None, load: Callable[[dict[str, Any]], T]
) -> tuple[bool, T | None]:
    """(True, the recorded answer) if this request was completed before; (False, None) otherwise.

    Read without reserving the request id: a saga records its answer in a later transaction.
    """
    earlier = uow.idempotency.find(tenant, key.request_id) if key is not None else None
    if earlier is None or earlier.response is None:
        return False, None
    # commit_once replays it, or refuses another request under the same id.
    outcome = commit_once(uow, tenant, method, key, _unreachable, lambda _: {}, load)
    return True, outcome.result


def _unreachable() -> Any:
    raise AssertionError("a recorded request is replayed, not done again")


def finish_stale(
    uow_factory: Callable[[], UnitOfWork],
    state: IngestionState,
    stale_after: timedelta,
    finish: Callable[[Ingestion], bool],
) -> int:
    """The reconciler: finishes (forward) each saga left in `state` for longer than `stale_after`; how many.

    Each is touched first, in a transaction of its own, so the other replicas' reconcilers
    leave it alone for another `stale_after`; a step that fails is tried again next pass.
    """
    finished = 0
    while True:
        with uow_factory() as uow:
            ingestion = uow.ingestions.next_stale(state, stale_after)
            if ingestion is None:
                return finished
            uow.ingestions.save(ingestion)
            uow.commit()
        log.info("finishing what %s was left at (%s)", ingestion.name, state.value,
                 extra={"action": "ingestion.reconcile", "ingestion": ingestion.name})  # fmt: skip
        try:
            finished += finish(ingestion)
        except Exception:
            log.exception("could not finish %s (%s); will retry", ingestion.name, state.value,
                          extra={"action": "ingestion.reconcile", "ingestion": ingestion.name})  # fmt: skip
            return finished
