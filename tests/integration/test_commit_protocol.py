"""The write path over gRPC on a real PostgreSQL and a real Iceberg table (pyiceberg, no Spark).

An agent's role is played by the test: it leases files, stages Parquet under the
lease's staging location and reports with data_files; the control plane's committer
commits the data and settles the files. Covered: the happy path and its identical
retry, the lease fence (whole and partial), staging paths outside the lease, group
commit, in-doubt files (claimable by nobody, not released, taken over by another
replica), recognition of a landed but unsettled commit, rows replaced by a later
load, data that cannot be committed, the orphan sweep against a backlog of pending
intents, and crash isolation of files whose leases keep expiring.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, text

from autoloader.v1 import file_pb2, ingestion_pb2, lease_pb2, run_pb2
from controlplane import bootstrap
from controlplane.config import ControlPlaneSettings
from controlplane.domain.commits import StagedBatch
from controlplane.service.commits import MAX_INTENTS_PER_COMMIT
from tests.integration.helpers import error_info, field_violations, valid_ingestion
from tests.integration.test_leasing import TERMINAL, Api, expect, rpc_error

pytestmark = pytest.mark.integration

File = file_pb2.File
Run = run_pb2.Run
Outcome = lease_pb2.ReportFileResultRequest
TABLE = "raw.orders"  # valid_ingestion's destination
ROWS = 2  # staged rows per source file
COMMITS = "autoloader.commits"
LEASES = "autoloader.leases"


# --- harness -----------------------------------------------------------------------------------------


@dataclass
class Plane(Api):
    """One control plane (on the test's database and warehouse) and a client of it, playing the agents."""

    plane: bootstrap.ControlPlane

    def create(  # type: ignore[override]
        self,
        ingestion_id: str,
        files: int | list[int] = 0,
        *,
        limits: ingestion_pb2.Limits | None = None,
        policy: ingestion_pb2.ErrorPolicy | None = None,
        table: str = TABLE,
    ) -> str:
        folder = self.root / ingestion_id
        folder.mkdir(parents=True, exist_ok=True)
        self.write(ingestion_id, files)
        overrides: dict[str, Any] = {
            "source": ingestion_pb2.Source(uri=f"file://{folder}", glob="*.json"),
            "destination": ingestion_pb2.Destination(table=table),
        }
        if limits is not None:
            overrides["limits"] = limits
        if policy is not None:
            overrides["error_policy"] = policy
        request = ingestion_pb2.CreateIngestionRequest(
            ingestion=valid_ingestion(**overrides), ingestion_id=ingestion_id
        )
        return str(self.ingestions.CreateIngestion(request).ingestion.name)

    # the agent's side

    def stage(
        self,
        got: lease_pb2.LeaseFilesResponse,
        files: Sequence[lease_pb2.LeasedFile] | None = None,
        *,
        name: str = "part-0.parquet",
        location: str | None = None,
        first: int = 0,
        n_type: pa.DataType | None = None,
    ) -> lease_pb2.DataFile:
        """One Parquet file with ROWS rows per source file (n = first, first + 1, ...), under the lease's
        staging location (or `location`); `n_type` gives n another type than bigint."""
        files = got.files if files is None else files
        uri = f"{(location or got.target.staging_location).rstrip('/')}/{name}"
        local = Path(uri.removeprefix("file://"))
        local.parent.mkdir(parents=True, exist_ok=True)
        rows = pa.table(
            {
                "n": pa.array([first + i for _ in files for i in range(ROWS)], pa.int64()).cast(n_type or pa.int64()),
                "payload": [f"{f.name}#{i}" for f in files for i in range(ROWS)],
                "_source_file": [f.path for f in files for _ in range(ROWS)],
            }
        )
        pq.write_table(rows, local)
        return lease_pb2.DataFile(path=uri, record_count=rows.num_rows, size_bytes=local.stat().st_size)

    def report_data(
        self,
        agent: str,
        got: lease_pb2.LeaseFilesResponse,
        data_files: Sequence[lease_pb2.DataFile],
        files: Sequence[lease_pb2.LeasedFile] | None = None,
        *,
        timeout: float = 30.0,
    ) -> lease_pb2.ReportFileResultsResponse:
        files = got.files if files is None else files
        request = lease_pb2.ReportFileResultsRequest(
            lease=got.lease.name,
            agent=f"agents/{agent}",
            results=[
                lease_pb2.FileResult(
                    file=f.name, attempt=f.attempt, outcome=Outcome.OUTCOME_SUCCEEDED, records=ROWS,
                    bytes=f.size_bytes,
                )
                for f in files
            ],
            data_files=data_files,
        )  # fmt: skip
        return self.leases.ReportFileResults(request, timeout=timeout)

    # the table

    def table(self) -> Any:
        return self.plane.tables.load(TABLE)

    def rows(self) -> list[tuple[str, int]]:
        """(source file, n) of every row of the table, sorted (duplicates kept)."""
        table = self.table()
        if table is None:
            return []
        return sorted((r["_source_file"], r["n"]) for r in table.scan().to_arrow().to_pylist())

    def snapshots(self) -> list[Any]:
        table = self.table()
        return [] if table is None else list(table.snapshots())

    # the database

    def commits(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text("SELECT * FROM commits ORDER BY create_time, id")))

    def rows_of(self, files: Sequence[lease_pb2.LeasedFile]) -> list[Any]:
        return [self.file_row(f.name) for f in files]


