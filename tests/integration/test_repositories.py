"""SQLAlchemy repositories and Unit of Work against a real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from controlplane.adapters.orm import FileRow, IdempotencyRow, IngestionRow
from controlplane.adapters.unit_of_work import SqlAlchemyUnitOfWork
from controlplane.domain.errors import AlreadyExists
from controlplane.domain.ingestion import (
    Column,
    Compression,
    Destination,
    ErrorMode,
    ErrorPolicy,
    Evolution,
    FileCounts,
    Format,
    FormatType,
    Ingestion,
    IngestionSpec,
    IngestionState,
    Limits,
    PartitionField,
    Schedule,
    Schema,
    SchemaMode,
    Source,
)
from controlplane.service.ports import IdempotencyRecord

pytestmark = pytest.mark.integration

UowFactory = Callable[[], SqlAlchemyUnitOfWork]


def rich_spec() -> IngestionSpec:
    """Every kind of value a spec holds: nested messages, tuples, maps, enums, datetimes, durations, unicode."""
    return IngestionSpec(
        display_name="Orders ✓",
        description='line one\nline "two"',
        labels={"team": "data", "env": "prod"},
        source=Source(
            uri="s3://bucket/orders",
            glob="year=*/{a,b}/*.csv",
            recursive=True,
            modified_after=datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
            credentials_ref="aws-prod",
            options={"fs.s3a.endpoint": "http://minio:9000"},
        ),
        format=Format(
            type=FormatType.CSV,
            header=True,
            delimiter="|",
            quote='"',
            escape="\\",
            multiline=True,
            encoding="latin-1",
            compression=Compression.GZIP,
        ),
        row_schema=Schema(
            mode=SchemaMode.EXPLICIT,
            columns=(
                Column(name="id", type="bigint", required=True),
                Column(name="amount", type="decimal(10,2)"),
                Column(name="tags", type="array<map<string,struct<a:int>>>"),
            ),
            hints={"amount": "decimal(38,0)"},
            evolution=Evolution.RESCUE,
        ),
        destination=Destination(
            table="raw.orders",
            partition_by=(PartitionField(column="id", transform="bucket[16]"), PartitionField(column="_ingested_at")),
        ),
        schedule=Schedule(cron="*/5 * * * *", time_zone="Europe/Berlin"),
        limits=Limits(max_files_per_lease=10, max_bytes_per_lease=1 << 35, max_attempts=7),
        error_policy=ErrorPolicy(
            mode=ErrorMode.FAIL_RUN,
            retry_backoff_initial=timedelta(seconds=1, microseconds=500_000),
            retry_backoff_max=timedelta(days=2, hours=3),
        ),
    )


def make_ingestion(
    ingestion_id: str = "orders", tenant: str = "tenant-a", state: IngestionState = IngestionState.ACTIVE
) -> Ingestion:
    spec = IngestionSpec(
        source=Source(uri="s3://bucket/x"), format=Format(type=FormatType.JSON), destination=Destination(table="raw.x")
    )
    return Ingestion(tenant=tenant, ingestion_id=ingestion_id, spec=spec.with_defaults(), state=state)


def add(uow_factory: UowFactory, *ingestions: Ingestion) -> None:
    with uow_factory() as uow:
        for ingestion in ingestions:
            uow.ingestions.add(ingestion)
        uow.commit()


def get(uow_factory: UowFactory, ingestion_id: str, tenant: str = "tenant-a") -> Ingestion | None:
    with uow_factory() as uow:
        return uow.ingestions.get(tenant, ingestion_id)


def listed(
    uow_factory: UowFactory,
    tenant: str = "tenant-a",
    states: tuple[IngestionState, ...] = (),
    after: str | None = None,
    limit: int = 100,
) -> list[str]:
    with uow_factory() as uow:
        return [i.ingestion_id for i in uow.ingestions.list_after(tenant, states=states, after=after, limit=limit)]


def test_add_then_get_round_trips_every_field(uow_factory: UowFactory) -> None:
    ingestion = Ingestion(
        tenant="tenant-a",
        ingestion_id="orders",
        spec=rich_spec(),
        state=IngestionState.PAUSED,
        state_message="paused by ops",
        schema_version=3,
        next_run_time=datetime(2030, 1, 1, tzinfo=UTC),
        prefect_deployment_id="dep-1",
    )
    add(uow_factory, ingestion)
    assert ingestion.create_time is not None
    assert ingestion.update_time is not None

    got = get(uow_factory, "orders")
    assert got is not None
    assert got.spec == rich_spec()
    assert got.model_dump(exclude={"spec"}) == ingestion.model_dump(exclude={"spec"})
    assert got == ingestion


def test_last_run_is_owned_by_the_run_repository(uow_factory: UowFactory) -> None:
    """last_run is output-only: set when a run starts, never written back by save()."""
    add(uow_factory, make_ingestion("orders"))
    with uow_factory() as uow:
        ingestion = uow.ingestions.get("tenant-a", "orders")
        assert ingestion is not None
        uow.runs.set_last_run(ingestion.id, "20300101-000000-0001abc")
        uow.commit()
    with uow_factory() as uow:
        ingestion = uow.ingestions.get("tenant-a", "orders", for_update=True)
        assert ingestion is not None
        assert ingestion.last_run == "ingestions/orders/runs/20300101-000000-0001abc"
        ingestion.last_run = "something else"
        uow.ingestions.save(ingestion)
        uow.commit()
    got = get(uow_factory, "orders")
    assert got is not None
    assert got.last_run == "ingestions/orders/runs/20300101-000000-0001abc"


def test_spec_is_stored_as_jsonb(uow_factory: UowFactory, session_factory: sessionmaker[Session]) -> None:
    add(uow_factory, Ingestion(tenant="tenant-a", ingestion_id="orders", spec=rich_spec()))
    with session_factory() as session:
        kind = session.execute(select(func.jsonb_typeof(IngestionRow.spec))).scalar_one()
        table = session.execute(select(IngestionRow.spec["destination"]["table"].astext)).scalar_one()
    assert kind == "object"
    assert table == "raw.orders"


def test_get_of_a_missing_ingestion_is_none(uow_factory: UowFactory) -> None:
    assert get(uow_factory, "missing") is None


def test_duplicate_id_in_a_tenant_is_already_exists(uow_factory: UowFactory) -> None:
    add(uow_factory, make_ingestion("orders"))
    with uow_factory() as uow, pytest.raises(AlreadyExists) as caught:
        uow.ingestions.add(make_ingestion("orders"))
    assert caught.value.metadata == {"constraint": "uq_ingestions_tenant_ingestion_id"}
    assert listed(uow_factory) == ["orders"]


def test_same_id_in_another_tenant_is_fine(uow_factory: UowFactory) -> None:
    add(uow_factory, make_ingestion("orders", "tenant-a"))
    add(uow_factory, make_ingestion("orders", "tenant-b"))
    a, b = get(uow_factory, "orders", "tenant-a"), get(uow_factory, "orders", "tenant-b")
    assert a is not None
    assert b is not None
    assert (a.tenant, b.tenant) == ("tenant-a", "tenant-b")
    assert a.id != b.id
    assert get(uow_factory, "orders", "tenant-c") is None


def test_list_orders_by_id_and_honours_after_limit_and_states(uow_factory: UowFactory) -> None:
    add(
        uow_factory,
        make_ingestion("c"),
        make_ingestion("a", state=IngestionState.PAUSED),
        make_ingestion("e", state=IngestionState.ERROR),
        make_ingestion("b"),
        make_ingestion("d", state=IngestionState.PAUSED),
        make_ingestion("a", tenant="tenant-b"),
        make_ingestion("aa", tenant="tenant-b"),
    )
    assert listed(uow_factory) == ["a", "b", "c", "d", "e"]
    assert listed(uow_factory, after="b") == ["c", "d", "e"]
    assert listed(uow_factory, after="bb") == ["c", "d", "e"]
    assert listed(uow_factory, after="e") == []
    assert listed(uow_factory, limit=2) == ["a", "b"]
    assert listed(uow_factory, after="a", limit=2) == ["b", "c"]
    assert listed(uow_factory, states=(IngestionState.PAUSED,)) == ["a", "d"]
    assert listed(uow_factory, states=(IngestionState.PAUSED, IngestionState.ERROR), after="a") == ["d", "e"]
    assert listed(uow_factory, states=(IngestionState.DELETING,)) == []
    assert listed(uow_factory, tenant="tenant-b") == ["a", "aa"]
    assert listed(uow_factory, tenant="tenant-c") == []


def test_walking_with_after_visits_every_row_once_in_list_order(uow_factory: UowFactory) -> None:
    """Keyset paging compares with `>`: ids with '-' and digits (collation-sensitive) must not be skipped."""
    ids = ["a-b", "a1", "ab", "a-a", "a0"]
    add(uow_factory, *(make_ingestion(i) for i in ids))
    order = listed(uow_factory)
    assert sorted(order) == sorted(ids)
    # Walking with `after` must visit every row exactly once, in the listed order.
    walked: list[str] = []
    after: str | None = None
    while True:
        page = listed(uow_factory, after=after, limit=1)
        if not page:
            break
        walked += page
        after = page[-1]
    assert walked == order


def test_save_bumps_the_version(uow_factory: UowFactory) -> None:
    add(uow_factory, make_ingestion())
    first = get(uow_factory, "orders")
    assert first is not None
    assert first.version == 1

    with uow_factory() as uow:
        ingestion = uow.ingestions.get("tenant-a", "orders", for_update=True)
        assert ingestion is not None
        ingestion.state = IngestionState.PAUSED
        ingestion.state_message = "maintenance"
        saved = uow.ingestions.save(ingestion)
        assert saved.version == 2
        assert saved.etag == 'W/"2"'
        uow.commit()

    with uow_factory() as uow:
        ingestion = uow.ingestions.get("tenant-a", "orders", for_update=True)
        assert ingestion is not None
        assert uow.ingestions.save(ingestion).version == 3
        uow.commit()

    stored = get(uow_factory, "orders")
    assert stored is not None
    assert (stored.version, stored.state, stored.state_message) == (3, IngestionState.PAUSED, "maintenance")
    assert stored.create_time == first.create_time
    assert stored.update_time is not None
    assert first.update_time is not None
    assert stored.update_time > first.update_time


def test_save_ignores_a_stale_version_from_the_caller(uow_factory: UowFactory) -> None:
    add(uow_factory, make_ingestion())
    with uow_factory() as uow:
        ingestion = uow.ingestions.get("tenant-a", "orders")
        assert ingestion is not None
        ingestion.version = 99
        assert uow.ingestions.save(ingestion).version == 2
        uow.commit()
    stored = get(uow_factory, "orders")
    assert stored is not None
    assert stored.version == 2


def test_leaving_without_commit_rolls_back(uow_factory: UowFactory) -> None:
    with uow_factory() as uow:
        uow.ingestions.add(make_ingestion("orders"))
        assert uow.ingestions.get("tenant-a", "orders") is not None  # visible inside the transaction
    assert get(uow_factory, "orders") is None


def test_an_exception_rolls_back(uow_factory: UowFactory) -> None:
    add(uow_factory, make_ingestion("orders"))

    def fail_half_way() -> None:
        with uow_factory() as uow:
            ingestion = uow.ingestions.get("tenant-a", "orders")
            assert ingestion is not None
            ingestion.state = IngestionState.ERROR
            uow.ingestions.save(ingestion)
            uow.ingestions.add(make_ingestion("other"))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_half_way()
    stored = get(uow_factory, "orders")
    assert stored is not None
    assert (stored.state, stored.version) == (IngestionState.ACTIVE, 1)
    assert get(uow_factory, "other") is None


def test_explicit_rollback_discards_earlier_work(uow_factory: UowFactory) -> None:
    with uow_factory() as uow:
        uow.ingestions.add(make_ingestion("a"))
        uow.rollback()
        uow.ingestions.add(make_ingestion("b"))
        uow.commit()
    assert listed(uow_factory) == ["b"]


def test_delete(uow_factory: UowFactory, session_factory: sessionmaker[Session]) -> None:
    ingestion = make_ingestion()
    add(uow_factory, ingestion, make_ingestion("keep"))
    with session_factory() as session:
        session.add(FileRow(ingestion_pk=ingestion.id, path="s3://bucket/x/1", size_bytes=1, state="PENDING"))
        session.commit()
    with uow_factory() as uow:
        found = uow.ingestions.get("tenant-a", "orders")
        assert found is not None
        uow.ingestions.delete(found)
        uow.commit()
    assert listed(uow_factory) == ["keep"]
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(FileRow)) == 0


def test_file_counts_aggregate_file_rows(uow_factory: UowFactory, session_factory: sessionmaker[Session]) -> None:
    a, b, c = make_ingestion("a"), make_ingestion("b"), make_ingestion("c")
    add(uow_factory, a, b, c)
    states_a = ["PENDING"] * 3 + ["LEASED"] + ["SUCCEEDED"] * 2 + ["FAILED"] + ["QUARANTINED"]
    states_b = ["SUCCEEDED", "SKIPPED", "SKIPPED"]
    with session_factory() as session:
        for ingestion, states in ((a, states_a), (b, states_b)):
            session.add_all(
                FileRow(ingestion_pk=ingestion.id, path=f"s3://bucket/x/{i}", size_bytes=10, state=state)
                for i, state in enumerate(states)
            )
        session.commit()

    with uow_factory() as uow:
        counted = uow.ingestions.with_file_counts([c, a, b])
        assert uow.ingestions.with_file_counts([]) == []

    assert [i.ingestion_id for i in counted] == ["c", "a", "b"]
    assert counted[0].file_counts == FileCounts()
    assert counted[1].file_counts == FileCounts(pending=3, leased=1, succeeded=2, failed=1, quarantined=1, skipped=0)
    assert counted[2].file_counts == FileCounts(succeeded=1, skipped=2)
    assert a.file_counts == FileCounts()  # the input is not changed


def test_file_counts_of_an_ingestion_without_rows(uow_factory: UowFactory) -> None:
    ghost = make_ingestion("ghost")
    with uow_factory() as uow:
        assert uow.ingestions.with_file_counts([ghost])[0].file_counts == FileCounts()


def test_idempotency_claim_complete_and_replay(uow_factory: UowFactory, session_factory: sessionmaker[Session]) -> None:
    with uow_factory() as uow:
        assert uow.idempotency.claim("tenant-a", "req-1", "CreateIngestion", "fp") is None
        uow.idempotency.complete("tenant-a", "req-1", {"answer": 42, "nested": {"list": [1, "x"]}})
        uow.commit()
    with uow_factory() as uow:
        assert uow.idempotency.claim("tenant-a", "req-1", "CreateIngestion", "other") == IdempotencyRecord(
            "CreateIngestion", "fp", {"answer": 42, "nested": {"list": [1, "x"]}}
        )
        assert uow.idempotency.claim("tenant-b", "req-1", "CreateIngestion", "fp") is None
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(IdempotencyRow)) == 1


def test_an_uncommitted_claim_is_released_on_rollback(uow_factory: UowFactory) -> None:
    with uow_factory() as uow:
        assert uow.idempotency.claim("tenant-a", "req-1", "CreateIngestion", "fp") is None
    with uow_factory() as uow:
        assert uow.idempotency.claim("tenant-a", "req-1", "CreateIngestion", "fp") is None


def test_add_records_the_given_primary_key(uow_factory: UowFactory, session_factory: sessionmaker[Session]) -> None:
    ingestion = make_ingestion()
    ingestion.id = uuid.UUID("00000000-0000-4000-8000-000000000001")
    add(uow_factory, ingestion)
    with session_factory() as session:
        row = session.scalars(select(IngestionRow)).one()
    assert row.id == ingestion.id
    assert (row.tenant, row.ingestion_id, row.state, row.version) == ("tenant-a", "orders", "ACTIVE", 1)
