"""The finalization sweep ends RUNNING runs with no open file, exactly once: runs whose last
two reports ran concurrently (each seeing the other's file open), and runs whose reporter
crashed between committing its result and ending the run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from autoloader.v1 import lease_pb2
from controlplane.adapters.unit_of_work import SqlAlchemyUnitOfWork
from controlplane.service.maintenance import MaintenanceService

from .test_leasing import Api, File, Outcome, Run, api_factory

pytestmark = pytest.mark.integration

NO_SWEEP = 3600.0  # a plane whose sweep ran once at start, on an empty database


@pytest.fixture
def make_api(
    database_url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Api]]:
    """make(sweep_interval) -> Api on its own control plane, sweeping every sweep_interval seconds."""
    planes = api_factory(database_url, engine, tmp_path)
    make = next(planes)

    def with_sweep(sweep_interval: float, ttl: float = 30.0) -> Api:
        monkeypatch.setenv("AUTOLOADER_FINALIZE_SWEEP_INTERVAL", str(sweep_interval))
        return make(ttl)

    try:
        yield with_sweep
    finally:
        next(planes, None)  # stops the planes


@pytest.fixture
def sweeper(uow_factory: Callable[[], SqlAlchemyUnitOfWork]) -> MaintenanceService:
    return MaintenanceService(uow_factory, timedelta(days=7))


# --- helpers -----------------------------------------------------------------------------------------


def file_ids(engine: Engine, ingestion_id: str) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT f.id FROM files f JOIN ingestions i ON i.id = f.ingestion_pk "
                    "WHERE i.ingestion_id = :i ORDER BY f.id"
                ),
                {"i": ingestion_id},
            ).scalars()
        )


def set_state(engine: Engine, ids: list[int], state: str, records: int = 0) -> None:
    """What a committed report leaves behind, written directly (no run finalization)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                """
                UPDATE files SET state = :state, records = :records, lease_pk = NULL, lease_expire_time = NULL,
                    attempts = greatest(attempts, 1),
                    next_attempt_at = CASE WHEN :state = 'FAILED' THEN now() + interval '1 hour'
                                           ELSE next_attempt_at END,
                    last_error = CASE WHEN :state IN ('FAILED', 'QUARANTINED') THEN 'X: broken' ELSE '' END,
                    update_time = now()
                WHERE id = ANY(:ids)
                """
            ),
            {"state": state, "records": records, "ids": ids},
        )


def run_row(engine: Engine, ingestion_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT r.state, r.end_time, r.final_counts FROM runs r JOIN ingestions i ON i.id = r.ingestion_pk "
                "WHERE i.ingestion_id = :i"
            ),
            {"i": ingestion_id},
        ).one()


def counts(run: Run) -> tuple[int, int, int, int, int, int]:
    c = run.file_counts
    return (c.total, c.pending, c.leased, c.succeeded, c.failed, c.quarantined)


def ok(file: lease_pb2.LeasedFile, records: int) -> lease_pb2.FileResult:
    return lease_pb2.FileResult(
        file=file.name, attempt=file.attempt, outcome=Outcome.OUTCOME_SUCCEEDED, records=records
    )


def report(api: Api, agent: str, got: lease_pb2.LeaseFilesResponse, records: int) -> list[Any]:
    request = lease_pb2.ReportFileResultsRequest(
        lease=got.lease.name, agent=f"agents/{agent}", results=[ok(f, records) for f in got.files]
    )
    return list(api.leases.ReportFileResults(request, timeout=30).results)


# --- the sweep, called directly -------------------------------------------------------------------------------