def expected_rows(*batches: Sequence[lease_pb2.LeasedFile], first: int = 0) -> list[tuple[str, int]]:
    return sorted((f.path, first + i) for files in batches for f in files for i in range(ROWS))


def lease_id(got: lease_pb2.LeaseFilesResponse) -> uuid.UUID:
    return uuid.UUID(got.lease.name.removeprefix("leases/"))


def local(data_file: lease_pb2.DataFile) -> Path:
    return Path(data_file.path.removeprefix("file://"))


def carried(snapshot: Any, key: str) -> list[str]:
    summary = snapshot.summary.additional_properties if snapshot.summary else {}
    value = summary.get(key, "")
    return value.split(",") if value else []


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["reply"] = call()
        except grpc.RpcError as error:
            out["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def pending_intent(api: Plane, got: lease_pb2.LeaseFilesResponse) -> Any:
    """Waits for the lease's intent to be written (PENDING) and returns its row."""

    def find() -> Any:
        rows = [c for c in api.commits() if c.lease_pk == lease_id(got)]
        return rows[0] if rows else None

    intent = wait_for(find, 10, "the report's intent")
    assert intent.state == "PENDING"
    return intent


def outcome_of_waiting_report(
    api: Plane, thread: threading.Thread, out: dict[str, Any], retry: Callable[[], Any]
) -> lease_pb2.ReportFileResultsResponse:
    """The waiting report's answer, or (if it gave up with COMMIT_IN_PROGRESS) its retry's."""
    thread.join(40)
    assert not thread.is_alive(), "the waiting report never returned"
    if "reply" in out:
        return out["reply"]
    error = out["error"]
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert error_info(error).reason == "COMMIT_IN_PROGRESS"
    return retry()


def states(reply: lease_pb2.ReportFileResultsResponse) -> list[tuple[str, int, bool]]:
    return [(r.file, r.file_state, r.lease_lost) for r in reply.results]


def succeeded(files: Sequence[lease_pb2.LeasedFile]) -> list[tuple[str, int, bool]]:
    return [(f.name, File.STATE_SUCCEEDED, False) for f in files]


@pytest.fixture
def make_plane(database_url: str, engine: Engine, tmp_path: Path) -> Iterator[Callable[..., Plane]]:
    """make(ttl, stale) -> a control plane on this test's database and warehouse; all are stopped afterwards."""
    made: list[tuple[bootstrap.ControlPlane, grpc.Channel]] = []

    def make(ttl: float = 60.0, stale: float = 2.0, linger: float = 1.0) -> Plane:
        settings = ControlPlaneSettings(
            database_url=database_url,
            state_dir=tmp_path / f"state{len(made)}",
            listen_address="127.0.0.1:0",
            warehouse=(tmp_path / "warehouse").as_uri(),
            lease_ttl=timedelta(seconds=ttl),
            commit_stale_after=timedelta(seconds=stale),
            commit_poll=0.2,
            commit_linger=timedelta(seconds=linger),
            finalize_sweep_interval=0.2,
            discovery_poll=0.2,
            shutdown_grace=0.5,
            health_interval=0.5,
        )
        plane = bootstrap.start(settings)
        channel = grpc.insecure_channel(plane.address)
        made.append((plane, channel))
        return Plane(plane.address, channel, engine, tmp_path / "src", plane)

    yield make
    for plane, channel in made:
        channel.close()
        plane.stop(grace=0)


def commit_three(api: Plane) -> tuple[lease_pb2.LeaseFilesResponse, lease_pb2.DataFile, Any]:
    """Three files leased, staged in one data file, reported: (lease, data file, reply)."""
    api.running("happy", 3)
    got = api.lease("a1")
    assert len(got.files) == 3
    assert got.target.table == TABLE
    assert got.target.staging_location.endswith(f"/data/_staging/{lease_id(got)}")
    data = api.stage(got)
    return got, data, api.report_data("a1", got, [data])


# --- the happy path and its retry --------------------------------------------------------------------


def test_a_report_with_data_commits_it_and_settles_the_files(make_plane: Callable[..., Plane]) -> None:
    api = make_plane()
    got, data, reply = commit_three(api)
    assert states(reply) == succeeded(got.files)
    assert all(not r.HasField("next_attempt_time") for r in reply.results)

    for row in api.rows_of(got.files):
        assert (row.state, row.records, row.commit_pk, row.lease_pk) == ("SUCCEEDED", ROWS, None, None)
    for f in got.files:
        assert [a.outcome for a in api.attempts(f.name)] == ["SUCCEEDED"]
    assert api.rows() == expected_rows(got.files)

    (intent,) = api.commits()
    assert (intent.state, intent.lease_pk, intent.table_name) == ("COMMITTED", lease_id(got), TABLE)
    assert intent.end_time is not None
    snapshot = api.table().current_snapshot()
    assert carried(snapshot, COMMITS) == [str(intent.id)]
    assert carried(snapshot, LEASES) == [got.lease.name]
    # Every snapshot the commit made names it, and no other snapshot exists.
    assert all(carried(s, COMMITS) == [str(intent.id)] for s in api.snapshots())
    assert local(data).exists()  # adopted in place, not copied and removed
    run = api.wait_run(got.files[0].run, lambda r: r.state in TERMINAL)
    assert run.state == Run.STATE_SUCCEEDED
    with api.engine.connect() as conn:
        held = conn.execute(text("SELECT count(*) FROM files WHERE commit_pk IS NOT NULL")).scalar_one()
    assert held == 0


def test_an_identical_retry_after_the_commit_gets_the_same_answers_and_changes_nothing(
    make_plane: Callable[..., Plane],
) -> None:
    api = make_plane()
    got, data, reply = commit_three(api)
    assert states(reply) == succeeded(got.files)
    snapshots = [s.snapshot_id for s in api.snapshots()]
    rows = api.rows()

    again = api.report_data("a1", got, [data])

    assert states(again) == states(reply)
    assert [s.snapshot_id for s in api.snapshots()] == snapshots
    assert api.rows() == rows == expected_rows(got.files)
    assert len(api.commits()) == 1
    # The committed data file is the table's: a retry must not remove it as a fenced batch's.
    assert local(data).exists()
    assert len(api.table().scan().to_arrow()) == len(rows)
    for f in got.files:
        assert [a.outcome for a in api.attempts(f.name)] == ["SUCCEEDED"]


# --- the fence -----------------------------------------------------------------------------------------


def test_an_expired_lease_taken_over_commits_nothing_and_its_data_is_removed(make_plane: Callable[..., Plane]) -> None:
    api = make_plane(ttl=1.5)
    api.running("fence", 3)
    base = api.lease("a0", max_files=1)
    assert states(api.report_data("a0", base, [api.stage(base)])) == succeeded(base.files)
    before = [s.snapshot_id for s in api.snapshots()]
    assert before

    first = api.lease("a1")
    assert len(first.files) == 2
    data = api.stage(first)
    time.sleep(1.8)  # the 1.5 s lease expires
    second = api.lease("a2")
    assert [f.name for f in second.files] == [f.name for f in first.files]
    assert [f.attempt for f in second.files] == [f.attempt for f in first.files]  # an expiry costs no attempt

    late = api.report_data("a1", first, [data])

    assert [(r.file, r.lease_lost, r.file_state) for r in late.results] == [
        (f.name, True, File.STATE_UNSPECIFIED) for f in first.files
    ]
    assert not local(data).exists(), "the fenced batch's data file was left behind"
    assert [s.snapshot_id for s in api.snapshots()] == before
    assert api.rows() == expected_rows(base.files)
    assert [c.lease_pk for c in api.commits()] == [lease_id(base)]
    for row in api.rows_of(first.files):
        assert (row.state, row.lease_pk, row.commit_pk) == ("LEASED", lease_id(second), None)

    data2 = api.stage(second)
    assert states(api.report_data("a2", second, [data2])) == succeeded(second.files)
    assert api.rows() == expected_rows(base.files, second.files)
    assert [r.state for r in api.rows_of(second.files)] == ["SUCCEEDED"] * 2
    assert local(data2).exists()


def test_another_agents_report_of_the_leases_data_is_refused_and_changes_nothing(
    make_plane: Callable[..., Plane],
) -> None:
    """The replica that granted a lease finds its table without reading the lease: the owner is still checked."""
    api = make_plane()
    api.running("owner", 3)
    base = api.lease("a0", max_files=1)
    assert states(api.report_data("a0", base, [api.stage(base)])) == succeeded(base.files)  # the table exists
    got = api.lease("a1")
    data = api.stage(got)

    expect(lambda: api.report_data("a2", got, [data]), grpc.StatusCode.PERMISSION_DENIED, "LEASE_NOT_OWNED")

    assert local(data).exists(), "another agent's report removed the owner's staged data"
    assert [c.lease_pk for c in api.commits()] == [lease_id(base)]
    assert {(r.state, r.lease_pk) for r in api.rows_of(got.files)} == {("LEASED", lease_id(got))}
    assert states(api.report_data("a1", got, [data])) == succeeded(got.files)
    assert api.rows() == expected_rows(base.files, got.files)


def test_a_lease_that_lost_one_success_commits_none_and_releases_the_others(make_plane: Callable[..., Plane]) -> None:
    api = make_plane()
    api.running("partial", 2)
    first = api.lease("a1")
    kept, lost = first.files
    assert api.release("a1", first.lease.name, [lost.name]) == 1
    second = api.lease("a2")
    assert [f.name for f in second.files] == [lost.name]
    data = api.stage(first)

    late = api.report_data("a1", first, [data])

    assert [(r.file, r.lease_lost) for r in late.results] == [(kept.name, True), (lost.name, True)]
    assert not local(data).exists()
    assert api.table() is None  # nothing was committed: no table yet
    assert api.commits() == []
    row = api.file_row(kept.name)  # the one still held goes back unspent
    assert (row.state, row.lease_pk, row.attempts, row.commit_pk) == ("PENDING", None, 0, None)
    assert [a.outcome for a in api.attempts(kept.name)] == ["RELEASED"]
    row = api.file_row(lost.name)
    assert (row.state, row.lease_pk) == ("LEASED", lease_id(second))

    assert states(api.report_data("a2", second, [api.stage(second)])) == succeeded(second.files)
    third = api.lease("a3")
    assert [(f.name, f.attempt) for f in third.files] == [(kept.name, 1)]
    assert states(api.report_data("a3", third, [api.stage(third)])) == succeeded(third.files)
    assert api.rows() == expected_rows([kept, lost])


# --- staging paths -------------------------------------------------------------------------------------


def test_data_files_outside_the_leases_staging_location_are_rejected(make_plane: Callable[..., Plane]) -> None:
    api = make_plane()
    api.running("paths", 2)
    api.running("elsewhere", 1, table="raw.elsewhere")
    got = api.lease("a1", max_files=1, ingestion="ingestions/paths")
    neighbour = api.lease("a2", max_files=1, ingestion="ingestions/paths")
    other_table = api.lease("a3", ingestion="ingestions/elsewhere")
    assert got.files
    assert neighbour.files
    assert other_table.files
    staging = got.target.staging_location
    assert neighbour.target.staging_location != staging
    assert other_table.target.table == "raw.elsewhere"
    # Real Parquet with this lease's rows, in places the lease does not own.
    in_neighbour = api.stage(got, location=neighbour.target.staging_location, name="stolen.parquet")
    in_other_table = api.stage(got, location=other_table.target.staging_location, name="stolen.parquet")
    sibling = api.stage(got, location=staging + "-x", name="part.parquet")  # shares the prefix, not the directory
    good = api.stage(got)
    neighbour_id = str(lease_id(neighbour))
    bad_paths = [
        in_neighbour.path,
        in_other_table.path,
        sibling.path,
        f"{staging}/../{neighbour_id}/stolen.parquet",
        f"{staging}/sub/../../{neighbour_id}/stolen.parquet",
        in_neighbour.path.removeprefix("file://"),  # the same file, without the scheme
    ]
    for path in bad_paths:
        bad = lease_pb2.DataFile(path=path, record_count=ROWS, size_bytes=10)
        for data_files, index in (([bad], 0), ([good, bad], 1)):
            error = rpc_error(lambda data_files=data_files: api.report_data("a1", got, data_files))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, error.code(), error.details())
            assert f"data_files[{index}].path" in field_violations(error), (path, field_violations(error))

    # Nothing was recorded, nothing committed, and no staged file (ours or the neighbour's) was removed.
    row = api.file_row(got.files[0].name)
    assert (row.state, row.attempts, row.lease_pk, row.commit_pk) == ("LEASED", 1, lease_id(got), None)
    assert api.attempts(got.files[0].name) == []
    assert api.commits() == []
    assert api.table() is None
    assert all(local(d).exists() for d in (in_neighbour, in_other_table, sibling, good))

    assert states(api.report_data("a1", got, [good])) == succeeded(got.files)
    assert api.rows() == expected_rows(got.files)


