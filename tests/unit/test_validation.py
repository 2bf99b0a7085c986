"""controlplane.domain.validation: every rule names the exact field path; valid specs pass."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controlplane.domain.errors import FieldViolation, InvalidArgument
from controlplane.domain.ingestion import (
    Column,
    Compression,
    Destination,
    ErrorPolicy,
    Evolution,
    Format,
    FormatType,
    IngestionSpec,
    Limits,
    PartitionField,
    Schedule,
    Schema,
    SchemaMode,
    Source,
)
from controlplane.domain.validation import check_ingestion_id, is_valid_type, spec_violations, validate_spec


def make_spec(**overrides: Any) -> IngestionSpec:
    """A minimal valid spec; keyword arguments replace top-level fields."""
    fields: dict[str, Any] = {
        "source": Source(uri="s3://bucket/orders", glob="*.json"),
        "format": Format(type=FormatType.JSON),
        "destination": Destination(table="raw.orders"),
    }
    fields.update(overrides)
    return IngestionSpec(**fields)


def violated_fields(spec: IngestionSpec) -> list[str]:
    return [v.field for v in spec_violations(spec)]


def explicit(*columns: tuple[str, str]) -> Schema:
    return Schema(mode=SchemaMode.EXPLICIT, columns=tuple(Column(name=n, type=t) for n, t in columns))


def csv(**options: Any) -> Format:
    return Format(type=FormatType.CSV, **options)


# (description, overrides, exact list of violated field paths)
INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    # metadata
    ("display_name too long", {"display_name": "x" * 201}, ["display_name"]),
    ("description too long", {"description": "x" * 4001}, ["description"]),
    ("too many labels", {"labels": {f"k{i}": "v" for i in range(65)}}, ["labels"]),
    ("label key upper case", {"labels": {"Env": "prod"}}, ["labels['Env']"]),
    ("label key starts with digit", {"labels": {"1env": "prod"}}, ["labels['1env']"]),
    ("label value too long", {"labels": {"env": "x" * 64}}, ["labels['env']"]),
    # source.uri
    ("uri missing", {"source": Source()}, ["source.uri"]),
    ("uri too long", {"source": Source(uri="s3://bucket/" + "a" * 2040)}, ["source.uri"]),
    ("uri control character", {"source": Source(uri="s3://bucket/a\x00b")}, ["source.uri"]),
    ("uri unsupported scheme", {"source": Source(uri="ftp://host/x")}, ["source.uri"]),
    ("uri http scheme", {"source": Source(uri="https://host/x")}, ["source.uri"]),
    ("uri without scheme", {"source": Source(uri="bucket/prefix")}, ["source.uri"]),
    ("uri with query", {"source": Source(uri="s3://bucket/x?versionId=1")}, ["source.uri"]),
    ("uri with fragment", {"source": Source(uri="s3://bucket/x#part")}, ["source.uri"]),
    ("uri with dot-dot", {"source": Source(uri="s3://bucket/a/../b")}, ["source.uri"]),
    ("uri with wildcard", {"source": Source(uri="s3://bucket/*.json")}, ["source.uri"]),
    ("uri with bracket", {"source": Source(uri="gs://bucket/[ab]")}, ["source.uri"]),
    ("file uri with host", {"source": Source(uri="file://host/data")}, ["source.uri"]),
    ("file uri relative", {"source": Source(uri="file:data/in")}, ["source.uri"]),
    ("s3 uri without bucket", {"source": Source(uri="s3:///prefix")}, ["source.uri"]),
    # source.glob
    ("glob too long", {"source": Source(uri="s3://b/p", glob="a" * 1025)}, ["source.glob"]),
    ("glob absolute", {"source": Source(uri="s3://b/p", glob="/x/*.json")}, ["source.glob"]),
    ("glob dot-dot", {"source": Source(uri="s3://b/p", glob="../*.json")}, ["source.glob"]),
    ("glob control character", {"source": Source(uri="s3://b/p", glob="a\tb")}, ["source.glob"]),
    ("glob unclosed bracket", {"source": Source(uri="s3://b/p", glob="[ab*.json")}, ["source.glob"]),
    ("glob unclosed brace", {"source": Source(uri="s3://b/p", glob="{a,b/*.json")}, ["source.glob"]),
    ("glob stray closing bracket", {"source": Source(uri="s3://b/p", glob="a]*.json")}, ["source.glob"]),
    # source credentials and options
    ("credentials_ref digit", {"source": Source(uri="s3://b/p", credentials_ref="1key")}, ["source.credentials_ref"]),
    ("credentials_ref space", {"source": Source(uri="s3://b/p", credentials_ref="my key")}, ["source.credentials_ref"]),
    ("option key space", {"source": Source(uri="s3://b/p", options={"bad key": "v"})}, ["source.options['bad key']"]),
    # format
    ("format type missing", {"format": Format()}, ["format.type"]),
    ("delimiter on JSON", {"format": Format(type=FormatType.JSON, delimiter=",")}, ["format.delimiter"]),
    ("quote on PARQUET", {"format": Format(type=FormatType.PARQUET, quote='"')}, ["format.quote"]),
    ("escape on TEXT", {"format": Format(type=FormatType.TEXT, escape="\\")}, ["format.escape"]),
    ("delimiter two characters", {"format": csv(delimiter=";;")}, ["format.delimiter"]),
    ("delimiter newline", {"format": csv(delimiter="\n")}, ["format.delimiter"]),
    ("quote carriage return", {"format": csv(quote="\r")}, ["format.quote"]),
    ("header on JSON", {"format": Format(type=FormatType.JSON, header=True)}, ["format.header"]),
    ("multiline on PARQUET", {"format": Format(type=FormatType.PARQUET, multiline=True)}, ["format.multiline"]),
    ("multiline on TEXT", {"format": Format(type=FormatType.TEXT, multiline=True)}, ["format.multiline"]),
    ("encoding on PARQUET", {"format": Format(type=FormatType.PARQUET, encoding="utf-8")}, ["format.encoding"]),
    ("unknown encoding", {"format": csv(encoding="klingon-8")}, ["format.encoding"]),
    (
        "compression on PARQUET",
        {"format": Format(type=FormatType.PARQUET, compression=Compression.GZIP)},
        ["format.compression"],
    ),
    (
        "compression on AVRO",
        {"format": Format(type=FormatType.AVRO, compression=Compression.SNAPPY)},
        ["format.compression"],
    ),
    # schema
    ("explicit without columns", {"row_schema": Schema(mode=SchemaMode.EXPLICIT)}, ["schema.columns"]),
    (
        "infer with columns",
        {"row_schema": Schema(mode=SchemaMode.INFER, columns=(Column(name="a", type="int"),))},
        ["schema.columns"],
    ),
    ("column name starts with digit", {"row_schema": explicit(("1a", "int"))}, ["schema.columns[0].name"]),
    ("column name empty", {"row_schema": explicit(("", "int"))}, ["schema.columns[0].name"]),
    ("column name with dash", {"row_schema": explicit(("a", "int"), ("b-c", "int"))}, ["schema.columns[1].name"]),
    ("column name too long", {"row_schema": explicit(("a" * 129, "int"))}, ["schema.columns[0].name"]),
    (
        "duplicate column, any case",
        {"row_schema": explicit(("id", "int"), ("ID", "string"))},
        ["schema.columns[1].name"],
    ),
    ("reserved column", {"row_schema": explicit(("_source_file", "string"))}, ["schema.columns[0].name"]),
    ("reserved column, any case", {"row_schema": explicit(("_Ingested_At", "timestamp"))}, ["schema.columns[0].name"]),
    ("column type missing", {"row_schema": explicit(("a", ""))}, ["schema.columns[0].type"]),
    ("column type unknown", {"row_schema": explicit(("a", "int"), ("b", "varchar(10)"))}, ["schema.columns[1].type"]),
    ("hint name bad", {"row_schema": Schema(hints={"1x": "int"})}, ["schema.hints['1x']"]),
    ("hint name reserved", {"row_schema": Schema(hints={"_run": "string"})}, ["schema.hints['_run']"]),
    ("hint type unknown", {"row_schema": Schema(hints={"amount": "money"})}, ["schema.hints['amount']"]),
    # destination
    ("table missing", {"destination": Destination()}, ["destination.table"]),
    ("table without namespace", {"destination": Destination(table="orders")}, ["destination.table"]),
    ("table with three parts", {"destination": Destination(table="a.b.c")}, ["destination.table"]),
    ("table upper case", {"destination": Destination(table="Raw.orders")}, ["destination.table"]),
    ("table starts with digit", {"destination": Destination(table="raw.1orders")}, ["destination.table"]),
    ("table with dash", {"destination": Destination(table="raw-x.orders")}, ["destination.table"]),
    ("table with quote", {"destination": Destination(table='raw.o"rders')}, ["destination.table"]),
    (
        "partition column bad",
        {"destination": Destination(table="raw.t", partition_by=(PartitionField(column="1x"),))},
        ["destination.partition_by[0].column"],
    ),
    (
        "partition column empty",
        {"destination": Destination(table="raw.t", partition_by=(PartitionField(column=""),))},
        ["destination.partition_by[0].column"],
    ),
    (
        "partition transform unknown",
        {"destination": Destination(table="raw.t", partition_by=(PartitionField(column="ts", transform="week"),))},
        ["destination.partition_by[0].transform"],
    ),
    (
        "partition bucket zero",
        {"destination": Destination(table="raw.t", partition_by=(PartitionField(column="id", transform="bucket[0]"),))},
        ["destination.partition_by[0].transform"],
    ),
    (
        "partition truncate too wide",
        {
            "destination": Destination(
                table="raw.t", partition_by=(PartitionField(column="id", transform="truncate[1000001]"),)
            )
        },
        ["destination.partition_by[0].transform"],
    ),
    (
        "partition bucket without width",
        {"destination": Destination(table="raw.t", partition_by=(PartitionField(column="id", transform="bucket[]"),))},
        ["destination.partition_by[0].transform"],
    ),
    (
        "duplicate partition field",
        {
            "destination": Destination(
                table="raw.t",
                partition_by=(
                    PartitionField(column="ts", transform="day"),
                    PartitionField(column="TS", transform="day"),
                ),
            )
        },
        ["destination.partition_by[1]"],
    ),
    (
        "partition column not in explicit schema",
        {
            "row_schema": explicit(("id", "int")),
            "destination": Destination(table="raw.t", partition_by=(PartitionField(column="ts"),)),
        },
        ["destination.partition_by[0].column"],
    ),
    # schedule
    ("cron missing", {"schedule": Schedule(cron="")}, ["schedule.cron"]),
    ("cron six fields", {"schedule": Schedule(cron="0 * * * * *")}, ["schedule.cron"]),
    ("cron out of range", {"schedule": Schedule(cron="61 * * * *")}, ["schedule.cron"]),
    ("cron nickname", {"schedule": Schedule(cron="@hourly")}, ["schedule.cron"]),
    ("time zone unknown", {"schedule": Schedule(cron="0 * * * *", time_zone="Mars/Olympus")}, ["schedule.time_zone"]),
    ("time zone path escape", {"schedule": Schedule(cron="0 * * * *", time_zone="../etc")}, ["schedule.time_zone"]),
    # limits
    ("max_files negative", {"limits": Limits(max_files_per_lease=-1)}, ["limits.max_files_per_lease"]),
    ("max_files too big", {"limits": Limits(max_files_per_lease=10_001)}, ["limits.max_files_per_lease"]),
    ("max_bytes too big", {"limits": Limits(max_bytes_per_lease=(1 << 40) + 1)}, ["limits.max_bytes_per_lease"]),
    ("max_attempts negative", {"limits": Limits(max_attempts=-1)}, ["limits.max_attempts"]),
    ("max_attempts too big", {"limits": Limits(max_attempts=101)}, ["limits.max_attempts"]),
    # error policy
    (
        "backoff below one second",
        {"error_policy": ErrorPolicy(retry_backoff_initial=timedelta(milliseconds=500))},
        ["error_policy.retry_backoff_initial"],
    ),
    (
        "backoff negative",
        {"error_policy": ErrorPolicy(retry_backoff_initial=timedelta(seconds=-1))},
        ["error_policy.retry_backoff_initial"],
    ),
    (
        "backoff max too long",
        {"error_policy": ErrorPolicy(retry_backoff_max=timedelta(days=7, seconds=1))},
        ["error_policy.retry_backoff_max"],
    ),
    (
        "backoff initial too long, and above the default max",
        {"error_policy": ErrorPolicy(retry_backoff_initial=timedelta(days=2))},
        ["error_policy.retry_backoff_initial", "error_policy.retry_backoff_initial"],
    ),
    (
        "backoff initial above the default max",
        {"error_policy": ErrorPolicy(retry_backoff_initial=timedelta(hours=2))},
        ["error_policy.retry_backoff_initial"],
    ),
    (
        "backoff initial above max",
        {
            "error_policy": ErrorPolicy(
                retry_backoff_initial=timedelta(seconds=10), retry_backoff_max=timedelta(seconds=5)
            )
        },
        ["error_policy.retry_backoff_initial"],
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), [(o, e) for _, o, e in INVALID], ids=[d for d, _, _ in INVALID])
def test_each_rule_names_its_field(overrides: dict[str, Any], expected: list[str]) -> None:
    assert violated_fields(make_spec(**overrides)) == expected


@pytest.mark.parametrize(("overrides", "expected"), [(o, e) for _, o, e in INVALID], ids=[d for d, _, _ in INVALID])
def test_validate_spec_raises_with_the_same_violations(overrides: dict[str, Any], expected: list[str]) -> None:
    spec = make_spec(**overrides)
    with pytest.raises(InvalidArgument) as caught:
        validate_spec(spec)
    assert [v.field for v in caught.value.violations] == expected
    assert caught.value.violations == list(spec_violations(spec))
    assert all(v.description for v in caught.value.violations)
    for field in expected:
        assert field in caught.value.message


VALID: list[tuple[str, dict[str, Any]]] = [
    ("minimal", {}),
    ("display_name at the limit", {"display_name": "x" * 200, "description": "y" * 4000}),
    ("64 labels", {"labels": {f"k{i}": "v" * 63 for i in range(64)}}),
    ("label keys with - and _", {"labels": {"team-a_b": "", "e": "x"}}),
    ("file uri", {"source": Source(uri="file:///data/in")}),
    ("file uri localhost", {"source": Source(uri="file://localhost/data/in")}),
    ("gs uri", {"source": Source(uri="gs://bucket")}),
    ("gcs uri", {"source": Source(uri="gcs://bucket/p/q")}),
    ("abfs uri", {"source": Source(uri="abfs://container@account.dfs.core.windows.net/p")}),
    ("abfss uri", {"source": Source(uri="abfss://container@account.dfs.core.windows.net/p")}),
    ("upper-case scheme", {"source": Source(uri="S3://bucket/p")}),
    ("dots inside names", {"source": Source(uri="s3://bucket/a..b/c.")}),
    ("uri at the length limit", {"source": Source(uri="s3://bucket/" + "a" * (2048 - len("s3://bucket/")))}),
    ("glob with classes and braces", {"source": Source(uri="s3://b/p", glob="year=*/{a,b}/[0-9]*.csv")}),
    ("recursive glob", {"source": Source(uri="s3://b/p", glob="**/*.json", recursive=True)}),
    ("glob at the length limit", {"source": Source(uri="s3://b/p", glob="a" * 1024)}),
    (
        "credentials and options",
        {
            "source": Source(
                uri="s3://b/p",
                credentials_ref="aws.prod-key_1",
                options={"fs.s3a.endpoint": "http://x", "Region": "eu"},
                modified_after=datetime(2024, 1, 1, tzinfo=UTC),
            )
        },
    ),
    (
        "csv with every option",
        {
            "format": csv(
                header=True,
                delimiter="|",
                quote='"',
                escape="\\",
                multiline=True,
                encoding="latin-1",
                compression=Compression.GZIP,
            )
        },
    ),
    ("json multiline", {"format": Format(type=FormatType.JSON, multiline=True, encoding="UTF-8")}),
    ("parquet no compression", {"format": Format(type=FormatType.PARQUET, compression=Compression.NONE)}),
    ("orc", {"format": Format(type=FormatType.ORC)}),
    ("text zstd", {"format": Format(type=FormatType.TEXT, encoding="utf-16", compression=Compression.ZSTD)}),
    (
        "explicit schema",
        {
            "row_schema": Schema(
                mode=SchemaMode.EXPLICIT,
                columns=(
                    Column(name="id", type="bigint", required=True),
                    Column(name="Amount", type="decimal(10,2)"),
                    Column(name="tags", type="array<string>"),
                    Column(name="_private", type="map<string,int>"),
                ),
                evolution=Evolution.RESCUE,
            )
        },
    ),
    ("hints", {"row_schema": Schema(hints={"amount": "decimal(38,0)", "ts": "TIMESTAMP"})}),
    (
        "partitions",
        {
            "row_schema": explicit(("ID", "int"), ("ts", "timestamp")),
            "destination": Destination(
                table="raw_1.orders_2",
                partition_by=(
                    PartitionField(column="ts", transform="day"),
                    PartitionField(column="id", transform="bucket[16]"),
                    PartitionField(column="id", transform="truncate[1000000]"),
                    PartitionField(column="_ingested_at", transform="hour"),
                    PartitionField(column="ts", transform=""),
                ),
            ),
        },
    ),
    ("schedule", {"schedule": Schedule(cron="0 * * * *", time_zone="Europe/Berlin")}),
    ("schedule without time zone", {"schedule": Schedule(cron="*/5 1-3 * * mon-fri", time_zone="")}),
    (
        "limits at the maximum",
        {"limits": Limits(max_files_per_lease=10_000, max_bytes_per_lease=1 << 40, max_attempts=100)},
    ),
    ("limits at the minimum", {"limits": Limits(max_files_per_lease=1, max_bytes_per_lease=1, max_attempts=1)}),
    (
        "backoff at the limits",
        {"error_policy": ErrorPolicy(retry_backoff_initial=timedelta(days=1), retry_backoff_max=timedelta(days=7))},
    ),
    (
        "backoff of one second",
        {
            "error_policy": ErrorPolicy(
                retry_backoff_initial=timedelta(seconds=1), retry_backoff_max=timedelta(seconds=1)
            )
        },
    ),
]


@pytest.mark.parametrize("overrides", [o for _, o in VALID], ids=[d for d, _ in VALID])
def test_valid_specs_have_no_violations(overrides: dict[str, Any]) -> None:
    spec = make_spec(**overrides)
    assert list(spec_violations(spec)) == []
    validate_spec(spec)  # does not raise


def test_all_violations_are_reported_at_once() -> None:
    spec = IngestionSpec(
        display_name="x" * 201,
        source=Source(uri="ftp://x/y", glob="/abs"),
        format=Format(),
        destination=Destination(table="nope"),
        limits=Limits(max_attempts=0, max_files_per_lease=-5),
    )
    assert violated_fields(spec) == [
        "display_name",
        "source.uri",
        "source.glob",
        "format.type",
        "destination.table",
        "limits.max_files_per_lease",
    ]


def test_violation_descriptions_help_the_user() -> None:
    (violation,) = spec_violations(make_spec(source=Source(uri="ftp://host/x")))
    assert violation == FieldViolation(
        "source.uri",
        "scheme ftp:// is not supported; use abfs://, abfss://, file://, gcs://, gs://, s3://",
    )
    (violation,) = spec_violations(make_spec(row_schema=explicit(("a", "int"), ("b", "varchar(10)"))))
    assert violation == FieldViolation("schema.columns[1].type", "unknown type 'varchar(10)'")


# --- time zones ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("time_zone", ["America", "Europe", "zone.tab", "tzdata.zi"])
def test_time_zone_that_names_no_zone_file_is_a_violation_not_a_crash(time_zone: str) -> None:
    """A client-sent time zone that is a tzdata directory or a non-zone file must be reported, not raise OSError."""
    spec = make_spec(schedule=Schedule(cron="0 * * * *", time_zone=time_zone))
    assert violated_fields(spec) == ["schedule.time_zone"]


# --- trailing newlines: `$` in a regex matches before a final "\n" ------------------------------------------------


def test_ingestion_id_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_ingestion_id("orders\n")
    assert [v.field for v in caught.value.violations] == ["ingestion_id"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"destination": Destination(table="raw.orders\n")}, ["destination.table"]),
        ({"row_schema": explicit(("id\n", "int"))}, ["schema.columns[0].name"]),
        ({"labels": {"env\n": "prod"}}, ["labels[" + repr("env\n") + "]"]),
        ({"source": Source(uri="s3://b/p", credentials_ref="key\n")}, ["source.credentials_ref"]),
        ({"source": Source(uri="s3://b/p", options={"k\n": "v"})}, ["source.options[" + repr("k\n") + "]"]),
        (
            {"destination": Destination(table="raw.t", partition_by=(PartitionField(column="ts", transform="day\n"),))},
            ["destination.partition_by[0].transform"],
        ),
    ],
    ids=["table", "column", "label", "credentials_ref", "option", "transform"],
)
def test_identifier_with_trailing_newline_is_rejected(overrides: dict[str, Any], expected: list[str]) -> None:
    """Identifiers reach SQL, Spark and the filesystem: a trailing newline must not pass as valid."""
    assert violated_fields(make_spec(**overrides)) == expected


# --- check_ingestion_id ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "orders", "orders-2024", "a1", "a-b-c", "a" * 63, "a" + "-" * 61 + "b"])
def test_valid_ingestion_ids(value: str) -> None:
    check_ingestion_id(value)


@pytest.mark.parametrize(
    "value", ["", "A", "Orders", "1a", "-a", "a-", "a_b", "a.b", "a b", "a" * 64, "ingestions/a", "é"]
)
def test_invalid_ingestion_ids(value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_ingestion_id(value)
    (violation,) = caught.value.violations
    assert violation.field == "ingestion_id"
    assert repr(value) in violation.description


def test_check_ingestion_id_uses_the_given_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_ingestion_id("Bad", field="name")
    assert [v.field for v in caught.value.violations] == ["name"]


# --- is_valid_type ------------------------------------------------------------------------------------------------

PRIMITIVES = [
    "string", "boolean", "byte", "tinyint", "short", "smallint", "int", "integer", "long", "bigint",
    "float", "real", "double", "date", "timestamp", "timestamp_ntz", "binary",
]  # fmt: skip


@pytest.mark.parametrize("type_", PRIMITIVES)
def test_primitives_are_valid(type_: str) -> None:
    assert is_valid_type(type_)
    assert is_valid_type(type_.upper())


@pytest.mark.parametrize(
    "type_",
    [
        " int ",
        "decimal(38,0)",
        "decimal(1,0)",
        "decimal(38,38)",
        "decimal(10, 2)",
        "DECIMAL( 10 , 2 )",
        "array<string>",
        "ARRAY<INT>",
        "map<string,int>",
        "map<string, array<int>>",
        "struct<a:int>",
        "struct<a:int,b:string>",
        "struct<a: int, B_2: decimal(10,2)>",
        "array<map<string,struct<a:int>>>",
        "map<string,array<struct<x:int,y:map<int,decimal(38,0)>>>>",
        "array<array<array<date>>>",
    ],
)
def test_valid_types(type_: str) -> None:
    assert is_valid_type(type_)


@pytest.mark.parametrize(
    "type_",
    [
        "",
        "foo",
        "varchar(10)",
        "char(1)",
        "decimal",
        "decimal(10)",
        "decimal(39,0)",
        "decimal(0,0)",
        "decimal(5,6)",
        "decimal(-1,0)",
        "decimal(10,2",
        "array<>",
        "array<int",
        "array<int>>",
        "array<foo>",
        "array<int,string>",
        "map<int>",
        "map<>",
        "map<int,int,int>",
        "map<string,varchar(1)>",
        "struct<>",
        "struct<a>",
        "struct<1a:int>",
        "struct<a b:int>",
        "struct<a:varchar(10)>",
        "struct<a:int>>",
        "list<int>",
        "array<map<string,struct<1a:int>>>",
    ],
)
def test_invalid_types(type_: str) -> None:
    assert not is_valid_type(type_)


@pytest.mark.parametrize("type_", ["array<int,>", "map<string,,int>", "struct<a:int,>", "struct<a:int,,b:int>"])
def test_empty_type_arguments_are_invalid(type_: str) -> None:
    """Spark's type parser rejects empty list elements; accepting them lets a bad schema reach Spark."""
    assert not is_valid_type(type_)
