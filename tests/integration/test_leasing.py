"""LeaseService over gRPC on a real PostgreSQL: fencing, idempotent reports, backoff and
quarantine, lease-expiry counting, release, fairness, limits, filters, paused ingestions and
cancelled runs, long-poll wake-ups, agent ownership, short transactions, and bad input."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import Engine, text

from autoloader.v1 import (
    file_pb2,
    file_pb2_grpc,
    ingestion_pb2,
    ingestion_pb2_grpc,
    lease_pb2,
    lease_pb2_grpc,
    run_pb2,
    run_pb2_grpc,
)
from controlplane import bootstrap
from controlplane.config import ControlPlaneSettings

from .helpers import error_info, valid_ingestion

pytestmark = pytest.mark.integration

Run = run_pb2.Run
File = file_pb2.File
Outcome = lease_pb2.ReportFileResultRequest
TERMINAL = (Run.STATE_SUCCEEDED, Run.STATE_PARTIALLY_SUCCEEDED, Run.STATE_FAILED, Run.STATE_CANCELLED)


# --- helpers -----------------------------------------------------------------------------------------


def start_plane(database_url: str, state_dir: Path, ttl: float = 2.0) -> bootstrap.ControlPlane:
    return bootstrap.start(
        ControlPlaneSettings(
            database_url=database_url,
            listen_address="127.0.0.1:0",
            state_dir=state_dir,
            lease_ttl=timedelta(seconds=ttl),
            discovery_chunk_size=1000,
            shutdown_grace=0.5,
            health_interval=0.5,
        )
    )


@dataclass
class Api:
    address: str
    channel: grpc.Channel
    engine: Engine
    root: Path

    def __post_init__(self) -> None:
        self.ingestions = ingestion_pb2_grpc.IngestionServiceStub(self.channel)
        self.runs = run_pb2_grpc.RunServiceStub(self.channel)
        self.files = file_pb2_grpc.FileServiceStub(self.channel)
        self.leases = lease_pb2_grpc.LeaseServiceStub(self.channel)

    # ingestions and runs

    def create(
        self,
        ingestion_id: str,
        files: int | list[int] = 0,
        *,
        limits: ingestion_pb2.Limits | None = None,
        policy: ingestion_pb2.ErrorPolicy | None = None,
    ) -> str:
        """An ingestion over a fresh local directory holding `files` JSON files (sizes if a list)."""
        folder = self.root / ingestion_id
        folder.mkdir(parents=True, exist_ok=True)
        self.write(ingestion_id, files)
        overrides: dict[str, Any] = {"source": ingestion_pb2.Source(uri=f"file://{folder}", glob="*.json")}
        if limits is not None:
            overrides["limits"] = limits
        if policy is not None:
            overrides["error_policy"] = policy
        request = ingestion_pb2.CreateIngestionRequest(
            ingestion=valid_ingestion(**overrides), ingestion_id=ingestion_id
        )
        return str(self.ingestions.CreateIngestion(request).ingestion.name)

    def write(self, ingestion_id: str, files: int | list[int], prefix: str = "f") -> None:
        sizes = [10] * files if isinstance(files, int) else files
        for i, size in enumerate(sizes):
            (self.root / ingestion_id / f"{prefix}{i:05d}.json").write_bytes(b"x" * size)

    def start(self, ingestion: str) -> Run:
        return self.runs.StartRun(run_pb2.StartRunRequest(ingestion=ingestion)).run

    def get_run(self, run: str) -> Run:
        return self.runs.GetRun(run_pb2.GetRunRequest(name=run)).run

    def wait_run(self, run: str, done: Callable[[Run], bool], timeout: float = 20.0) -> Run:
        deadline = time.monotonic() + timeout
        while True:
            current = self.get_run(run)
            if done(current):
                return current
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for the run; last seen: {current}")
            time.sleep(0.02)

    def running(self, ingestion_id: str, files: int | list[int], **kwargs: Any) -> tuple[str, str]:
        """An ingestion whose run is RUNNING with `files` PENDING files: (ingestion name, run name)."""
        ingestion = self.create(ingestion_id, files, **kwargs)
        run = self.start(ingestion)
        self.wait_run(run.name, lambda r: r.state != Run.STATE_DISCOVERING)
        assert self.get_run(run.name).state == Run.STATE_RUNNING
        return ingestion, run.name

    def add_rows(self, ingestion_id: str, count: int, size: int = 10) -> None:
        """PENDING file rows straight into the ingestion's active run (fast many files)."""
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    """
                    INSERT INTO files (ingestion_pk, run_pk, path, size_bytes, state)
                    SELECT r.ingestion_pk, r.id, 'rows/' || lpad(g::text, 6, '0') || '.json', :size, 'PENDING'
                    FROM runs r JOIN ingestions i ON i.id = r.ingestion_pk,
                         generate_series(1, :count) g
                    WHERE i.ingestion_id = :ingestion AND r.state IN ('DISCOVERING', 'RUNNING')
                    """
                ),
                {"ingestion": ingestion_id, "count": count, "size": size},
            )

    # leases

    def lease(
        self, agent: str, max_files: int = 0, wait: float = 0, timeout: float | None = 30, **fields: Any
    ) -> lease_pb2.LeaseFilesResponse:
        request = lease_pb2.LeaseFilesRequest(agent=f"agents/{agent}", max_files=max_files, **fields)
        if wait:
            request.wait.FromTimedelta(timedelta(seconds=wait))
        return self.leases.LeaseFiles(request, timeout=timeout)

    def report(
        self,
        agent: str,
        lease: str,
        file: lease_pb2.LeasedFile,
        ok: bool = True,
        *,
        records: int = 1,
        retryable: bool = True,
        message: str = "boom",
        attempt: int | None = None,
    ) -> lease_pb2.ReportFileResultResponse:
        request = Outcome(
            lease=lease,
            agent=f"agents/{agent}",
            file=file.name,
            attempt=file.attempt if attempt is None else attempt,
            outcome=Outcome.OUTCOME_SUCCEEDED if ok else Outcome.OUTCOME_FAILED,
            records=records,
        )
        if not ok:
            request.error.CopyFrom(
                lease_pb2.FileErrorDetail(type="MalformedJson", message=message, retryable=retryable)
            )
        return self.leases.ReportFileResult(request, timeout=30)

    def extend(self, agent: str, lease: str) -> lease_pb2.ExtendLeaseResponse:
        return self.leases.ExtendLease(lease_pb2.ExtendLeaseRequest(lease=lease, agent=f"agents/{agent}"), timeout=30)

    def release(self, agent: str, lease: str, files: list[str] | None = None) -> int:
        request = lease_pb2.ReleaseLeaseRequest(lease=lease, agent=f"agents/{agent}", files=files or [])
        return int(self.leases.ReleaseLease(request, timeout=30).files_released)

    # database

    def file_row(self, file_name: str) -> Any:
        file_id = int(file_name.rsplit("/", 1)[1])
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT * FROM files WHERE id = :id"), {"id": file_id}).one()

    def attempts(self, file_name: str) -> list[Any]:
        file_id = int(file_name.rsplit("/", 1)[1])
        with self.engine.connect() as conn:
            return list(
                conn.execute(text("SELECT * FROM file_attempts WHERE file_pk = :id ORDER BY id"), {"id": file_id})
            )


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def expect(call: Callable[[], Any], code: grpc.StatusCode, reason: str | None = None) -> grpc.RpcError:
    error = rpc_error(call)
    assert error.code() == code, f"expected {code}, got {error.code()}: {error.details()}"
    if reason is not None:
        assert error_info(error).reason == reason
    return error


