"""Every validation rule, through CreateIngestion over gRPC against a real server and database.

Each rejected spec must answer INVALID_ARGUMENT with a google.rpc.BadRequest that names the
exact field (its API path), and nothing a client sends may answer INTERNAL or UNKNOWN.

Rejected requests change nothing, so the tests of this module share one control plane on one
fresh database (starting a server per test would dominate the runtime); each test checks that
the number of ingestions is unchanged by what it sent.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import make_url

from autoloader.v1 import ingestion_pb2 as pb
from autoloader.v1 import ingestion_pb2_grpc
from controlplane import bootstrap
from controlplane.config import ControlPlaneSettings

from .helpers import error_info, field_violations, valid_ingestion

Stub = ingestion_pb2_grpc.IngestionServiceStub
Mutation = Callable[[pb.Ingestion], None]


def _admin(postgres_url: str) -> psycopg.Connection:
    url = make_url(postgres_url).set(drivername="postgresql", database="postgres")
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


@pytest.fixture(scope="module")
def shared_plane(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[bootstrap.ControlPlane]:
    """One control plane on its own fresh database (migrated by the server itself) for this module."""
    name = f"t_validation_{uuid.uuid4().hex[:12]}"
    with _admin(postgres_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    state: Path = tmp_path_factory.mktemp("validation-state")
    settings = ControlPlaneSettings(
        database_url=make_url(postgres_url).set(database=name).render_as_string(hide_password=False),
        state_dir=state,
        listen_address="127.0.0.1:0",
        shutdown_grace=1.0,
        health_interval=0.2,
        spark_avro=True,  # the format rules below cover AVRO too; its engine check is tested apart
    )
    plane = bootstrap.start(settings)
    try:
        yield plane
    finally:
        plane.stop(grace=0)
        with _admin(postgres_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def shared_channel(shared_plane: bootstrap.ControlPlane) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(shared_plane.address) as channel:
        yield channel


@pytest.fixture
def ingestions(shared_channel: grpc.Channel) -> Stub:
    """Shadows the per-test fixture of conftest: a stub on the module's shared server."""
    return ingestion_pb2_grpc.IngestionServiceStub(shared_channel)


def _count(ingestions: Stub) -> int:
    total, token = 0, ""
    while True:
        page = ingestions.ListIngestions(pb.ListIngestionsRequest(page_size=1000, page_token=token))
        total += len(page.ingestions)
        token = page.next_page_token
        if not token:
            return total


def _spec(mutate: Mutation) -> pb.Ingestion:
    message = valid_ingestion()
    mutate(message)
    return message


def _rejected(ingestions: Stub, request: pb.CreateIngestionRequest) -> grpc.RpcError:
    """Sends a request that must be rejected with INVALID_ARGUMENT, and checks it created nothing."""
    before = _count(ingestions)
    with pytest.raises(grpc.RpcError) as caught:
        ingestions.CreateIngestion(request)
    assert _count(ingestions) == before, "a rejected request must not create anything"
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    info = error_info(error)
    assert info.reason == "INVALID_ARGUMENT"
    assert info.domain == "autoloader.v1"
    return error


def _call(
    ingestions: Stub, request: pb.CreateIngestionRequest
) -> tuple[pb.CreateIngestionResponse | None, grpc.RpcError | None]:
    try:
        return ingestions.CreateIngestion(request, timeout=10), None
    except grpc.RpcError as error:
        return None, error


# --- mutations, one per rule -------------------------------------------------------------------


def _uri(uri: str) -> Mutation:
    def mutate(m: pb.Ingestion) -> None:
        m.source.uri = uri

    return mutate


def _glob(glob: str) -> Mutation:
    def mutate(m: pb.Ingestion) -> None:
        m.source.glob = glob

    return mutate


def _csv(**options: object) -> Mutation:
    def mutate(m: pb.Ingestion) -> None:
        m.format.CopyFrom(pb.Format(type=pb.Format.TYPE_CSV, **options))  # type: ignore[arg-type]

    return mutate


def _format(**fields: object) -> Mutation:
    def mutate(m: pb.Ingestion) -> None:
        m.format.CopyFrom(pb.Format(**fields))  # type: ignore[arg-type]

    return mutate


def _columns(*columns: tuple[str, str], mode: int = pb.Schema.MODE_EXPLICIT) -> Mutation:
    def mutate(m: pb.Ingestion) -> None:
        m.schema.CopyFrom(pb.Schema(mode=mode, columns=[pb.Column(name=n, type=t) for n, t in columns]))  # type: ignore[arg-type]

    return mutate


def _column_type(type_: str) -> Mutation:
    return _columns(("id", "bigint"), ("value", type_))


def _table(table: str) -> Mutation:
    def mutate(m: pb.Ingestion) -> None:
        m.destination.table = table

    return mutate


