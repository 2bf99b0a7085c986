"""RunService over gRPC on a real PostgreSQL: starting (one active run, paused ingestions,
request ids), the lifecycle and its finalization, counts derived from file rows, listing,
watching, cancelling, and bad input. Agents do not exist yet: the tests move file rows in
the database and finalize through the run repository, as an agent's report would."""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import Engine, text

from autoloader.v1 import file_pb2, file_pb2_grpc, ingestion_pb2, ingestion_pb2_grpc, run_pb2, run_pb2_grpc
from controlplane.adapters.unit_of_work import SqlAlchemyUnitOfWork

from .helpers import error_info, valid_ingestion

pytestmark = pytest.mark.integration

Run = run_pb2.Run
File = file_pb2.File
UowFactory = Callable[[], SqlAlchemyUnitOfWork]
TERMINAL = (Run.STATE_SUCCEEDED, Run.STATE_PARTIALLY_SUCCEEDED, Run.STATE_FAILED, Run.STATE_CANCELLED)
# A run only moves forward: DISCOVERING -> RUNNING -> one terminal state.
RANK = {Run.STATE_DISCOVERING: 0, Run.STATE_RUNNING: 1, **dict.fromkeys(TERMINAL, 2)}
RUN_NAME = re.compile(r"^ingestions/[a-z0-9-]+/runs/[0-9]{8}-[0-9]{6}-[0-9]{3}[0-9a-f]{4}$")


# --- helpers -----------------------------------------------------------------------------------------


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

    def start(self, ingestion: str, **fields: Any) -> Run:
        return self.runs.StartRun(run_pb2.StartRunRequest(ingestion=ingestion, **fields)).run

    def get(self, run: str) -> Run:
        return self.runs.GetRun(run_pb2.GetRunRequest(name=run)).run

    def cancel(self, run: str, request_id: str = "") -> Run:
        return self.runs.CancelRun(run_pb2.CancelRunRequest(name=run, request_id=request_id)).run

    def wait(self, run: str, done: Callable[[Run], bool], timeout: float = 30.0) -> Run:
        deadline = time.monotonic() + timeout
        while True:
            current = self.get(run)
            if done(current):
                return current
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting; last seen: {current}")
            time.sleep(0.05)

    def discovered(self, run: str) -> Run:
        return self.wait(run, lambda r: r.state != Run.STATE_DISCOVERING)

    def ended(self, run: str) -> Run:
        return self.wait(run, lambda r: r.state in TERMINAL)

    def list_runs(self, ingestion: str, page_size: int = 0, filter_: str = "") -> list[list[Run]]:
        """Every page, following next_page_token."""
        pages, token = [], ""
        while True:
            reply = self.runs.ListRuns(
                run_pb2.ListRunsRequest(ingestion=ingestion, page_size=page_size, page_token=token, filter=filter_)
            )
            pages.append(list(reply.runs))
            token = reply.next_page_token
            if not token:
                return pages
            assert len(pages) < 100

    def files_of(self, ingestion: str) -> list[File]:
        return list(self.files.ListFiles(file_pb2.ListFilesRequest(ingestion=ingestion, page_size=1000)).files)


@pytest.fixture
def api(channel: grpc.Channel) -> Api:
    return Api(
        ingestion_pb2_grpc.IngestionServiceStub(channel),
        run_pb2_grpc.RunServiceStub(channel),
        file_pb2_grpc.FileServiceStub(channel),
    )


def make_tree(root: Path, count: int, size: Callable[[int], int] = lambda i: 0) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count):
        path = root / f"f{i:03d}.json"
        path.write_bytes(b"x" * size(i))
        made.append(f"file://{path}")
    return made


def run_pk(engine: Engine, run: str) -> uuid.UUID:
    with engine.connect() as conn:
        found = conn.execute(text("SELECT id FROM runs WHERE run_id = :r"), {"r": run.rsplit("/", 1)[1]}).scalar_one()
    return uuid.UUID(str(found))


def execute(engine: Engine, statement: str, **params: Any) -> int:
    with engine.begin() as conn:
        return int(conn.execute(text(statement), params).rowcount)