def test_sweep_ends_finished_runs_once_and_leaves_open_ones(
    make_api: Callable[..., Api], sweeper: MaintenanceService, engine: Engine
) -> None:
    api = make_api(NO_SWEEP)
    sizes = {"done": 3, "partial": 2, "open": 2, "failing": 2, "held": 2}
    runs = {name: api.running(name, files)[1] for name, files in sizes.items()}
    done, partial, open_, failing = (file_ids(engine, name) for name in ("done", "partial", "open", "failing"))
    set_state(engine, done, "SUCCEEDED", records=5)
    set_state(engine, partial[:1], "SUCCEEDED", records=7)
    set_state(engine, partial[1:], "QUARANTINED")
    set_state(engine, open_[:1], "SUCCEEDED", records=1)  # the other stays PENDING
    set_state(engine, failing[:1], "SUCCEEDED", records=1)
    set_state(engine, failing[1:], "FAILED")  # to be retried: still open
    leased = api.lease("a1", ingestion="ingestions/held")
    assert len(leased.files) == 2
    set_state(engine, [int(leased.files[0].name.rsplit("/", 1)[1])], "SUCCEEDED", records=1)  # the other LEASED
    for name, run in runs.items():
        assert api.get_run(run).state == Run.STATE_RUNNING, name

    assert sweeper.finalize_finished_runs() == 2

    ended = api.get_run(runs["done"])
    assert ended.state == Run.STATE_SUCCEEDED
    assert ended.HasField("end_time")
    assert counts(ended) == (3, 0, 0, 3, 0, 0)
    assert ended.records == 15
    ended_partial = api.get_run(runs["partial"])
    assert ended_partial.state == Run.STATE_PARTIALLY_SUCCEEDED
    assert counts(ended_partial) == (2, 0, 0, 1, 0, 1)
    assert [e.error for e in ended_partial.first_errors] == ["X: broken"]
    row = run_row(engine, "done")
    assert (row.state, row.final_counts["succeeded"], row.final_counts["records"]) == ("SUCCEEDED", 3, 15)
    for name in ("open", "failing", "held"):
        still = run_row(engine, name)
        assert (still.state, still.end_time, still.final_counts) == ("RUNNING", None, None), name
    assert counts(api.get_run(runs["open"])) == (2, 1, 0, 1, 0, 0)
    assert counts(api.get_run(runs["failing"])) == (2, 0, 0, 1, 1, 0)
    assert counts(api.get_run(runs["held"])) == (2, 0, 1, 1, 0, 0)

    # Exactly once: nothing left to end, and the ended runs are not touched again.
    end_times = {name: run_row(engine, name).end_time for name in ("done", "partial")}
    assert sweeper.finalize_finished_runs() == 0
    assert {name: run_row(engine, name).end_time for name in ("done", "partial")} == end_times

    # Their last files close (reporters that crashed before ending the run): the next sweep ends them.
    set_state(engine, open_[1:], "SUCCEEDED", records=2)
    set_state(engine, failing[1:], "QUARANTINED")
    assert sweeper.finalize_finished_runs() == 2
    assert api.get_run(runs["open"]).state == Run.STATE_SUCCEEDED
    assert api.get_run(runs["open"]).records == 3
    assert api.get_run(runs["failing"]).state == Run.STATE_PARTIALLY_SUCCEEDED
    assert api.get_run(runs["held"]).state == Run.STATE_RUNNING
    assert sweeper.finalize_finished_runs() == 0


def test_concurrent_sweeps_end_each_run_exactly_once(
    make_api: Callable[..., Api], uow_factory: Callable[[], SqlAlchemyUnitOfWork], engine: Engine
) -> None:
    api = make_api(NO_SWEEP)
    names = [f"many{i}" for i in range(8)]
    runs = [api.running(name, 2)[1] for name in names]
    for name in names:
        set_state(engine, file_ids(engine, name), "SUCCEEDED", records=1)
    sweepers = [MaintenanceService(uow_factory, timedelta(days=7)) for _ in range(4)]
    start = threading.Barrier(len(sweepers))

    def sweep(service: MaintenanceService) -> int:
        start.wait(10)
        return service.finalize_finished_runs()

    with ThreadPoolExecutor(len(sweepers)) as pool:
        ended = list(pool.map(sweep, sweepers))
    assert sum(ended) == len(names), ended
    assert [api.get_run(run).state for run in runs] == [Run.STATE_SUCCEEDED] * len(names)
    assert sweepers[0].finalize_finished_runs() == 0