# --- group commit --------------------------------------------------------------------------------------


def test_concurrent_reports_of_one_table_share_commits(make_plane: Callable[..., Plane]) -> None:
    api = make_plane()
    reports = 6
    api.running("group", 2 * reports, limits=ingestion_pb2.Limits(max_files_per_lease=2))
    leases = [api.lease(f"g{i}") for i in range(reports)]
    assert [len(g.files) for g in leases] == [2] * reports
    staged = [api.stage(g) for g in leases]
    barrier = threading.Barrier(reports)

    def report(i: int) -> Any:
        barrier.wait(10)
        return api.report_data(f"g{i}", leases[i], [staged[i]])

    calls = [in_thread(lambda i=i: report(i)) for i in range(reports)]
    for thread, _ in calls:
        thread.join(60)
    for (_, out), got in zip(calls, leases, strict=True):
        assert "error" not in out, out.get("error")
        assert states(out["reply"]) == succeeded(got.files)

    all_files = [f for g in leases for f in g.files]
    assert api.rows() == expected_rows(all_files)
    assert {r.state for r in api.rows_of(all_files)} == {"SUCCEEDED"}
    intents = api.commits()
    assert len(intents) == reports
    assert {c.state for c in intents} == {"COMMITTED"}
    snapshots = api.snapshots()
    groups = [carried(s, COMMITS) for s in snapshots]
    named = [c for group in groups for c in group]
    assert sorted(named) == sorted(str(c.id) for c in intents), "each intent in exactly one snapshot"
    sizes = [len(g) for g in groups]
    print(f"group commit: {reports} reports -> {len(snapshots)} snapshots, intents per snapshot {sizes}")
    assert len(snapshots) < reports, f"{len(snapshots)} snapshots for {reports} reports: no group commit"
    for s in snapshots:  # the snapshot names exactly the leases of its intents
        leases_of = {f"leases/{c.lease_pk}" for c in intents if str(c.id) in carried(s, COMMITS)}
        assert set(carried(s, LEASES)) == leases_of