def set_states(engine: Engine, run: str, states: list[str], *, records: int = 0, errors: bool = False) -> None:
    """Gives the run's files (in path order) these states; records = records * (index + 1);
    with errors, every non-SUCCEEDED file gets last_error 'boom {i}' and update_time in index order."""
    with engine.begin() as conn:
        ids = list(
            conn.execute(text("SELECT id FROM files WHERE run_pk = :r ORDER BY path"), {"r": run_pk(engine, run)})
            .scalars()
            .all()
        )
        assert len(ids) == len(states)
        for i, (file_id, state) in enumerate(zip(ids, states, strict=True)):
            conn.execute(
                text(
                    "UPDATE files SET state = :s, records = :rec, last_error = :err, "
                    "update_time = now() + make_interval(secs => :i) WHERE id = :id"
                ),
                {
                    "s": state,
                    "rec": records * (i + 1) if state == "SUCCEEDED" else 0,
                    "err": f"boom {i}" if errors and state != "SUCCEEDED" else "",
                    "i": i,
                    "id": file_id,
                },
            )


def finalize(uow_factory: UowFactory, engine: Engine, run: str) -> str | None:
    with uow_factory() as uow:
        state = uow.runs.finalize_if_done(run_pk(engine, run))
        uow.commit()
    return None if state is None else str(state)


def finish(api: Api, uow_factory: UowFactory, engine: Engine, run: str) -> Run:
    execute(engine, "UPDATE files SET state = 'SUCCEEDED' WHERE run_pk = :r", r=run_pk(engine, run))
    assert finalize(uow_factory, engine, run) == "SUCCEEDED"
    return api.get(run)


def invoke(call: Callable[..., Any], request: Any) -> None:
    result = call(request)
    if hasattr(result, "__next__"):
        list(result)  # a stream fails when read