def backoff(initial: float = 1.0, maximum: float = 1.0) -> ingestion_pb2.ErrorPolicy:
    return ingestion_pb2.ErrorPolicy(
        retry_backoff_initial=Duration(seconds=int(initial), nanos=int(initial % 1 * 1e9)),
        retry_backoff_max=Duration(seconds=int(maximum), nanos=int(maximum % 1 * 1e9)),
    )


def api_factory(database_url: str, engine: Engine, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """Yields make(ttl) -> Api on its own control plane; stops them all afterwards."""
    planes: list[bootstrap.ControlPlane] = []
    channels: list[grpc.Channel] = []

    def make(ttl: float = 2.0) -> Api:
        plane = start_plane(database_url, tmp_path / f"state{len(planes)}", ttl)
        planes.append(plane)
        channel = grpc.insecure_channel(plane.address)
        channels.append(channel)
        return Api(plane.address, channel, engine, tmp_path / "src")

    yield make
    for channel in channels:
        channel.close()
    for plane in planes:
        plane.stop(grace=0)


@pytest.fixture
def make_api(database_url: str, engine: Engine, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    yield from api_factory(database_url, engine, tmp_path)


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api(2.0)


# --- fencing and idempotent reports ------------------------------------------------------------------


def test_expired_lease_is_fenced_and_the_new_holders_result_stands(api: Api) -> None:
    api.running("fence", 1)
    first = api.lease("a1")
    assert len(first.files) == 1
    file = first.files[0]
    assert file.attempt == 1
    time.sleep(2.3)  # the 2s lease expires

    second = api.lease("a2")
    assert [f.name for f in second.files] == [file.name]
    assert second.lease.name != first.lease.name
    assert second.files[0].attempt == 1  # an expiry is not the file's fault: no attempt spent

    error = expect(lambda: api.report("a1", first.lease.name, file), grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
    assert error.code() != grpc.StatusCode.INTERNAL
    expect(lambda: api.extend("a1", first.lease.name), grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
    row = api.file_row(file.name)
    assert row.state == "LEASED"
    assert row.lease_pk == uuid.UUID(second.lease.name.removeprefix("leases/"))

    reply = api.report("a2", second.lease.name, second.files[0], records=7)
    assert reply.file_state == File.STATE_SUCCEEDED
    row = api.file_row(file.name)
    assert (row.state, row.records, row.attempts, row.lease_expiries) == ("SUCCEEDED", 7, 1, 1)
    # The late holder still cannot overwrite it, not even with a failure.
    expect(
        lambda: api.report("a1", first.lease.name, file, ok=False), grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST"
    )
    assert api.file_row(file.name).state == "SUCCEEDED"

    history = [(a.outcome, a.agent_id, a.attempt) for a in api.attempts(file.name)]
    assert history == [("LEASE_EXPIRED", "a1", 1), ("SUCCEEDED", "a2", 1)]


def test_duplicate_identical_report_gets_the_same_answer_and_one_attempt_row(api: Api) -> None:
    _, run = api.running("dup", 2)
    got = api.lease("a1")
    file, other = got.files
    first = api.report("a1", got.lease.name, file, records=3)
    again = api.report("a1", got.lease.name, file, records=3)
    assert first.file_state == again.file_state == File.STATE_SUCCEEDED
    assert first.next_attempt_time == again.next_attempt_time
    rows = [a for a in api.attempts(file.name) if a.lease_pk == uuid.UUID(got.lease.name.removeprefix("leases/"))]
    assert [(a.attempt, a.outcome, a.records) for a in rows] == [(1, "SUCCEEDED", 3)]
    # A different result for the same (lease, attempt) is not a replay.
    expect(lambda: api.report("a1", got.lease.name, file, ok=False), grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
    assert api.file_row(file.name).state == "SUCCEEDED"

    # Duplicate failures too: same state, one FAILED row.
    failed = api.report("a1", got.lease.name, other, ok=False, retryable=False)
    failed_again = api.report("a1", got.lease.name, other, ok=False, retryable=False)
    assert failed.file_state == failed_again.file_state == File.STATE_QUARANTINED
    assert [a.outcome for a in api.attempts(other.name)] == ["FAILED"]
    ended = api.wait_run(run, lambda r: r.state in TERMINAL)
    assert ended.file_counts.succeeded == 1
    assert ended.file_counts.quarantined == 1


# --- backoff, quarantine, expiries, release ------------------------------------------------------------


def test_failed_file_is_not_claimable_before_next_attempt_time_and_is_after(api: Api) -> None:
    api.running("backoff", 1, policy=backoff(1.0, 1.0))
    got = api.lease("a1")
    before = datetime.now(UTC)
    reply = api.report("a1", got.lease.name, got.files[0], ok=False, message="bad json")
    assert reply.file_state == File.STATE_FAILED
    next_at = reply.next_attempt_time.ToDatetime(UTC)
    # initial 1s, jitter in [0.5, 1): between 0.5s and 1s from the report.
    assert before + timedelta(seconds=0.45) <= next_at <= datetime.now(UTC) + timedelta(seconds=1.05)
    row = api.file_row(got.files[0].name)
    assert row.state == "FAILED"
    assert abs(row.next_attempt_at - next_at) < timedelta(milliseconds=5)

    assert not api.lease("a1").files  # not yet
    assert not api.lease("a2").files
    # Poll until just before next_attempt_time. A poll sent in time may still be answered late on a
    # loaded machine, so a claim is judged by when the database made it (the claim stamps the row's
    # update_time with the claiming transaction's now()), not by when the client asked.
    retry = None
    while retry is None and datetime.now(UTC) < next_at - timedelta(milliseconds=100):
        polled = api.lease("a2")
        if polled.files:
            retry = polled
        time.sleep(0.05)
    if retry is None:
        retry = api.lease("a2", wait=5)
    assert [f.name for f in retry.files] == [got.files[0].name]
    assert retry.files[0].attempt == 2
    claimed_at = api.file_row(got.files[0].name).update_time
    assert claimed_at >= next_at, f"claimed {(next_at - claimed_at).total_seconds():.3f}s early"
    assert claimed_at - next_at < timedelta(seconds=2.5)  # found by the poll, not forgotten


def test_max_attempts_quarantines_and_keeps_the_error(api: Api) -> None:
    _, run = api.running("maxatt", 1, limits=ingestion_pb2.Limits(max_attempts=2), policy=backoff(1, 1))
    got = api.lease("a1")
    reply = api.report("a1", got.lease.name, got.files[0], ok=False, message="first failure")
    assert reply.file_state == File.STATE_FAILED
    retry = api.lease("a1", wait=5)
    assert retry.files[0].attempt == 2
    reply = api.report("a1", retry.lease.name, retry.files[0], ok=False, message="second failure")
    assert reply.file_state == File.STATE_QUARANTINED
    assert not reply.HasField("next_attempt_time")

    row = api.file_row(got.files[0].name)
    assert (row.state, row.attempts) == ("QUARANTINED", 2)
    assert "second failure" in row.last_error
    assert "MalformedJson" in row.last_error
    history = [(a.attempt, a.outcome, a.error_type, a.error_message, a.retryable) for a in api.attempts(row_name(row))]
    assert history == [
        (1, "FAILED", "MalformedJson", "first failure", True),
        (2, "FAILED", "MalformedJson", "second failure", True),
    ]
    assert not api.lease("a1", wait=0.5).files
    ended = api.wait_run(run, lambda r: r.state in TERMINAL)
    assert ended.file_counts.quarantined == 1
    assert ended.state != Run.STATE_SUCCEEDED


def row_name(row: Any) -> str:
    return f"ingestions/x/files/{row.id}"


def test_non_retryable_error_quarantines_at_once(api: Api) -> None:
    api.running("nonretry", 1, limits=ingestion_pb2.Limits(max_attempts=5), policy=backoff(1, 1))
    got = api.lease("a1")
    reply = api.report("a1", got.lease.name, got.files[0], ok=False, retryable=False, message="schema mismatch")
    assert reply.file_state == File.STATE_QUARANTINED
    row = api.file_row(got.files[0].name)
    assert (row.state, row.attempts) == ("QUARANTINED", 1)
    assert "schema mismatch" in row.last_error
    assert [(a.outcome, a.retryable) for a in api.attempts(got.files[0].name)] == [("FAILED", False)]
    time.sleep(0.3)
    assert not api.lease("a1").files


def test_lease_expiries_cost_no_attempt_and_three_quarantine_the_file(make_api: Callable[..., Api]) -> None:
    api = make_api(1.0)
    _, run = api.running("killer", 1)
    got = api.lease("a0")
    name = got.files[0].name
    for expiries in (1, 2):
        time.sleep(1.2)
        again = api.lease(f"a{expiries}")
        assert [f.name for f in again.files] == [name]
        assert again.files[0].attempt == 1
        row = api.file_row(name)
        assert (row.state, row.attempts, row.lease_expiries) == ("LEASED", 1, expiries)
    time.sleep(1.2)
    assert not api.lease("a3").files  # the third expiry quarantines it instead of leasing it again
    row = api.file_row(name)
    assert (row.state, row.attempts, row.lease_expiries) == ("QUARANTINED", 1, 3)
    assert row.last_error
    assert [a.outcome for a in api.attempts(name)] == ["LEASE_EXPIRED"] * 3
    ended = api.wait_run(run, lambda r: r.state in TERMINAL)
    assert ended.file_counts.quarantined == 1


def test_release_returns_files_to_pending_without_spending_an_attempt(api: Api) -> None:
    api.running("release", 3)
    got = api.lease("a1")
    assert len(got.files) == 3
    assert all(f.attempt == 1 for f in got.files)
    assert api.release("a1", got.lease.name, [got.files[0].name]) == 1
    row = api.file_row(got.files[0].name)
    assert (row.state, row.attempts, row.lease_pk) == ("PENDING", 0, None)
    assert api.release("a1", got.lease.name) == 2  # every unreported file
    assert api.release("a1", got.lease.name) == 0  # nothing left: not an error
    for f in got.files:
        row = api.file_row(f.name)
        assert (row.state, row.attempts) == ("PENDING", 0)
    # A released file cannot be reported on the old lease.
    expect(lambda: api.report("a1", got.lease.name, got.files[1]), grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")

    again = api.lease("a2")
    assert sorted(f.name for f in again.files) == sorted(f.name for f in got.files)
    assert all(f.attempt == 1 for f in again.files)
    for f in again.files:
        assert api.report("a2", again.lease.name, f).file_state == File.STATE_SUCCEEDED
        assert api.file_row(f.name).attempts == 1


def test_release_after_a_report_only_returns_unreported_files(api: Api) -> None:
    api.running("partial", 2)
    got = api.lease("a1")
    api.report("a1", got.lease.name, got.files[0])
    assert api.release("a1", got.lease.name) == 1
    assert api.file_row(got.files[0].name).state == "SUCCEEDED"
    assert api.file_row(got.files[1].name).state == "PENDING"


# --- claiming: fairness, limits, filters, paused and cancelled ---------------------------------------


def test_fair_between_two_ingestions(make_api: Callable[..., Api]) -> None:
    # Leases that outlive the test: a re-leased expired file would come in a smaller batch.
    api = make_api(60.0)
    api.running("fa", 1)
    api.running("fb", 1)
    api.add_rows("fa", 499)
    api.add_rows("fb", 499)
    taken = {"fa": 0, "fb": 0}
    # Holding leases: the least busy ingestion goes next, so they alternate.
    for _ in range(20):
        got = api.lease("a1", max_files=10)
        assert len(got.files) == 10
        taken[got.ingestion.name.removeprefix("ingestions/")] += 1
    assert abs(taken["fa"] - taken["fb"]) <= 2, taken
    # Reporting everything each time: ties go at random, neither is starved.
    done = {"fa": 0, "fb": 0}
    for _ in range(30):
        got = api.lease("a2", max_files=10)
        assert len(got.files) == 10
        done[got.ingestion.name.removeprefix("ingestions/")] += 1
        for f in got.files:
            api.report("a2", got.lease.name, f)
    assert min(done.values()) >= 3, done


def test_max_bytes_bounds_a_lease(api: Api) -> None:
    api.running("bytes", [100] * 6)
    got = api.lease("a1", max_bytes=250)
    assert 1 <= len(got.files) <= 2, [f.size_bytes for f in got.files]
    assert sum(f.size_bytes for f in got.files) <= 250
    exact = api.lease("a1", max_bytes=200)
    assert len(exact.files) == 2


def test_a_file_larger_than_max_bytes_goes_alone(api: Api) -> None:
    api.running("big", [1000, 1000])
    alone = api.lease("a1", max_bytes=10, ingestion="ingestions/big")
    assert [f.size_bytes for f in alone.files] == [1000]


def test_ingestion_limit_caps_max_files(api: Api) -> None:
    api.running("cap", 10, limits=ingestion_pb2.Limits(max_files_per_lease=3))
    assert len(api.lease("a1", max_files=100).files) == 3
    assert len(api.lease("a1").files) == 3
    assert len(api.lease("a1", max_files=1).files) == 1


def test_ingestion_filter(api: Api) -> None:
    api.running("one", 5)
    api.running("two", 5)
    for _ in range(3):
        got = api.lease("a1", max_files=2, ingestion="ingestions/two")
        assert got.ingestion.name == "ingestions/two"
        assert all(f.name.startswith("ingestions/two/files/") for f in got.files)
        assert all(f.run.startswith("ingestions/two/runs/") for f in got.files)
    assert not api.lease("a1", ingestion="ingestions/two").files  # drained
    got = api.lease("a1", max_files=100)
    assert got.ingestion.name == "ingestions/one"
    assert len(got.files) == 5


def test_paused_ingestion_is_not_leased(api: Api) -> None:
    ingestion, _ = api.running("paused", 3)
    api.ingestions.PauseIngestion(ingestion_pb2.PauseIngestionRequest(name=ingestion))
    assert not api.lease("a1", wait=0.5).files
    assert not api.lease("a1", ingestion=ingestion).files
    api.ingestions.ResumeIngestion(ingestion_pb2.ResumeIngestionRequest(name=ingestion))
    assert len(api.lease("a1", wait=2).files) == 3


def test_cancelled_runs_files_are_not_leased(api: Api) -> None:
    _, run = api.running("cancel", 4)
    held = api.lease("a1", max_files=1)
    api.runs.CancelRun(run_pb2.CancelRunRequest(name=run))
    assert not api.lease("a2", wait=0.5).files
    # The holder's late report is fenced too.
    expect(lambda: api.report("a1", held.lease.name, held.files[0]), grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
    assert api.get_run(run).state == Run.STATE_CANCELLED


# --- long polls ----------------------------------------------------------------------------------------


def waiting_lease(api: Api, agent: str, wait: float, **fields: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["reply"] = api.lease(agent, wait=wait, timeout=wait + 5, **fields)
        except grpc.RpcError as error:  # pragma: no cover - reported by the assertion
            result["error"] = error
        result["at"] = time.monotonic()

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    time.sleep(0.3)  # let it reach the wait
    assert "at" not in result, "LeaseFiles returned instead of waiting"
    return thread, result


def test_waiting_lease_wakes_at_once_when_files_are_released(api: Api) -> None:
    api.running("wake", 2)
    held = api.lease("a1")
    thread, result = waiting_lease(api, "a2", 10)
    api.release("a1", held.lease.name)
    released_at = time.monotonic()
    thread.join(12)
    assert "error" not in result
    assert len(result["reply"].files) == 2
    assert result["at"] - released_at < 0.2


def test_waiting_lease_wakes_at_once_when_discovery_commits_new_work(api: Api) -> None:
    ingestion = api.create("newwork", 0)
    thread, result = waiting_lease(api, "a1", 10)
    api.write("newwork", 3)
    api.start(ingestion)
    committed_at = None
    deadline = time.monotonic() + 10
    with api.engine.connect() as conn:
        while time.monotonic() < deadline and "at" not in result:
            if conn.execute(text("SELECT count(*) FROM files")).scalar_one():
                committed_at = time.monotonic()
                break
            conn.commit()
            time.sleep(0.005)
    thread.join(12)
    assert "error" not in result
    assert result["reply"].files, "the waiting LeaseFiles returned empty"
    if committed_at is None:  # it returned before our poll saw the rows: fast enough
        return
    assert result["at"] - committed_at < 0.2


def test_empty_long_poll_returns_before_the_client_deadline(api: Api) -> None:
    started = time.monotonic()
    reply = api.lease("a1", wait=10, timeout=2)
    elapsed = time.monotonic() - started
    assert not reply.HasField("lease")
    assert not reply.files
    assert 1.0 < elapsed < 2.0


def test_empty_long_poll_waits_the_requested_time(api: Api) -> None:
    started = time.monotonic()
    reply = api.lease("a1", wait=1, timeout=10)
    elapsed = time.monotonic() - started
    assert not reply.files
    assert 0.9 <= elapsed < 2.5


# --- agents ----------------------------------------------------------------------------------------------


def test_a_lease_is_bound_to_its_agent(api: Api) -> None:
    api.running("owner", 2)
    got = api.lease("a1")
    file = got.files[0]
    expect(lambda: api.extend("a2", got.lease.name), grpc.StatusCode.PERMISSION_DENIED, "LEASE_NOT_OWNED")
    expect(lambda: api.report("a2", got.lease.name, file), grpc.StatusCode.PERMISSION_DENIED, "LEASE_NOT_OWNED")
    expect(lambda: api.release("a2", got.lease.name), grpc.StatusCode.PERMISSION_DENIED, "LEASE_NOT_OWNED")
    expect(lambda: api.release("a2", got.lease.name, [file.name]), grpc.StatusCode.PERMISSION_DENIED, "LEASE_NOT_OWNED")
    assert all(api.file_row(f.name).state == "LEASED" for f in got.files)
    extended = api.extend("a1", got.lease.name).lease
    assert extended.agent == "agents/a1"
    assert extended.expire_time.ToDatetime(UTC) >= got.lease.expire_time.ToDatetime(UTC)
    assert api.report("a1", got.lease.name, file).file_state == File.STATE_SUCCEEDED


def test_extend_keeps_a_lease_alive_past_its_ttl(api: Api) -> None:
    api.running("keep", 1)
    got = api.lease("a1")
    assert got.lease.heartbeat_interval.ToTimedelta() == timedelta(seconds=2) / 3
    for _ in range(4):
        time.sleep(0.7)
        api.extend("a1", got.lease.name)
    assert not api.lease("a2").files  # still held: 2.8s after the claim
    assert api.report("a1", got.lease.name, got.files[0]).file_state == File.STATE_SUCCEEDED


def test_list_agents_shows_last_contact_and_active_leases(api: Api) -> None:
    api.running("agents", 5, limits=ingestion_pb2.Limits(max_files_per_lease=2))
    before = datetime.now(UTC) - timedelta(seconds=1)
    a1 = [api.lease("a1"), api.lease("a1")]
    api.lease("a2", max_files=1)
    api.lease("idle-agent")  # nothing left: an agent with no lease
    agents = {a.name: a for a in api.leases.ListAgents(lease_pb2.ListAgentsRequest()).agents}
    assert set(agents) == {"agents/a1", "agents/a2", "agents/idle-agent"}
    assert (agents["agents/a1"].active_leases, agents["agents/a1"].leased_files) == (2, 4)
    assert (agents["agents/a2"].active_leases, agents["agents/a2"].leased_files) == (1, 1)
    assert (agents["agents/idle-agent"].active_leases, agents["agents/idle-agent"].leased_files) == (0, 0)
    for agent in agents.values():
        assert agent.last_seen_time.ToDatetime(UTC) >= before
        assert agent.create_time.ToDatetime(UTC) >= before

    seen = agents["agents/a2"].last_seen_time.ToDatetime(UTC)
    time.sleep(0.05)
    api.extend("a1", a1[0].lease.name)
    api.lease("a2")
    later = {a.name: a for a in api.leases.ListAgents(lease_pb2.ListAgentsRequest()).agents}
    assert later["agents/a2"].last_seen_time.ToDatetime(UTC) > seen
    # Reporting every file of a lease ends it.
    for f in a1[0].files:
        api.report("a1", a1[0].lease.name, f)
    after = {a.name: a for a in api.leases.ListAgents(lease_pb2.ListAgentsRequest()).agents}
    assert (after["agents/a1"].active_leases, after["agents/a1"].leased_files) == (1, 2)


# --- transactions ----------------------------------------------------------------------------------------


def test_no_transaction_stays_open_while_leases_are_out(api: Api, engine: Engine) -> None:
    api.running("tx", 40, limits=ingestion_pb2.Limits(max_files_per_lease=5))
    for i in range(6):
        assert api.lease(f"holder{i}").files
    waiting, _ = waiting_lease(api, "waiter", 3, ingestion="ingestions/nope")
    with engine.connect() as conn:
        database = conn.execute(text("SELECT current_database()")).scalar_one()
        # Held, not passing through: a background task's transaction is idle in transaction for
        # the instant between two of its statements (longer on a loaded machine), while one held
        # across the long-poll would stay so for the whole 3 s wait.
        for _ in range(40):
            idle = conn.execute(
                text(
                    """
                    SELECT pid, state, query, now() - state_change AS held FROM pg_stat_activity
                    WHERE datname = :db AND pid <> pg_backend_pid()
                      AND state IN ('idle in transaction', 'idle in transaction (aborted)')
                      AND now() - state_change > interval '500 milliseconds'
                    """
                ),
                {"db": database},
            ).all()
            conn.commit()
            assert not idle, idle
            time.sleep(0.05)
    waiting.join(10)


# --- bad input -------------------------------------------------------------------------------------------


def test_bad_input(api: Api) -> None:
    api.running("bad", 3)
    got = api.lease("a1", max_files=2)
    file = got.files[0]
    lease = got.lease.name
    unknown = f"leases/{uuid.uuid4()}"
    L = api.leases
    codes: list[grpc.StatusCode] = []

    def check(call: Callable[[], Any], code: grpc.StatusCode, reason: str | None = None) -> None:
        error = expect(call, code, reason)
        codes.append(error.code())

    ok = grpc.StatusCode.INVALID_ARGUMENT
    # unknown lease
    check(lambda: api.extend("a1", unknown), grpc.StatusCode.NOT_FOUND)
    check(lambda: api.report("a1", unknown, file), grpc.StatusCode.NOT_FOUND)
    check(lambda: api.release("a1", unknown), grpc.StatusCode.NOT_FOUND)
    # malformed names
    for bad_lease in ["", "leases/", "leases/not-a-uuid", lease.removeprefix("leases/"), "agents/a1"]:
        check(lambda bad_lease=bad_lease: api.extend("a1", bad_lease), ok)
        check(lambda bad_lease=bad_lease: api.report("a1", bad_lease, file), ok)
        check(lambda bad_lease=bad_lease: api.release("a1", bad_lease), ok)
    for bad_agent in ["", "a1", "agents/", "agents/a b", "agents/" + "x" * 129, "leases/a1"]:
        check(lambda bad_agent=bad_agent: L.LeaseFiles(lease_pb2.LeaseFilesRequest(agent=bad_agent)), ok)
        check(lambda bad_agent=bad_agent: L.ExtendLease(lease_pb2.ExtendLeaseRequest(lease=lease, agent=bad_agent)), ok)
        check(
            lambda bad_agent=bad_agent: L.ReleaseLease(lease_pb2.ReleaseLeaseRequest(lease=lease, agent=bad_agent)), ok
        )
        check(
            lambda bad_agent=bad_agent: L.ReportFileResult(
                Outcome(lease=lease, agent=bad_agent, file=file.name, attempt=1, outcome=Outcome.OUTCOME_SUCCEEDED)
            ),
            ok,
        )
    for bad_file in ["", "files/1", "ingestions/bad/files/abc", "ingestions/bad/files/", "ingestions//files/1"]:
        check(
            lambda bad_file=bad_file: L.ReportFileResult(
                Outcome(lease=lease, agent="agents/a1", file=bad_file, attempt=1, outcome=Outcome.OUTCOME_SUCCEEDED)
            ),
            ok,
        )
        check(lambda bad_file=bad_file: api.release("a1", lease, [bad_file]), ok)
    check(lambda: api.lease("a1", ingestion="ingestions/Not Valid!"), ok)
    check(lambda: api.lease("a1", ingestion="runs/x"), ok)
    # a file not in the lease (another file, or one that does not exist)
    not_leased = f"ingestions/bad/files/{int(file.name.rsplit('/', 1)[1]) + 1000}"
    check(
        lambda: L.ReportFileResult(
            Outcome(lease=lease, agent="agents/a1", file=not_leased, attempt=1, outcome=Outcome.OUTCOME_SUCCEEDED)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_LOST",
    )
    third = api.lease("a2").files[0]
    check(lambda: api.report("a1", lease, third), grpc.StatusCode.FAILED_PRECONDITION)
    # wrong attempt
    check(lambda: api.report("a1", lease, file, attempt=2), grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
    check(lambda: api.report("a1", lease, file, attempt=0), ok)
    check(lambda: api.report("a1", lease, file, attempt=-1), ok)
    # numbers
    check(lambda: api.report("a1", lease, file, records=-1), ok)
    check(
        lambda: L.ReportFileResult(
            Outcome(lease=lease, agent="agents/a1", file=file.name, attempt=1, outcome=1, records=1, bytes=-5)
        ),
        ok,
    )
    check(lambda: api.lease("a1", max_files=20000), ok)
    check(lambda: api.lease("a1", max_files=10001), ok)
    check(lambda: api.lease("a1", max_files=-1), ok)
    check(lambda: api.lease("a1", max_bytes=-1), ok)
    check(lambda: L.LeaseFiles(lease_pb2.LeaseFilesRequest(agent="agents/a1", wait=Duration(seconds=100))), ok)
    check(lambda: L.LeaseFiles(lease_pb2.LeaseFilesRequest(agent="agents/a1", wait=Duration(seconds=61))), ok)
    check(lambda: L.LeaseFiles(lease_pb2.LeaseFilesRequest(agent="agents/a1", wait=Duration(seconds=-1))), ok)
    check(lambda: L.LeaseFiles(lease_pb2.LeaseFilesRequest(agent="agents/a1", wait=Duration(seconds=0, nanos=-5))), ok)
    # outcomes
    check(
        lambda: L.ReportFileResult(
            Outcome(lease=lease, agent="agents/a1", file=file.name, attempt=1, outcome=Outcome.OUTCOME_FAILED)
        ),
        ok,
    )
    check(
        lambda: L.ReportFileResult(
            Outcome(lease=lease, agent="agents/a1", file=file.name, attempt=1, outcome=Outcome.OUTCOME_UNSPECIFIED)
        ),
        ok,
    )
    assert grpc.StatusCode.INTERNAL not in codes
    assert grpc.StatusCode.UNKNOWN not in codes
    # None of that touched the leased file.
    row = api.file_row(file.name)
    assert (row.state, row.attempts) == ("LEASED", 1)
    assert api.report("a1", lease, file).file_state == File.STATE_SUCCEEDED