def _partitions(*fields: tuple[str, str], explicit: tuple[str, ...] = ()) -> Mutation:
    def mutate(m: pb.Ingestion) -> None:
        m.destination.partition_by.extend(pb.PartitionField(column=c, transform=t) for c, t in fields)
        if explicit:
            m.schema.CopyFrom(
                pb.Schema(mode=pb.Schema.MODE_EXPLICIT, columns=[pb.Column(name=n, type="string") for n in explicit])
            )

    return mutate


def _schedule(cron: str, time_zone: str = "") -> Mutation:
    def mutate(m: pb.Ingestion) -> None:
        m.schedule.CopyFrom(pb.Schedule(cron=cron, time_zone=time_zone))

    return mutate


def _limits(**fields: int) -> Mutation:
    def mutate(m: pb.Ingestion) -> None:
        m.limits.CopyFrom(pb.Limits(**fields))

    return mutate


def _backoff(initial: Duration | None = None, maximum: Duration | None = None) -> Mutation:
    def mutate(m: pb.Ingestion) -> None:
        if initial is not None:
            m.error_policy.retry_backoff_initial.CopyFrom(initial)
        if maximum is not None:
            m.error_policy.retry_backoff_max.CopyFrom(maximum)

    return mutate


def _labels(**labels: str) -> Mutation:
    def mutate(m: pb.Ingestion) -> None:
        m.labels.update(labels)

    return mutate


def _set(path: str, value: object) -> Mutation:
    def mutate(m: pb.Ingestion) -> None:
        *parents, leaf = path.split(".")
        target: object = m
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, value)

    return mutate


def _seconds(seconds: int, nanos: int = 0) -> Duration:
    return Duration(seconds=seconds, nanos=nanos)


DAY = 86_400