def fails(call: Callable[..., Any], request: Any, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        invoke(call, request)
    assert caught.value.code() == code, f"{caught.value.code()}: {caught.value.details()}"
    return caught.value


def counts(run: Run) -> dict[str, int]:
    c = run.file_counts
    return {
        name: getattr(c, name)
        for name in ("total", "pending", "leased", "succeeded", "failed", "quarantined", "skipped")
        if getattr(c, name)
    }


def consistent(run: Run) -> bool:
    c = run.file_counts
    return c.total == c.pending + c.leased + c.succeeded + c.failed + c.quarantined + c.skipped


# --- starting ----------------------------------------------------------------------------------------


def test_start_discovers_then_runs(api: Api, tmp_path: Path) -> None:
    make_tree(tmp_path / "src", 3)
    ingestion = api.create("orders", tmp_path / "src")
    run = api.start(ingestion)
    assert RUN_NAME.fullmatch(run.name), run.name
    assert run.name.startswith(f"{ingestion}/runs/")
    assert run.state == Run.STATE_DISCOVERING
    assert run.trigger == Run.TRIGGER_MANUAL
    assert run.HasField("create_time")
    assert not run.HasField("end_time")
    running = api.discovered(run.name)
    assert running.state == Run.STATE_RUNNING
    assert counts(running) == {"total": 3, "pending": 3}
    assert running.create_time == run.create_time
    assert running.HasField("discovery_end_time")
    assert running.discovery_end_time.ToDatetime() >= running.create_time.ToDatetime()
    assert not running.HasField("end_time")
    assert running.error == ""
    got = api.ingestions.GetIngestion(ingestion_pb2.GetIngestionRequest(name=ingestion)).ingestion
    assert got.last_run == run.name


def test_trigger_is_kept(api: Api, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    ingestion = api.create("orders", tmp_path / "src")
    run = api.start(ingestion, trigger=Run.TRIGGER_SCHEDULED)
    assert run.trigger == Run.TRIGGER_SCHEDULED
    assert api.ended(run.name).trigger == Run.TRIGGER_SCHEDULED


def test_second_start_while_active_is_run_in_progress(api: Api, tmp_path: Path) -> None:
    make_tree(tmp_path / "src", 2)
    ingestion = api.create("orders", tmp_path / "src")
    first = api.start(ingestion)
    for _ in range(2):  # while discovering (or running), then surely while running
        error = fails(
            api.runs.StartRun, run_pb2.StartRunRequest(ingestion=ingestion), grpc.StatusCode.FAILED_PRECONDITION
        )
        info = error_info(error)
        assert info.reason == "RUN_IN_PROGRESS"
        assert info.metadata["run"] == first.name
        assert first.name in error.details()
        api.discovered(first.name)
    assert [r.name for page in api.list_runs(ingestion) for r in page] == [first.name]


def test_concurrent_starts_open_exactly_one_run(api: Api, tmp_path: Path) -> None:
    make_tree(tmp_path / "src", 1)
    ingestion = api.create("orders", tmp_path / "src")
    barrier = threading.Barrier(8)
    started: list[str] = []
    refused: list[tuple[grpc.StatusCode, str, str]] = []

    def start() -> None:
        barrier.wait()
        try:
            started.append(api.start(ingestion).name)
        except grpc.RpcError as error:
            info = error_info(error)
            refused.append((error.code(), info.reason, info.metadata.get("run", "")))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(started) == 1, (started, refused)
    assert refused == [(grpc.StatusCode.FAILED_PRECONDITION, "RUN_IN_PROGRESS", started[0])] * 7
    assert [r.name for page in api.list_runs(ingestion) for r in page] == started


def test_paused_ingestion_cannot_start_a_run(api: Api, tmp_path: Path) -> None:
    make_tree(tmp_path / "src", 1)
    ingestion = api.create("orders", tmp_path / "src")
    api.ingestions.PauseIngestion(ingestion_pb2.PauseIngestionRequest(name=ingestion))
    error = fails(api.runs.StartRun, run_pb2.StartRunRequest(ingestion=ingestion), grpc.StatusCode.FAILED_PRECONDITION)
    assert "paused" in error.details()
    assert api.list_runs(ingestion) == [[]]
    api.ingestions.ResumeIngestion(ingestion_pb2.ResumeIngestionRequest(name=ingestion))
    assert api.discovered(api.start(ingestion).name).state == Run.STATE_RUNNING


def test_request_id_retries_return_the_same_run(
    api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory
) -> None:
    make_tree(tmp_path / "src", 2)
    ingestion = api.create("orders", tmp_path / "src")
    first = api.start(ingestion, request_id="flow-run-1")
    again = api.start(ingestion, request_id="flow-run-1")
    assert again.name == first.name
    # Still the same run once it has ended, and no second run is opened.
    api.discovered(first.name)
    finish(api, uow_factory, engine, first.name)
    later = api.start(ingestion, request_id="flow-run-1")
    assert later.name == first.name
    assert [r.name for page in api.list_runs(ingestion) for r in page] == [first.name]
    # The same id with a different request is refused.
    fails(
        api.runs.StartRun,
        run_pb2.StartRunRequest(ingestion=ingestion, request_id="flow-run-1", trigger=Run.TRIGGER_SCHEDULED),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    # A new id starts a new run.
    second = api.start(ingestion, request_id="flow-run-2")
    assert second.name != first.name
    assert api.ended(second.name).state == Run.STATE_SUCCEEDED


# --- lifecycle, finalization and counts ------------------------------------------------------------------


def test_a_run_with_nothing_new_succeeds_at_once_with_zero_files(api: Api, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    ingestion = api.create("orders", tmp_path / "empty")
    run = api.ended(api.start(ingestion).name)
    assert run.state == Run.STATE_SUCCEEDED
    assert counts(run) == {}
    assert (run.records, run.bytes) == (0, 0)
    assert run.HasField("discovery_end_time")
    assert run.HasField("end_time")
    assert run.create_time.ToDatetime() <= run.discovery_end_time.ToDatetime() <= run.end_time.ToDatetime()
    assert run.error == ""
    assert list(run.first_errors) == []


def test_finalization_happens_exactly_once(api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory) -> None:
    make_tree(tmp_path / "src", 20, size=lambda i: i)
    ingestion = api.create("orders", tmp_path / "src")
    run = api.discovered(api.start(ingestion).name)
    assert finalize(uow_factory, engine, run.name) is None  # files are still open
    set_states(engine, run.name, ["SUCCEEDED"] * 20, records=10)
    barrier = threading.Barrier(8)
    results: list[str | None] = []
    errors: list[BaseException] = []

    def report() -> None:
        try:
            barrier.wait()
            results.append(finalize(uow_factory, engine, run.name))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=report) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert sorted(results, key=lambda r: r is None) == ["SUCCEEDED"] + [None] * 7
    ended = api.get(run.name)
    assert ended.state == Run.STATE_SUCCEEDED
    assert counts(ended) == {"total": 20, "succeeded": 20}
    assert ended.records == 10 * sum(range(1, 21))
    assert ended.bytes == sum(range(20))
    assert ended.HasField("end_time")
    assert ended.discovery_end_time.ToDatetime() <= ended.end_time.ToDatetime()
    # Finalizing an ended run changes nothing.
    assert finalize(uow_factory, engine, run.name) is None
    assert api.get(run.name) == ended


def test_some_quarantined_is_partially_succeeded(
    api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory
) -> None:
    make_tree(tmp_path / "src", 5, size=lambda i: 100 + i)
    ingestion = api.create("orders", tmp_path / "src")
    run = api.discovered(api.start(ingestion).name)
    set_states(engine, run.name, ["SUCCEEDED", "QUARANTINED", "SUCCEEDED", "QUARANTINED", "SUCCEEDED"], records=7,
               errors=True)  # fmt: skip
    assert finalize(uow_factory, engine, run.name) == "PARTIALLY_SUCCEEDED"
    ended = api.get(run.name)
    assert ended.state == Run.STATE_PARTIALLY_SUCCEEDED
    assert counts(ended) == {"total": 5, "succeeded": 3, "quarantined": 2}
    assert ended.records == 7 * (1 + 3 + 5)
    assert ended.bytes == 100 + 102 + 104
    files = {f.path: f for f in api.files_of(ingestion)}
    paths = sorted(files)
    assert [(e.path, e.error, e.file) for e in ended.first_errors] == [
        (paths[1], "boom 1", files[paths[1]].name),
        (paths[3], "boom 3", files[paths[3]].name),
    ]


def test_all_quarantined_is_failed(api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory) -> None:
    make_tree(tmp_path / "src", 3)
    ingestion = api.create("orders", tmp_path / "src")
    run = api.discovered(api.start(ingestion).name)
    set_states(engine, run.name, ["QUARANTINED"] * 3, errors=True)
    assert finalize(uow_factory, engine, run.name) == "FAILED"
    ended = api.get(run.name)
    assert ended.state == Run.STATE_FAILED
    assert counts(ended) == {"total": 3, "quarantined": 3}
    assert (ended.records, ended.bytes) == (0, 0)
    assert [e.error for e in ended.first_errors] == ["boom 0", "boom 1", "boom 2"]
    assert ended.HasField("end_time")


def test_skipped_files_without_quarantine_still_succeed(
    api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory
) -> None:
    make_tree(tmp_path / "src", 3)
    ingestion = api.create("orders", tmp_path / "src")
    run = api.discovered(api.start(ingestion).name)
    set_states(engine, run.name, ["SUCCEEDED", "SKIPPED", "SUCCEEDED"])
    assert finalize(uow_factory, engine, run.name) == "SUCCEEDED"
    assert counts(api.get(run.name)) == {"total": 3, "succeeded": 2, "skipped": 1}


def test_counts_records_bytes_and_first_errors_come_from_file_rows(
    api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory
) -> None:
    make_tree(tmp_path / "src", 10, size=lambda i: 10 * (i + 1))
    ingestion = api.create("orders", tmp_path / "src")
    run = api.discovered(api.start(ingestion).name)
    states = ["PENDING", "LEASED", "SUCCEEDED", "FAILED", "QUARANTINED", "SKIPPED", "SUCCEEDED", "FAILED",
              "PENDING", "QUARANTINED"]  # fmt: skip
    set_states(engine, run.name, states, records=3, errors=True)
    live = api.get(run.name)
    assert live.state == Run.STATE_RUNNING
    assert counts(live) == {
        "total": 10,
        "pending": 2,
        "leased": 1,
        "succeeded": 2,
        "failed": 2,
        "quarantined": 2,
        "skipped": 1,
    }
    assert live.records == 3 * 3 + 3 * 7
    assert live.bytes == 30 + 70
    # At most five errors, the earliest first.
    files = {f.path: f for f in api.files_of(ingestion)}
    paths = sorted(files)
    with_errors = [i for i, s in enumerate(states) if s != "SUCCEEDED"][:5]
    assert [(e.file, e.path, e.error) for e in live.first_errors] == [
        (files[paths[i]].name, paths[i], f"boom {i}") for i in with_errors
    ]
    # FAILED files are retried, so the run is not done.
    assert finalize(uow_factory, engine, run.name) is None
    assert api.get(run.name).state == Run.STATE_RUNNING
    # Listing shows the same counts as getting.
    (listed,) = api.list_runs(ingestion)
    assert listed == [api.get(run.name)]


# --- listing -------------------------------------------------------------------------------------------


def test_list_runs_newest_first_paginated_and_filtered(
    api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory
) -> None:
    make_tree(tmp_path / "src", 1)
    ingestion = api.create("orders", tmp_path / "src")
    names, states = [], []

    def record(run: Run) -> None:
        names.append(run.name)
        states.append(run.state)

    run1 = api.discovered(api.start(ingestion).name)
    record(api.cancel(run1.name))
    run2 = api.discovered(api.start(ingestion).name)  # queues the skipped file again
    assert counts(run2) == {"total": 1, "pending": 1}
    record(finish(api, uow_factory, engine, run2.name))
    record(api.ended(api.start(ingestion).name))  # nothing new
    (tmp_path / "src" / "f000.json").write_bytes(b"changed")
    run4 = api.discovered(api.start(ingestion).name)
    record(api.cancel(run4.name))
    run5 = api.discovered(api.start(ingestion).name)
    record(api.cancel(run5.name))
    record(api.discovered(api.start(ingestion).name))
    C, S, R = Run.STATE_CANCELLED, Run.STATE_SUCCEEDED, Run.STATE_RUNNING
    assert states == [C, S, S, C, C, R]
    newest_first = names[::-1]

    everything = api.list_runs(ingestion)
    assert [[r.name for r in page] for page in everything] == [newest_first]
    assert [r.state for r in everything[0]] == states[::-1]
    assert everything[0][0] == api.get(names[-1])

    pages = api.list_runs(ingestion, page_size=2)
    assert [[r.name for r in page] for page in pages] == [newest_first[0:2], newest_first[2:4], newest_first[4:6]]

    cancelled = api.list_runs(ingestion, page_size=2, filter_="state = CANCELLED")
    assert [[r.name for r in page] for page in cancelled] == [[names[4], names[3]], [names[0]]]
    assert all(r.state == C for page in cancelled for r in page)

    def flat(filter_: str, page_size: int = 0) -> list[str]:
        return [r.name for page in api.list_runs(ingestion, page_size, filter_) for r in page]

    assert flat("state = STATE_RUNNING") == [names[5]]
    assert flat("state = succeeded") == [names[2], names[1]]
    assert flat("state = SUCCEEDED OR state = CANCELLED", page_size=1) == newest_first[1:]
    assert flat("state = FAILED") == []

    # A token belongs to its filter.
    token = api.runs.ListRuns(run_pb2.ListRunsRequest(ingestion=ingestion, page_size=1)).next_page_token
    assert token
    fails(
        api.runs.ListRuns,
        run_pb2.ListRunsRequest(ingestion=ingestion, page_size=1, page_token=token, filter="state = CANCELLED"),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def test_runs_of_other_ingestions_are_not_listed(api: Api, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = api.create("aaa", tmp_path / "a")
    b = api.create("bbb", tmp_path / "b")
    run_a = api.ended(api.start(a).name)
    run_b = api.ended(api.start(b).name)
    assert [r.name for r in api.list_runs(a)[0]] == [run_a.name]
    assert [r.name for r in api.list_runs(b)[0]] == [run_b.name]
    other = run_a.name.replace("ingestions/aaa/", "ingestions/bbb/")
    fails(api.runs.GetRun, run_pb2.GetRunRequest(name=other), grpc.StatusCode.NOT_FOUND)


# --- watching ------------------------------------------------------------------------------------------


class Watcher:
    """Reads a WatchRun stream in the background."""

    def __init__(self, api: Api, run: str) -> None:
        self.messages: list[Run] = []
        self.error: grpc.RpcError | None = None
        self._stream = api.runs.WatchRun(run_pb2.WatchRunRequest(name=run), timeout=60)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._stream:
                self.messages.append(message.run)
        except grpc.RpcError as error:
            self.error = error

    def until(self, done: Callable[[Run], bool], timeout: float = 10.0) -> Run:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.messages):
                if done(message):
                    return message
            time.sleep(0.02)
        raise AssertionError(f"the watch never showed it; saw {[counts(m) for m in self.messages]}")

    def ended(self, timeout: float = 10.0) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def cancel(self) -> None:
        self._stream.cancel()
        self._thread.join(5)


def assert_in_order(messages: list[Run]) -> None:
    assert messages, "no message"
    for before, after in itertools.pairwise(messages):
        assert RANK[after.state] >= RANK[before.state], f"{before.state} -> {after.state}"
        assert before != after, "an update that changes nothing"
        if before.state in TERMINAL:
            raise AssertionError("a message after the terminal one")
    for message in messages:
        assert consistent(message), message
        assert message.name == messages[0].name


def test_watch_streams_progress_until_terminal(
    api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory
) -> None:
    make_tree(tmp_path / "src", 30)
    ingestion = api.create("orders", tmp_path / "src")
    run = api.start(ingestion)
    watcher = Watcher(api, run.name)
    try:
        watcher.until(lambda r: r.state == Run.STATE_RUNNING)
        pk = run_pk(engine, run.name)
        for step in (1, 2, 3):
            execute(
                engine,
                "UPDATE files SET state = 'SUCCEEDED', records = 2 WHERE id IN "
                "(SELECT id FROM files WHERE run_pk = :r AND state = 'PENDING' ORDER BY path LIMIT 10)",
                r=pk,
            )
            watcher.until(lambda r, step=step: r.file_counts.succeeded == 10 * step)
        # Nothing reported these files, so the finalization sweep ends the run (within ~1 s).
        assert watcher.ended(), "the stream did not end after the run ended"
    finally:
        watcher.cancel()
    assert watcher.error is None, watcher.error
    messages = watcher.messages
    assert_in_order(messages)
    assert messages[0].state in (Run.STATE_DISCOVERING, Run.STATE_RUNNING)
    assert messages[-1].state == Run.STATE_SUCCEEDED
    assert messages[-1] == api.get(run.name)
    assert counts(messages[-1]) == {"total": 30, "succeeded": 30}
    assert messages[-1].records == 60
    succeeded = [m.file_counts.succeeded for m in messages]
    assert succeeded == sorted(succeeded)
    assert {0, 10, 20, 30} <= set(succeeded)
    running = [m for m in messages if m.state == Run.STATE_RUNNING]
    assert all(m.file_counts.total == 30 for m in running)


def test_watch_of_an_ended_run_sends_one_terminal_message(api: Api, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    ingestion = api.create("orders", tmp_path / "empty")
    run = api.ended(api.start(ingestion).name)
    messages = [m.run for m in api.runs.WatchRun(run_pb2.WatchRunRequest(name=run.name), timeout=10)]
    assert messages == [run]


def test_watch_ends_promptly_when_the_run_is_cancelled(api: Api, tmp_path: Path) -> None:
    make_tree(tmp_path / "src", 4)
    ingestion = api.create("orders", tmp_path / "src")
    run = api.discovered(api.start(ingestion).name)
    watcher = Watcher(api, run.name)
    try:
        watcher.until(lambda r: r.state == Run.STATE_RUNNING)
        api.cancel(run.name)
        assert watcher.ended(timeout=3)
    finally:
        watcher.cancel()
    assert watcher.error is None
    assert_in_order(watcher.messages)
    last = watcher.messages[-1]
    assert last.state == Run.STATE_CANCELLED
    assert counts(last) == {"total": 4, "skipped": 4}


def test_several_watchers_see_the_same_end(api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory) -> None:
    make_tree(tmp_path / "src", 2)
    ingestion = api.create("orders", tmp_path / "src")
    run = api.discovered(api.start(ingestion).name)
    watchers = [Watcher(api, run.name) for _ in range(5)]
    try:
        for w in watchers:
            w.until(lambda r: r.state == Run.STATE_RUNNING)
        final = finish(api, uow_factory, engine, run.name)
        assert all(w.ended() for w in watchers)
    finally:
        for w in watchers:
            w.cancel()
    for w in watchers:
        assert w.error is None
        assert_in_order(w.messages)
        assert w.messages[-1] == final


# --- cancelling ----------------------------------------------------------------------------------------


def test_cancel_while_running_skips_open_files_only(
    api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory
) -> None:
    make_tree(tmp_path / "src", 7)
    ingestion = api.create("orders", tmp_path / "src")
    run = api.discovered(api.start(ingestion).name)
    set_states(engine, run.name, ["SUCCEEDED", "SUCCEEDED", "QUARANTINED", "FAILED", "LEASED", "PENDING", "PENDING"],
               records=1, errors=True)  # fmt: skip
    cancelled = api.cancel(run.name)
    assert cancelled.state == Run.STATE_CANCELLED
    assert counts(cancelled) == {"total": 7, "succeeded": 2, "quarantined": 1, "skipped": 4}
    assert cancelled.HasField("end_time")
    assert cancelled.records == 1 + 2
    by_path = sorted(api.files_of(ingestion), key=lambda f: f.path)
    assert [f.state for f in by_path] == [File.STATE_SUCCEEDED, File.STATE_SUCCEEDED, File.STATE_QUARANTINED] + [
        File.STATE_SKIPPED
    ] * 4
    assert api.get(run.name) == cancelled
    # Cancelling twice is fine and changes nothing.
    assert api.cancel(run.name) == cancelled
    # Finalizing after a cancel does not change the outcome.
    assert finalize(uow_factory, engine, run.name) is None
    assert api.get(run.name) == cancelled
    # The ingestion can start again right away.
    assert api.start(ingestion).state == Run.STATE_DISCOVERING


def test_cancel_with_only_pending_files(api: Api, tmp_path: Path) -> None:
    make_tree(tmp_path / "src", 5)
    ingestion = api.create("orders", tmp_path / "src")
    run = api.discovered(api.start(ingestion).name)
    assert counts(run) == {"total": 5, "pending": 5}
    cancelled = api.cancel(run.name, request_id="cancel-1")
    assert cancelled.state == Run.STATE_CANCELLED
    assert counts(cancelled) == {"total": 5, "skipped": 5}
    assert {f.state for f in api.files_of(ingestion)} == {File.STATE_SKIPPED}
    assert api.cancel(run.name, request_id="cancel-1") == cancelled


def test_cancelling_an_ended_run_is_failed_precondition(
    api: Api, tmp_path: Path, engine: Engine, uow_factory: UowFactory
) -> None:
    (tmp_path / "empty").mkdir()
    ingestion = api.create("orders", tmp_path / "empty")
    succeeded = api.ended(api.start(ingestion).name)
    assert succeeded.state == Run.STATE_SUCCEEDED
    fails(api.runs.CancelRun, run_pb2.CancelRunRequest(name=succeeded.name), grpc.StatusCode.FAILED_PRECONDITION)
    assert api.get(succeeded.name) == succeeded
    broken = api.create("broken", tmp_path / "missing")
    failed = api.ended(api.start(broken).name)
    assert failed.state == Run.STATE_FAILED
    fails(api.runs.CancelRun, run_pb2.CancelRunRequest(name=failed.name), grpc.StatusCode.FAILED_PRECONDITION)
    assert api.get(failed.name) == failed


# --- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_never_internal(api: Api, tmp_path: Path) -> None:
    make_tree(tmp_path / "src", 1)
    ingestion = api.create("orders", tmp_path / "src")
    run = api.discovered(api.start(ingestion).name)
    unknown_run = f"{ingestion}/runs/20200101-000000-000abcd"
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    bad_run_names = [
        "",
        "orders",
        "ingestions/orders",
        "ingestions/orders/runs/",
        "ingestions/orders/runs/latest",
        "ingestions/orders/runs/20200101-000000-000ABCD",
        f"{run.name}/extra",
        run.name.replace("ingestions/", "ingestion/"),
        run.name.replace("/runs/", "/files/"),
        run.name.replace("orders", "Orders"),
        run.name + "\x00",
        "ingestions/orders/runs/20200101-000000-000abcd/../x",
        "ingestions/ördérs/runs/20200101-000000-000abcd",
        "/" + run.name,
    ]
    cases: list[tuple[str, Callable[..., Any], Any, grpc.StatusCode]] = []
    for name in bad_run_names:
        cases.append((f"GetRun {name!r}", api.runs.GetRun, run_pb2.GetRunRequest(name=name), invalid))
        cases.append((f"CancelRun {name!r}", api.runs.CancelRun, run_pb2.CancelRunRequest(name=name), invalid))
        cases.append((f"WatchRun {name!r}", api.runs.WatchRun, run_pb2.WatchRunRequest(name=name), invalid))
    for name in (unknown_run, "ingestions/nobody/runs/20200101-000000-000abcd"):
        cases.append((f"GetRun {name!r}", api.runs.GetRun, run_pb2.GetRunRequest(name=name), not_found))
        cases.append((f"CancelRun {name!r}", api.runs.CancelRun, run_pb2.CancelRunRequest(name=name), not_found))
        cases.append((f"WatchRun {name!r}", api.runs.WatchRun, run_pb2.WatchRunRequest(name=name), not_found))

    def list_runs(**fields: Any) -> run_pb2.ListRunsRequest:
        return run_pb2.ListRunsRequest(**{"ingestion": ingestion, **fields})

    cases += [
        ("ListRuns no ingestion", api.runs.ListRuns, list_runs(ingestion=""), invalid),
        ("ListRuns bad ingestion", api.runs.ListRuns, list_runs(ingestion="ingestions/Bad_Name"), invalid),
        ("ListRuns unknown ingestion", api.runs.ListRuns, list_runs(ingestion="ingestions/nobody"), not_found),
        ("ListRuns unknown state", api.runs.ListRuns, list_runs(filter="state = BOGUS"), invalid),
        ("ListRuns state number", api.runs.ListRuns, list_runs(filter="state = 3"), invalid),
        ("ListRuns file state", api.runs.ListRuns, list_runs(filter="state = PENDING"), invalid),
        ("ListRuns other field", api.runs.ListRuns, list_runs(filter="trigger = MANUAL"), invalid),
        ("ListRuns garbage filter", api.runs.ListRuns, list_runs(filter="state = FAILED AND ("), invalid),
        ("ListRuns negative page size", api.runs.ListRuns, list_runs(page_size=-1), invalid),
        ("ListRuns garbage token", api.runs.ListRuns, list_runs(page_token="not-a-token"), invalid),
        ("ListRuns huge token", api.runs.ListRuns, list_runs(page_token="A" * 5000), invalid),
        ("StartRun no ingestion", api.runs.StartRun, run_pb2.StartRunRequest(), invalid),
        ("StartRun bad ingestion", api.runs.StartRun, run_pb2.StartRunRequest(ingestion="ingestions/a b"), invalid),
        ("StartRun unknown", api.runs.StartRun, run_pb2.StartRunRequest(ingestion="ingestions/nobody"), not_found),
        ("StartRun unknown trigger", api.runs.StartRun, run_pb2.StartRunRequest(ingestion=ingestion, trigger=99),
         invalid),
        ("StartRun bad request id", api.runs.StartRun,
         run_pb2.StartRunRequest(ingestion=ingestion, request_id="has space"), invalid),
        ("CancelRun bad request id", api.runs.CancelRun, run_pb2.CancelRunRequest(name=run.name, request_id="x" * 300),
         invalid),
    ]  # fmt: skip
    problems = []
    for label, call, request, code in cases:
        try:
            invoke(call, request)
            problems.append(f"{label}: succeeded")
        except grpc.RpcError as error:
            if error.code() != code:
                problems.append(f"{label}: {error.code()} {error.details()}")
    assert problems == []
    # Nothing above disturbed the run.
    assert api.get(run.name).state == Run.STATE_RUNNING


def test_page_size_above_the_maximum_is_clamped(api: Api, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    ingestion = api.create("orders", tmp_path / "empty")
    run = api.ended(api.start(ingestion).name)
    reply = api.runs.ListRuns(run_pb2.ListRunsRequest(ingestion=ingestion, page_size=100_000))
    assert [r.name for r in reply.runs] == [run.name]
    assert reply.next_page_token == ""
