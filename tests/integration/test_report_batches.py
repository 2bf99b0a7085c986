"""LeaseService.ReportFileResults over gRPC on a real PostgreSQL: a whole batch in one
transaction, mixed outcomes under the error policy, per-file fencing (one lost entry does not
stop the others), idempotent retries, and bad input with the offending field named."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import Engine, text

from autoloader.v1 import ingestion_pb2, lease_pb2

from .helpers import field_violations
from .test_leasing import Api, File, Outcome, Run, api_factory, backoff, expect

pytestmark = pytest.mark.integration

Batch = lease_pb2.ReportFileResultsRequest


# --- helpers -----------------------------------------------------------------------------------------


@pytest.fixture
def make_api(
    database_url: str, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Api]]:
    # No finalization sweep during these tests: a run that ends was ended by the report itself.
    monkeypatch.setenv("AUTOLOADER_FINALIZE_SWEEP_INTERVAL", "3600")
    yield from api_factory(database_url, engine, tmp_path)


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api(2.0)


def ok(file: lease_pb2.LeasedFile | str, records: int = 1, *, size: int = 0) -> lease_pb2.FileResult:
    """A success for a leased file (with its attempt), or for a bare file name at attempt 1."""
    name, attempt = (file, 1) if isinstance(file, str) else (file.name, file.attempt)
    return lease_pb2.FileResult(
        file=name, attempt=attempt, outcome=Outcome.OUTCOME_SUCCEEDED, records=records, bytes=size
    )


def failed(
    file: lease_pb2.LeasedFile, message: str = "boom", *, retryable: bool = True, error_type: str = "MalformedJson"
) -> lease_pb2.FileResult:
    return lease_pb2.FileResult(
        file=file.name,
        attempt=file.attempt,
        outcome=Outcome.OUTCOME_FAILED,
        error=lease_pb2.FileErrorDetail(type=error_type, message=message, retryable=retryable),
    )


def report_batch(
    api: Api, agent: str, lease: str, results: list[lease_pb2.FileResult]
) -> list[lease_pb2.ReportFileResultsResponse.Result]:
    reply = api.leases.ReportFileResults(Batch(lease=lease, agent=f"agents/{agent}", results=results), timeout=30)
    return list(reply.results)


def all_attempts(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT * FROM file_attempts ORDER BY id")))


def lease_uuid(lease: str) -> uuid.UUID:
    return uuid.UUID(lease.removeprefix("leases/"))


def agents(api: Api) -> dict[str, lease_pb2.Agent]:
    return {a.name: a for a in api.leases.ListAgents(lease_pb2.ListAgentsRequest()).agents}


# --- a whole batch ---------------------------------------------------------------------------------------


def test_a_whole_batch_is_recorded_in_one_transaction_and_ends_the_run(api: Api) -> None:
    sizes = [10, 20, 30, 40, 50]
    _, run = api.running("batch", sizes)
    got = api.lease("a1")
    assert len(got.files) == 5
    # Reported in an order other than the lease's: answers follow the request.
    files = list(reversed(got.files))
    results = [ok(f, records=100 + i, size=f.size_bytes * 2) for i, f in enumerate(files)]

    answers = report_batch(api, "a1", got.lease.name, results)

    assert [a.file for a in answers] == [f.name for f in files]
    assert [(a.file_state, a.lease_lost, a.HasField("next_attempt_time")) for a in answers] == [
        (File.STATE_SUCCEEDED, False, False)
    ] * 5
    rows = [api.file_row(f.name) for f in files]
    assert [(r.state, r.records, r.attempts, r.lease_pk, r.last_error) for r in rows] == [
        ("SUCCEEDED", 100 + i, 1, None, "") for i in range(5)
    ]
    # now() is the transaction's start: one update_time for every file means one transaction.
    assert len({r.update_time for r in rows}) == 1
    for i, f in enumerate(files):
        history = [(a.attempt, a.outcome, a.agent_id, a.lease_pk, a.records, a.bytes) for a in api.attempts(f.name)]
        assert history == [(1, "SUCCEEDED", "a1", lease_uuid(got.lease.name), 100 + i, f.size_bytes * 2)]
    assert len(all_attempts(api.engine)) == 5

    # The call that closed the run's last open files ended the run (the sweep is off).
    ended = api.get_run(run)
    assert ended.state == Run.STATE_SUCCEEDED
    assert ended.HasField("end_time")
    counts = ended.file_counts
    assert (counts.total, counts.succeeded, counts.pending, counts.leased, counts.failed, counts.quarantined) == (
        5, 5, 0, 0, 0, 0,
    )  # fmt: skip
    assert ended.records == sum(100 + i for i in range(5))
    assert ended.bytes == sum(sizes)
    # Every file of the lease reported: the lease holds nothing any more.
    assert (agents(api)["agents/a1"].active_leases, agents(api)["agents/a1"].leased_files) == (0, 0)


def test_a_batch_of_part_of_a_lease_leaves_the_rest_leased_and_the_run_running(api: Api) -> None:
    _, run = api.running("part", 4)
    got = api.lease("a1")
    first, second = got.files[:2], got.files[2:]
    answers = report_batch(api, "a1", got.lease.name, [ok(f, records=2) for f in first])
    assert [a.file_state for a in answers] == [File.STATE_SUCCEEDED] * 2
    assert [api.file_row(f.name).state for f in second] == ["LEASED", "LEASED"]
    assert api.get_run(run).state == Run.STATE_RUNNING
    assert (agents(api)["agents/a1"].active_leases, agents(api)["agents/a1"].leased_files) == (1, 2)

    answers = report_batch(api, "a1", got.lease.name, [ok(f, records=3) for f in second])
    assert [a.file_state for a in answers] == [File.STATE_SUCCEEDED] * 2
    ended = api.get_run(run)
    assert ended.state == Run.STATE_SUCCEEDED
    assert (ended.file_counts.succeeded, ended.records) == (4, 10)


# --- mixed outcomes ----------------------------------------------------------------------------------------


def test_mixed_success_failure_and_non_retryable_in_one_call(api: Api) -> None:
    _, run = api.running("mixed", 4, limits=ingestion_pb2.Limits(max_attempts=2), policy=backoff(1.0, 1.0))
    got = api.lease("a1")
    a, b, c, d = got.files
    before = datetime.now(UTC)
    answers = report_batch(
        api,
        "a1",
        got.lease.name,
        [ok(a, records=7), failed(b, "bad line 3"), failed(c, "wrong schema", retryable=False), failed(d, "eof")],
    )
    after = datetime.now(UTC)

    assert [a_.file for a_ in answers] == [a.name, b.name, c.name, d.name]
    assert [a_.lease_lost for a_ in answers] == [False] * 4
    assert [a_.file_state for a_ in answers] == [
        File.STATE_SUCCEEDED,
        File.STATE_FAILED,
        File.STATE_QUARANTINED,
        File.STATE_FAILED,
    ]
    assert [a_.HasField("next_attempt_time") for a_ in answers] == [False, True, False, True]
    for answer, file in ((answers[1], b), (answers[3], d)):
        next_at = answer.next_attempt_time.ToDatetime(UTC)
        # initial 1s with jitter in [0.5, 1)
        assert before + timedelta(seconds=0.45) <= next_at <= after + timedelta(seconds=1.05)
        row = api.file_row(file.name)
        assert (row.state, row.attempts, row.lease_pk) == ("FAILED", 1, None)
        assert abs(row.next_attempt_at - next_at) < timedelta(milliseconds=5)

    assert (api.file_row(a.name).state, api.file_row(a.name).records) == ("SUCCEEDED", 7)
    quarantined = api.file_row(c.name)
    assert (quarantined.state, quarantined.last_error) == ("QUARANTINED", "MalformedJson: wrong schema")
    assert api.file_row(b.name).last_error == "MalformedJson: bad line 3"
    assert [(x.outcome, x.error_type, x.error_message, x.retryable) for x in api.attempts(b.name)] == [
        ("FAILED", "MalformedJson", "bad line 3", True)
    ]
    assert [(x.outcome, x.error_message, x.retryable) for x in api.attempts(c.name)] == [
        ("FAILED", "wrong schema", False)
    ]
    assert [(x.outcome, x.records) for x in api.attempts(a.name)] == [("SUCCEEDED", 7)]
    # FAILED files are still open: the run goes on.
    running = api.get_run(run)
    assert running.state == Run.STATE_RUNNING
    counts = running.file_counts
    assert (counts.succeeded, counts.failed, counts.quarantined) == (1, 2, 1)

    # Their retries (attempt 2 = max_attempts): one succeeds, one fails for good.
    latest = max(answers[i].next_attempt_time.ToDatetime(UTC) for i in (1, 3))
    time.sleep(max((latest - datetime.now(UTC)).total_seconds(), 0) + 0.1)  # both claimable
    retry = api.lease("a2")
    assert sorted(f.name for f in retry.files) == sorted([b.name, d.name])
    assert [f.attempt for f in retry.files] == [2, 2]
    by_name = {f.name: f for f in retry.files}
    answers = report_batch(
        api, "a2", retry.lease.name, [ok(by_name[b.name], records=5), failed(by_name[d.name], "eof again")]
    )
    assert [(a_.file_state, a_.HasField("next_attempt_time")) for a_ in answers] == [
        (File.STATE_SUCCEEDED, False),
        (File.STATE_QUARANTINED, False),  # max_attempts reached
    ]
    assert (api.file_row(d.name).state, api.file_row(d.name).attempts) == ("QUARANTINED", 2)
    assert [(x.attempt, x.outcome) for x in api.attempts(d.name)] == [(1, "FAILED"), (2, "FAILED")]

    ended = api.get_run(run)
    assert ended.state == Run.STATE_PARTIALLY_SUCCEEDED
    counts = ended.file_counts
    assert (counts.total, counts.succeeded, counts.quarantined, counts.failed) == (4, 2, 2, 0)
    assert ended.records == 12


def test_fail_run_policy_ends_the_run_on_a_quarantine_in_a_batch(api: Api) -> None:
    policy = ingestion_pb2.ErrorPolicy(mode=ingestion_pb2.ErrorPolicy.MODE_FAIL_RUN)
    _, run = api.running("failrun", 4, policy=policy)
    got = api.lease("a1", max_files=2)
    held = api.lease("a2", max_files=1)
    untouched = held.files[0]
    first, second = got.files
    answers = report_batch(api, "a1", got.lease.name, [ok(first), failed(second, "fatal", retryable=False)])
    assert [a.file_state for a in answers] == [File.STATE_SUCCEEDED, File.STATE_QUARANTINED]
    ended = api.get_run(run)
    assert ended.state == Run.STATE_FAILED
    assert "quarantined" in ended.error
    assert (ended.file_counts.succeeded, ended.file_counts.quarantined, ended.file_counts.skipped) == (1, 1, 2)
    # The other agent's file was skipped: its late report is fenced.
    late = report_batch(api, "a2", held.lease.name, [ok(untouched)])
    assert [(a.lease_lost, a.file_state) for a in late] == [(True, File.STATE_UNSPECIFIED)]
    assert api.file_row(untouched.name).state == "SKIPPED"


# --- fencing per file ---------------------------------------------------------------------------------------


def test_a_lost_file_is_answered_lost_and_the_others_are_recorded(make_api: Callable[..., Api]) -> None:
    api = make_api(1.0)
    _, run = api.running("lost", 3)
    first = api.lease("a1")
    assert len(first.files) == 3
    time.sleep(1.3)  # the 1s lease expires
    taken = api.lease("a2", max_files=1)
    assert len(taken.files) == 1
    stolen = taken.files[0]
    assert stolen.attempt == 1  # an expiry costs no attempt
    kept = [f for f in first.files if f.name != stolen.name]
    assert len(kept) == 2

    results = [ok(f, records=10 + i) for i, f in enumerate(first.files)]
    answers = report_batch(api, "a1", first.lease.name, results)

    assert [a.file for a in answers] == [f.name for f in first.files]
    by_file = {a.file: a for a in answers}
    lost = by_file[stolen.name]
    assert lost.lease_lost
    assert lost.file_state == File.STATE_UNSPECIFIED
    assert not lost.HasField("next_attempt_time")
    for f in kept:
        assert (by_file[f.name].lease_lost, by_file[f.name].file_state) == (False, File.STATE_SUCCEEDED)
        assert api.file_row(f.name).state == "SUCCEEDED"
    # Nothing changed for the lost file: still the new holder's.
    row = api.file_row(stolen.name)
    assert (row.state, row.lease_pk, row.attempts, row.records) == ("LEASED", lease_uuid(taken.lease.name), 1, 0)
    assert [(a.outcome, a.agent_id) for a in api.attempts(stolen.name)] == [("LEASE_EXPIRED", "a1")]
    assert api.get_run(run).state == Run.STATE_RUNNING

    # The new holder's report wins.
    mine = report_batch(api, "a2", taken.lease.name, [ok(stolen, records=99)])
    assert [(a.file, a.file_state, a.lease_lost) for a in mine] == [(stolen.name, File.STATE_SUCCEEDED, False)]
    row = api.file_row(stolen.name)
    assert (row.state, row.records, row.lease_pk) == ("SUCCEEDED", 99, None)
    assert [(a.outcome, a.agent_id, a.records) for a in api.attempts(stolen.name)] == [
        ("LEASE_EXPIRED", "a1", 0),
        ("SUCCEEDED", "a2", 99),
    ]
    ended = api.get_run(run)
    assert ended.state == Run.STATE_SUCCEEDED
    expected_records = 99 + sum(10 + i for i, f in enumerate(first.files) if f.name != stolen.name)
    assert (ended.file_counts.succeeded, ended.records) == (3, expected_records)

    # The late holder retrying its whole call: its own results replay, the lost one stays lost
    # and does not overwrite the winner's, not even as a failure.
    again = report_batch(api, "a1", first.lease.name, results)
    assert [(a.file, a.lease_lost) for a in again] == [(f.name, f.name == stolen.name) for f in first.files]
    worse = report_batch(api, "a1", first.lease.name, [failed(stolen, "late")])
    assert [a.lease_lost for a in worse] == [True]
    row = api.file_row(stolen.name)
    assert (row.state, row.records, row.last_error) == ("SUCCEEDED", 99, "")
    assert len(api.attempts(stolen.name)) == 2
    assert api.get_run(run).records == expected_records


def test_files_not_held_by_the_lease_are_lost_entries_not_errors(api: Api) -> None:
    api.running("notheld", 3)
    mine = api.lease("a1", max_files=2)
    other = api.lease("a2", max_files=1).files[0]
    missing = f"ingestions/notheld/files/{int(other.name.rsplit('/', 1)[1]) + 1000}"
    wrong_attempt = ok(mine.files[1])
    wrong_attempt.attempt = 2
    answers = report_batch(api, "a1", mine.lease.name, [ok(mine.files[0]), ok(other), ok(missing), wrong_attempt])
    assert [(a.file, a.lease_lost) for a in answers] == [
        (mine.files[0].name, False),
        (other.name, True),
        (missing, True),
        (mine.files[1].name, True),
    ]
    assert api.file_row(mine.files[0].name).state == "SUCCEEDED"
    assert api.file_row(other.name).state == "LEASED"
    assert (api.file_row(mine.files[1].name).state, api.file_row(mine.files[1].name).attempts) == ("LEASED", 1)
    assert len(all_attempts(api.engine)) == 1


# --- idempotent retries ------------------------------------------------------------------------------------


def test_an_exact_retry_gets_the_same_answers_and_adds_no_attempt_rows(api: Api) -> None:
    _, run = api.running("retry", 4, limits=ingestion_pb2.Limits(max_attempts=3), policy=backoff(60, 60))
    got = api.lease("a1")
    a, b, c, d = got.files
    results = [ok(a, records=4), failed(b, "transient"), failed(c, "fatal", retryable=False), ok(d, records=6)]
    first = api.leases.ReportFileResults(Batch(lease=got.lease.name, agent="agents/a1", results=results), timeout=30)
    rows_before = [api.file_row(f.name) for f in got.files]
    attempts_before = all_attempts(api.engine)
    assert len(attempts_before) == 4
    assert [r.file_state for r in first.results] == [
        File.STATE_SUCCEEDED,
        File.STATE_FAILED,
        File.STATE_QUARANTINED,
        File.STATE_SUCCEEDED,
    ]

    again = api.leases.ReportFileResults(Batch(lease=got.lease.name, agent="agents/a1", results=results), timeout=30)

    assert [(r.file, r.file_state, r.lease_lost) for r in again.results] == [
        (r.file, r.file_state, r.lease_lost) for r in first.results
    ]
    assert not any(r.lease_lost for r in again.results)
    # Where the first answer had no next_attempt_time, neither has the replay.
    for replayed, recorded in zip(again.results, first.results, strict=True):
        if not recorded.HasField("next_attempt_time"):
            assert replayed == recorded
    assert all_attempts(api.engine) == attempts_before
    assert [api.file_row(f.name) for f in got.files] == rows_before

    # A different result for the same (lease, attempt) is not a replay: lost, nothing changes.
    changed = report_batch(api, "a1", got.lease.name, [failed(a, "now failing"), ok(b, records=1)])
    assert [r.lease_lost for r in changed] == [True, True]
    assert [api.file_row(f.name) for f in got.files] == rows_before
    assert all_attempts(api.engine) == attempts_before
    assert api.get_run(run).state == Run.STATE_RUNNING  # b is FAILED: still open


def test_a_retried_failure_gets_its_next_attempt_time_again(api: Api) -> None:
    api.running("retrynext", 2, policy=backoff(60, 60))
    got = api.lease("a1")
    results = [ok(got.files[0]), failed(got.files[1], "transient")]
    first = report_batch(api, "a1", got.lease.name, results)
    assert first[1].file_state == File.STATE_FAILED
    assert first[1].HasField("next_attempt_time")
    # The time the first answer gave is the one stored on the file.
    stored = api.file_row(got.files[1].name).next_attempt_at
    assert abs(first[1].next_attempt_time.ToDatetime(UTC) - stored) < timedelta(milliseconds=5)

    again = report_batch(api, "a1", got.lease.name, results)

    assert again[1].file_state == File.STATE_FAILED
    assert again[1].HasField("next_attempt_time"), "the replayed FAILED answer lost its next_attempt_time"
    assert again == first


def test_a_retry_of_the_call_that_ended_the_run_changes_nothing(api: Api) -> None:
    _, run = api.running("retryend", 3)
    got = api.lease("a1")
    results = [ok(f, records=2) for f in got.files]
    first = report_batch(api, "a1", got.lease.name, results)
    ended = api.get_run(run)
    assert ended.state == Run.STATE_SUCCEEDED
    again = report_batch(api, "a1", got.lease.name, results)
    assert again == first
    assert len(all_attempts(api.engine)) == 3
    after = api.get_run(run)
    assert after == ended  # same state, counts and end_time


# --- bad input -----------------------------------------------------------------------------------------------


def test_bad_input_names_the_field_and_changes_nothing(api: Api) -> None:
    api.running("bad", 3)
    got = api.lease("a1", max_files=2)
    lease = got.lease.name
    f0, f1 = got.files
    L = api.leases
    bad = grpc.StatusCode.INVALID_ARGUMENT

    def call(results: list[lease_pb2.FileResult], *, lease: str = lease, agent: str = "agents/a1") -> Any:
        return lambda: L.ReportFileResults(Batch(lease=lease, agent=agent, results=results), timeout=30)

    def check_field(results: list[lease_pb2.FileResult], field: str, **kwargs: str) -> None:
        error = expect(call(results, **kwargs), bad)
        assert set(field_violations(error)) == {field}, (field, error.details())

    check_field([], "results")
    too_many = [ok(f"ingestions/bad/files/{i}") for i in range(1, 10_002)]
    check_field(too_many, "results")
    check_field([ok(f0), ok(f1), ok(f0)], "results[2].file")  # the same file twice

    negative_records = ok(f1)
    negative_records.records = -1
    check_field([ok(f0), negative_records], "results[1].records")
    negative_bytes = ok(f1)
    negative_bytes.bytes = -5
    check_field([ok(f0), negative_bytes], "results[1].bytes")
    for attempt in (0, -1):
        zero = ok(f1)
        zero.attempt = attempt
        check_field([ok(f0), zero], "results[1].attempt")
    for name in ["", "files/1", "ingestions/bad/files/abc", "ingestions/bad/files/", "ingestions//files/1"]:
        check_field([ok(f0), ok(name)], "results[1].file")
    no_error = lease_pb2.FileResult(file=f1.name, attempt=1, outcome=Outcome.OUTCOME_FAILED)
    check_field([ok(f0), no_error], "results[1].error")
    empty_message = failed(f1, "")
    check_field([ok(f0), empty_message], "results[1].error")
    unspecified = lease_pb2.FileResult(file=f1.name, attempt=1, outcome=Outcome.OUTCOME_UNSPECIFIED)
    check_field([ok(f0), unspecified], "results[1].outcome")
    for bad_lease in ["", "leases/", "leases/not-a-uuid", lease.removeprefix("leases/"), "agents/a1"]:
        check_field([ok(f0)], "lease", lease=bad_lease)
    for bad_agent in ["", "a1", "agents/", "agents/a b", "agents/" + "x" * 129]:
        check_field([ok(f0)], "agent", agent=bad_agent)

    # Unknown lease; another agent's lease. Successes only and with a failure take different paths.
    unknown = f"leases/{uuid.uuid4()}"
    for results in ([ok(f0), ok(f1)], [ok(f0), failed(f1)]):
        expect(call(results, lease=unknown), grpc.StatusCode.NOT_FOUND)
        expect(call(results, agent="agents/a2"), grpc.StatusCode.PERMISSION_DENIED, "LEASE_NOT_OWNED")

    # None of that touched a file.
    assert [(api.file_row(f.name).state, api.file_row(f.name).attempts) for f in got.files] == [("LEASED", 1)] * 2
    assert all_attempts(api.engine) == []

    # The most a call may hold is accepted (files the lease does not hold are lost entries).
    most = [ok(f0)] + [ok(f"ingestions/bad/files/{1_000_000 + i}") for i in range(9_999)]
    answers = report_batch(api, "a1", lease, most)
    assert len(answers) == 10_000
    assert (answers[0].file_state, answers[0].lease_lost) == (File.STATE_SUCCEEDED, False)
    assert all(a.lease_lost for a in answers[1:])
    assert [(api.file_row(f.name).state) for f in got.files] == ["SUCCEEDED", "LEASED"]
    assert len(all_attempts(api.engine)) == 1


def test_an_agent_cannot_set_the_schema_version(api: Api) -> None:
    """The deprecated field is ignored: the ingestion's schema version follows the table's commits
    (tests/e2e/test_agent_schema.py), never what an agent says."""
    ingestion, _ = api.running("schema", 4)
    got = api.lease("a1", max_files=2)

    def version() -> int:
        request = ingestion_pb2.GetIngestionRequest(name=ingestion)
        return api.ingestions.GetIngestion(request).ingestion.schema_version

    assert version() == 0
    api.leases.ReportFileResults(
        Batch(lease=got.lease.name, agent="agents/a1", results=[ok(got.files[0])], schema_version=3)
    )
    assert version() == 0