RULES = [
    # metadata
    pytest.param(_set("display_name", "x" * 201), "display_name", id="display-name-too-long"),
    pytest.param(_set("description", "x" * 4001), "description", id="description-too-long"),
    pytest.param(
        lambda m: m.labels.update({f"k{i}": "v" for i in range(65)}),
        "labels",
        id="too-many-labels",
    ),
    pytest.param(_labels(Team="data"), "labels['Team']", id="label-key-upper-case"),
    pytest.param(_labels(**{"1team": "data"}), "labels['1team']", id="label-key-digit-start"),
    pytest.param(_labels(**{"": "data"}), "labels['']", id="label-key-empty"),
    pytest.param(_labels(team="x" * 64), "labels['team']", id="label-value-too-long"),
    pytest.param(_labels(**{"team\n": "data"}), "labels['team\\n']", id="label-key-trailing-newline"),
    # source.uri
    pytest.param(_uri(""), "source.uri", id="uri-missing"),
    pytest.param(_uri("ftp://host/data"), "source.uri", id="uri-scheme-ftp"),
    pytest.param(_uri("http://host/data"), "source.uri", id="uri-scheme-http"),
    pytest.param(_uri("s3a://bucket/data"), "source.uri", id="uri-scheme-s3a"),
    pytest.param(_uri("/data/in"), "source.uri", id="uri-no-scheme"),
    pytest.param(_uri("bucket/data"), "source.uri", id="uri-bare-path"),
    pytest.param(_uri("file:data/in"), "source.uri", id="file-uri-relative"),
    pytest.param(_uri("file://host/data/in"), "source.uri", id="file-uri-remote-host"),
    pytest.param(_uri("file:///data/../etc"), "source.uri", id="file-uri-dotdot"),
    pytest.param(_uri("s3://bucket/a/../b"), "source.uri", id="s3-uri-dotdot"),
    pytest.param(_uri("s3://bucket/data/*.json"), "source.uri", id="uri-wildcard-star"),
    pytest.param(_uri("s3://bucket/data/file?.json"), "source.uri", id="uri-wildcard-question"),
    pytest.param(_uri("gs://bucket/data/[ab]"), "source.uri", id="uri-wildcard-bracket"),
    pytest.param(_uri("s3://bucket/data#part"), "source.uri", id="uri-fragment"),
    pytest.param(_uri("s3:///data"), "source.uri", id="s3-bucket-missing"),
    pytest.param(_uri("gs://"), "source.uri", id="gs-bucket-missing"),
    pytest.param(_uri("abfs:///prefix"), "source.uri", id="abfs-container-missing"),
    pytest.param(_uri("s3://bucket/da\tta"), "source.uri", id="uri-control-character"),
    pytest.param(_uri("s3://bucket/" + "a" * 2048), "source.uri", id="uri-too-long"),
    # source.glob and friends
    pytest.param(_glob("/abs/*.json"), "source.glob", id="glob-absolute"),
    pytest.param(_glob("../*.json"), "source.glob", id="glob-dotdot"),
    pytest.param(_glob("year=*/../*.json"), "source.glob", id="glob-inner-dotdot"),
    pytest.param(_glob("[abc*.json"), "source.glob", id="glob-unclosed-bracket"),
    pytest.param(_glob("{a,b*.json"), "source.glob", id="glob-unclosed-brace"),
    pytest.param(_glob("a]*.json"), "source.glob", id="glob-stray-closing-bracket"),
    pytest.param(_glob("*.js\non"), "source.glob", id="glob-control-character"),
    pytest.param(_glob("*" * 1025), "source.glob", id="glob-too-long"),
    pytest.param(_set("source.credentials_ref", "my creds"), "source.credentials_ref", id="credentials-ref-space"),
    pytest.param(_set("source.credentials_ref", "creds\n"), "source.credentials_ref", id="credentials-ref-newline"),
    pytest.param(
        lambda m: m.source.options.update({"region\n": "eu"}), "source.options['region\\n']", id="option-key-newline"
    ),
    pytest.param(
        lambda m: m.source.options.update({"1region": "eu"}), "source.options['1region']", id="option-key-digit"
    ),
    # format
    pytest.param(_format(), "format.type", id="format-type-missing"),
    pytest.param(_format(type=99), "format.type", id="format-type-unknown-number"),
    pytest.param(_format(type=pb.Format.TYPE_JSON, compression=99), "format.compression", id="compression-unknown"),
    pytest.param(_format(type=pb.Format.TYPE_JSON, delimiter=","), "format.delimiter", id="delimiter-on-json"),
    pytest.param(_format(type=pb.Format.TYPE_JSON, quote="'"), "format.quote", id="quote-on-json"),
    pytest.param(_format(type=pb.Format.TYPE_PARQUET, escape="\\"), "format.escape", id="escape-on-parquet"),
    pytest.param(_format(type=pb.Format.TYPE_JSON, header=True), "format.header", id="header-on-json"),
    pytest.param(_format(type=pb.Format.TYPE_PARQUET, multiline=True), "format.multiline", id="multiline-on-parquet"),
    pytest.param(_format(type=pb.Format.TYPE_TEXT, multiline=True), "format.multiline", id="multiline-on-text"),
    pytest.param(_format(type=pb.Format.TYPE_AVRO, encoding="utf-8"), "format.encoding", id="encoding-on-avro"),
    pytest.param(
        _format(type=pb.Format.TYPE_PARQUET, compression=pb.Format.COMPRESSION_GZIP),
        "format.compression",
        id="gzip-on-parquet",
    ),
    pytest.param(
        _format(type=pb.Format.TYPE_ORC, compression=pb.Format.COMPRESSION_SNAPPY),
        "format.compression",
        id="snappy-on-orc",
    ),
    pytest.param(_csv(delimiter=",,"), "format.delimiter", id="csv-multi-char-delimiter"),
    pytest.param(_csv(delimiter="\n"), "format.delimiter", id="csv-newline-delimiter"),
    pytest.param(_csv(quote="''"), "format.quote", id="csv-multi-char-quote"),
    pytest.param(_csv(escape="\r"), "format.escape", id="csv-line-break-escape"),
    pytest.param(_csv(encoding="utf-99"), "format.encoding", id="csv-unknown-encoding"),
    pytest.param(_csv(encoding="utf-8\x00"), "format.encoding", id="csv-encoding-with-nul"),
    pytest.param(_csv(encoding="x" * 300), "format.encoding", id="csv-encoding-too-long"),
    # Python codecs that are not character encodings: Spark cannot read a file "in base64".
    pytest.param(_csv(encoding="base64"), "format.encoding", id="csv-encoding-bytes-codec"),
    pytest.param(_csv(encoding="rot13"), "format.encoding", id="csv-encoding-text-transform"),
    pytest.param(_format(type=pb.Format.TYPE_JSON, encoding="klingon"), "format.encoding", id="json-unknown-encoding"),
    # schema
    pytest.param(_columns(), "schema.columns", id="explicit-without-columns"),
    pytest.param(_columns(("id", "int"), mode=pb.Schema.MODE_INFER), "schema.columns", id="columns-with-infer"),
    pytest.param(_columns(("id", "int"), mode=pb.Schema.MODE_UNSPECIFIED), "schema.columns", id="columns-unspecified"),
    pytest.param(_columns(("id", "int"), mode=99), "schema.mode", id="schema-mode-unknown"),
    pytest.param(_set("schema.evolution", 99), "schema.evolution", id="evolution-unknown"),
    pytest.param(_columns(("1id", "int")), "schema.columns[0].name", id="column-name-digit-start"),
    pytest.param(_columns(("id", "int"), ("user-id", "int")), "schema.columns[1].name", id="column-name-hyphen"),
    pytest.param(_columns(("", "int")), "schema.columns[0].name", id="column-name-empty"),
    pytest.param(_columns(("a" * 129, "int")), "schema.columns[0].name", id="column-name-too-long"),
    pytest.param(_columns(("id", "int"), ("ID", "string")), "schema.columns[1].name", id="column-name-duplicate"),
    pytest.param(_columns(("id\n", "int")), "schema.columns[0].name", id="column-name-trailing-newline"),
    pytest.param(_columns(("_source_file", "string")), "schema.columns[0].name", id="column-reserved-source-file"),
    pytest.param(_columns(("_Rescued_Data", "string")), "schema.columns[0].name", id="column-reserved-any-case"),
    pytest.param(_columns(("id", "")), "schema.columns[0].type", id="column-type-missing"),
    pytest.param(_column_type("varchar"), "schema.columns[1].type", id="type-varchar"),
    pytest.param(_column_type("decimal(40,2)"), "schema.columns[1].type", id="type-decimal-precision"),
    pytest.param(_column_type("decimal(5,6)"), "schema.columns[1].type", id="type-decimal-scale"),
    pytest.param(_column_type("decimal(0,0)"), "schema.columns[1].type", id="type-decimal-zero"),
    pytest.param(_column_type("array<int,int>"), "schema.columns[1].type", id="type-array-two-args"),
    pytest.param(_column_type("array<nope>"), "schema.columns[1].type", id="type-array-bad-element"),
    pytest.param(_column_type("map<string>"), "schema.columns[1].type", id="type-map-one-arg"),
    pytest.param(_column_type("struct<>"), "schema.columns[1].type", id="type-struct-empty"),
    pytest.param(_column_type("struct<a int>"), "schema.columns[1].type", id="type-struct-no-colon"),
    pytest.param(_column_type("struct<1a:int>"), "schema.columns[1].type", id="type-struct-bad-name"),
    pytest.param(_column_type("array<int"), "schema.columns[1].type", id="type-unclosed"),
    pytest.param(_column_type("array<int,>"), "schema.columns[1].type", id="type-array-trailing-comma"),
    pytest.param(_column_type("map<string,>"), "schema.columns[1].type", id="type-map-empty-value"),
    pytest.param(_column_type("struct<a:int,>"), "schema.columns[1].type", id="type-struct-trailing-comma"),
    pytest.param(_column_type("decimal(10,2)x"), "schema.columns[1].type", id="type-decimal-trailing-garbage"),
    pytest.param(lambda m: m.schema.hints.update({"1col": "int"}), "schema.hints['1col']", id="hint-bad-column-name"),
    pytest.param(lambda m: m.schema.hints.update({"amount": "money"}), "schema.hints['amount']", id="hint-bad-type"),
    # destination
    pytest.param(_table(""), "destination.table", id="table-missing"),
    pytest.param(_table("Raw.Orders"), "destination.table", id="table-upper-case"),
    pytest.param(_table("orders"), "destination.table", id="table-one-part"),
    pytest.param(_table("cat.raw.orders"), "destination.table", id="table-three-parts"),
    pytest.param(_table("1raw.orders"), "destination.table", id="table-namespace-digit-start"),
    pytest.param(_table("raw.2orders"), "destination.table", id="table-name-digit-start"),
    pytest.param(_table("raw.or-ders"), "destination.table", id="table-hyphen"),
    pytest.param(_table("raw.orders\n"), "destination.table", id="table-trailing-newline"),
    pytest.param(_table("raw."), "destination.table", id="table-empty-name"),
    pytest.param(_table("raw." + "a" * 129), "destination.table", id="table-name-too-long"),
    pytest.param(_partitions(("1col", "identity")), "destination.partition_by[0].column", id="partition-bad-column"),
    pytest.param(_partitions(("", "day")), "destination.partition_by[0].column", id="partition-column-missing"),
    pytest.param(_partitions(("ts", "weekly")), "destination.partition_by[0].transform", id="transform-unknown"),
    pytest.param(_partitions(("ts", "DAY")), "destination.partition_by[0].transform", id="transform-upper-case"),
    pytest.param(_partitions(("ts", "day\n")), "destination.partition_by[0].transform", id="transform-newline"),
    pytest.param(_partitions(("id", "bucket[0]")), "destination.partition_by[0].transform", id="bucket-zero"),
    pytest.param(_partitions(("id", "bucket[]")), "destination.partition_by[0].transform", id="bucket-no-width"),
    pytest.param(_partitions(("id", "bucket[-1]")), "destination.partition_by[0].transform", id="bucket-negative"),
    pytest.param(
        _partitions(("id", "truncate[2000000]")), "destination.partition_by[0].transform", id="truncate-too-wide"
    ),
    pytest.param(_partitions(("ts", "day"), ("ts", "day")), "destination.partition_by[1]", id="partition-duplicate"),
    pytest.param(
        _partitions(("region", "identity"), explicit=("id",)),
        "destination.partition_by[0].column",
        id="partition-column-not-in-explicit-schema",
    ),
    # schedule
    pytest.param(_schedule(""), "schedule.cron", id="cron-missing"),
    pytest.param(_schedule("0 0 * * * *"), "schedule.cron", id="cron-six-fields"),
    pytest.param(_schedule("* * * *"), "schedule.cron", id="cron-four-fields"),
    pytest.param(_schedule("every day at noon"), "schedule.cron", id="cron-garbage"),
    pytest.param(_schedule("61 * * * *"), "schedule.cron", id="cron-minute-out-of-range"),
    pytest.param(_schedule("@daily"), "schedule.cron", id="cron-macro"),
    pytest.param(_schedule("0 * * * *", "Mars/Olympus_Mons"), "schedule.time_zone", id="time-zone-unknown"),
    pytest.param(_schedule("0 * * * *", "../../etc/passwd"), "schedule.time_zone", id="time-zone-path"),
    pytest.param(_schedule("0 * * * *", "Europe"), "schedule.time_zone", id="time-zone-folder"),
    pytest.param(_schedule("0 * * * *", "x" * 300), "schedule.time_zone", id="time-zone-too-long"),
    pytest.param(_schedule("0 * * * *", "Europe/Paris\x00"), "schedule.time_zone", id="time-zone-nul"),
    # limits
    pytest.param(_limits(max_files_per_lease=-1), "limits.max_files_per_lease", id="max-files-negative"),
    pytest.param(_limits(max_files_per_lease=10_001), "limits.max_files_per_lease", id="max-files-too-large"),
    pytest.param(_limits(max_bytes_per_lease=-1), "limits.max_bytes_per_lease", id="max-bytes-negative"),
    pytest.param(_limits(max_bytes_per_lease=(1 << 40) + 1), "limits.max_bytes_per_lease", id="max-bytes-too-large"),
    pytest.param(_limits(max_attempts=-5), "limits.max_attempts", id="max-attempts-negative"),
    pytest.param(_limits(max_attempts=101), "limits.max_attempts", id="max-attempts-too-large"),
    # error policy
    pytest.param(_set("error_policy.mode", 99), "error_policy.mode", id="error-mode-unknown"),
    pytest.param(_backoff(initial=_seconds(-1)), "error_policy.retry_backoff_initial", id="backoff-initial-negative"),
    pytest.param(
        _backoff(initial=_seconds(0, 500_000_000)),
        "error_policy.retry_backoff_initial",
        id="backoff-initial-sub-second",
    ),
    pytest.param(
        _backoff(initial=_seconds(DAY + 1), maximum=_seconds(7 * DAY)),
        "error_policy.retry_backoff_initial",
        id="backoff-initial-over-a-day",
    ),
    pytest.param(_backoff(maximum=_seconds(-60)), "error_policy.retry_backoff_max", id="backoff-max-negative"),
    pytest.param(
        _backoff(maximum=_seconds(7 * DAY + 1)), "error_policy.retry_backoff_max", id="backoff-max-over-a-week"
    ),
    pytest.param(
        _backoff(initial=_seconds(120), maximum=_seconds(60)),
        "error_policy.retry_backoff_initial",
        id="backoff-initial-above-max",
    ),
    pytest.param(
        _backoff(initial=_seconds(2 * 3600)),
        "error_policy.retry_backoff_initial",
        id="backoff-initial-above-default-max",
    ),
    pytest.param(
        _backoff(initial=_seconds(10**15)), "error_policy.retry_backoff_initial", id="backoff-initial-overflow"
    ),
    pytest.param(
        lambda m: m.source.modified_after.CopyFrom(Timestamp(seconds=10**13)),
        "source.modified_after",
        id="modified-after-out-of-range",
    ),
]


