"""IngestionService semantics over gRPC: reads, updates with field masks, deletes, pause and
resume, list filters, every error code with its ErrorInfo, health and reflection."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from sqlalchemy import make_url

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import ingestion_pb2_grpc
from controlplane import bootstrap

from .helpers import error_info, field_violations, valid_ingestion

Stub = ingestion_pb2_grpc.IngestionServiceStub
SERVICE = "autoloader.v1.IngestionService"
GIB = 1 << 30


def _create(ingestions: Stub, ingestion_id: str = "orders", **overrides: object) -> pb.Ingestion:
    request = pb.CreateIngestionRequest(ingestion=valid_ingestion(**overrides), ingestion_id=ingestion_id)
    return ingestions.CreateIngestion(request).ingestion


def _get(ingestions: Stub, name: str = "ingestions/orders") -> pb.Ingestion:
    return ingestions.GetIngestion(pb.GetIngestionRequest(name=name)).ingestion


def _update(
    ingestions: Stub, patch: pb.Ingestion, *paths: str, name: str = "ingestions/orders", etag: str = ""
) -> pb.Ingestion:
    message = pb.Ingestion()
    message.CopyFrom(patch)
    message.name = name
    message.etag = etag
    request = pb.UpdateIngestionRequest(ingestion=message, update_mask=FieldMask(paths=list(paths)))
    return ingestions.UpdateIngestion(request).ingestion


def _fails(call: Callable[..., Any], request: Any, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    error = caught.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    return error


def _invalid(call: Callable[..., Any], request: Any, field: str) -> grpc.RpcError:
    error = _fails(call, request, grpc.StatusCode.INVALID_ARGUMENT)
    assert error_info(error).reason == "INVALID_ARGUMENT"
    assert field in field_violations(error), field_violations(error)
    return error


def _problem(call: Callable[..., Any], request: Any, code: grpc.StatusCode, field: str | None = None) -> str | None:
    """None when the call fails with `code` (and, given a field, exactly that field violation); else what happened.

    Loops over many cases collect these so one test reports every failing case at once."""
    try:
        call(request)
    except grpc.RpcError as error:
        if error.code() != code:
            return f"{error.code()}: {error.details()}"
        if field is not None and set(field_violations(error)) != {field}:
            return f"violations {field_violations(error)}"
        return None
    return "succeeded"


def _ids(items: Any) -> list[str]:
    return [i.name.removeprefix("ingestions/") for i in items]


# --- create, get, defaults -----------------------------------------------------------------------


def test_get_returns_what_create_returned(ingestions: Stub) -> None:
    created = _create(ingestions)
    assert created.name == "ingestions/orders"
    assert created.state == pb.Ingestion.STATE_ACTIVE
    assert created.etag
    assert created.HasField("create_time")
    assert created.HasField("update_time")
    assert created.source.uri == "s3://bucket/orders"
    assert created.destination.table == "raw.orders"
    assert _get(ingestions) == created


def test_defaults_are_filled_in(ingestions: Stub) -> None:
    created = _create(ingestions, schedule=pb.Schedule(cron="0 * * * *"))
    assert created.limits == pb.Limits(max_files_per_lease=1000, max_bytes_per_lease=GIB, max_attempts=5)
    assert created.error_policy.retry_backoff_initial == Duration(seconds=30)
    assert created.error_policy.retry_backoff_max == Duration(seconds=3600)
    assert created.schedule == pb.Schedule(cron="0 * * * *", time_zone="UTC")
    got = _get(ingestions)
    assert got.limits == created.limits
    assert got.error_policy == created.error_policy
    assert got.schedule == created.schedule


def test_partial_limits_keep_given_values(ingestions: Stub) -> None:
    created = _create(
        ingestions,
        limits=pb.Limits(max_attempts=9),
        error_policy=pb.ErrorPolicy(retry_backoff_initial=Duration(seconds=5)),
    )
    assert created.limits == pb.Limits(max_files_per_lease=1000, max_bytes_per_lease=GIB, max_attempts=9)
    assert created.error_policy.retry_backoff_initial == Duration(seconds=5)
    assert created.error_policy.retry_backoff_max == Duration(seconds=3600)


def test_no_schedule_stays_unset(ingestions: Stub) -> None:
    assert not _create(ingestions).HasField("schedule")
    assert not _get(ingestions).HasField("schedule")


def test_output_only_fields_are_ignored_on_create(ingestions: Stub) -> None:
    message = valid_ingestion(state=pb.Ingestion.STATE_PAUSED, etag='W/"99"', schema_version=7, name="ingestions/x")
    created = ingestions.CreateIngestion(pb.CreateIngestionRequest(ingestion=message, ingestion_id="orders")).ingestion
    assert created.name == "ingestions/orders"
    assert created.state == pb.Ingestion.STATE_ACTIVE
    assert created.schema_version == 0
    assert created.etag != 'W/"99"'


def test_generated_id_is_valid_and_readable(ingestions: Stub) -> None:
    created = ingestions.CreateIngestion(pb.CreateIngestionRequest(ingestion=valid_ingestion())).ingestion
    ingestion_id = created.name.removeprefix("ingestions/")
    assert ingestion_id.startswith("orders-")
    assert _get(ingestions, created.name) == created
    other = ingestions.CreateIngestion(pb.CreateIngestionRequest(ingestion=valid_ingestion())).ingestion
    assert other.name != created.name


# --- error codes ---------------------------------------------------------------------------------

MISSING = "ingestions/missing"


def _not_found_calls(ingestions: Stub) -> dict[str, tuple[Callable[..., Any], Any]]:
    patch = valid_ingestion(name=MISSING, display_name="x")
    return {
        "get": (ingestions.GetIngestion, pb.GetIngestionRequest(name=MISSING)),
        "update": (
            ingestions.UpdateIngestion,
            pb.UpdateIngestionRequest(ingestion=patch, update_mask=FieldMask(paths=["display_name"])),
        ),
        "delete": (ingestions.DeleteIngestion, pb.DeleteIngestionRequest(name=MISSING)),
        "pause": (ingestions.PauseIngestion, pb.PauseIngestionRequest(name=MISSING)),
        "resume": (ingestions.ResumeIngestion, pb.ResumeIngestionRequest(name=MISSING)),
    }


def test_not_found(ingestions: Stub) -> None:
    existing = _create(ingestions)  # another ingestion exists; it must not be touched
    for method, (call, request) in _not_found_calls(ingestions).items():
        error = _fails(call, request, grpc.StatusCode.NOT_FOUND)
        info = error_info(error)
        assert info.reason == "NOT_FOUND", method
        assert info.domain == "autoloader.v1", method
        assert info.metadata["ingestion"] == MISSING, method
        assert MISSING in (error.details() or ""), method
    assert _get(ingestions) == existing


def test_already_exists(ingestions: Stub) -> None:
    first = ingestions.CreateIngestion(
        pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders", request_id="req-1")
    ).ingestion
    error = _fails(
        ingestions.CreateIngestion,
        pb.CreateIngestionRequest(
            ingestion=valid_ingestion(display_name="Other"), ingestion_id="orders", request_id="req-2"
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    info = error_info(error)
    assert info.reason == "ALREADY_EXISTS"
    assert info.domain == "autoloader.v1"
    assert _get(ingestions) == first
    # Without request ids too.
    error = _fails(
        ingestions.CreateIngestion,
        pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="orders"),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert error_info(error).reason == "ALREADY_EXISTS"
    assert len(ingestions.ListIngestions(pb.ListIngestionsRequest()).ingestions) == 1


BAD_NAMES = ["foo/bar", "ingestions/UPPER", "", "ingestions/", "ingestions/orders/runs/r1", "ingestions/orders\n"]


def test_malformed_names(ingestions: Stub) -> None:
    created = _create(ingestions)
    problems: dict[tuple[str, str], str] = {}
    for name in BAD_NAMES:
        calls: dict[str, tuple[Callable[..., Any], Any, str]] = {
            "get": (ingestions.GetIngestion, pb.GetIngestionRequest(name=name), "name"),
            "delete": (ingestions.DeleteIngestion, pb.DeleteIngestionRequest(name=name), "name"),
            "pause": (ingestions.PauseIngestion, pb.PauseIngestionRequest(name=name), "name"),
            "resume": (ingestions.ResumeIngestion, pb.ResumeIngestionRequest(name=name), "name"),
            "update": (
                ingestions.UpdateIngestion,
                pb.UpdateIngestionRequest(
                    ingestion=pb.Ingestion(name=name, display_name="x"), update_mask=FieldMask(paths=["display_name"])
                ),
                "ingestion.name",
            ),
        }
        for method, (call, request, field) in calls.items():
            problem = _problem(call, request, grpc.StatusCode.INVALID_ARGUMENT, field)
            if problem:
                problems[(method, name)] = problem
    assert problems == {}
    assert _get(ingestions) == created


def test_update_without_ingestion(ingestions: Stub) -> None:
    request = pb.UpdateIngestionRequest(update_mask=FieldMask(paths=["display_name"]))
    _invalid(ingestions.UpdateIngestion, request, "ingestion")


def test_update_with_stale_etag(ingestions: Stub) -> None:
    created = _create(ingestions)
    current = _update(ingestions, pb.Ingestion(display_name="v2"), "display_name", etag=created.etag)
    assert current.display_name == "v2"
    assert current.etag != created.etag
    error = _fails(
        ingestions.UpdateIngestion,
        pb.UpdateIngestionRequest(
            ingestion=pb.Ingestion(name=created.name, display_name="v3", etag=created.etag),
            update_mask=FieldMask(paths=["display_name"]),
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    info = error_info(error)
    assert info.reason == "ETAG_MISMATCH"
    assert info.domain == "autoloader.v1"
    assert info.metadata["etag"] == current.etag
    assert _get(ingestions) == current
    # The current etag succeeds.
    latest = _update(ingestions, pb.Ingestion(display_name="v3"), "display_name", etag=current.etag)
    assert latest.display_name == "v3"


def test_delete_with_stale_etag(ingestions: Stub) -> None:
    created = _create(ingestions)
    current = _update(ingestions, pb.Ingestion(description="changed"), "description")
    error = _fails(
        ingestions.DeleteIngestion,
        pb.DeleteIngestionRequest(name=created.name, etag=created.etag),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_info(error).reason == "ETAG_MISMATCH"
    assert _get(ingestions) == current
    ingestions.DeleteIngestion(pb.DeleteIngestionRequest(name=created.name, etag=current.etag))
    _fails(ingestions.GetIngestion, pb.GetIngestionRequest(name=created.name), grpc.StatusCode.NOT_FOUND)


def test_delete_then_everything_is_not_found(ingestions: Stub) -> None:
    created = _create(ingestions)
    assert ingestions.DeleteIngestion(pb.DeleteIngestionRequest(name=created.name)) == pb.DeleteIngestionResponse()
    _fails(ingestions.GetIngestion, pb.GetIngestionRequest(name=created.name), grpc.StatusCode.NOT_FOUND)
    _fails(ingestions.DeleteIngestion, pb.DeleteIngestionRequest(name=created.name), grpc.StatusCode.NOT_FOUND)
    _fails(ingestions.PauseIngestion, pb.PauseIngestionRequest(name=created.name), grpc.StatusCode.NOT_FOUND)
    assert list(ingestions.ListIngestions(pb.ListIngestionsRequest()).ingestions) == []
    # The id is free again.
    again = _create(ingestions)
    assert again.name == created.name
    assert again.create_time.ToDatetime() >= created.create_time.ToDatetime()


def test_refresh_without_a_mode_is_invalid_and_preview_is_unimplemented(ingestions: Stub) -> None:
    created = _create(ingestions)
    _invalid(ingestions.RefreshIngestion, pb.RefreshIngestionRequest(name=created.name), "mode")
    _fails(ingestions.PreviewIngestion, pb.PreviewIngestionRequest(name=created.name), grpc.StatusCode.UNIMPLEMENTED)
    assert _get(ingestions) == created


def _drop_database(postgres_url: str, database_url: str) -> None:
    name = make_url(database_url).database
    admin = make_url(postgres_url).set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_database_gone_is_unavailable(
    ingestions: Stub, channel: grpc.Channel, postgres_url: str, database_url: str
) -> None:
    created = _create(ingestions)
    _drop_database(postgres_url, database_url)
    calls: list[tuple[Callable[..., Any], Any]] = [
        (ingestions.GetIngestion, pb.GetIngestionRequest(name=created.name)),
        (ingestions.ListIngestions, pb.ListIngestionsRequest()),
        (ingestions.CreateIngestion, pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id="other")),
        (
            ingestions.UpdateIngestion,
            pb.UpdateIngestionRequest(
                ingestion=pb.Ingestion(name=created.name, display_name="x"),
                update_mask=FieldMask(paths=["display_name"]),
            ),
        ),
        (ingestions.PauseIngestion, pb.PauseIngestionRequest(name=created.name, request_id="r-1")),
        (ingestions.DeleteIngestion, pb.DeleteIngestionRequest(name=created.name)),
    ]
    for call, request in calls:
        error = _fails(call, request, grpc.StatusCode.UNAVAILABLE)
        assert error_info(error).reason == "DATABASE_UNAVAILABLE"
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
    # Health follows the database.
    health = health_pb2_grpc.HealthStub(channel)
    assert _eventually_status(health, "", health_pb2.HealthCheckResponse.NOT_SERVING)


def _eventually_status(health: Any, service: str, expected: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health.Check(health_pb2.HealthCheckRequest(service=service)).status == expected:
            return True
        time.sleep(0.05)
    return False


# --- update masks --------------------------------------------------------------------------------


def _csv_ingestion(ingestions: Stub) -> pb.Ingestion:
    return _create(
        ingestions,
        source=pb.Source(uri="s3://bucket/orders", glob="*.csv"),
        format=pb.Format(type=pb.Format.TYPE_CSV, header=True, delimiter=";", quote="'"),
        limits=pb.Limits(max_files_per_lease=10, max_bytes_per_lease=2048, max_attempts=3),
        schedule=pb.Schedule(cron="0 * * * *", time_zone="Europe/Paris"),
    )


def test_mask_changes_only_the_named_field(ingestions: Stub) -> None:
    created = _csv_ingestion(ingestions)
    patch = pb.Ingestion(
        display_name="ignored",
        format=pb.Format(type=pb.Format.TYPE_JSON, header=False, delimiter="|", quote=""),
        limits=pb.Limits(max_attempts=50),
    )
    updated = _update(ingestions, patch, "format.delimiter")
    expected = pb.Format()
    expected.CopyFrom(created.format)
    expected.delimiter = "|"
    assert updated.format == expected
    assert updated.format.header
    assert updated.display_name == created.display_name
    assert updated.limits == created.limits
    assert updated.schedule == created.schedule
    assert updated.source == created.source
    assert updated.destination == created.destination
    assert _get(ingestions) == updated


def test_mask_leaf_of_limits(ingestions: Stub) -> None:
    _csv_ingestion(ingestions)
    updated = _update(
        ingestions, pb.Ingestion(limits=pb.Limits(max_attempts=7, max_files_per_lease=1)), "limits.max_attempts"
    )
    assert updated.limits == pb.Limits(max_files_per_lease=10, max_bytes_per_lease=2048, max_attempts=7)


def test_mask_message_replaces_the_whole_message(ingestions: Stub) -> None:
    _csv_ingestion(ingestions)
    updated = _update(ingestions, pb.Ingestion(limits=pb.Limits(max_bytes_per_lease=4096)), "limits")
    # Unset subfields take their defaults, they do not keep the old values.
    assert updated.limits == pb.Limits(max_files_per_lease=1000, max_bytes_per_lease=4096, max_attempts=5)


def test_mask_format_replaces_csv_options(ingestions: Stub) -> None:
    created = _csv_ingestion(ingestions)
    updated = _update(ingestions, pb.Ingestion(format=pb.Format(type=pb.Format.TYPE_JSON)), "format")
    assert updated.format.type == pb.Format.TYPE_JSON
    assert not updated.format.header
    assert updated.format.delimiter == ""
    assert updated.format.quote == ""
    assert updated.limits == created.limits


def test_mask_result_is_validated(ingestions: Stub) -> None:
    created = _csv_ingestion(ingestions)
    # Only the type changes: the CSV options left behind are not valid for JSON.
    request = pb.UpdateIngestionRequest(
        ingestion=pb.Ingestion(name=created.name, format=pb.Format(type=pb.Format.TYPE_JSON)),
        update_mask=FieldMask(paths=["format.type"]),
    )
    error = _invalid(ingestions.UpdateIngestion, request, "format.header")
    assert "format.delimiter" in field_violations(error)
    request = pb.UpdateIngestionRequest(
        ingestion=pb.Ingestion(name=created.name, format=pb.Format(delimiter=",,")),
        update_mask=FieldMask(paths=["format.delimiter"]),
    )
    _invalid(ingestions.UpdateIngestion, request, "format.delimiter")
    assert _get(ingestions) == created


def test_mask_schedule_with_empty_patch_removes_it(ingestions: Stub) -> None:
    created = _csv_ingestion(ingestions)
    assert created.HasField("schedule")
    updated = _update(ingestions, pb.Ingestion(), "schedule")
    assert not updated.HasField("schedule")
    assert not _get(ingestions).HasField("schedule")
    assert updated.format == created.format


def test_mask_schedule_cron_keeps_time_zone(ingestions: Stub) -> None:
    _csv_ingestion(ingestions)
    updated = _update(
        ingestions, pb.Ingestion(schedule=pb.Schedule(cron="*/5 * * * *", time_zone="Asia/Tokyo")), "schedule.cron"
    )
    assert updated.schedule == pb.Schedule(cron="*/5 * * * *", time_zone="Europe/Paris")


def test_mask_adds_a_schedule(ingestions: Stub) -> None:
    _create(ingestions)
    updated = _update(ingestions, pb.Ingestion(schedule=pb.Schedule(cron="0 3 * * *")), "schedule")
    assert updated.schedule == pb.Schedule(cron="0 3 * * *", time_zone="UTC")


def test_mask_labels_and_several_paths(ingestions: Stub) -> None:
    created = _create(ingestions)
    patch = pb.Ingestion(display_name="New", description="d", labels={"team": "data"})
    patch.source.glob = "**/*.json"
    updated = _update(ingestions, patch, "display_name", "labels", "source.glob")
    assert updated.display_name == "New"
    assert updated.description == created.description
    assert dict(updated.labels) == {"team": "data"}
    assert updated.source.glob == "**/*.json"
    assert updated.source.uri == created.source.uri
    assert updated.source.recursive == created.source.recursive


REJECTED_PATHS = [
    "source.uri",
    "destination",
    "destination.table",
    "destination.partition_by",
    "source",
    "state",
    "etag",
    "name",
    "create_time",
    "update_time",
    "file_counts",
    "nope",
    "format.nope",
    "limits.max_attempts.x",
    "labels.team.x",
    "",
]


def test_mask_rejects_immutable_output_only_and_unknown_paths(ingestions: Stub) -> None:
    created = _create(ingestions)
    patch = valid_ingestion(
        name=created.name,
        source=pb.Source(uri="s3://other/x"),
        destination=pb.Destination(table="raw.other"),
        state=pb.Ingestion.STATE_PAUSED,
    )
    patch.labels["team"] = "data"
    problems = {}
    for path in REJECTED_PATHS:
        for paths in ([path], ["display_name", path]):  # alone, and next to a valid path
            request = pb.UpdateIngestionRequest(ingestion=patch, update_mask=FieldMask(paths=paths))
            problem = _problem(ingestions.UpdateIngestion, request, grpc.StatusCode.INVALID_ARGUMENT, "update_mask")
            if problem:
                problems[",".join(paths)] = problem
    assert problems == {}
    assert _get(ingestions) == created


def test_empty_mask_is_invalid(ingestions: Stub) -> None:
    created = _create(ingestions)
    request = pb.UpdateIngestionRequest(ingestion=pb.Ingestion(name=created.name, display_name="x"))
    _invalid(ingestions.UpdateIngestion, request, "update_mask")
    assert _get(ingestions) == created


def test_output_only_fields_in_patch_are_ignored(ingestions: Stub) -> None:
    created = _create(ingestions)
    patch = pb.Ingestion(display_name="x", state=pb.Ingestion.STATE_PAUSED, schema_version=5)
    updated = _update(ingestions, patch, "display_name")
    assert updated.state == pb.Ingestion.STATE_ACTIVE
    assert updated.schema_version == 0
    assert updated.create_time == created.create_time


def test_etag_and_update_time_change_on_every_update(ingestions: Stub) -> None:
    created = _create(ingestions)
    seen = [created]
    for i in range(3):
        seen.append(_update(ingestions, pb.Ingestion(display_name=f"v{i}"), "display_name", etag=seen[-1].etag))
    etags = [s.etag for s in seen]
    assert len(set(etags)) == len(etags), etags
    times = [s.update_time.ToDatetime() for s in seen]
    assert times == sorted(times)
    assert len(set(times)) == len(times), times
    assert all(s.create_time == created.create_time for s in seen)
    assert _get(ingestions) == seen[-1]


def test_concurrent_updates_with_one_etag_one_wins(ingestions: Stub) -> None:
    created = _create(ingestions)
    workers = 6
    barrier = threading.Barrier(workers)
    outcomes: list[Any] = [None] * workers

    def update(slot: int) -> None:
        request = pb.UpdateIngestionRequest(
            ingestion=pb.Ingestion(name=created.name, display_name=f"writer {slot}", etag=created.etag),
            update_mask=FieldMask(paths=["display_name"]),
        )
        barrier.wait(timeout=10)
        try:
            outcomes[slot] = ingestions.UpdateIngestion(request, timeout=30).ingestion
        except grpc.RpcError as error:
            outcomes[slot] = error

    threads = [threading.Thread(target=update, args=(i,), name=f"update-{i}") for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [o for o in outcomes if isinstance(o, pb.Ingestion)]
    losers = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(winners) == 1, outcomes
    assert [e.code() for e in losers] == [grpc.StatusCode.FAILED_PRECONDITION] * (workers - 1)
    assert {error_info(e).reason for e in losers} == {"ETAG_MISMATCH"}
    assert _get(ingestions) == winners[0]


def test_update_with_nul_in_free_text_is_not_internal(ingestions: Stub) -> None:
    """PostgreSQL cannot store NUL in text or JSONB; a client that sends one must get an answer, not INTERNAL."""
    created = _create(ingestions)
    request = pb.UpdateIngestionRequest(
        ingestion=pb.Ingestion(name=created.name, display_name="a\x00b"), update_mask=FieldMask(paths=["display_name"])
    )
    try:
        updated = ingestions.UpdateIngestion(request).ingestion
    except grpc.RpcError as error:
        code = error.code()
        violations = field_violations(error) if code == grpc.StatusCode.INVALID_ARGUMENT else {}
    else:
        code, violations = grpc.StatusCode.OK, {}
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), f"{code}: never INTERNAL"
    if code == grpc.StatusCode.OK:
        assert updated.display_name == "a\x00b"
    else:
        assert set(violations) == {"display_name"}
        assert _get(ingestions) == created


# --- pause and resume, list filters --------------------------------------------------------------


def test_pause_and_resume(ingestions: Stub) -> None:
    created = _create(ingestions)
    paused = ingestions.PauseIngestion(pb.PauseIngestionRequest(name=created.name)).ingestion
    assert paused.state == pb.Ingestion.STATE_PAUSED
    assert paused.etag != created.etag
    assert _get(ingestions) == paused
    again = ingestions.PauseIngestion(pb.PauseIngestionRequest(name=created.name)).ingestion
    assert again == paused, "pausing a paused ingestion is a no-op"
    resumed = ingestions.ResumeIngestion(pb.ResumeIngestionRequest(name=created.name)).ingestion
    assert resumed.state == pb.Ingestion.STATE_ACTIVE
    assert resumed.etag not in (created.etag, paused.etag)
    assert ingestions.ResumeIngestion(pb.ResumeIngestionRequest(name=created.name)).ingestion == resumed
    assert _get(ingestions) == resumed


def test_update_keeps_paused_state(ingestions: Stub) -> None:
    created = _create(ingestions)
    ingestions.PauseIngestion(pb.PauseIngestionRequest(name=created.name))
    updated = _update(ingestions, pb.Ingestion(display_name="x"), "display_name")
    assert updated.state == pb.Ingestion.STATE_PAUSED


def test_list_filters_on_state(ingestions: Stub) -> None:
    for ingestion_id in ("alpha", "bravo", "charlie", "delta"):
        _create(ingestions, ingestion_id)
    for ingestion_id in ("bravo", "delta"):
        ingestions.PauseIngestion(pb.PauseIngestionRequest(name=f"ingestions/{ingestion_id}"))

    def listed(filter_: str) -> list[str]:
        return _ids(ingestions.ListIngestions(pb.ListIngestionsRequest(filter=filter_)).ingestions)

    assert listed("") == ["alpha", "bravo", "charlie", "delta"]
    assert listed("state = PAUSED") == ["bravo", "delta"]
    assert listed("state = ACTIVE") == ["alpha", "charlie"]
    assert listed("state = ACTIVE OR state = PAUSED") == ["alpha", "bravo", "charlie", "delta"]
    assert listed("state=PAUSED or state=ERROR") == ["bravo", "delta"]
    assert listed("state = ERROR") == []
    for item in ingestions.ListIngestions(pb.ListIngestionsRequest(filter="state = PAUSED")).ingestions:
        assert item.state == pb.Ingestion.STATE_PAUSED


BAD_FILTERS = [
    "state = BOGUS",
    "name = alpha",
    "state = ACTIVE AND state = PAUSED",
    "state ACTIVE",
    "state = ",
    "state = ACTIVE OR",
    "garbage",
    "state = ACTIVE; DROP TABLE ingestions",
    "state = ACTIVE\nOR state = PAUSED;",
]


def test_list_bad_filter(ingestions: Stub) -> None:
    _create(ingestions)
    problems = {}
    for filter_ in BAD_FILTERS:
        request = pb.ListIngestionsRequest(filter=filter_)
        problem = _problem(ingestions.ListIngestions, request, grpc.StatusCode.INVALID_ARGUMENT, "filter")
        if problem:
            problems[filter_] = problem
    assert problems == {}
    error = _invalid(ingestions.ListIngestions, pb.ListIngestionsRequest(filter="state = BOGUS"), "filter")
    assert error_info(error).reason == "INVALID_ARGUMENT"


# --- health and reflection -----------------------------------------------------------------------


def test_health_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_reports_not_serving_on_stop(channel: grpc.Channel, control_plane: bootstrap.ControlPlane) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    stream = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=15)
    first = next(stream)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    stopper = threading.Thread(target=control_plane.stop, name="stopper")
    stopper.start()
    statuses = []
    ended: grpc.StatusCode | None = None
    try:
        for response in stream:
            statuses.append(response.status)
            if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
    except grpc.RpcError as error:  # the stream may end once the server is gone
        ended = error.code()
    finally:
        stream.cancel()
        stopper.join(timeout=15)
    assert ended in (None, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), ended
    assert not stopper.is_alive()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses


def test_health_drain_then_check(channel: grpc.Channel, control_plane: bootstrap.ControlPlane) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    control_plane.health.drain()
    for service in ("", SERVICE):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING, service


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {SERVICE, "grpc.health.v1.Health"} <= services
    pool = DescriptorPool(database)
    service = pool.FindServiceByName(SERVICE)
    assert {m.name for m in service.methods} == {
        "CreateIngestion",
        "GetIngestion",
        "ListIngestions",
        "UpdateIngestion",
        "DeleteIngestion",
        "PauseIngestion",
        "ResumeIngestion",
        "RefreshIngestion",
        "PreviewIngestion",
    }
    ingestion = pool.FindMessageTypeByName("autoloader.v1.Ingestion")
    assert "etag" in ingestion.fields_by_name
