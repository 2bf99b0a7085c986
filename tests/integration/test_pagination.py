"""ListIngestions paging over gRPC: sizes, tokens, and stable pages while others insert."""

from __future__ import annotations

import base64
import queue
import random
import threading
from collections.abc import Callable

import grpc
import pytest

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import ingestion_pb2_grpc
from controlplane.adapters.unit_of_work import SqlAlchemyUnitOfWork
from controlplane.api.context import DEFAULT_TENANT
from controlplane.api.convert import spec_from_proto
from controlplane.domain.ingestion import Ingestion, IngestionState

from .helpers import error_info, field_violations, valid_ingestion

Stub = ingestion_pb2_grpc.IngestionServiceStub


def _create(ingestions: Stub, ingestion_id: str) -> pb.Ingestion:
    request = pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id=ingestion_id)
    return ingestions.CreateIngestion(request, timeout=10).ingestion


def _ids(page: pb.ListIngestionsResponse) -> list[str]:
    return [i.name.removeprefix("ingestions/") for i in page.ingestions]


def _list(ingestions: Stub, page_size: int = 0, page_token: str = "", filter_: str = "") -> pb.ListIngestionsResponse:
    request = pb.ListIngestionsRequest(page_size=page_size, page_token=page_token, filter=filter_)
    return ingestions.ListIngestions(request, timeout=10)


def _pages(ingestions: Stub, page_size: int, filter_: str = "") -> list[pb.ListIngestionsResponse]:
    pages = [_list(ingestions, page_size, filter_=filter_)]
    while pages[-1].next_page_token:
        pages.append(_list(ingestions, page_size, pages[-1].next_page_token, filter_))
        assert len(pages) < 10_000, "paging does not end"
    return pages


def _bad_token(ingestions: Stub, token: str, filter_: str = "") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _list(ingestions, 5, token, filter_)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code()}: {error.details()}"
    assert error_info(error).reason == "INVALID_ARGUMENT"
    assert set(field_violations(error)) == {"page_token"}
    return error


def _bulk_insert(uow_factory: Callable[[], SqlAlchemyUnitOfWork], ids: list[str]) -> None:
    """Rows straight through the repository, in one transaction: many rows, quickly."""
    spec = spec_from_proto(valid_ingestion()).with_defaults()
    with uow_factory() as uow:
        for ingestion_id in ids:
            uow.ingestions.add(
                Ingestion(tenant=DEFAULT_TENANT, ingestion_id=ingestion_id, spec=spec, state=IngestionState.ACTIVE)
            )
        uow.commit()


def test_pages_of_five(ingestions: Stub) -> None:
    ids = [f"ing-{i:02d}" for i in range(23)]
    for ingestion_id in random.Random(7).sample(ids, len(ids)):
        _create(ingestions, ingestion_id)
    pages = _pages(ingestions, 5)
    assert [len(p.ingestions) for p in pages] == [5, 5, 5, 5, 3]
    assert all(p.next_page_token for p in pages[:-1])
    assert pages[-1].next_page_token == ""
    listed = [i for p in pages for i in _ids(p)]
    assert listed == sorted(ids)
    # Paged items are the same as what GetIngestion returns.
    first = pages[0].ingestions[0]
    assert ingestions.GetIngestion(pb.GetIngestionRequest(name=first.name)).ingestion == first


def test_exact_multiple_has_no_empty_last_page(ingestions: Stub) -> None:
    for i in range(10):
        _create(ingestions, f"ing-{i:02d}")
    pages = _pages(ingestions, 5)
    assert [len(p.ingestions) for p in pages] == [5, 5]
    assert pages[-1].next_page_token == ""


def test_empty_list(ingestions: Stub) -> None:
    page = _list(ingestions, 5)
    assert list(page.ingestions) == []
    assert page.next_page_token == ""


def test_page_size_may_change_between_pages(ingestions: Stub) -> None:
    ids = [f"ing-{i:02d}" for i in range(9)]
    for ingestion_id in ids:
        _create(ingestions, ingestion_id)
    first = _list(ingestions, 2)
    second = _list(ingestions, 4, first.next_page_token)
    third = _list(ingestions, 100, second.next_page_token)
    assert _ids(first) + _ids(second) + _ids(third) == ids
    assert third.next_page_token == ""


def test_page_size_zero_takes_the_default(ingestions: Stub, uow_factory: Callable[[], SqlAlchemyUnitOfWork]) -> None:
    ids = [f"ing-{i:03d}" for i in range(53)]
    _bulk_insert(uow_factory, ids)
    page = _list(ingestions, 0)
    assert _ids(page) == ids[:50]
    assert page.next_page_token
    rest = _list(ingestions, 0, page.next_page_token)
    assert _ids(rest) == ids[50:]
    assert rest.next_page_token == ""


def test_page_size_is_capped(ingestions: Stub, uow_factory: Callable[[], SqlAlchemyUnitOfWork]) -> None:
    ids = [f"ing-{i:04d}" for i in range(1003)]
    _bulk_insert(uow_factory, ids)
    for page_size in (1001, 5000, 2**31 - 1):
        page = _list(ingestions, page_size)
        assert len(page.ingestions) == 1000, page_size
        assert page.next_page_token
    page = _list(ingestions, 2**31 - 1)
    rest = _list(ingestions, 2**31 - 1, page.next_page_token)
    assert _ids(page) + _ids(rest) == ids
    assert rest.next_page_token == ""


