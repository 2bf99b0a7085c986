"""Validation of ingestion specs and ids.

Every rule yields a FieldViolation naming the field by its API path
("source.uri", "schema.columns[2].type"), so a client can point at the line of
its spec that is wrong. All violations are reported at once, not just the first.
"""

from __future__ import annotations

import codecs
import re
import zoneinfo
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import urlsplit

from croniter import croniter

from autoloader.columns import METADATA_COLUMN_NAMES, RESCUED
from autoloader.partitioning import TRANSFORM as PARTITION_TRANSFORM
from controlplane.domain.errors import FieldViolation, InvalidArgument
from controlplane.domain.ingestion import (
    Compression,
    FormatType,
    IngestionSpec,
    SchemaMode,
)

INGESTION_ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,127}$")
COLUMN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
OPTION_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")
CREDENTIALS_REF = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")

SOURCE_SCHEMES = frozenset({"file", "s3", "gs", "gcs", "abfs", "abfss"})
# Columns the agent adds to every row; a user column may not take these names.
RESERVED_COLUMNS = frozenset({*METADATA_COLUMN_NAMES, RESCUED})
TEXT_FORMATS = frozenset({FormatType.JSON, FormatType.CSV, FormatType.TEXT})
PRIMITIVE_TYPES = frozenset(
    {
        "string", "boolean", "byte", "tinyint", "short", "smallint", "int", "integer", "long", "bigint",
        "float", "real", "double", "date", "timestamp", "timestamp_ntz", "binary",
    }
)  # fmt: skip
DECIMAL_TYPE = re.compile(r"^decimal\(\s*(\d+)\s*,\s*(\d+)\s*\)$")

MAX_FILES_PER_LEASE = 10_000
MAX_BYTES_PER_LEASE = 1 << 40
MAX_ATTEMPTS = 100
MAX_BACKOFF_INITIAL = timedelta(days=1)
MAX_BACKOFF_MAX = timedelta(days=7)
MAX_GLOB_LENGTH = 1024


def check_ingestion_id(value: str, field: str = "ingestion_id") -> None:
    if not INGESTION_ID.fullmatch(value):
        raise InvalidArgument.field(
            field,
            f"{value!r} is not a valid id: use 1 to 63 lower-case letters, digits and hyphens, "
            "starting with a letter and not ending with a hyphen",
        )


def validate_spec(spec: IngestionSpec) -> None:
    """Raises InvalidArgument listing every violation of the spec."""
    violations = list(spec_violations(spec))
    if violations:
        raise InvalidArgument(violations=violations)


def spec_violations(spec: IngestionSpec) -> Iterator[FieldViolation]:
    # A value with a NUL is reported for that alone: the other rules would only add noise.
    nul = list(_nul_characters(spec.model_dump(), ""))
    yield from nul
    spoiled = {v.field for v in nul}
    for rule in (_metadata, _source, _format, _schema, _destination, _schedule, _limits):
        yield from (v for v in rule(spec) if v.field not in spoiled)