def test_a_commit_waits_for_the_batches_other_agents_are_still_working_on(make_plane: Callable[..., Plane]) -> None:
    """Group commit without luck: the first report lingers while another agent works on the table.

    It waits for agents that have no report waiting, up to the linger: not for its own agent's
    next batch (that report comes after this one's answer), nor once everyone has reported.
    """
    linger = 3.0
    api = make_plane(linger=linger)
    api.running("linger", 10, limits=ingestion_pb2.Limits(max_files_per_lease=2))
    first, second = api.lease("la"), api.lease("lb")
    ahead = api.lease("la")  # la's next batch, leased while its report waits (the agent pipelines)

    started = time.monotonic()
    waiting, out_first = in_thread(lambda: api.report_data("la", first, [api.stage(first)]))
    time.sleep(1.0)
    assert pending_intent(api, first).state == "PENDING", "committed without waiting for lb's batch"
    assert not api.snapshots()
    _, out_second = in_thread(lambda: api.report_data("lb", second, [api.stage(second)]))
    waiting.join(linger + 10)
    # lb's report completed the group: both in one snapshot, before the linger ran out.
    assert time.monotonic() - started < linger, "the complete group waited out the linger"
    assert states(out_first["reply"]) == succeeded(first.files)
    wait_for(lambda: "reply" in out_second, 10, "lb's answer")
    (snapshot,) = api.snapshots()
    assert sorted(carried(snapshot, LEASES)) == sorted([first.lease.name, second.lease.name])

    # Nobody else working: la's next batch commits at once.
    started = time.monotonic()
    assert states(api.report_data("la", ahead, [api.stage(ahead)])) == succeeded(ahead.files)
    assert time.monotonic() - started < linger / 2

    # Another agent that never reports holds a commit back for the linger, no longer.
    silent, last = api.lease("lc"), api.lease("ld")
    started = time.monotonic()
    assert states(api.report_data("ld", last, [api.stage(last)])) == succeeded(last.files)
    assert linger * 0.8 <= time.monotonic() - started < linger + 5
    assert {r.state for r in api.rows_of(silent.files)} == {"LEASED"}
    assert api.rows() == expected_rows(first.files, second.files, ahead.files, last.files)


