"""FileService over gRPC on a real PostgreSQL: ListFiles filters and pagination, RetryFiles by
name, by state and by modified range (touching nothing else), ListFileAttempts, and bad input.
Agents do not exist yet: tests move file rows in the database, as reports would."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Engine, text

from autoloader.v1 import file_pb2, file_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc, run_pb2, run_pb2_grpc
from controlplane.adapters.unit_of_work import SqlAlchemyUnitOfWork

from .helpers import field_violations, valid_ingestion

pytestmark = pytest.mark.integration

Run = run_pb2.Run
File = file_pb2.File
UowFactory = Callable[[], SqlAlchemyUnitOfWork]
TERMINAL = (Run.STATE_SUCCEEDED, Run.STATE_PARTIALLY_SUCCEEDED, Run.STATE_FAILED, Run.STATE_CANCELLED)
BASE = datetime(2024, 1, 1, tzinfo=UTC)
STATE_NAMES = {v: k.removeprefix("STATE_") for k, v in File.State.items()}


# --- helpers -----------------------------------------------------------------------------------------


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def mtime(i: int) -> datetime:
    """File i is modified i minutes after BASE."""
    return BASE + timedelta(minutes=i)


@dataclass
class Api:
    ingestions: ingestion_pb2_grpc.IngestionServiceStub
    runs: run_pb2_grpc.RunServiceStub
    files: file_pb2_grpc.FileServiceStub

    def create(self, ingestion_id: str, root: Path) -> str:
        source = ingestion_pb2.Source(uri=f"file://{root}", recursive=True)
        request = ingestion_pb2.CreateIngestionRequest(
            ingestion=valid_ingestion(source=source), ingestion_id=ingestion_id
        )
        return str(self.ingestions.CreateIngestion(request).ingestion.name)

    def get(self, run: str) -> Run:
        return self.runs.GetRun(run_pb2.GetRunRequest(name=run)).run

    def wait(self, run: str, done: Callable[[Run], bool], timeout: float = 30.0) -> Run:
        deadline = time.monotonic() + timeout
        while True:
            current = self.get(run)
            if done(current):
                return current
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting; last seen: {current}")
            time.sleep(0.05)

    def run_discovered(self, ingestion: str) -> Run:
        run = self.runs.StartRun(run_pb2.StartRunRequest(ingestion=ingestion)).run
        return self.wait(run.name, lambda r: r.state != Run.STATE_DISCOVERING)

    def pages(self, ingestion: str, page_size: int = 1000, **filters: Any) -> list[list[File]]:
        pages, token = [], ""
        while True:
            reply = self.files.ListFiles(
                file_pb2.ListFilesRequest(ingestion=ingestion, page_size=page_size, page_token=token, **filters)
            )
            pages.append(list(reply.files))
            token = reply.next_page_token
            if not token:
                return pages
            assert len(pages) < 1000

    def list(self, ingestion: str, **filters: Any) -> list[File]:
        return [f for page in self.pages(ingestion, **filters) for f in page]

    def retry(self, ingestion: str, **fields: Any) -> file_pb2.RetryFilesResponse:
        return self.files.RetryFiles(file_pb2.RetryFilesRequest(ingestion=ingestion, **fields))

    def run_names(self, ingestion: str) -> list[str]:
        reply = self.runs.ListRuns(run_pb2.ListRunsRequest(ingestion=ingestion, page_size=1000))
        return [r.name for r in reply.runs]


@pytest.fixture
def api(channel: grpc.Channel) -> Api:
    return Api(
        ingestion_pb2_grpc.IngestionServiceStub(channel),
        run_pb2_grpc.RunServiceStub(channel),
        file_pb2_grpc.FileServiceStub(channel),
    )


def make_files(root: Path, names: list[str], first: int = 0) -> list[str]:
    """Creates the files, the k-th with size k+first and mtime(k+first); returns their URIs in order."""
    uris = []
    for k, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (k + first))
        seconds = mtime(k + first).timestamp()
        os.utime(path, (seconds, seconds))
        uris.append(f"file://{path}")
    return uris


def names_for(count: int) -> list[str]:
    folders = ["a", "a b", "b", "é"]
    return [f"{folders[i % len(folders)]}/f{i:03d}.json" for i in range(count)]


def execute(engine: Engine, statement: str, **params: Any) -> int:
    with engine.begin() as conn:
        return int(conn.execute(text(statement), params).rowcount)


def set_state(engine: Engine, uris: list[str], state: str, **extra: Any) -> None:
    assignments = "".join(f", {column} = :{column}" for column in extra)
    execute(engine, f"UPDATE files SET state = :state{assignments} WHERE path = ANY(:paths)", state=state,
            paths=uris, **extra)  # fmt: skip


def run_pk(engine: Engine, run: str) -> uuid.UUID:
    with engine.connect() as conn:
        found = conn.execute(text("SELECT id FROM runs WHERE run_id = :r"), {"r": run.rsplit("/", 1)[1]}).scalar_one()
    return uuid.UUID(str(found))


def finalize(uow_factory: UowFactory, engine: Engine, run: str) -> str | None:
    with uow_factory() as uow:
        state = uow.runs.finalize_if_done(run_pk(engine, run))
        uow.commit()
    return None if state is None else str(state)


def by_path(files: list[File]) -> dict[str, File]:
    found = {f.path: f for f in files}
    assert len(found) == len(files), "a file is listed twice"
    return found


def fails(call: Callable[..., Any], request: Any, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    assert caught.value.code() == code, f"{caught.value.code()}: {caught.value.details()}"
    return caught.value


@dataclass
class Setup:
    ingestion: str
    run: Run
    uris: list[str]  # in creation order: file i has size i and mtime(i)


def setup_files(api: Api, tmp_path: Path, count: int, ingestion_id: str = "orders") -> Setup:
    root = tmp_path / ingestion_id
    uris = make_files(root, names_for(count))
    ingestion = api.create(ingestion_id, root)
    run = api.run_discovered(ingestion)
    assert run.state == Run.STATE_RUNNING
    assert run.file_counts.total == count
    return Setup(ingestion, run, uris)


CYCLE = ["PENDING", "LEASED", "SUCCEEDED", "FAILED", "QUARANTINED", "SKIPPED"]


def cycle_states(engine: Engine, uris: list[str], cycle: list[str] = CYCLE) -> dict[str, str]:
    """File i gets cycle[i % len(cycle)]; returns uri -> state."""
    wanted = {uri: cycle[i % len(cycle)] for i, uri in enumerate(uris)}
    for state in set(cycle):
        set_state(engine, [u for u, s in wanted.items() if s == state], state)
    return wanted


# --- ListFiles ---------------------------------------------------------------------------------------------


def test_list_files_filters(api: Api, tmp_path: Path, engine: Engine) -> None:
    s = setup_files(api, tmp_path, 48)
    wanted = cycle_states(engine, s.uris)
    root = f"file://{tmp_path}/orders"

    def listed(**filters: Any) -> set[str]:
        return set(by_path(api.list(s.ingestion, **filters)))

    assert listed() == set(s.uris)
    for state in CYCLE:
        value = File.State.Value(f"STATE_{state}")
        assert listed(states=[value]) == {u for u, w in wanted.items() if w == state}, state
    assert listed(states=[File.STATE_FAILED, File.STATE_QUARANTINED]) == {
        u for u, w in wanted.items() if w in ("FAILED", "QUARANTINED")
    }
    for f in api.list(s.ingestion, states=[File.STATE_LEASED]):
        assert f.state == File.STATE_LEASED

    assert listed(run=s.run.name) == set(s.uris)
    assert listed(path_prefix=f"{root}/a/") == {u for u in s.uris if u.startswith(f"{root}/a/")}
    assert len(listed(path_prefix=f"{root}/a/")) == 12
    assert listed(path_prefix=f"{root}/a") == {u for u in s.uris if u.startswith((f"{root}/a/", f"{root}/a b/"))}
    assert listed(path_prefix=f"{root}/é/") == {u for u in s.uris if "/é/" in u}
    assert listed(path_prefix=f"{root}/a/f004") == {f"{root}/a/f004.json"}
    assert listed(path_prefix=f"{root}/nothing") == set()
    assert listed(path_prefix="s3://") == set()

    # modified_after is inclusive, modified_before exclusive.
    assert listed(modified_after=ts(mtime(10)), modified_before=ts(mtime(20))) == set(s.uris[10:20])
    assert listed(modified_after=ts(mtime(40))) == set(s.uris[40:])
    assert listed(modified_before=ts(mtime(3))) == set(s.uris[:3])
    assert listed(modified_after=ts(mtime(10) + timedelta(microseconds=1)), modified_before=ts(mtime(12))) == {
        s.uris[11]
    }
    assert listed(modified_after=ts(mtime(20)), modified_before=ts(mtime(10))) == set()

    combined = listed(
        states=[File.STATE_SUCCEEDED, File.STATE_SKIPPED],
        path_prefix=f"{root}/b/",
        modified_after=ts(mtime(6)),
        modified_before=ts(mtime(40)),
        run=s.run.name,
    )
    assert combined == {
        u
        for i, u in enumerate(s.uris)
        if wanted[u] in ("SUCCEEDED", "SKIPPED") and u.startswith(f"{root}/b/") and 6 <= i < 40
    }
    assert combined  # the case is not vacuous


def test_list_files_by_run(api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory) -> None:
    root = tmp_path / "orders"
    first_uris = make_files(root, [f"old/{i}.json" for i in range(5)])
    ingestion = api.create("orders", root)
    first = api.run_discovered(ingestion)
    set_state(engine, first_uris, "SUCCEEDED")
    assert finalize(uow_factory, engine, first.name) == "SUCCEEDED"
    second_uris = make_files(root, [f"new/{i}.json" for i in range(3)], first=10)
    second = api.run_discovered(ingestion)
    assert set(by_path(api.list(ingestion, run=first.name))) == set(first_uris)
    assert set(by_path(api.list(ingestion, run=second.name))) == set(second_uris)
    assert {f.run for f in api.list(ingestion, run=second.name)} == {second.name}
    assert set(by_path(api.list(ingestion, run=second.name, states=[File.STATE_SUCCEEDED]))) == set()


def test_list_files_pagination_is_complete_and_stable(api: Api, tmp_path: Path, engine: Engine) -> None:
    s = setup_files(api, tmp_path, 53)
    cycle_states(engine, s.uris)
    whole = api.list(s.ingestion)
    assert len(whole) == 53
    pages = api.pages(s.ingestion, page_size=7)
    assert [len(p) for p in pages] == [7] * 7 + [4]
    flat = [f for p in pages for f in p]
    assert flat == whole  # same order, no duplicate, nothing missing
    assert api.pages(s.ingestion, page_size=7) == pages  # stable
    ids = [int(f.name.rsplit("/", 1)[1]) for f in flat]
    assert ids == sorted(ids)
    # Default page size is 50.
    first = api.files.ListFiles(file_pb2.ListFilesRequest(ingestion=s.ingestion))
    assert len(first.files) == 50
    assert first.next_page_token
    # A filtered listing pages the same way.
    failed = [f for f in whole if f.state in (File.STATE_FAILED, File.STATE_QUARANTINED)]
    filtered = api.pages(s.ingestion, page_size=3, states=[File.STATE_FAILED, File.STATE_QUARANTINED])
    assert [f for p in filtered for f in p] == failed
    assert all(len(p) == 3 for p in filtered[:-1])
    # A page size that divides the total exactly ends without an empty page... or with one empty page at most.
    exact = api.pages(s.ingestion, page_size=53)
    assert [f for p in exact for f in p] == whole
    assert len(exact) <= 2


def test_files_added_while_paging_do_not_disturb_the_pages(api: Api, tmp_path: Path, engine: Engine,
                                                           uow_factory: UowFactory) -> None:  # fmt: skip
    s = setup_files(api, tmp_path, 20)
    reply = api.files.ListFiles(file_pb2.ListFilesRequest(ingestion=s.ingestion, page_size=8))
    seen = list(reply.files)
    # Finish the run and discover more files in a second one.
    set_state(engine, s.uris, "SUCCEEDED")
    assert finalize(uow_factory, engine, s.run.name) == "SUCCEEDED"
    more = make_files(tmp_path / "orders", [f"zz/{i}.json" for i in range(6)], first=100)
    api.run_discovered(s.ingestion)
    token = reply.next_page_token
    while token:
        reply = api.files.ListFiles(file_pb2.ListFilesRequest(ingestion=s.ingestion, page_size=8, page_token=token))
        seen.extend(reply.files)
        token = reply.next_page_token
    paths = [f.path for f in seen]
    assert len(paths) == len(set(paths))
    assert set(paths) == set(s.uris) | set(more)


def test_list_files_bad_input(api: Api, tmp_path: Path) -> None:
    s = setup_files(api, tmp_path, 3)
    other = setup_files(api, tmp_path, 1, ingestion_id="other")
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    token = api.files.ListFiles(file_pb2.ListFilesRequest(ingestion=s.ingestion, page_size=1)).next_page_token

    def request(**fields: Any) -> file_pb2.ListFilesRequest:
        return file_pb2.ListFilesRequest(**{"ingestion": s.ingestion, **fields})

    cases = [
        ("no ingestion", request(ingestion=""), invalid),
        ("bad ingestion", request(ingestion="ingestions/NO"), invalid),
        ("unknown ingestion", request(ingestion="ingestions/nobody"), not_found),
        ("unknown state", request(states=[99]), invalid),
        ("negative state", request(states=[-1]), invalid),
        ("bad run", request(run="runs/x"), invalid),
        ("bad run id", request(run=f"{s.ingestion}/runs/latest"), invalid),
        ("run of another ingestion", request(run=other.run.name), invalid),
        ("unknown run", request(run=f"{s.ingestion}/runs/20200101-000000-000abcd"), not_found),
        ("negative page size", request(page_size=-5), invalid),
        ("garbage token", request(page_token="garbage"), invalid),
        ("token of another filter", request(page_size=1, page_token=token, path_prefix="file://"), invalid),
        ("token of another ingestion", request(ingestion=other.ingestion, page_size=1, page_token=token), invalid),
        ("timestamp out of range", request(modified_after=Timestamp(seconds=-(10**13))), invalid),
        ("bad nanos", request(modified_before=Timestamp(seconds=0, nanos=2_000_000_000)), invalid),
    ]
    problems = []
    for label, req, code in cases:
        try:
            api.files.ListFiles(req)
            problems.append(f"{label}: succeeded")
        except grpc.RpcError as error:
            if error.code() != code:
                problems.append(f"{label}: {error.code()} {error.details()}")
    assert problems == []


# --- RetryFiles ---------------------------------------------------------------------------------------------


def assert_untouched(before: dict[str, File], after: dict[str, File], changed: set[str]) -> None:
    assert set(before) == set(after)
    touched = sorted(p for p in before if p not in changed and before[p] != after[p])
    assert touched == [], f"files that should not have changed: {touched[:5]}"


def test_retry_defaults_to_failed_and_quarantined_in_the_active_run(api: Api, tmp_path: Path, engine: Engine) -> None:
    s = setup_files(api, tmp_path, 24)
    wanted = cycle_states(engine, s.uris)
    chosen = {u for u, w in wanted.items() if w in ("FAILED", "QUARANTINED")}
    set_state(engine, [u for u in chosen if wanted[u] == "FAILED"], "FAILED", attempts=2, last_error="bad row")
    set_state(engine, [u for u in chosen if wanted[u] == "QUARANTINED"], "QUARANTINED", attempts=5,
              last_error="gave up", records=0)  # fmt: skip
    before = by_path(api.list(s.ingestion))
    reply = api.retry(s.ingestion)
    assert (reply.run, reply.files_queued) == (s.run.name, len(chosen))
    after = by_path(api.list(s.ingestion))
    assert_untouched(before, after, chosen)
    for uri in chosen:
        f = after[uri]
        assert (f.state, f.run, f.attempts, f.last_error) == (File.STATE_PENDING, s.run.name, 0, ""), uri
    assert api.run_names(s.ingestion) == [s.run.name]
    run = api.get(s.run.name)
    assert run.state == Run.STATE_RUNNING
    assert run.file_counts.pending == 4 + len(chosen)
    assert (run.file_counts.failed, run.file_counts.quarantined) == (0, 0)


def test_retry_with_no_active_run_opens_a_retry_run(
    api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory
) -> None:
    s = setup_files(api, tmp_path, 12)
    wanted = cycle_states(engine, s.uris, ["SUCCEEDED", "QUARANTINED", "SKIPPED", "SUCCEEDED"])
    assert finalize(uow_factory, engine, s.run.name) == "PARTIALLY_SUCCEEDED"
    first_final = api.get(s.run.name)
    before = by_path(api.list(s.ingestion))
    quarantined = {u for u, w in wanted.items() if w == "QUARANTINED"}

    reply = api.retry(s.ingestion, states=[File.STATE_QUARANTINED])
    assert reply.files_queued == len(quarantined) == 3
    assert reply.run
    assert reply.run != s.run.name
    retry_run = api.get(reply.run)
    assert retry_run.trigger == Run.TRIGGER_RETRY
    assert retry_run.state == Run.STATE_RUNNING
    assert (retry_run.file_counts.total, retry_run.file_counts.pending) == (3, 3)
    after = by_path(api.list(s.ingestion))
    assert_untouched(before, after, quarantined)
    assert {(after[u].state, after[u].run) for u in quarantined} == {(File.STATE_PENDING, reply.run)}
    # The first run keeps the counts it ended with.
    assert api.get(s.run.name) == first_final
    assert api.run_names(s.ingestion) == [reply.run, s.run.name]
    # The retry run is the active run now.
    with pytest.raises(grpc.RpcError) as caught:
        api.runs.StartRun(run_pb2.StartRunRequest(ingestion=s.ingestion))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A further retry joins the active retry run.
    again = api.retry(s.ingestion, states=[File.STATE_SKIPPED])
    assert (again.run, again.files_queued) == (reply.run, 3)
    assert api.get(reply.run).file_counts.pending == 6


def test_a_retry_does_not_rewrite_an_ended_run(
    api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory
) -> None:
    """An ended run reports what it ended with: counts, records, bytes and its first errors."""
    s = setup_files(api, tmp_path, 4)
    set_state(engine, s.uris[:2], "SUCCEEDED", records=5)
    set_state(engine, s.uris[2:], "QUARANTINED", last_error="corrupt gzip stream")
    assert finalize(uow_factory, engine, s.run.name) == "PARTIALLY_SUCCEEDED"
    ended = api.get(s.run.name)
    assert sorted(e.path for e in ended.first_errors) == sorted(s.uris[2:])
    assert ended.records == 10
    reply = api.retry(s.ingestion)
    assert reply.files_queued == 2
    after = api.get(s.run.name)
    assert (after.state, after.file_counts, after.records, after.bytes) == (
        ended.state,
        ended.file_counts,
        ended.records,
        ended.bytes,
    )
    assert [(e.file, e.path, e.error) for e in after.first_errors] == [
        (e.file, e.path, e.error) for e in ended.first_errors
    ]
    assert after == ended


def test_retry_by_names(api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory) -> None:
    s = setup_files(api, tmp_path, 10)
    cycle_states(engine, s.uris, ["SUCCEEDED", "SKIPPED", "QUARANTINED"])
    assert finalize(uow_factory, engine, s.run.name) == "PARTIALLY_SUCCEEDED"
    before = by_path(api.list(s.ingestion))
    chosen = {s.uris[0], s.uris[1], s.uris[5]}  # SUCCEEDED, SKIPPED, QUARANTINED
    reply = api.retry(s.ingestion, names=[before[u].name for u in sorted(chosen)])
    assert reply.files_queued == 3
    after = by_path(api.list(s.ingestion))
    assert_untouched(before, after, chosen)
    assert {(after[u].state, after[u].run) for u in chosen} == {(File.STATE_PENDING, reply.run)}
    # Naming a file twice queues it once.
    set_state(engine, [s.uris[2]], "FAILED")
    twice = api.retry(s.ingestion, names=[before[s.uris[2]].name] * 2)
    assert (twice.run, twice.files_queued) == (reply.run, 1)


def test_retry_by_names_and_state(api: Api, tmp_path: Path, engine: Engine) -> None:
    s = setup_files(api, tmp_path, 6)
    cycle_states(engine, s.uris, ["SUCCEEDED", "QUARANTINED"])
    before = by_path(api.list(s.ingestion))
    names = [before[u].name for u in s.uris[:4]]  # SUCCEEDED, QUARANTINED, SUCCEEDED, QUARANTINED
    reply = api.retry(s.ingestion, names=names, states=[File.STATE_QUARANTINED])
    assert (reply.run, reply.files_queued) == (s.run.name, 2)
    after = by_path(api.list(s.ingestion))
    assert_untouched(before, after, {s.uris[1], s.uris[3]})


def test_retry_by_modified_range(api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory) -> None:
    s = setup_files(api, tmp_path, 20)
    cycle_states(engine, s.uris, ["SUCCEEDED", "QUARANTINED", "SKIPPED", "SUCCEEDED", "SUCCEEDED"])
    assert finalize(uow_factory, engine, s.run.name) == "PARTIALLY_SUCCEEDED"
    before = by_path(api.list(s.ingestion))
    reply = api.retry(s.ingestion, modified_after=ts(mtime(5)), modified_before=ts(mtime(9)))
    chosen = set(s.uris[5:9])
    assert reply.files_queued == 4
    after = by_path(api.list(s.ingestion))
    assert_untouched(before, after, chosen)
    assert {(after[u].state, after[u].run) for u in chosen} == {(File.STATE_PENDING, reply.run)}
    # A range and a state together: only quarantined files in the range.
    before = after
    reply2 = api.retry(s.ingestion, modified_after=ts(mtime(10)), states=[File.STATE_QUARANTINED])
    chosen2 = {u for i, u in enumerate(s.uris) if i >= 10 and i % 5 == 1}
    assert (reply2.run, reply2.files_queued) == (reply.run, len(chosen2))
    assert_untouched(before, by_path(api.list(s.ingestion)), chosen2)


def test_retry_is_idempotent_with_a_request_id(api: Api, tmp_path: Path, engine: Engine) -> None:
    s = setup_files(api, tmp_path, 4)
    set_state(engine, s.uris[:2], "FAILED")
    first = api.retry(s.ingestion, request_id="retry-1")
    assert first.files_queued == 2
    set_state(engine, s.uris[:2], "FAILED")
    again = api.retry(s.ingestion, request_id="retry-1")
    assert again == first
    # The replay did not queue anything.
    assert {f.state for f in api.list(s.ingestion) if f.path in s.uris[:2]} == {File.STATE_FAILED}


def test_retrying_queued_states_is_invalid_and_changes_nothing(api: Api, tmp_path: Path, engine: Engine) -> None:
    s = setup_files(api, tmp_path, 6)
    cycle_states(engine, s.uris)
    before = by_path(api.list(s.ingestion))
    for states in ([File.STATE_PENDING], [File.STATE_LEASED], [File.STATE_FAILED, File.STATE_PENDING], [99]):
        error = fails(
            api.files.RetryFiles,
            file_pb2.RetryFilesRequest(ingestion=s.ingestion, states=states),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "states" in field_violations(error), states
    assert by_path(api.list(s.ingestion)) == before


def test_naming_a_pending_file_is_refused_as_wrong_state(api: Api, tmp_path: Path) -> None:
    """A PENDING file exists, so NOT_FOUND would be misleading: retrying it is bad input (or the wrong state)."""
    s = setup_files(api, tmp_path, 2)
    before = by_path(api.list(s.ingestion))
    with pytest.raises(grpc.RpcError) as caught:
        api.retry(s.ingestion, names=[before[s.uris[0]].name])
    assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), (
        f"{caught.value.code()}: {caught.value.details()}"
    )
    assert by_path(api.list(s.ingestion)) == before


def test_retry_that_matches_nothing_queues_nothing_and_opens_no_run(
    api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory
) -> None:
    s = setup_files(api, tmp_path, 5)
    set_state(engine, s.uris, "SUCCEEDED")
    assert finalize(uow_factory, engine, s.run.name) == "SUCCEEDED"
    before = by_path(api.list(s.ingestion))
    for fields in (
        {},
        {"states": [File.STATE_FAILED]},
        {"states": [File.STATE_QUARANTINED, File.STATE_SKIPPED]},
        {"modified_after": ts(mtime(100))},
        {"modified_before": ts(mtime(0))},
    ):
        reply = api.retry(s.ingestion, **fields)
        assert (reply.run, reply.files_queued) == ("", 0), fields
    assert api.run_names(s.ingestion) == [s.run.name]
    assert by_path(api.list(s.ingestion)) == before
    # And the ingestion can still start a run.
    run = api.runs.StartRun(run_pb2.StartRunRequest(ingestion=s.ingestion)).run
    assert api.wait(run.name, lambda r: r.state in TERMINAL).state == Run.STATE_SUCCEEDED


def test_retry_bad_names(api: Api, tmp_path: Path, engine: Engine) -> None:
    s = setup_files(api, tmp_path, 2)
    other = setup_files(api, tmp_path, 1, ingestion_id="other")
    set_state(engine, s.uris + other.uris, "FAILED")
    mine = by_path(api.list(s.ingestion))
    theirs = by_path(api.list(other.ingestion))
    other_file = theirs[other.uris[0]]
    other_id = other_file.name.rsplit("/", 1)[1]
    bad = [
        "",
        "files/1",
        "ingestions/orders/files/",
        "ingestions/orders/files/abc",
        "ingestions/orders/files/-1",
        "ingestions/orders/files/1.5",
        "ingestions/orders/runs/1",
        "ingestions/Orders/files/1",
        "ingestions/orders/files/1/attempts",
        "ingestions/orders/files/" + "9" * 40,
        other_file.name,  # a file of another ingestion
    ]
    for name in bad:
        error = fails(
            api.files.RetryFiles,
            file_pb2.RetryFilesRequest(ingestion=s.ingestion, names=[mine[s.uris[0]].name, name]),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "names[1]" in field_violations(error), (name, field_violations(error))
    # Another ingestion's file id under this ingestion's name is not this ingestion's file.
    fails(
        api.files.RetryFiles,
        file_pb2.RetryFilesRequest(ingestion=s.ingestion, names=[f"{s.ingestion}/files/{other_id}"]),
        grpc.StatusCode.NOT_FOUND,
    )
    fails(
        api.files.RetryFiles,
        file_pb2.RetryFilesRequest(ingestion=s.ingestion, names=[f"{s.ingestion}/files/999999999"]),
        grpc.StatusCode.NOT_FOUND,
    )
    fails(
        api.files.RetryFiles,
        file_pb2.RetryFilesRequest(ingestion="ingestions/nobody", names=["ingestions/nobody/files/1"]),
        grpc.StatusCode.NOT_FOUND,
    )
    fails(
        api.files.RetryFiles,
        file_pb2.RetryFilesRequest(ingestion=s.ingestion, modified_after=Timestamp(seconds=-(10**13))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    fails(
        api.files.RetryFiles,
        file_pb2.RetryFilesRequest(ingestion=s.ingestion, request_id="not valid!"),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    # Nothing was queued by any of it.
    assert by_path(api.list(s.ingestion)) == mine
    assert by_path(api.list(other.ingestion)) == theirs


# --- ListFileAttempts -----------------------------------------------------------------------------------


def test_attempts_oldest_first(api: Api, tmp_path: Path, engine: Engine) -> None:
    s = setup_files(api, tmp_path, 2)
    files = by_path(api.list(s.ingestion))
    target = files[s.uris[0]]
    file_id = int(target.name.rsplit("/", 1)[1])
    assert list(api.files.ListFileAttempts(file_pb2.ListFileAttemptsRequest(file=target.name)).attempts) == []
    lease = uuid.uuid4()
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    with engine.begin() as conn:
        for attempt, outcome, error in ((1, "FAILED", "ValueError"), (2, "LEASE_EXPIRED", ""), (3, "SUCCEEDED", "")):
            conn.execute(
                text(
                    "INSERT INTO file_attempts (file_pk, attempt, agent_id, lease_pk, outcome, start_time, end_time, "
                    "records, error_type, error_message, retryable) "
                    "VALUES (:f, :a, 'agent-1', :l, :o, :s, :e, :r, :et, :em, :rt)"
                ),
                {
                    "f": file_id,
                    "a": attempt,
                    "l": lease,
                    "o": outcome,
                    "s": start + timedelta(minutes=attempt),
                    "e": start + timedelta(minutes=attempt, seconds=attempt * 1.5),
                    "r": 10 if outcome == "SUCCEEDED" else 0,
                    "et": error,
                    "em": "bad value in row 3" if error else "",
                    "rt": outcome == "FAILED",
                },
            )
    attempts = list(api.files.ListFileAttempts(file_pb2.ListFileAttemptsRequest(file=target.name)).attempts)
    Outcome = file_pb2.FileAttempt
    assert [(a.attempt, a.outcome) for a in attempts] == [
        (1, Outcome.OUTCOME_FAILED),
        (2, Outcome.OUTCOME_LEASE_EXPIRED),
        (3, Outcome.OUTCOME_SUCCEEDED),
    ]
    first = attempts[0]
    assert first.agent == "agents/agent-1"
    assert first.lease == f"leases/{lease}"
    assert (first.error_type, first.error_message, first.retryable) == ("ValueError", "bad value in row 3", True)
    assert first.start_time == ts(start + timedelta(minutes=1))
    assert first.duration.ToTimedelta() == timedelta(seconds=1.5)
    assert attempts[2].records == 10
    # The other file has no history.
    other = files[s.uris[1]]
    assert list(api.files.ListFileAttempts(file_pb2.ListFileAttemptsRequest(file=other.name)).attempts) == []


def test_attempts_bad_input(api: Api, tmp_path: Path) -> None:
    s = setup_files(api, tmp_path, 1)
    other = setup_files(api, tmp_path, 1, ingestion_id="other")
    mine = api.list(s.ingestion)[0]
    theirs = api.list(other.ingestion)[0]
    theirs_id = theirs.name.rsplit("/", 1)[1]
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    cases = [
        ("", invalid),
        ("files/1", invalid),
        (f"{s.ingestion}/files/x", invalid),
        (f"{s.ingestion}/files/-1", invalid),
        (f"{s.ingestion}/runs/1", invalid),
        (mine.name + "/", invalid),
        (mine.name + "\x00", invalid),
        (f"{s.ingestion}/files/999999999", not_found),
        (f"{s.ingestion}/files/0", not_found),
        (f"{s.ingestion}/files/{theirs_id}", not_found),  # another ingestion's file
        ("ingestions/nobody/files/1", not_found),
    ]
    problems = []
    for name, code in cases:
        try:
            api.files.ListFileAttempts(file_pb2.ListFileAttemptsRequest(file=name))
            problems.append(f"{name!r}: succeeded")
        except grpc.RpcError as error:
            if error.code() != code:
                problems.append(f"{name!r}: {error.code()} {error.details()}")
    assert problems == []
    assert STATE_NAMES[mine.state] == "PENDING"
