"""Loading the resources a use case acts on, or NOT_FOUND naming them; the etag check of a conditional change."""

from __future__ import annotations

from controlplane.domain.errors import EtagMismatch, NotFound, WrongState
from controlplane.domain.ingestion import Ingestion, IngestionState
from controlplane.domain.runs import Run
from controlplane.service.ports import UnitOfWork


def require_ingestion(uow: UnitOfWork, tenant: str, ingestion_id: str, *, for_update: bool = False) -> Ingestion:
    ingestion = uow.ingestions.get(tenant, ingestion_id, for_update=for_update)
    if ingestion is None:
        name = f"ingestions/{ingestion_id}"
        raise NotFound(f"{name} does not exist", metadata={"ingestion": name})
    return ingestion


def require_run(uow: UnitOfWork, ingestion: Ingestion, run_id: str, *, for_update: bool = False) -> Run:
    run = uow.runs.get(ingestion.id, ingestion.ingestion_id, run_id, for_update=for_update)
    if run is None:
        name = f"{ingestion.name}/runs/{run_id}"
        raise NotFound(f"{name} does not exist", metadata={"run": name})
    return run


def check_etag(ingestion: Ingestion, etag: str) -> None:
    if etag and etag != ingestion.etag:
        raise EtagMismatch(
            f"{ingestion.name} changed since it was read (etag {etag}, now {ingestion.etag}); read it again",
            metadata={"ingestion": ingestion.name, "etag": ingestion.etag},
        )


def require_not_deleting(ingestion: Ingestion) -> None:
    if ingestion.state is IngestionState.DELETING:
        raise WrongState(f"{ingestion.name} is being deleted", metadata={"ingestion": ingestion.name})