# --- in-doubt files ------------------------------------------------------------------------------------


def test_in_doubt_files_are_claimable_by_nobody_and_another_replica_commits_them(
    make_plane: Callable[..., Plane],
) -> None:
    first_plane = make_plane(ttl=1.5, stale=2.0)
    first_plane.running("doubt", 5)
    base = first_plane.lease("a0", max_files=1)  # a first commit: this replica owns the table
    base_data = first_plane.stage(base)
    assert states(first_plane.report_data("a0", base, [base_data])) == succeeded(base.files)
    first_plane.plane.committer.stop()  # a committer that hangs

    got = first_plane.lease("a1", max_files=3)
    assert len(got.files) == 3
    data = first_plane.stage(got)
    thread, out = in_thread(lambda: first_plane.report_data("a1", got, [data], timeout=30))
    intent = pending_intent(first_plane, got)
    for row in first_plane.rows_of(got.files):
        assert (row.state, row.commit_pk) == ("LEASED", intent.id)

    time.sleep(1.8)  # the lease expires while its data is in doubt
    with first_plane.engine.connect() as conn:
        expired = conn.execute(
            text("SELECT bool_and(lease_expire_time < now()) FROM files WHERE commit_pk = :c"), {"c": intent.id}
        ).scalar_one()
    assert expired
    # The ingestion has claimable work (its fifth file), but none of the files in doubt.
    other = first_plane.lease("a2", wait=1.0)
    in_doubt = {f.name for f in got.files}
    assert len(other.files) == 1, [f.name for f in other.files]
    assert other.files[0].name not in in_doubt | {base.files[0].name}
    assert not first_plane.lease("a3", wait=0.5).files
    for row in first_plane.rows_of(got.files):
        assert (row.state, row.lease_pk, row.attempts, row.commit_pk) == ("LEASED", lease_id(got), 1, intent.id)
        assert row.lease_expiries == 0
        assert row.solo_expiries == 0
    assert all(a.outcome != "LEASE_EXPIRED" for f in got.files for a in first_plane.attempts(f.name))
    assert thread.is_alive(), f"the report returned before its data was committed: {out}"
    assert first_plane.rows() == expected_rows(base.files)

    second_plane = make_plane(ttl=1.5, stale=2.0)  # takes the table over: the first's heartbeat is stale

    reply = outcome_of_waiting_report(first_plane, thread, out, lambda: second_plane.report_data("a1", got, [data]))
    assert states(reply) == succeeded(got.files)
    (settled,) = [c for c in second_plane.commits() if c.id == intent.id]
    assert settled.state == "COMMITTED"
    for row in second_plane.rows_of(got.files):
        assert (row.state, row.records, row.commit_pk) == ("SUCCEEDED", ROWS, None)
    assert second_plane.rows() == expected_rows(base.files, got.files)
    assert sum(str(intent.id) in carried(s, COMMITS) for s in second_plane.snapshots()) >= 1
    with second_plane.engine.connect() as conn:
        owner = conn.execute(text("SELECT owner FROM table_committers WHERE table_name = :t"), {"t": TABLE}).scalar()
    assert owner == second_plane.plane.committer.service.owner
    # A retry on either replica gets the recorded answers.
    assert states(first_plane.report_data("a1", got, [data])) == succeeded(got.files)
    assert second_plane.rows() == expected_rows(base.files, got.files)


