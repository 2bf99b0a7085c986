"""IngestionService on in-memory fakes of the Unit of Work and repositories (cosmicpython style).

The fake Unit of Work is transactional like the real one: repositories work on a private copy of
the committed state, `commit()` publishes it, and leaving `with uow:` without a commit discards it.
So "nothing was committed" is checked both by the `committed` flag and by the stored state.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import pytest

from controlplane.domain.errors import (
    AlreadyExists,
    EtagMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    WrongState,
)
from controlplane.domain.idempotency import RequestKey
from controlplane.domain.ingestion import (
    Destination,
    FileCounts,
    Format,
    FormatType,
    Ingestion,
    IngestionSpec,
    IngestionState,
    Limits,
    Schema,
    Source,
)
from controlplane.domain.validation import INGESTION_ID
from controlplane.service.ingestions import IngestionService
from controlplane.service.ports import IdempotencyRecord, UnitOfWork

TENANT = "tenant-a"

Key = tuple[str, str]


class FakeIngestionRepository:
    def __init__(self, rows: dict[Key, Ingestion], file_counts: dict[uuid.UUID, FileCounts], uow: FakeUnitOfWork):
        self.rows = rows
        self._file_counts = file_counts
        self._uow = uow

    def add(self, ingestion: Ingestion) -> None:
        key = (ingestion.tenant, ingestion.ingestion_id)
        self._uow.adds += 1
        if key in self.rows:
            raise AlreadyExists("an ingestion with this id already exists")
        self.rows[key] = ingestion.model_copy(deep=True)

    def get(self, tenant: str, ingestion_id: str, *, for_update: bool = False) -> Ingestion | None:
        row = self.rows.get((tenant, ingestion_id))
        return row.model_copy(deep=True) if row else None

    def list_after(
        self, tenant: str, *, states: Collection[IngestionState], after: str | None, limit: int
    ) -> Sequence[Ingestion]:
        rows = sorted(
            (r for (t, _), r in self.rows.items() if t == tenant and (not states or r.state in states)),
            key=lambda r: r.ingestion_id,
        )
        return [r.model_copy(deep=True) for r in rows if after is None or r.ingestion_id > after][:limit]

    def save(self, ingestion: Ingestion) -> Ingestion:
        key = (ingestion.tenant, ingestion.ingestion_id)
        self._uow.saves += 1
        ingestion.version = self.rows[key].version + 1
        self.rows[key] = ingestion.model_copy(deep=True)
        return ingestion

    def delete(self, ingestion: Ingestion) -> None:
        del self.rows[(ingestion.tenant, ingestion.ingestion_id)]

    def with_file_counts(self, ingestions: Sequence[Ingestion]) -> list[Ingestion]:
        return [i.model_copy(update={"file_counts": self._file_counts.get(i.id, FileCounts())}) for i in ingestions]


class FakeIdempotencyRepository:
    def __init__(self, records: dict[Key, IdempotencyRecord], created: dict[Key, datetime]) -> None:
        self.records = records
        self.created = created

    def claim(self, tenant: str, request_id: str, method: str, fingerprint: str) -> IdempotencyRecord | None:
        earlier = self.records.get((tenant, request_id))
        if earlier is not None:
            return earlier
        self.records[(tenant, request_id)] = IdempotencyRecord(method, fingerprint, None)
        self.created[(tenant, request_id)] = datetime.now(UTC)
        return None

    def purge(self, older_than: timedelta, limit: int) -> int:
        cutoff = datetime.now(UTC) - older_than
        old = sorted((k for k, t in self.created.items() if t < cutoff), key=self.created.__getitem__)[:limit]
        for key in old:
            del self.records[key], self.created[key]
        return len(old)

    def complete(self, tenant: str, request_id: str, response: dict[str, Any]) -> None:
        record = self.records[(tenant, request_id)]
        self.records[(tenant, request_id)] = IdempotencyRecord(record.method, record.fingerprint, response)


class FakeUnitOfWork:
    def __init__(self) -> None:
        # The committed state ("the database").
        self.stored: dict[Key, Ingestion] = {}
        self.stored_requests: dict[Key, IdempotencyRecord] = {}
        self.stored_request_times: dict[Key, datetime] = {}
        self.file_counts: dict[uuid.UUID, FileCounts] = {}
        self.committed = False
        self.commits = 0
        self.adds = 0
        self.saves = 0
        self.open = False
        self._begin()

    def _begin(self) -> None:
        self._ingestions = FakeIngestionRepository(dict(self.stored), self.file_counts, self)
        self._idempotency = FakeIdempotencyRepository(dict(self.stored_requests), dict(self.stored_request_times))

    @property
    def ingestions(self) -> FakeIngestionRepository:
        return self._ingestions

    @property
    def idempotency(self) -> FakeIdempotencyRepository:
        return self._idempotency

    def __enter__(self) -> Self:
        assert not self.open, "nested Unit of Work"
        self.open = True
        self._begin()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.rollback()
        self.open = False

    def commit(self) -> None:
        assert self.open, "commit outside 'with uow:'"
        self.stored = dict(self._ingestions.rows)
        self.stored_requests = dict(self._idempotency.records)
        self.stored_request_times = dict(self._idempotency.created)
        self.committed = True
        self.commits += 1

    def rollback(self) -> None:
        self._begin()

    # test helpers
    def seed(self, ingestion: Ingestion) -> Ingestion:
        self.stored[(ingestion.tenant, ingestion.ingestion_id)] = ingestion.model_copy(deep=True)
        return ingestion

    def stored_ingestion(self, ingestion_id: str, tenant: str = TENANT) -> Ingestion:
        return self.stored[(tenant, ingestion_id)]


def make_spec(**overrides: Any) -> IngestionSpec:
    fields: dict[str, Any] = {
        "display_name": "Orders",
        "description": "raw orders",
        "source": Source(uri="s3://bucket/orders", glob="*.csv"),
        "format": Format(type=FormatType.CSV, header=True, delimiter=","),
        "destination": Destination(table="raw.orders"),
    }
    fields.update(overrides)
    return IngestionSpec(**fields)


def make_ingestion(ingestion_id: str = "orders", state: IngestionState = IngestionState.ACTIVE, **kw: Any) -> Ingestion:
    return Ingestion(tenant=TENANT, ingestion_id=ingestion_id, spec=make_spec().with_defaults(), state=state, **kw)


@pytest.fixture
def uow() -> FakeUnitOfWork:
    return FakeUnitOfWork()


@pytest.fixture
def service(uow: FakeUnitOfWork) -> IngestionService:
    factory: Callable[[], UnitOfWork] = lambda: uow  # noqa: E731 - the protocol type is the point
    return IngestionService(factory)


def fields_of(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


# --- create -------------------------------------------------------------------------------------------------------


def test_create_commits_once_with_defaults(service: IngestionService, uow: FakeUnitOfWork) -> None:
    created = service.create(TENANT, make_spec(), "orders")
    assert uow.commits == 1
    assert uow.committed
    assert uow.adds == 1
    assert created.name == "ingestions/orders"
    assert created.state is IngestionState.ACTIVE
    assert created.version == 1
    assert created.spec == make_spec().with_defaults()
    assert created.spec.limits.max_attempts == 5
    assert uow.stored_ingestion("orders") == created


def test_create_generates_a_readable_id(service: IngestionService, uow: FakeUnitOfWork) -> None:
    created = service.create(TENANT, make_spec(destination=Destination(table="raw.web_orders")))
    assert re.fullmatch(r"web-orders-[0-9a-f]{6}", created.ingestion_id)
    assert INGESTION_ID.match(created.ingestion_id)
    assert list(uow.stored) == [(TENANT, created.ingestion_id)]


def test_create_with_an_invalid_spec_commits_nothing(service: IngestionService, uow: FakeUnitOfWork) -> None:
    with pytest.raises(InvalidArgument) as caught:
        service.create(TENANT, make_spec(source=Source(), limits=Limits(max_attempts=1000)), "orders")
    assert fields_of(caught.value) == ["source.uri", "limits.max_attempts"]
    assert not uow.committed
    assert uow.commits == 0
    assert uow.adds == 0
    assert uow.stored == {}
    assert uow.stored_requests == {}


def test_create_with_an_invalid_id_commits_nothing(service: IngestionService, uow: FakeUnitOfWork) -> None:
    with pytest.raises(InvalidArgument) as caught:
        service.create(TENANT, make_spec(), "Orders_1", key=RequestKey("r-1", "fp"))
    assert fields_of(caught.value) == ["ingestion_id"]
    assert not uow.committed
    assert uow.stored == {}
    assert uow.stored_requests == {}


def test_create_duplicate_commits_nothing(service: IngestionService, uow: FakeUnitOfWork) -> None:
    service.create(TENANT, make_spec(), "orders")
    with pytest.raises(AlreadyExists):
        service.create(TENANT, make_spec(display_name="Other"), "orders", key=RequestKey("r-2", "fp"))
    assert uow.commits == 1
    assert uow.stored_ingestion("orders").spec.display_name == "Orders"
    assert uow.stored_requests == {}


def test_repeated_request_returns_the_first_answer(service: IngestionService, uow: FakeUnitOfWork) -> None:
    key = RequestKey("req-1", "fingerprint-a")
    first = service.create(TENANT, make_spec(), key=key)
    again = service.create(TENANT, make_spec(), key=key)
    assert again == first
    assert uow.adds == 1
    assert uow.commits == 1
    assert list(uow.stored) == [(TENANT, first.ingestion_id)]
    record = uow.stored_requests[(TENANT, "req-1")]
    assert (record.method, record.fingerprint) == ("CreateIngestion", "fingerprint-a")
    assert record.response is not None
    assert record.response["ingestion_id"] == first.ingestion_id


def test_request_ids_are_per_tenant(service: IngestionService, uow: FakeUnitOfWork) -> None:
    key = RequestKey("req-1", "fp")
    a = service.create("tenant-a", make_spec(), "orders", key=key)
    b = service.create("tenant-b", make_spec(), "orders", key=key)
    assert (a.tenant, b.tenant) == ("tenant-a", "tenant-b")
    assert uow.adds == 2


def test_same_request_id_with_another_fingerprint_is_invalid(service: IngestionService, uow: FakeUnitOfWork) -> None:
    service.create(TENANT, make_spec(), "orders", key=RequestKey("req-1", "fingerprint-a"))
    with pytest.raises(InvalidArgument) as caught:
        service.create(TENANT, make_spec(display_name="Other"), "orders-2", key=RequestKey("req-1", "fingerprint-b"))
    assert fields_of(caught.value) == ["request_id"]
    assert uow.adds == 1
    assert uow.commits == 1
    assert list(uow.stored) == [(TENANT, "orders")]


def test_same_request_id_for_another_method_is_invalid(service: IngestionService, uow: FakeUnitOfWork) -> None:
    service.create(TENANT, make_spec(), "orders", key=RequestKey("req-1", "fp"))
    with pytest.raises(InvalidArgument) as caught:
        service.pause(TENANT, "orders", key=RequestKey("req-1", "fp"))
    assert fields_of(caught.value) == ["request_id"]
    assert uow.stored_ingestion("orders").state is IngestionState.ACTIVE


def test_a_failed_request_does_not_use_up_its_request_id(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion(state=IngestionState.ERROR))
    key = RequestKey("req-1", "fp")
    with pytest.raises(WrongState):
        service.pause(TENANT, "orders", key=key)
    assert uow.stored_requests == {}
    uow.seed(make_ingestion(state=IngestionState.ACTIVE))
    paused = service.pause(TENANT, "orders", key=key)
    assert paused.state is IngestionState.PAUSED


# --- pause / resume -----------------------------------------------------------------------------------------------


def test_pause_then_resume(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion())
    paused = service.pause(TENANT, "orders")
    assert paused.state is IngestionState.PAUSED
    assert paused.version == 2
    assert uow.stored_ingestion("orders").state is IngestionState.PAUSED
    assert uow.commits == 1
    resumed = service.resume(TENANT, "orders")
    assert resumed.state is IngestionState.ACTIVE
    assert resumed.version == 3
    assert uow.stored_ingestion("orders").state is IngestionState.ACTIVE
    assert uow.saves == 2


def test_pause_when_paused_and_resume_when_active_change_nothing(
    service: IngestionService, uow: FakeUnitOfWork
) -> None:
    uow.seed(make_ingestion("a", IngestionState.PAUSED))
    uow.seed(make_ingestion("b", IngestionState.ACTIVE))
    assert service.pause(TENANT, "a").version == 1
    assert service.resume(TENANT, "b").version == 1
    assert uow.saves == 0
    assert uow.stored_ingestion("a").state is IngestionState.PAUSED
    assert uow.stored_ingestion("b").state is IngestionState.ACTIVE


@pytest.mark.parametrize(
    "state", [IngestionState.DELETING, IngestionState.ERROR, IngestionState.PROVISIONING, IngestionState.REFRESHING]
)
@pytest.mark.parametrize("action", ["pause", "resume"])
def test_pause_and_resume_from_other_states_are_wrong_state(
    service: IngestionService, uow: FakeUnitOfWork, state: IngestionState, action: str
) -> None:
    uow.seed(make_ingestion(state=state))
    with pytest.raises(WrongState) as caught:
        getattr(service, action)(TENANT, "orders")
    assert isinstance(caught.value, FailedPrecondition)
    assert caught.value.metadata == {"ingestion": "ingestions/orders", "state": state.value}
    assert state.value in caught.value.message
    stored = uow.stored_ingestion("orders")
    assert (stored.state, stored.version) == (state, 1)
    assert uow.saves == 0


def test_repeated_pause_request_returns_the_first_answer(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion())
    key = RequestKey("req-p", "fp")
    first = service.pause(TENANT, "orders", key=key)
    service.resume(TENANT, "orders")
    again = service.pause(TENANT, "orders", key=key)
    assert again == first
    assert uow.stored_ingestion("orders").state is IngestionState.ACTIVE


# --- update -------------------------------------------------------------------------------------------------------


def test_update_changes_only_the_masked_paths(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion())
    patch = IngestionSpec(
        display_name="New name",
        description="ignored: not in the mask",
        format=Format(type=FormatType.JSON, delimiter=";"),
        destination=Destination(table="other.table"),
    )
    updated = service.update(TENANT, "orders", patch, ["display_name", "format.delimiter"])
    expected = make_spec(
        display_name="New name", format=Format(type=FormatType.CSV, header=True, delimiter=";")
    ).with_defaults()
    assert updated.spec == expected
    assert updated.version == 2
    assert uow.stored_ingestion("orders").spec == expected
    assert uow.commits == 1


def test_update_uses_api_field_names(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion())
    updated = service.update(
        TENANT, "orders", IngestionSpec(row_schema=Schema(hints={"id": "bigint"})), ["schema.hints"]
    )
    assert updated.spec.row_schema.hints == {"id": "bigint"}


def test_update_of_a_whole_message_refills_defaults(service: IngestionService, uow: FakeUnitOfWork) -> None:
    seeded = make_ingestion()
    uow.seed(seeded.model_copy(update={"spec": make_spec(limits=Limits(max_files_per_lease=7)).with_defaults()}))
    updated = service.update(TENANT, "orders", IngestionSpec(limits=Limits(max_attempts=9)), ["limits"])
    assert updated.spec.limits == Limits(max_files_per_lease=1000, max_bytes_per_lease=1 << 30, max_attempts=9)


def test_update_that_fails_validation_commits_nothing(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion())
    before = uow.stored_ingestion("orders").model_copy(deep=True)
    with pytest.raises(InvalidArgument) as caught:
        service.update(
            TENANT,
            "orders",
            IngestionSpec(limits=Limits(max_attempts=1000)),
            ["limits.max_attempts"],
            key=RequestKey("u", "f"),
        )
    assert fields_of(caught.value) == ["limits.max_attempts"]
    assert uow.stored_ingestion("orders") == before
    assert uow.stored_ingestion("orders").version == 1
    assert not uow.committed
    assert uow.saves == 0
    assert uow.stored_requests == {}


@pytest.mark.parametrize("path", ["source.uri", "destination", "destination.table", "source", "state", "nope"])
def test_update_of_an_immutable_or_unknown_path_is_invalid(
    service: IngestionService, uow: FakeUnitOfWork, path: str
) -> None:
    uow.seed(make_ingestion())
    with pytest.raises(InvalidArgument) as caught:
        service.update(TENANT, "orders", make_spec(source=Source(uri="s3://other/x")), [path])
    assert fields_of(caught.value) == ["update_mask"]
    assert not uow.committed
    assert uow.stored_ingestion("orders").version == 1


def test_update_with_an_empty_mask_is_invalid(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion())
    with pytest.raises(InvalidArgument) as caught:
        service.update(TENANT, "orders", make_spec(display_name="x"), [])
    assert fields_of(caught.value) == ["update_mask"]
    assert not uow.committed


def test_update_path_below_a_scalar_is_invalid_argument(service: IngestionService, uow: FakeUnitOfWork) -> None:
    """Nothing a client sends may escape as a non-domain error (INTERNAL); a nonsense path is INVALID_ARGUMENT."""
    uow.seed(make_ingestion())
    with pytest.raises(InvalidArgument):
        service.update(TENANT, "orders", IngestionSpec(limits=Limits(max_attempts=5)), ["limits.max_attempts.x"])
    assert not uow.committed


def test_update_checks_the_etag(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion())
    with pytest.raises(EtagMismatch) as caught:
        service.update(TENANT, "orders", make_spec(display_name="x"), ["display_name"], etag='W/"7"')
    assert caught.value.metadata == {"ingestion": "ingestions/orders", "etag": 'W/"1"'}
    assert not uow.committed
    updated = service.update(TENANT, "orders", make_spec(display_name="x"), ["display_name"], etag='W/"1"')
    assert updated.etag == 'W/"2"'


def test_update_of_a_deleting_ingestion_is_wrong_state(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion(state=IngestionState.DELETING))
    with pytest.raises(WrongState):
        service.update(TENANT, "orders", make_spec(display_name="x"), ["display_name"])
    assert not uow.committed


def test_repeated_update_request_applies_once(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion())
    key = RequestKey("req-u", "fp")
    first = service.update(TENANT, "orders", make_spec(display_name="x"), ["display_name"], key=key)
    again = service.update(TENANT, "orders", make_spec(display_name="x"), ["display_name"], key=key)
    assert again == first
    assert first.version == 2
    assert uow.stored_ingestion("orders").version == 2
    assert uow.saves == 1


# --- get / list / delete / not found ------------------------------------------------------------------------------


def test_get_includes_file_counts(service: IngestionService, uow: FakeUnitOfWork) -> None:
    seeded = uow.seed(make_ingestion())
    uow.file_counts[seeded.id] = FileCounts(pending=3, failed=1)
    got = service.get(TENANT, "orders")
    assert got.file_counts == FileCounts(pending=3, failed=1)
    assert not uow.committed


def test_other_tenants_ingestions_are_not_found(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion())
    with pytest.raises(NotFound):
        service.get("tenant-b", "orders")


NOT_FOUND_CALLS: dict[str, Callable[[IngestionService], object]] = {
    "get": lambda s: s.get(TENANT, "missing"),
    "update": lambda s: s.update(TENANT, "missing", make_spec(), ["display_name"]),
    "delete": lambda s: s.delete(TENANT, "missing"),
    "pause": lambda s: s.pause(TENANT, "missing"),
    "resume": lambda s: s.resume(TENANT, "missing", key=RequestKey("r", "f")),
}


@pytest.mark.parametrize("call", NOT_FOUND_CALLS.values(), ids=NOT_FOUND_CALLS.keys())
def test_unknown_ids_are_not_found(
    service: IngestionService, uow: FakeUnitOfWork, call: Callable[[IngestionService], object]
) -> None:
    uow.seed(make_ingestion())
    with pytest.raises(NotFound) as caught:
        call(service)
    assert caught.value.metadata == {"ingestion": "ingestions/missing"}
    assert not uow.committed
    assert uow.stored_requests == {}


def test_delete(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion())
    service.delete(TENANT, "orders", etag='W/"1"')
    assert uow.stored == {}
    assert uow.commits == 1


def test_delete_with_a_stale_etag_or_drop_table_keeps_the_ingestion(
    service: IngestionService, uow: FakeUnitOfWork
) -> None:
    uow.seed(make_ingestion())
    with pytest.raises(EtagMismatch):
        service.delete(TENANT, "orders", etag='W/"2"')
    with pytest.raises(FailedPrecondition):
        service.delete(TENANT, "orders", drop_table=True)
    assert (TENANT, "orders") in uow.stored
    assert not uow.committed


def test_list_pages_through_every_ingestion_once(service: IngestionService, uow: FakeUnitOfWork) -> None:
    for name in ["e", "c", "a", "d", "b"]:
        uow.seed(make_ingestion(name))
    uow.seed(make_ingestion("zz").model_copy(update={"tenant": "tenant-b"}))
    pages: list[list[str]] = []
    token = ""
    while True:
        items, token = service.list(TENANT, 2, token, "")
        pages.append([i.ingestion_id for i in items])
        if not token:
            break
    assert pages == [["a", "b"], ["c", "d"], ["e"]]


def test_list_filters_by_state(service: IngestionService, uow: FakeUnitOfWork) -> None:
    uow.seed(make_ingestion("a"))
    uow.seed(make_ingestion("b", IngestionState.PAUSED))
    uow.seed(make_ingestion("c", IngestionState.ERROR))
    items, token = service.list(TENANT, 0, "", "state = PAUSED OR state = STATE_ERROR")
    assert [i.ingestion_id for i in items] == ["b", "c"]
    assert token == ""


def test_list_rejects_a_token_after_the_filter_changed(service: IngestionService, uow: FakeUnitOfWork) -> None:
    for name in "abc":
        uow.seed(make_ingestion(name))
    _, token = service.list(TENANT, 1, "", "")
    assert token
    with pytest.raises(InvalidArgument) as caught:
        service.list(TENANT, 1, token, "state = ACTIVE")
    assert fields_of(caught.value) == ["page_token"]
