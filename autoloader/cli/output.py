"""Rendering API messages: tables for people, proto3 JSON or YAML for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from autoloader.v1 import ingestion_pb2 as pb

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


def as_dict(message: Message) -> dict[str, Any]:
    """The proto3 JSON mapping (lowerCamelCase keys, enum names, RFC 3339 times)."""
    return json_format.MessageToDict(message)


def emit(data: Any, fmt: OutputFormat) -> None:
    if fmt is OutputFormat.yaml:
        console.print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip(), markup=False)
    else:
        console.print(json.dumps(data, indent=2, ensure_ascii=False), markup=False)


def _short(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def _files(ingestion: pb.Ingestion) -> str:
    c = ingestion.file_counts
    total = c.pending + c.leased + c.succeeded + c.failed + c.quarantined + c.skipped
    text = f"{c.succeeded}/{total}"
    if c.failed or c.quarantined:
        text += f" ({c.failed} failed, {c.quarantined} quarantined)"
    return text


def ingestion_rows(ingestions: Sequence[pb.Ingestion]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "STATE", "SOURCE", "FORMAT", "TABLE", "SCHEDULE", "FILES"):
        table.add_column(column, overflow="fold")
    for i in ingestions:
        source = i.source.uri + (f" {i.source.glob}" if i.source.glob else "")
        schedule = f"{i.schedule.cron} {i.schedule.time_zone}" if i.HasField("schedule") else "-"
        table.add_row(
            i.name.removeprefix("ingestions/"),
            _short(i.state, pb.Ingestion.State, "STATE_"),
            source,
            _short(i.format.type, pb.Format.Type, "TYPE_"),
            i.destination.table,
            schedule,
            _files(i),
        )
    return table


def ingestion_detail(i: pb.Ingestion) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [
        ("name", i.name),
        ("display name", i.display_name or "-"),
        ("state", _short(i.state, pb.Ingestion.State, "STATE_") + (f" ({i.state_message})" if i.state_message else "")),
        ("source", i.source.uri + (f"  glob={i.source.glob}" if i.source.glob else "")
         + ("  recursive" if i.source.recursive else "")),
        ("format", _short(i.format.type, pb.Format.Type, "TYPE_")),
        ("schema", f"{_short(i.schema.mode, pb.Schema.Mode, 'MODE_')}, evolution "
         f"{_short(i.schema.evolution, pb.Schema.Evolution, 'EVOLUTION_')}"),
        ("table", i.destination.table),
        ("schedule", f"{i.schedule.cron} ({i.schedule.time_zone})" if i.HasField("schedule") else "-"),
        ("limits", f"{i.limits.max_files_per_lease} files / {i.limits.max_bytes_per_lease} bytes per lease, "
         f"{i.limits.max_attempts} attempts"),
        ("files", _files(i)),
        ("etag", i.etag),
        ("created", i.create_time.ToJsonString() if i.HasField("create_time") else "-"),
        ("updated", i.update_time.ToJsonString() if i.HasField("update_time") else "-"),
    ]  # fmt: skip
    for key, value in rows:
        table.add_row(key, value)
    return table


def show_ingestion(ingestion: pb.Ingestion, fmt: OutputFormat) -> None:
    if fmt is OutputFormat.table:
        console.print(ingestion_detail(ingestion))
    else:
        emit(as_dict(ingestion), fmt)


def show_ingestions(ingestions: Sequence[pb.Ingestion], fmt: OutputFormat) -> None:
    if fmt is OutputFormat.table:
        if ingestions:
            console.print(ingestion_rows(ingestions))
        else:
            err_console.print("no ingestions")
    else:
        emit({"ingestions": [as_dict(i) for i in ingestions]}, fmt)