def test_release_does_not_return_in_doubt_files(make_plane: Callable[..., Plane]) -> None:
    first_plane = make_plane()
    first_plane.plane.committer.stop()
    first_plane.running("release", 3)
    got = first_plane.lease("a1")
    reported, unreported = list(got.files[:2]), got.files[2]
    data = first_plane.stage(got, reported)
    thread, out = in_thread(lambda: first_plane.report_data("a1", got, [data], reported, timeout=30))
    intent = pending_intent(first_plane, got)

    assert first_plane.release("a1", got.lease.name, [f.name for f in reported]) == 0
    assert first_plane.release("a1", got.lease.name) == 1  # every unreported file: only the third
    for row in first_plane.rows_of(reported):
        assert (row.state, row.attempts, row.commit_pk) == ("LEASED", 1, intent.id)
    row = first_plane.file_row(unreported.name)
    assert (row.state, row.attempts, row.commit_pk) == ("PENDING", 0, None)
    # A retry while in doubt waits for the same intent; it writes no second one.
    error = rpc_error(lambda: first_plane.report_data("a1", got, [data], reported, timeout=1.5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(error).reason == "COMMIT_IN_PROGRESS"
    assert [c.id for c in first_plane.commits()] == [intent.id]
    assert local(data).exists()

    second_plane = make_plane()  # nobody owned the table: commits at once
    reply = outcome_of_waiting_report(
        first_plane, thread, out, lambda: second_plane.report_data("a1", got, [data], reported)
    )
    assert states(reply) == succeeded(reported)
    for row in second_plane.rows_of(reported):
        assert (row.state, row.commit_pk) == ("SUCCEEDED", None)
    assert second_plane.rows() == expected_rows(reported)


def test_a_landed_but_unsettled_commit_is_recognised_not_repeated(make_plane: Callable[..., Plane]) -> None:
    first_plane = make_plane()
    first_plane.plane.committer.stop()
    first_plane.running("recognise", 3)
    got = first_plane.lease("a1")
    data = first_plane.stage(got)
    error = rpc_error(lambda: first_plane.report_data("a1", got, [data], timeout=2.0))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert error_info(error).reason == "COMMIT_IN_PROGRESS"
    intent = pending_intent(first_plane, got)

    # The committer's Iceberg commit lands, then it dies before settling.
    batch = StagedBatch(str(intent.id), got.lease.name, tuple(f.path for f in got.files), (data.path,))
    tables = first_plane.plane.tables
    tables.commit(TABLE, [batch], [], lambda: True, tables.load(TABLE))
    landed = [s.snapshot_id for s in first_plane.snapshots()]
    assert landed
    assert first_plane.rows() == expected_rows(got.files)
    assert {r.state for r in first_plane.rows_of(got.files)} == {"LEASED"}

    second_plane = make_plane()
    wait_for(lambda: second_plane.commits()[0].state != "PENDING", 20, "the intent to be settled")

    (settled,) = second_plane.commits()
    assert settled.state == "COMMITTED"
    assert [s.snapshot_id for s in second_plane.snapshots()] == landed, "the commit was made again"
    for row in second_plane.rows_of(got.files):
        assert (row.state, row.records, row.commit_pk) == ("SUCCEEDED", ROWS, None)
    assert second_plane.rows() == expected_rows(got.files)
    assert states(second_plane.report_data("a1", got, [data])) == succeeded(got.files)
    assert local(data).exists()


# --- replacing rows, and data that cannot be committed ----------------------------------------------


def test_a_commit_replaces_the_rows_its_source_files_already_had(make_plane: Callable[..., Plane]) -> None:
    api = make_plane()
    api.running("replace", 2)
    got = api.lease("a1")
    changed, emptied = got.files
    # Rows of an earlier load of both files, and of a file of no concern, are in the table already.
    tables = api.plane.tables
    old_lease = str(uuid.uuid4())
    unrelated = lease_pb2.LeasedFile(name="ingestions/x/files/0", path="file:///elsewhere/other.json")
    earlier = api.stage(got, [changed, emptied, unrelated], location=tables.describe(TABLE).staging_location(old_lease),
                        first=100)  # fmt: skip
    batch = StagedBatch(str(uuid.uuid4()), f"leases/{old_lease}", (changed.path, emptied.path, unrelated.path),
                        (earlier.path,))  # fmt: skip
    tables.commit(TABLE, [batch], [], lambda: True, tables.load(TABLE))
    assert api.rows() == expected_rows([changed, emptied, unrelated], first=100)

    # Now `changed` has new rows and `emptied` has none.
    reply = api.report_data("a1", got, [api.stage(got, [changed])])

    assert states(reply) == succeeded(got.files)
    assert api.rows() == sorted(expected_rows([changed]) + expected_rows([unrelated], first=100))
    (intent,) = api.commits()
    assert intent.state == "COMMITTED"
    assert str(intent.id) in carried(api.table().current_snapshot(), COMMITS)


def test_data_that_cannot_be_committed_fails_its_own_files_only(make_plane: Callable[..., Plane]) -> None:
    api = make_plane()
    api.running("abort", 4)
    base = api.lease("a0", max_files=1)
    assert states(api.report_data("a0", base, [api.stage(base)])) == succeeded(base.files)  # n is a bigint
    good, missing, conflicting = (api.lease(f"a{i}", max_files=1) for i in (1, 2, 3))
    staged = {
        "good": api.stage(good),
        "missing": lease_pb2.DataFile(path=f"{missing.target.staging_location}/never-written.parquet",
                                      record_count=ROWS, size_bytes=100),
        "conflicting": api.stage(conflicting, n_type=pa.string()),  # n as text: the table's n is a bigint
    }  # fmt: skip
    leases = {"good": good, "missing": missing, "conflicting": conflicting}
    barrier = threading.Barrier(3)

    leases_by_agent = {"good": "a1", "missing": "a2", "conflicting": "a3"}

    def report_as_holder(key: str) -> Any:
        barrier.wait(10)
        return api.report_data(leases_by_agent[key], leases[key], [staged[key]])

    calls = {key: in_thread(lambda key=key: report_as_holder(key)) for key in leases}
    for thread, _ in calls.values():
        thread.join(60)
    replies = {}
    for key, (_, out) in calls.items():
        assert "error" not in out, (key, out.get("error"))
        replies[key] = out["reply"]

    assert states(replies["good"]) == succeeded(good.files)
    by_lease = {c.lease_pk: c for c in api.commits()}
    assert by_lease[lease_id(good)].state == "COMMITTED"
    for key in ("missing", "conflicting"):
        (result,) = replies[key].results
        assert (result.file_state, result.lease_lost) == (File.STATE_FAILED, False), key
        assert result.HasField("next_attempt_time"), key
        row = api.file_row(leases[key].files[0].name)
        assert (row.state, row.commit_pk, row.lease_pk, row.attempts) == ("FAILED", None, None, 1), key
        assert row.last_error.startswith("CommitFailed"), (key, row.last_error)
        intent = by_lease[lease_id(leases[key])]
        assert intent.state == "ABORTED", key
        assert intent.error, key
    assert not local(staged["conflicting"]).exists()  # an aborted batch's data is removed
    assert api.rows() == expected_rows(base.files, good.files)


def test_the_orphan_sweep_spares_the_staged_data_of_pending_intents(make_plane: Callable[..., Plane]) -> None:
    """After a long committer outage, more intents are pending than one commit takes, their data older than
    orphan_age: the sweep after the first commit must not remove the data of the intents still pending."""
    first_plane = make_plane()
    first_plane.plane.committer.stop()  # the outage: intents pile up
    group = MAX_INTENTS_PER_COMMIT
    first_plane.running("backlog", group + 1, limits=ingestion_pb2.Limits(max_files_per_lease=group))
    big = first_plane.lease("a1")
    last = first_plane.lease("a2")
    assert (len(big.files), len(last.files)) == (group, 1)
    jobs = [("a1", big, f) for f in big.files]
    staged = {
        f.name: first_plane.stage(big, [f], name=f"p{f.name.rsplit('/', 1)[1]}/part-0.parquet") for f in big.files
    }
    staged[last.files[0].name] = first_plane.stage(last)

    def report(job: tuple[str, lease_pb2.LeaseFilesResponse, lease_pb2.LeasedFile]) -> grpc.StatusCode:
        agent, got, f = job
        try:
            first_plane.report_data(agent, got, [staged[f.name]], [f], timeout=0.8)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(16) as pool:
        codes = set(pool.map(report, jobs))
    assert codes <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
    wait_for(lambda: len(first_plane.commits()) == group, 30, "the first lease's intents")
    assert report(("a2", last, last.files[0])) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    wait_for(lambda: len(first_plane.commits()) == group + 1, 10, "the last intent")
    # The outage lasted longer than orphan_age (6 h): the staged data is that old.
    root = Path(big.target.staging_location.removeprefix("file://")).parent
    long_ago = time.time() - 7 * 3600
    for directory in root.iterdir():
        os.utime(directory, (long_ago, long_ago))

    second_plane = make_plane()  # default orphan_age and sweep interval
    wait_for(lambda: all(c.state != "PENDING" for c in second_plane.commits()), 60, "every intent settled")

    intents = second_plane.commits()
    assert [c.state for c in intents].count("COMMITTED") == group + 1, {(c.state, c.error[:120]) for c in intents}
    all_files = [*big.files, *last.files]
    assert {r.state for r in second_plane.rows_of(all_files)} == {"SUCCEEDED"}
    assert second_plane.rows() == expected_rows(all_files)


# --- crash isolation -----------------------------------------------------------------------------------


def test_expired_batches_shrink_and_only_solo_expiries_quarantine(make_plane: Callable[..., Plane]) -> None:
    ttl = 1.0
    api = make_plane(ttl=ttl)
    api.running("crashy", 8, limits=ingestion_pb2.Limits(max_files_per_lease=8))
    claims: list[list[str]] = []
    for i in range(6):  # every lease dies with its agent
        got = api.lease(f"doomed{i}")
        claims.append([f.name for f in got.files])
        assert all(f.attempt == 1 for f in got.files)  # expiries cost no attempt
        time.sleep(ttl + 0.3)
    assert [len(c) for c in claims] == [8, 4, 2, 1, 1, 1], claims
    assert claims[1] == claims[0][:4]
    assert claims[2] == claims[0][:2]
    killer = claims[0][0]
    assert claims[3] == claims[4] == claims[5] == [killer]

    # Its third expiry while alone quarantines it; the next lease goes on without it.
    survivors = []
    for _ in range(8):
        got = api.lease("healthy")
        if not got.files:
            break
        assert killer not in [f.name for f in got.files]
        assert states(api.report_data("healthy", got, [api.stage(got)])) == succeeded(got.files)
        survivors.append(got)
    assert [len(g.files) for g in survivors] == [1, 2, 4], [[f.name for f in g.files] for g in survivors]

    row = api.file_row(killer)
    assert row.state == "QUARANTINED"
    assert "leased alone" in row.last_error
    assert (row.solo_expiries, row.commit_pk, row.lease_pk) == (3, None, None)
    survivor_files = [f for g in survivors for f in g.files]
    assert sorted(f.name for f in survivor_files) == sorted(claims[0][1:])
    for f in survivor_files:
        row = api.file_row(f.name)
        assert (row.state, row.solo_expiries) == ("SUCCEEDED", 0), f.name
    # The second file expired three times, always with others: MAX_LEASE_EXPIRIES counts only solo expiries.
    assert api.file_row(claims[0][1]).lease_expiries == 3
    assert api.rows() == expected_rows(survivor_files)


def test_a_data_file_is_committed_once_per_lease(make_plane: Callable[..., Plane]) -> None:
    """An agent naming an already committed data file again (for another file of its lease) is refused:
    adding the file twice would put its rows in the table twice."""
    api = make_plane()
    api.running("twice", 2)
    got = api.lease("a1", max_files=2)
    first, second = got.files
    data = api.stage(got, [first])
    assert states(api.report_data("a1", got, [data], [first])) == succeeded([first])
    with pytest.raises(grpc.RpcError) as raised:
        api.report_data("a1", got, [data], [second])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "data_files[0].path" in raised.value.details()
    assert api.rows() == expected_rows([first])
    assert api.file_row(second.name).state == "LEASED"