def _top(field: str) -> str:
    return re.split(r"[.\[]", field, maxsplit=1)[0]


@pytest.mark.parametrize(("mutate", "field"), RULES)
def test_rule_names_the_field(ingestions: Stub, mutate: Mutation, field: str) -> None:
    error = _rejected(ingestions, pb.CreateIngestionRequest(ingestion=_spec(mutate)))
    violations = field_violations(error)
    assert field in violations, violations
    assert violations[field], "a violation must say what is wrong"
    # Nothing unrelated is reported (a bad value may imply a second violation of the same message).
    assert {_top(f) for f in violations} == {_top(field)}, violations


@pytest.mark.parametrize(
    "ingestion_id",
    [
        "UPPER",
        "1orders",
        "orders-",
        "-orders",
        "or_ders",
        "or.ders",
        "a" * 64,
        "orders/x",
        "ingestions/orders",
        " ",
        "orders\n",
    ],
)
def test_bad_ingestion_id(ingestions: Stub, ingestion_id: str) -> None:
    error = _rejected(ingestions, pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id=ingestion_id))
    assert set(field_violations(error)) == {"ingestion_id"}


@pytest.mark.parametrize("ingestion_id", ["a", "orders", "orders-2024", "a" * 63, "x1"])
def test_good_ingestion_id(ingestions: Stub, ingestion_id: str) -> None:
    created = ingestions.CreateIngestion(
        pb.CreateIngestionRequest(ingestion=valid_ingestion(), ingestion_id=ingestion_id)
    )
    assert created.ingestion.name == f"ingestions/{ingestion_id}"