@pytest.mark.parametrize("page_size", [-1, -50, -(2**31)])
def test_negative_page_size(ingestions: Stub, page_size: int) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _list(ingestions, page_size)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"page_size"}


def _encoded(payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


GARBAGE_TOKENS = [
    "garbage",
    "!!!!",
    "x",
    "=",
    "\u00e9t\u00e9",
    "A" * 5000,
    _encoded(b"not json"),
    _encoded(b"\xff\xfe\xfd"),
    _encoded(b"[]"),
    _encoded(b"null"),
    _encoded(b"42"),
    _encoded(b'"after"'),
    _encoded(b'{"after": "ing-01"}'),
    _encoded(b'{"query": "0123456789abcdef"}'),
    _encoded(b'{"after": 1, "query": "0123456789abcdef"}'),
    _encoded(b'{"after": "ing-01", "query": "0123456789abcdef"}'),
    _encoded(b'{"after": "ing-01", "query": ["x"]}'),
    _encoded(b"[" * 1400),
    _encoded(b'{"after": ' * 300),
]


def test_garbage_page_token(ingestions: Stub) -> None:
    for i in range(3):
        _create(ingestions, f"ing-{i:02d}")
    problems = {}
    for token in GARBAGE_TOKENS:
        try:
            _bad_token(ingestions, token)
        except (AssertionError, pytest.fail.Exception) as failure:
            problems[token[:60]] = str(failure).splitlines()[0]
    assert problems == {}


def test_token_from_another_filter_is_rejected(ingestions: Stub) -> None:
    for i in range(6):
        _create(ingestions, f"ing-{i:02d}")
    ingestions.PauseIngestion(pb.PauseIngestionRequest(name="ingestions/ing-04"))
    token = _list(ingestions, 2).next_page_token
    assert token
    _bad_token(ingestions, token, "state = ACTIVE")
    _bad_token(ingestions, token, "state = PAUSED")
    paused_token = _list(ingestions, 2, filter_="state = ACTIVE").next_page_token
    _bad_token(ingestions, paused_token)
    _bad_token(ingestions, paused_token, "state = PAUSED")
    # The same filter, spelled differently, is the same query.
    either = _list(ingestions, 2, filter_="state = ACTIVE OR state = PAUSED")
    rest = _list(ingestions, 10, either.next_page_token, "state = PAUSED OR state = ACTIVE")
    assert _ids(either) + _ids(rest) == [f"ing-{i:02d}" for i in range(6)]
    # A token continues under its own filter.
    active = _pages(ingestions, 2, "state = ACTIVE")
    assert [i for p in active for i in _ids(p)] == ["ing-00", "ing-01", "ing-02", "ing-03", "ing-05"]


def test_concurrent_inserts_while_paging(ingestions: Stub) -> None:
    existing = [f"m-{i:03d}" for i in range(0, 300, 10)]
    for ingestion_id in random.Random(3).sample(existing, len(existing)):
        _create(ingestions, ingestion_id)

    cursors: queue.Queue[tuple[str, str] | None] = queue.Queue()
    inserted: queue.Queue[object] = queue.Queue()
    before_cursor: list[str] = []
    after_cursor: list[str] = []

    def writer() -> None:
        """Inserts, for each page the reader got, ids just before and just after its cursor and at both ends."""
        counter = 0
        try:
            while (page := cursors.get(timeout=30)) is not None:
                previous, cursor = page
                counter += 1
                planned = [
                    (f"{previous}-b{counter}", before_cursor),  # between the last two ids of the page
                    (f"a-{counter:03d}", before_cursor),  # before everything
                    (f"{cursor}-a{counter}", after_cursor),  # right after the cursor
                    (f"z-{counter:03d}", after_cursor),  # after everything
                ]
                for ingestion_id, bucket in planned:
                    _create(ingestions, ingestion_id)
                    bucket.append(ingestion_id)
                inserted.put(None)
        except BaseException as exc:
            inserted.put(exc)

    thread = threading.Thread(target=writer, name="writer")
    thread.start()
    seen: list[str] = []
    pages = 0
    try:
        token = ""
        while True:
            page = _list(ingestions, 3, token)
            ids = _ids(page)
            seen.extend(ids)
            pages += 1
            token = page.next_page_token
            if not token:
                break
            assert len(ids) == 3
            cursors.put((ids[-2], ids[-1]))
            outcome = inserted.get(timeout=30)
            assert outcome is None, outcome
            assert pages < 200, "paging does not end"
    finally:
        cursors.put(None)
        thread.join(timeout=30)
    assert not thread.is_alive()

    assert len(seen) == len(set(seen)), [i for i in seen if seen.count(i) > 1]
    assert seen == sorted(seen), "pages are in id order"
    for ingestion_id in existing:
        assert seen.count(ingestion_id) == 1, ingestion_id
    # Keyset paging: rows inserted behind the cursor are never seen, rows ahead of it always are.
    assert before_cursor
    assert not set(before_cursor) & set(seen), sorted(set(before_cursor) & set(seen))
    assert set(after_cursor) <= set(seen), sorted(set(after_cursor) - set(seen))
    total = _pages(ingestions, 1000)
    assert len([i for p in total for i in _ids(p)]) == len(existing) + len(before_cursor) + len(after_cursor)
