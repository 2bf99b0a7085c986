"""Proto <-> domain conversion for ingestions.

Enum values are matched by name: proto "TYPE_JSON" is domain "JSON". An
unspecified enum takes the domain default; an unknown number is bad input.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from autoloader.v1 import ingestion_pb2 as pb
from controlplane.domain import ingestion as d
from controlplane.domain.errors import InvalidArgument

E = TypeVar("E", bound=StrEnum)


def _enum_in(value: int, wrapper: Any, prefix: str, domain: type[E], field: str) -> E | None:
    if value == 0:
        return None
    try:
        return domain(wrapper.Name(value).removeprefix(prefix))
    except ValueError:
        raise InvalidArgument.field(field, f"unknown value {value}") from None


def _enum_out(value: StrEnum | None, wrapper: Any, prefix: str) -> Any:
    """The proto enum number (typed Any: each generated enum is its own int subtype)."""
    return 0 if value is None else wrapper.Value(prefix + value.value)


def timestamp_in(message: Timestamp, field: str) -> datetime:
    try:
        return message.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument.field(field, "is not a valid timestamp") from None


def _timestamp_out(value: datetime | None, target: Timestamp) -> None:
    if value is not None:
        target.FromDatetime(value)


def _duration_in(message: Duration, field: str) -> timedelta:
    try:
        return timedelta(seconds=message.seconds, microseconds=message.nanos // 1000)
    except OverflowError:
        raise InvalidArgument.field(field, "is out of range") from None


def spec_from_proto(message: pb.Ingestion) -> d.IngestionSpec:
    """The user-settable part of an Ingestion message. Output-only fields are ignored."""
    source, fmt, schema = message.source, message.format, message.schema
    policy, limits = message.error_policy, message.limits
    return d.IngestionSpec(
        display_name=message.display_name,
        description=message.description,
        labels=dict(message.labels),
        source=d.Source(
            uri=source.uri,
            glob=source.glob,
            recursive=source.recursive,
            modified_after=timestamp_in(source.modified_after, "source.modified_after")
            if source.HasField("modified_after")
            else None,
            credentials_ref=source.credentials_ref,
            options=dict(source.options),
        ),
        format=d.Format(
            type=_enum_in(fmt.type, pb.Format.Type, "TYPE_", d.FormatType, "format.type"),
            header=fmt.header,
            delimiter=fmt.delimiter,
            quote=fmt.quote,
            escape=fmt.escape,
            multiline=fmt.multiline,
            encoding=fmt.encoding,
            compression=_enum_in(
                fmt.compression, pb.Format.Compression, "COMPRESSION_", d.Compression, "format.compression"
            )
            or d.Compression.AUTO,
        ),
        row_schema=d.Schema(
            mode=_enum_in(schema.mode, pb.Schema.Mode, "MODE_", d.SchemaMode, "schema.mode") or d.SchemaMode.INFER,
            columns=tuple(d.Column(name=c.name, type=c.type, required=c.required) for c in schema.columns),
            hints=dict(schema.hints),
            evolution=_enum_in(schema.evolution, pb.Schema.Evolution, "EVOLUTION_", d.Evolution, "schema.evolution")
            or d.Evolution.ADD_NEW_COLUMNS,
        ),
        destination=d.Destination(
            table=message.destination.table,
            partition_by=tuple(
                d.PartitionField(column=p.column, transform=p.transform or "identity")
                for p in message.destination.partition_by
            ),
        ),
        schedule=(
            d.Schedule(cron=message.schedule.cron, time_zone=message.schedule.time_zone)
            if message.HasField("schedule")
            else None
        ),
        limits=d.Limits(
            max_files_per_lease=limits.max_files_per_lease,
            max_bytes_per_lease=limits.max_bytes_per_lease,
            max_attempts=limits.max_attempts,
        ),
        error_policy=d.ErrorPolicy(
            mode=_enum_in(policy.mode, pb.ErrorPolicy.Mode, "MODE_", d.ErrorMode, "error_policy.mode")
            or d.ErrorMode.CONTINUE,
            retry_backoff_initial=_duration_in(policy.retry_backoff_initial, "error_policy.retry_backoff_initial"),
            retry_backoff_max=_duration_in(policy.retry_backoff_max, "error_policy.retry_backoff_max"),
        ),
    )


def ingestion_to_proto(ingestion: d.Ingestion) -> pb.Ingestion:
    spec = ingestion.spec
    message = pb.Ingestion(
        name=ingestion.name,
        display_name=spec.display_name,
        description=spec.description,
        labels=spec.labels,
        source=pb.Source(
            uri=spec.source.uri,
            glob=spec.source.glob,
            recursive=spec.source.recursive,
            credentials_ref=spec.source.credentials_ref,
            options=spec.source.options,
        ),
        format=pb.Format(
            type=_enum_out(spec.format.type, pb.Format.Type, "TYPE_"),
            header=spec.format.header,
            delimiter=spec.format.delimiter,
            quote=spec.format.quote,
            escape=spec.format.escape,
            multiline=spec.format.multiline,
            encoding=spec.format.encoding,
            compression=_enum_out(spec.format.compression, pb.Format.Compression, "COMPRESSION_"),
        ),
        schema=pb.Schema(
            mode=_enum_out(spec.row_schema.mode, pb.Schema.Mode, "MODE_"),
            columns=[pb.Column(name=c.name, type=c.type, required=c.required) for c in spec.row_schema.columns],
            hints=spec.row_schema.hints,
            evolution=_enum_out(spec.row_schema.evolution, pb.Schema.Evolution, "EVOLUTION_"),
        ),
        destination=pb.Destination(
            table=spec.destination.table,
            partition_by=[
                pb.PartitionField(column=p.column, transform=p.transform) for p in spec.destination.partition_by
            ],
        ),
        limits=pb.Limits(
            max_files_per_lease=spec.limits.max_files_per_lease,
            max_bytes_per_lease=spec.limits.max_bytes_per_lease,
            max_attempts=spec.limits.max_attempts,
        ),
        error_policy=pb.ErrorPolicy(mode=_enum_out(spec.error_policy.mode, pb.ErrorPolicy.Mode, "MODE_")),
        state=_enum_out(ingestion.state, pb.Ingestion.State, "STATE_"),
        state_message=ingestion.state_message,
        schema_version=ingestion.schema_version,
        last_run=ingestion.last_run,
        prefect_deployment_id=ingestion.prefect_deployment_id,
        file_counts=pb.FileCounts(**ingestion.file_counts.model_dump()),
        etag=ingestion.etag,
    )
    if spec.source.modified_after is not None:
        message.source.modified_after.FromDatetime(spec.source.modified_after)
    message.error_policy.retry_backoff_initial.FromTimedelta(spec.error_policy.retry_backoff_initial)
    message.error_policy.retry_backoff_max.FromTimedelta(spec.error_policy.retry_backoff_max)
    if spec.schedule is not None:
        message.schedule.cron = spec.schedule.cron
        message.schedule.time_zone = spec.schedule.time_zone
    _timestamp_out(ingestion.next_run_time, message.next_run_time)
    _timestamp_out(ingestion.create_time, message.create_time)
    _timestamp_out(ingestion.update_time, message.update_time)
    return message