def test_missing_ingestion(ingestions: Stub) -> None:
    error = _rejected(ingestions, pb.CreateIngestionRequest(ingestion_id="orders"))
    assert set(field_violations(error)) == {"ingestion"}


@pytest.mark.parametrize(
    "request_id", ["has space", "slash/inside", "caf\u00e9", "a" * 129, "semi;colon", "tab\t", "abc\n"]
)
def test_bad_request_id(ingestions: Stub, request_id: str) -> None:
    error = _rejected(ingestions, pb.CreateIngestionRequest(ingestion=valid_ingestion(), request_id=request_id))
    assert set(field_violations(error)) == {"request_id"}


def test_all_violations_reported_at_once(ingestions: Stub) -> None:
    message = valid_ingestion(
        source=pb.Source(uri="ftp://host/x", glob="/abs"),
        format=pb.Format(type=pb.Format.TYPE_JSON, delimiter=";"),
        schema=pb.Schema(mode=pb.Schema.MODE_EXPLICIT, columns=[pb.Column(name="ok", type="int"), pb.Column(name="x")]),
        destination=pb.Destination(table="Bad"),
        schedule=pb.Schedule(cron="0 0 * * * *", time_zone="Nowhere/Land"),
        limits=pb.Limits(max_attempts=1000),
    )
    message.labels["Bad"] = "v"
    error = _rejected(ingestions, pb.CreateIngestionRequest(ingestion=message))
    assert set(field_violations(error)) == {
        "labels['Bad']",
        "source.uri",
        "source.glob",
        "format.delimiter",
        "schema.columns[1].type",
        "destination.table",
        "schedule.cron",
        "schedule.time_zone",
        "limits.max_attempts",
    }
    # The status message names them too, for clients that only print it.
    for field in ("source.uri", "destination.table", "limits.max_attempts"):
        assert field in (error.details() or "")