def test_two_concurrent_last_reports_leave_the_run_to_the_sweep(
    make_api: Callable[..., Api], sweeper: MaintenanceService, engine: Engine
) -> None:
    """Both last reports' statements start before either commits: each sees the other's file open."""
    api = make_api(NO_SWEEP)
    _, run = api.running("race", 2)
    first, second = api.lease("a1", max_files=1), api.lease("a2", max_files=1)
    assert len(first.files) == len(second.files) == 1
    ids = [int(got.files[0].name.rsplit("/", 1)[1]) for got in (first, second)]

    with engine.connect() as blocker, ThreadPoolExecutor(2) as pool:
        # Hold both file rows so that the two recording statements wait, snapshots taken.
        blocker.execute(text("SELECT id FROM files WHERE id = ANY(:ids) FOR UPDATE"), {"ids": ids})
        replies = [pool.submit(report, api, "a1", first, 3), pool.submit(report, api, "a2", second, 4)]
        deadline = time.monotonic() + 10
        while True:
            with engine.connect() as probe:
                waiting = probe.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE '%UPDATE files f SET%'"
                    )
                ).scalar_one()
            if waiting == 2:
                break
            assert time.monotonic() < deadline, f"{waiting} reports waiting"
            assert not any(r.done() for r in replies), [r.result() for r in replies if r.done()]
            time.sleep(0.02)
        blocker.commit()
        answers = [r.result(timeout=30) for r in replies]

    assert [[(a.file_state, a.lease_lost) for a in reply] for reply in answers] == [
        [(File.STATE_SUCCEEDED, False)],
        [(File.STATE_SUCCEEDED, False)],
    ]
    # Every file is closed, yet neither report ended the run: each saw the other's file open.
    assert run_row(engine, "race").state == "RUNNING"
    assert counts(api.get_run(run)) == (2, 0, 0, 2, 0, 0)

    assert sweeper.finalize_finished_runs() == 1
    ended = api.get_run(run)
    assert ended.state == Run.STATE_SUCCEEDED
    assert ended.records == 7
    assert sweeper.finalize_finished_runs() == 0


# --- the sweep in a running control plane -----------------------------------------------------------------------


def test_control_plane_sweep_ends_a_run_whose_reporter_crashed_after_commit(
    make_api: Callable[..., Api], engine: Engine
) -> None:
    api = make_api(0.2)
    _, run = api.running("crash", 3)
    got = api.lease("a1")
    assert len(got.files) == 3
    answers = report(api, "a1", lease_pb2.LeaseFilesResponse(lease=got.lease, files=got.files[:2]), 5)
    assert [a.file_state for a in answers] == [File.STATE_SUCCEEDED] * 2
    time.sleep(0.6)  # several sweeps: none ends a run with an open (LEASED) file
    assert api.get_run(run).state == Run.STATE_RUNNING

    # The last report committed, then its control plane died before ending the run.
    last = int(got.files[2].name.rsplit("/", 1)[1])
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE files SET state = 'SUCCEEDED', records = 5, lease_pk = NULL, lease_expire_time = NULL "
                "WHERE id = :id"
            ),
            {"id": last},
        )
        conn.execute(
            text(
                "INSERT INTO file_attempts (file_pk, attempt, agent_id, lease_pk, outcome, records) "
                "VALUES (:id, 1, 'a1', :lease, 'SUCCEEDED', 5)"
            ),
            {"id": last, "lease": got.lease.name.removeprefix("leases/")},
        )
    closed_at = time.monotonic()
    ended = api.wait_run(run, lambda r: r.state != Run.STATE_RUNNING, timeout=5)
    assert time.monotonic() - closed_at < 2.0
    assert ended.state == Run.STATE_SUCCEEDED
    assert counts(ended) == (3, 0, 0, 3, 0, 0)
    assert ended.records == 15
    assert ended.HasField("end_time")
