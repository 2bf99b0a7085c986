"""A discovery that fails for an unexpected reason ends its run visibly instead of wedging it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from sqlalchemy import Engine, text

from controlplane.adapters.storage import ListingError
from controlplane.adapters.unit_of_work import SqlAlchemyUnitOfWork
from controlplane.domain.ingestion import Destination, Format, FormatType, Ingestion, IngestionSpec, Source
from controlplane.domain.runs import ListedFile, Trigger
from controlplane.service.changes import ChangeFeed
from controlplane.service.discovery import DiscoveryService
from controlplane.service.runs import open_run


class BrokenLister:
    def list(self, source: Source, after: str | None = None) -> Iterator[ListedFile]:
        yield ListedFile(path="file:///x/a.json", size_bytes=1, modified_time=None)
        raise RuntimeError("the storage client broke")


def test_unexpected_listing_error_fails_the_run(
    uow_factory: Callable[[], SqlAlchemyUnitOfWork], engine: Engine
) -> None:
    spec = IngestionSpec(
        source=Source(uri="file:///x"), format=Format(type=FormatType.JSON), destination=Destination(table="a.b")
    )
    with uow_factory() as uow:
        ingestion = Ingestion(tenant="default", ingestion_id="broken", spec=spec)
        uow.ingestions.add(ingestion)
        run = open_run(uow, ingestion, Trigger.MANUAL, discovering=True)
        uow.commit()
    service = DiscoveryService(uow_factory, BrokenLister(), (ListingError,), ChangeFeed(), chunk_size=1)

    assert service.discover_next() is True

    with engine.connect() as conn:
        state, error, owner_claims = conn.execute(
            text("SELECT state, error, discovery_end_time IS NOT NULL FROM runs WHERE id = :r"), {"r": run.id}
        ).one()
        file_states = conn.execute(text("SELECT state FROM files")).scalars().all()
    assert state == "FAILED"
    assert error == "discovery failed: RuntimeError: the storage client broke"
    assert owner_claims
    assert file_states == ["SKIPPED"]  # found before the failure, not processed in a failed run
    assert service.discover_next() is False  # nothing left claimed or stuck