VALID_FORMATS = [
    pytest.param(
        pb.Format(type=pb.Format.TYPE_JSON, multiline=True, encoding="utf-8", compression=pb.Format.COMPRESSION_AUTO),
        id="json",
    ),
    pytest.param(
        pb.Format(
            type=pb.Format.TYPE_CSV,
            header=True,
            delimiter=";",
            quote="'",
            escape="\\",
            multiline=True,
            encoding="latin-1",
            compression=pb.Format.COMPRESSION_GZIP,
        ),
        id="csv",
    ),
    pytest.param(pb.Format(type=pb.Format.TYPE_CSV, delimiter="\t", compression=pb.Format.COMPRESSION_AUTO), id="tsv"),
    pytest.param(pb.Format(type=pb.Format.TYPE_PARQUET, compression=pb.Format.COMPRESSION_NONE), id="parquet"),
    pytest.param(pb.Format(type=pb.Format.TYPE_AVRO, compression=pb.Format.COMPRESSION_AUTO), id="avro"),
    pytest.param(pb.Format(type=pb.Format.TYPE_ORC, compression=pb.Format.COMPRESSION_AUTO), id="orc"),
    pytest.param(
        pb.Format(type=pb.Format.TYPE_TEXT, encoding="utf-16", compression=pb.Format.COMPRESSION_ZSTD), id="text"
    ),
]


@pytest.mark.parametrize("fmt", VALID_FORMATS)
def test_valid_format_accepted(ingestions: Stub, fmt: pb.Format) -> None:
    created = ingestions.CreateIngestion(pb.CreateIngestionRequest(ingestion=valid_ingestion(format=fmt)))
    assert created.ingestion.format == fmt
    assert created.ingestion.state == pb.Ingestion.STATE_ACTIVE
    got = ingestions.GetIngestion(pb.GetIngestionRequest(name=created.ingestion.name))
    assert got.ingestion.format == fmt


VALID_TYPES = [
    "string",
    "INT",
    "bigint",
    "double",
    "boolean",
    "date",
    "timestamp",
    "timestamp_ntz",
    "binary",
    "decimal(10,2)",
    "decimal(38, 0)",
    "array<int>",
    "map<string,int>",
    "struct<a:int,b:string>",
    "array<struct<a:decimal(10,2),b:map<string,array<int>>>>",
]


def test_valid_types_accepted(ingestions: Stub) -> None:
    columns = [pb.Column(name=f"c{i}", type=t, required=i % 2 == 0) for i, t in enumerate(VALID_TYPES)]
    schema = pb.Schema(
        mode=pb.Schema.MODE_EXPLICIT,
        columns=columns,
        hints={"c1": "decimal(10,2)"},
        evolution=pb.Schema.EVOLUTION_RESCUE,
    )
    created = ingestions.CreateIngestion(pb.CreateIngestionRequest(ingestion=valid_ingestion(schema=schema)))
    assert list(created.ingestion.schema.columns) == columns
    assert created.ingestion.schema.mode == pb.Schema.MODE_EXPLICIT
    assert created.ingestion.schema.evolution == pb.Schema.EVOLUTION_RESCUE