def _nul_characters(value: object, path: str) -> Iterator[FieldViolation]:
    """PostgreSQL cannot store U+0000 in text; no field has a use for it."""
    if isinstance(value, str):
        if "\x00" in value:
            yield FieldViolation(path, "must not contain NUL characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and "\x00" in key:
                yield FieldViolation(f"{path}[{key!r}]", "keys must not contain NUL characters")
            elif path.rsplit(".", 1)[-1] in _MAP_FIELDS:
                yield from _nul_characters(item, f"{path}[{key!r}]")
            else:
                yield from _nul_characters(item, f"{path}.{_API_NAMES.get(key, key)}".lstrip("."))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _nul_characters(item, f"{path}[{i}]")


# Domain names that the API spells differently, and the spec's map fields.
_API_NAMES = {"row_schema": "schema"}
_MAP_FIELDS = frozenset({"labels", "options", "hints"})


def _metadata(spec: IngestionSpec) -> Iterator[FieldViolation]:
    if len(spec.display_name) > 200:
        yield FieldViolation("display_name", "must be at most 200 characters")
    if len(spec.description) > 4000:
        yield FieldViolation("description", "must be at most 4000 characters")
    if len(spec.labels) > 64:
        yield FieldViolation("labels", "at most 64 labels")
    for key, value in spec.labels.items():
        if not LABEL_KEY.fullmatch(key):
            yield FieldViolation(f"labels[{key!r}]", "key must be lower-case letters, digits, - and _ (1-63)")
        if len(value) > 63:
            yield FieldViolation(f"labels[{key!r}]", "value must be at most 63 characters")


def _source(spec: IngestionSpec) -> Iterator[FieldViolation]:
    source = spec.source
    if not source.uri:
        yield FieldViolation("source.uri", "is required, such as s3://bucket/prefix or file:///data/in")
    else:
        yield from _source_uri(source.uri)
    if source.glob:
        yield from _glob(source.glob)
    if source.credentials_ref and not CREDENTIALS_REF.fullmatch(source.credentials_ref):
        yield FieldViolation("source.credentials_ref", "must be a name: letters, digits, '_', '.', '-'")
    for key in source.options:
        if not OPTION_KEY.fullmatch(key):
            yield FieldViolation(f"source.options[{key!r}]", "key must be letters, digits, '_', '.', '-'")


def _source_uri(uri: str) -> Iterator[FieldViolation]:
    field = "source.uri"
    if len(uri) > 2048:
        yield FieldViolation(field, "must be at most 2048 characters")
        return
    if any(ord(ch) < 32 for ch in uri):
        yield FieldViolation(field, "must not contain control characters")
        return
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SOURCE_SCHEMES:
        allowed = ", ".join(f"{s}://" for s in sorted(SOURCE_SCHEMES))
        yield FieldViolation(field, f"scheme {scheme + '://' if scheme else '(none)'} is not supported; use {allowed}")
        return
    if parts.query or parts.fragment:
        yield FieldViolation(field, "must not have a query or fragment; put a pattern in source.glob")
    if any(segment == ".." for segment in parts.path.split("/")):
        yield FieldViolation(field, "must not contain '..' segments")
    if any(ch in parts.path for ch in "*?["):
        yield FieldViolation(field, "must not contain wildcards; put them in source.glob")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            yield FieldViolation(field, "file URIs are local: file:///absolute/path")
        elif not parts.path.startswith("/"):
            yield FieldViolation(field, "file URIs need an absolute path: file:///absolute/path")
    elif not parts.netloc:
        yield FieldViolation(field, f"{scheme}:// URIs need a bucket or container: {scheme}://bucket/prefix")


def _glob(glob: str) -> Iterator[FieldViolation]:
    field = "source.glob"
    if len(glob) > MAX_GLOB_LENGTH:
        yield FieldViolation(field, f"must be at most {MAX_GLOB_LENGTH} characters")
    elif glob.startswith("/"):
        yield FieldViolation(field, "is relative to source.uri and must not start with '/'")
    elif any(segment == ".." for segment in glob.split("/")):
        yield FieldViolation(field, "must not contain '..' segments")
    elif any(ord(ch) < 32 for ch in glob):
        yield FieldViolation(field, "must not contain control characters")
    elif not _brackets_balanced(glob):
        yield FieldViolation(field, "has an unclosed '[' or '{'")


def _brackets_balanced(glob: str) -> bool:
    depth = {"[": 0, "{": 0}
    closing = {"]": "[", "}": "{"}
    for ch in glob:
        if ch in depth:
            depth[ch] += 1
        elif ch in closing:
            if depth[closing[ch]] == 0:
                return False
            depth[closing[ch]] -= 1
    return all(v == 0 for v in depth.values())


def _format(spec: IngestionSpec) -> Iterator[FieldViolation]:
    fmt = spec.format
    if fmt.type is None:
        yield FieldViolation("format.type", "is required: JSON, CSV, PARQUET, AVRO, ORC or TEXT")
        return
    is_csv = fmt.type is FormatType.CSV
    for name in ("delimiter", "quote", "escape"):
        value: str = getattr(fmt, name)
        if not value:
            continue
        if not is_csv:
            yield FieldViolation(f"format.{name}", f"applies to CSV only, not {fmt.type.value}")
        elif len(value) != 1:
            yield FieldViolation(f"format.{name}", f"must be one character, got {value!r}")
        elif value in "\r\n":
            yield FieldViolation(f"format.{name}", "must not be a line break")
    if fmt.header and not is_csv:
        yield FieldViolation("format.header", f"applies to CSV only, not {fmt.type.value}")
    if fmt.multiline and fmt.type not in (FormatType.JSON, FormatType.CSV):
        yield FieldViolation("format.multiline", f"applies to JSON and CSV only, not {fmt.type.value}")
    if fmt.encoding:
        if fmt.type not in TEXT_FORMATS:
            yield FieldViolation("format.encoding", f"applies to text formats only, not {fmt.type.value}")
        else:
            try:
                # Text encodings only: base64 or rot13 are codecs but not character sets.
                is_text = getattr(codecs.lookup(fmt.encoding), "_is_text_encoding", True)
            except (LookupError, ValueError):
                is_text = False
            if not is_text:
                yield FieldViolation("format.encoding", f"unknown character encoding {fmt.encoding!r}")
    if fmt.compression not in (Compression.AUTO, Compression.NONE) and fmt.type not in TEXT_FORMATS:
        yield FieldViolation(
            "format.compression", f"{fmt.type.value} files carry their own compression; leave it unset"
        )


def _schema(spec: IngestionSpec) -> Iterator[FieldViolation]:
    schema = spec.row_schema
    if schema.mode is SchemaMode.EXPLICIT and not schema.columns:
        yield FieldViolation("schema.columns", "an explicit schema needs at least one column")
    if schema.mode is SchemaMode.INFER and schema.columns:
        yield FieldViolation("schema.columns", "columns are for MODE_EXPLICIT; use hints to override inferred types")
    seen: set[str] = set()
    for i, column in enumerate(schema.columns):
        field = f"schema.columns[{i}]"
        yield from _column_name(column.name, f"{field}.name")
        if column.name.lower() in seen:
            yield FieldViolation(f"{field}.name", f"duplicate column {column.name!r}")
        seen.add(column.name.lower())
        if not column.type:
            yield FieldViolation(f"{field}.type", "is required")
        elif not is_valid_type(column.type):
            yield FieldViolation(f"{field}.type", f"unknown type {column.type!r}")
    for name, type_ in schema.hints.items():
        field = f"schema.hints[{name!r}]"
        yield from _column_name(name, field)
        if not is_valid_type(type_):
            yield FieldViolation(field, f"unknown type {type_!r}")


def _column_name(name: str, field: str) -> Iterator[FieldViolation]:
    if not name:
        yield FieldViolation(field, "is required")
    elif not COLUMN_NAME.fullmatch(name):
        yield FieldViolation(
            field, f"{name!r} is not a column name: letters, digits and '_', not starting with a digit"
        )
    elif name.lower() in RESERVED_COLUMNS:
        yield FieldViolation(field, f"{name!r} is reserved for a metadata column")


def is_valid_type(type_: str) -> bool:
    """A Spark SQL type: primitives, decimal(p,s), array<T>, map<K,V>, struct<a:T,...>."""
    text = type_.strip().lower()
    if text in PRIMITIVE_TYPES:
        return True
    decimal = DECIMAL_TYPE.fullmatch(text)
    if decimal:
        precision, scale = int(decimal.group(1)), int(decimal.group(2))
        return 1 <= precision <= 38 and 0 <= scale <= precision
    for prefix, arity in (("array<", 1), ("map<", 2), ("struct<", 0)):
        if text.startswith(prefix) and text.endswith(">"):
            parts = _split_top_level(text[len(prefix) : -1])
            if arity and len(parts) != arity:
                return False
            if not arity:
                return bool(parts) and all(_struct_field_valid(p) for p in parts)
            return all(is_valid_type(p) for p in parts)
    return False


def _struct_field_valid(part: str) -> bool:
    name, sep, type_ = part.partition(":")
    return bool(sep) and bool(COLUMN_NAME.fullmatch(name.strip())) and is_valid_type(type_)


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    # Empty pieces ("array<int,>") are kept so the caller rejects them.
    return [p.strip() for p in parts]


def _destination(spec: IngestionSpec) -> Iterator[FieldViolation]:
    destination = spec.destination
    table = destination.table
    if not table:
        yield FieldViolation("destination.table", "is required: namespace.table")
    else:
        parts = table.split(".")
        if len(parts) != 2 or not all(IDENTIFIER.fullmatch(p) for p in parts):
            yield FieldViolation(
                "destination.table",
                f"{table!r} must be namespace.table, each part lower-case letters, digits and '_' "
                "(1-128), not starting with a digit",
            )
    explicit = {c.name.lower() for c in spec.row_schema.columns}
    seen: set[tuple[str, str]] = set()
    for i, partition in enumerate(destination.partition_by):
        field = f"destination.partition_by[{i}]"
        if partition.column.lower() not in RESERVED_COLUMNS:  # metadata columns may partition too
            yield from _column_name(partition.column, f"{field}.column")
        transform = partition.transform or "identity"
        match = PARTITION_TRANSFORM.fullmatch(transform)
        if not match:
            yield FieldViolation(
                f"{field}.transform", f"{transform!r}: use identity, year, month, day, hour, bucket[N] or truncate[W]"
            )
        elif any(g is not None and not 1 <= int(g) <= 1_000_000 for g in match.groups()[1:]):
            yield FieldViolation(f"{field}.transform", "bucket and truncate widths are 1 to 1000000")
        key = (partition.column.lower(), transform.split("[")[0])
        if key in seen:
            yield FieldViolation(field, f"duplicate partition field {partition.column} {transform}")
        seen.add(key)
        if (
            spec.row_schema.mode is SchemaMode.EXPLICIT
            and explicit
            and partition.column.lower() not in explicit
            and partition.column.lower() not in RESERVED_COLUMNS
        ):
            yield FieldViolation(f"{field}.column", f"{partition.column!r} is not a column of the explicit schema")


def _schedule(spec: IngestionSpec) -> Iterator[FieldViolation]:
    schedule = spec.schedule
    if schedule is None:
        return
    if not schedule.cron:
        yield FieldViolation("schedule.cron", "is required when a schedule is given, such as '0 * * * *'")
    elif len(schedule.cron.split()) != 5 or not croniter.is_valid(schedule.cron):
        yield FieldViolation(
            "schedule.cron", f"{schedule.cron!r} is not a five-field cron expression (minute hour day month weekday)"
        )
    if schedule.time_zone:
        try:
            zoneinfo.ZoneInfo(schedule.time_zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a tzdata folder ("Europe")
            yield FieldViolation("schedule.time_zone", f"unknown time zone {schedule.time_zone!r}; use an IANA name")


def _limits(spec: IngestionSpec) -> Iterator[FieldViolation]:
    limits = spec.limits
    for name, maximum in (
        ("max_files_per_lease", MAX_FILES_PER_LEASE),
        ("max_bytes_per_lease", MAX_BYTES_PER_LEASE),
        ("max_attempts", MAX_ATTEMPTS),
    ):
        value: int = getattr(limits, name)
        if value < 0 or value > maximum:
            yield FieldViolation(f"limits.{name}", f"must be 1 to {maximum} (0 takes the default), got {value}")
    policy = spec.error_policy
    for name, maximum_delay in (
        ("retry_backoff_initial", MAX_BACKOFF_INITIAL),
        ("retry_backoff_max", MAX_BACKOFF_MAX),
    ):
        delay: timedelta = getattr(policy, name)
        if delay < timedelta(0) or delay > maximum_delay or timedelta(0) < delay < timedelta(seconds=1):
            yield FieldViolation(f"error_policy.{name}", f"must be 1s to {maximum_delay} (0 takes the default)")
    resolved = spec.with_defaults().error_policy
    if resolved.retry_backoff_initial > resolved.retry_backoff_max:
        yield FieldViolation("error_policy.retry_backoff_initial", "must not exceed retry_backoff_max")
