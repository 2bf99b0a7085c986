"""Request ids over gRPC: a retried mutating call returns the first answer and never applies twice."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import ingestion_pb2_grpc

from .helpers import error_info, field_violations, valid_ingestion

Stub = ingestion_pb2_grpc.IngestionServiceStub


def _all(ingestions: Stub) -> list[pb.Ingestion]:
    items: list[pb.Ingestion] = []
    token = ""
    while True:
        page = ingestions.ListIngestions(pb.ListIngestionsRequest(page_size=1000, page_token=token))
        items.extend(page.ingestions)
        token = page.next_page_token
        if not token:
            return items


def _request_id_rejected(call: Any, request: Any) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code()}: {error.details()}"
    assert error_info(error).reason == "INVALID_ARGUMENT"
    assert set(field_violations(error)) == {"request_id"}


def test_same_request_id_same_request_creates_once(ingestions: Stub) -> None:
    request = pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders", request_id="create-1")
    first = ingestions.CreateIngestion(request)
    second = ingestions.CreateIngestion(request)
    third = ingestions.CreateIngestion(request)
    assert second == first
    assert third == first
    listed = _all(ingestions)
    assert [i.name for i in listed] == ["ingestions/orders"]
    assert listed[0] == first.ingestion


def test_retry_without_ingestion_id_returns_the_generated_one(ingestions: Stub) -> None:
    request = pb.CreateIngestionRequest(ingestion=valid_ingestion(), request_id="create-generated")
    first = ingestions.CreateIngestion(request)
    second = ingestions.CreateIngestion(request)
    assert second == first
    assert first.ingestion.name.startswith("ingestions/orders-")
    assert [i.name for i in _all(ingestions)] == [first.ingestion.name]


def test_concurrent_identical_creates_create_one(ingestions: Stub) -> None:
    workers = 8
    request = pb.CreateIngestionRequest(ingestion=valid_ingestion(), request_id="concurrent-create")
    barrier = threading.Barrier(workers)
    responses: list[pb.CreateIngestionResponse | None] = [None] * workers
    errors: list[BaseException] = []

    def create(slot: int) -> None:
        try:
            barrier.wait(timeout=10)
            responses[slot] = ingestions.CreateIngestion(request, timeout=30)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,), name=f"create-{i}") for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    first = responses[0]
    assert first is not None
    assert all(r == first for r in responses), {r.ingestion.name for r in responses if r is not None}
    listed = _all(ingestions)
    assert [i.name for i in listed] == [first.ingestion.name]


def test_same_request_id_different_request_is_rejected(ingestions: Stub) -> None:
    first = ingestions.CreateIngestion(
        pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders", request_id="reused")
    )
    # Different content, different id, or a different method under the same request id.
    _request_id_rejected(
        ingestions.CreateIngestion,
        pb.CreateIngestionRequest(
            ingestion=valid_ingestion(display_name="Other"), ingestion_id="orders", request_id="reused"
        ),
    )
    _request_id_rejected(
        ingestions.CreateIngestion,
        pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="other", request_id="reused"),
    )
    _request_id_rejected(
        ingestions.PauseIngestion, pb.PauseIngestionRequest(name=first.ingestion.name, request_id="reused")
    )
    assert _all(ingestions) == [first.ingestion]
    # The original request still replays.
    again = ingestions.CreateIngestion(
        pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders", request_id="reused")
    )
    assert again == first


def test_different_request_ids_create_different_ingestions(ingestions: Stub) -> None:
    names = set()
    for request_id in ("one", "two", "three"):
        response = ingestions.CreateIngestion(
            pb.CreateIngestionRequest(ingestion=valid_ingestion(), request_id=request_id)
        )
        names.add(response.ingestion.name)
    assert len(names) == 3
    assert {i.name for i in _all(ingestions)} == names


def test_failed_attempt_is_not_recorded(ingestions: Stub) -> None:
    ingestions.CreateIngestion(pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders"))
    request = pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders", request_id="after-failure")
    with pytest.raises(grpc.RpcError) as caught:
        ingestions.CreateIngestion(request)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # The failure rolled back with its transaction: once the conflict is gone, the retry does the work.
    ingestions.DeleteIngestion(pb.DeleteIngestionRequest(name="ingestions/orders"))
    created = ingestions.CreateIngestion(request)
    assert created.ingestion.name == "ingestions/orders"
    assert ingestions.CreateIngestion(request) == created


def test_retried_update_applies_once(ingestions: Stub) -> None:
    created = ingestions.CreateIngestion(
        pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders")
    ).ingestion
    request = pb.UpdateIngestionRequest(
        ingestion=pb.Ingestion(name=created.name, display_name="Renamed", etag=created.etag),
        update_mask=FieldMask(paths=["display_name"]),
        request_id="update-1",
    )
    first = ingestions.UpdateIngestion(request)
    assert first.ingestion.display_name == "Renamed"
    assert first.ingestion.etag != created.etag
    # The retry carries the etag the first attempt consumed: it gets the first answer, not ETAG_MISMATCH,
    # and the etag is bumped once only.
    second = ingestions.UpdateIngestion(request)
    assert second == first
    got = ingestions.GetIngestion(pb.GetIngestionRequest(name=created.name)).ingestion
    assert got.etag == first.ingestion.etag
    assert got.update_time == first.ingestion.update_time
    # A new request id is a new update.
    request.request_id = "update-2"
    request.ingestion.etag = first.ingestion.etag
    third = ingestions.UpdateIngestion(request)
    assert third.ingestion.etag != first.ingestion.etag


def test_retried_pause_replays_without_acting_again(ingestions: Stub) -> None:
    created = ingestions.CreateIngestion(
        pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders")
    ).ingestion
    pause = pb.PauseIngestionRequest(name=created.name, request_id="pause-1")
    paused = ingestions.PauseIngestion(pause)
    assert paused.ingestion.state == pb.Ingestion.STATE_PAUSED
    assert ingestions.PauseIngestion(pause) == paused
    resumed = ingestions.ResumeIngestion(pb.ResumeIngestionRequest(name=created.name, request_id="resume-1"))
    assert resumed.ingestion.state == pb.Ingestion.STATE_ACTIVE
    # A late retry of the pause returns the recorded answer and does not pause again.
    assert ingestions.PauseIngestion(pause) == paused
    got = ingestions.GetIngestion(pb.GetIngestionRequest(name=created.name)).ingestion
    assert got.state == pb.Ingestion.STATE_ACTIVE
    assert got.etag == resumed.ingestion.etag


def test_retried_delete_succeeds_again(ingestions: Stub) -> None:
    created = ingestions.CreateIngestion(
        pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders")
    ).ingestion
    delete = pb.DeleteIngestionRequest(name=created.name, etag=created.etag, request_id="delete-1")
    assert ingestions.DeleteIngestion(delete) == pb.DeleteIngestionResponse()
    assert ingestions.DeleteIngestion(delete) == pb.DeleteIngestionResponse()
    assert _all(ingestions) == []
    # Without the request id, the second delete is an ordinary NOT_FOUND.
    with pytest.raises(grpc.RpcError) as caught:
        ingestions.DeleteIngestion(pb.DeleteIngestionRequest(name=created.name))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # A retried delete does not delete a new ingestion that took the same id.
    recreated = ingestions.CreateIngestion(
        pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders")
    ).ingestion
    assert ingestions.DeleteIngestion(delete) == pb.DeleteIngestionResponse()
    assert _all(ingestions) == [recreated]


def test_concurrent_creates_of_one_id_with_different_request_ids(ingestions: Stub) -> None:
    workers = 8
    barrier = threading.Barrier(workers)
    outcomes: list[Any] = [None] * workers

    def create(slot: int) -> None:
        request = pb.CreateIngestionRequest(
            ingestion=valid_ingestion(display_name=f"attempt {slot}"), ingestion_id="orders", request_id=f"r-{slot}"
        )
        barrier.wait(timeout=10)
        try:
            outcomes[slot] = ingestions.CreateIngestion(request, timeout=30)
        except grpc.RpcError as error:
            outcomes[slot] = error

    threads = [threading.Thread(target=create, args=(i,), name=f"create-{i}") for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [o for o in outcomes if isinstance(o, pb.CreateIngestionResponse)]
    losers = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(winners) == 1, outcomes
    assert [e.code() for e in losers] == [grpc.StatusCode.ALREADY_EXISTS] * (workers - 1)
    assert all(error_info(e).reason == "ALREADY_EXISTS" for e in losers)
    assert _all(ingestions) == [winners[0].ingestion]