@pytest.mark.parametrize(
    "uri",
    [
        "file:///data/in",
        "file://localhost/data/in",
        "s3://bucket",
        "s3://bucket/prefix/deeper",
        "gs://bucket/prefix",
        "gcs://bucket/prefix",
        "abfs://container@account.dfs.core.windows.net/prefix",
        "abfss://container@account.dfs.core.windows.net/prefix",
        "S3://bucket/prefix",
    ],
)
def test_valid_uri_accepted(ingestions: Stub, uri: str) -> None:
    created = ingestions.CreateIngestion(
        pb.CreateIngestionRequest(ingestion=valid_ingestion(source=pb.Source(uri=uri)))
    )
    assert created.ingestion.source.uri == uri


def test_valid_partitions_and_schedule_accepted(ingestions: Stub) -> None:
    partitions = [
        pb.PartitionField(column="ts", transform="day"),
        pb.PartitionField(column="id", transform="bucket[16]"),
        pb.PartitionField(column="name", transform="truncate[1000000]"),
        pb.PartitionField(column="_ingested_at", transform="hour"),
        pb.PartitionField(column="ts", transform="month"),
    ]
    message = valid_ingestion(
        source=pb.Source(uri="s3://bucket/events", glob="year=*/{a,b}/[0-9]*.json.gz", recursive=True),
        destination=pb.Destination(table="raw_2.events_v1", partition_by=partitions),
        schedule=pb.Schedule(cron="*/15 9-17 * * 1-5", time_zone="America/New_York"),
        limits=pb.Limits(max_files_per_lease=10_000, max_bytes_per_lease=1 << 40, max_attempts=100),
        error_policy=pb.ErrorPolicy(
            mode=pb.ErrorPolicy.MODE_FAIL_RUN,
            retry_backoff_initial=Duration(seconds=DAY),
            retry_backoff_max=Duration(seconds=7 * DAY),
        ),
    )
    message.labels.update({"team": "data", "cost-center": "x" * 63})
    created = ingestions.CreateIngestion(pb.CreateIngestionRequest(ingestion=message)).ingestion
    assert list(created.destination.partition_by) == partitions
    assert created.schedule == pb.Schedule(cron="*/15 9-17 * * 1-5", time_zone="America/New_York")
    assert created.limits == message.limits
    assert created.error_policy == message.error_policy
    assert dict(created.labels) == dict(message.labels)
    assert created.source.glob == message.source.glob


def test_free_text_with_nul_is_not_internal(ingestions: Stub) -> None:
    """PostgreSQL text and JSONB cannot hold NUL; a client sending one gets an answer, not INTERNAL."""
    message = valid_ingestion(display_name="a\x00b", description="c\x00d")
    message.labels["team"] = "x\x00y"
    message.source.options["endpoint_url"] = "http://\x00"
    created, error = _call(ingestions, pb.CreateIngestionRequest(ingestion=message))
    if error is not None:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code()}: {error.details()}"
        assert field_violations(error), "INVALID_ARGUMENT must name the fields"
    else:
        assert created is not None
        got = ingestions.GetIngestion(pb.GetIngestionRequest(name=created.ingestion.name))
        assert got.ingestion.display_name == "a\x00b"


# --- fuzz: nothing a client sends is INTERNAL ----------------------------------------------------

_ALPHABET = string.ascii_letters + string.digits + " ./-_*?[]{}:;,<>()=@#%\\'\"\t\n\r\x00\x7f\u00e9\u2603\U0001f600"
_EDGE_INTS = [0, 1, -1, 2, 99, 100, 10_000, 10_001, 2**31 - 1, -(2**31)]
_EDGE_INT64 = [*_EDGE_INTS, 1 << 40, (1 << 40) + 1, 2**63 - 1, -(2**63)]
_EDGE_STRINGS = [
    "",
    "..",
    "/",
    "*",
    "s3://bucket/x",
    "file:///tmp/x",
    "file:///../x",
    "raw.orders",
    "a.b",
    "A.B",
    "decimal(10,2)",
    "struct<a:int>",
    "array<",
    "0 * * * *",
    "* * * * * *",
    "UTC",
    "Europe/Paris",
    "bucket[3]",
    "truncate[0]",
    "\x00",
    "x" * 300,
]


def _random_string(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return rng.choice(_EDGE_STRINGS)
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 40)))


def _random_int(rng: random.Random, edges: list[int], bits: int) -> int:
    if rng.random() < 0.6:
        return rng.choice(edges)
    return rng.randint(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _fuzz_mutations(rng: random.Random) -> list[Callable[[pb.Ingestion], None]]:
    s = lambda: _random_string(rng)  # noqa: E731
    i32 = lambda: _random_int(rng, _EDGE_INTS, 32)  # noqa: E731
    i64 = lambda: _random_int(rng, _EDGE_INT64, 64)  # noqa: E731
    enum = lambda: rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 99, 2**31 - 1, -1])  # noqa: E731

    def duration() -> Duration:
        return Duration(seconds=i64() if rng.random() < 0.3 else rng.randint(-100, 10 * DAY), nanos=i32())

    def timestamp() -> Timestamp:
        return Timestamp(seconds=i64() if rng.random() < 0.5 else rng.randint(-(10**11), 10**11), nanos=i32())

    return [
        lambda m: setattr(m, "display_name", s()),
        lambda m: setattr(m, "description", s()),
        lambda m: m.labels.update({s(): s()}),
        lambda m: setattr(m.source, "uri", s()),
        lambda m: setattr(m.source, "uri", "s3://bucket/" + s()),
        lambda m: setattr(m.source, "glob", s()),
        lambda m: setattr(m.source, "credentials_ref", s()),
        lambda m: m.source.options.update({s(): s()}),
        lambda m: m.source.modified_after.CopyFrom(timestamp()),
        lambda m: setattr(m.format, "type", enum()),
        lambda m: setattr(m.format, "delimiter", s()),
        lambda m: setattr(m.format, "quote", s()),
        lambda m: setattr(m.format, "escape", s()),
        lambda m: setattr(m.format, "encoding", s()),
        lambda m: setattr(m.format, "compression", enum()),
        lambda m: setattr(m.format, "header", rng.random() < 0.5),
        lambda m: setattr(m.format, "multiline", rng.random() < 0.5),
        lambda m: setattr(m.schema, "mode", enum()),
        lambda m: setattr(m.schema, "evolution", enum()),
        lambda m: m.schema.columns.add(name=s(), type=s(), required=rng.random() < 0.5),
        lambda m: m.schema.hints.update({s(): s()}),
        lambda m: setattr(m.destination, "table", s()),
        lambda m: m.destination.partition_by.add(column=s(), transform=s()),
        lambda m: m.schedule.CopyFrom(pb.Schedule(cron=s(), time_zone=s())),
        lambda m: setattr(m.limits, "max_files_per_lease", i32()),
        lambda m: setattr(m.limits, "max_bytes_per_lease", i64()),
        lambda m: setattr(m.limits, "max_attempts", i32()),
        lambda m: setattr(m.error_policy, "mode", enum()),
        lambda m: m.error_policy.retry_backoff_initial.CopyFrom(duration()),
        lambda m: m.error_policy.retry_backoff_max.CopyFrom(duration()),
        # Output-only fields are ignored, whatever they hold.
        lambda m: setattr(m, "state", enum()),
        lambda m: setattr(m, "etag", s()),
        lambda m: setattr(m, "name", s()),
        lambda m: m.file_counts.CopyFrom(pb.FileCounts(pending=i64(), skipped=i64())),
    ]


def test_fuzz_never_internal(ingestions: Stub) -> None:
    rng = random.Random(20_240_611)
    mutations = _fuzz_mutations(rng)
    outcomes: dict[str, int] = {}
    for attempt in range(200):
        message = valid_ingestion()
        if rng.random() < 0.3:
            message.format.type = pb.Format.TYPE_CSV
        for mutate in rng.sample(mutations, rng.randint(1, 4)):
            mutate(message)
        request = pb.CreateIngestionRequest(ingestion=message)
        if rng.random() < 0.2:
            request.ingestion_id = _random_string(rng)
        if rng.random() < 0.2:
            request.request_id = _random_string(rng)
        _, error = _call(ingestions, request)
        if error is None:
            outcome = "OK"
        else:
            code = error.code()
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                f"attempt {attempt}: {code} {error.details()} for {request}"
            )
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS), (
                f"attempt {attempt}: unexpected {code} {error.details()}"
            )
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert field_violations(error), f"attempt {attempt}: no field violations in {error.details()}"
            outcome = code.name
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # The fuzz exercises both paths: accepted specs reach the database, rejected ones don't.
    assert outcomes.get("OK", 0) >= 5, outcomes
    assert outcomes.get("INVALID_ARGUMENT", 0) >= 50, outcomes


def test_avro_is_rejected_when_the_spark_has_no_spark_avro(control_plane: bootstrap.ControlPlane) -> None:
    """The pyspark wheel has no spark-avro: without AUTOLOADER_SPARK_AVRO an Avro ingestion would only fail later."""
    with grpc.insecure_channel(control_plane.address) as channel:
        stub = ingestion_pb2_grpc.IngestionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.CreateIngestion(
                pb.CreateIngestionRequest(ingestion=valid_ingestion(format=pb.Format(type=pb.Format.TYPE_AVRO)))
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = field_violations(raised.value)
        assert "spark-avro" in violations["format.type"]
        assert list(stub.ListIngestions(pb.ListIngestionsRequest()).ingestions) == []
