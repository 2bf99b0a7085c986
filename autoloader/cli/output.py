"""Rendering API messages: tables for people, proto3 JSON or YAML for scripts."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, TypeVar

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from autoloader.v1 import file_pb2, lease_pb2, run_pb2
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


M = TypeVar("M", bound=Message)


def show_one(message: M, fmt: OutputFormat, detail: Callable[[M], Table]) -> None:
    """One resource: a key/value table, or its proto3 JSON mapping."""
    if fmt is OutputFormat.table:
        console.print(detail(message))
    else:
        emit(as_dict(message), fmt)


def show_many(items: Sequence[M], fmt: OutputFormat, key: str, rows: Callable[[Sequence[M]], Table]) -> None:
    """A list: a table (or "no <key>" on stderr), or {"<key>": [...]} in JSON/YAML."""
    if fmt is OutputFormat.table:
        if items:
            console.print(rows(items))
        else:
            err_console.print(f"no {key}")
    else:
        emit({key: [as_dict(i) for i in items]}, fmt)


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
    show_one(ingestion, fmt, ingestion_detail)


def show_ingestions(ingestions: Sequence[pb.Ingestion], fmt: OutputFormat) -> None:
    show_many(ingestions, fmt, "ingestions", ingestion_rows)


# Runs and files


def _when(message: Message, field: str) -> str:
    """A timestamp field as "2026-01-31 12:00:00Z" (UTC), or "-" when unset."""
    if not message.HasField(field):
        return "-"
    return f"{getattr(message, field).ToDatetime():%Y-%m-%d %H:%M:%S}Z"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _clip(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def run_done(run: run_pb2.Run) -> int:
    """Files of the run that need nothing more: succeeded, quarantined or skipped."""
    c = run.file_counts
    return c.succeeded + c.quarantined + c.skipped


def run_state(run: run_pb2.Run) -> str:
    return _short(run.state, run_pb2.Run.State, "STATE_")


def _rows_table(*columns: str) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def run_rows(runs: Sequence[run_pb2.Run]) -> Table:
    table = _rows_table("NAME", "STATE", "TRIGGER", "FILES", "RECORDS", "STARTED", "ENDED")
    for r in runs:
        table.add_row(
            r.name.rsplit("/", 1)[-1],
            run_state(r),
            _short(r.trigger, run_pb2.Run.Trigger, "TRIGGER_"),
            f"{run_done(r)}/{r.file_counts.total}",
            str(r.records),
            _when(r, "create_time"),
            _when(r, "end_time"),
        )
    return table


def run_detail(r: run_pb2.Run) -> Table:
    c = r.file_counts
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [
        ("name", r.name),
        ("state", run_state(r) + (f" ({r.error})" if r.error else "")),
        ("trigger", _short(r.trigger, run_pb2.Run.Trigger, "TRIGGER_")),
        ("files", f"{run_done(r)}/{c.total} done: {c.pending} pending, {c.leased} leased, {c.succeeded} succeeded, "
         f"{c.failed} failed, {c.quarantined} quarantined, {c.skipped} skipped"),
        ("records", str(r.records)),
        ("bytes", _size(r.bytes)),
        ("started", _when(r, "create_time")),
        ("discovered", _when(r, "discovery_end_time")),
        ("ended", _when(r, "end_time")),
    ]  # fmt: skip
    rows += [("error", f"{e.path}: {_clip(e.error, 200)}") for e in r.first_errors]
    for key, value in rows:
        table.add_row(key, value)
    return table


def show_run(run: run_pb2.Run, fmt: OutputFormat) -> None:
    show_one(run, fmt, run_detail)


def show_runs(runs: Sequence[run_pb2.Run], fmt: OutputFormat) -> None:
    show_many(runs, fmt, "runs", run_rows)


def file_rows(files: Sequence[file_pb2.File]) -> Table:
    table = _rows_table("ID", "STATE", "SIZE", "MODIFIED", "ATTEMPTS", "PATH", "ERROR")
    for f in files:
        table.add_row(
            f.name.rsplit("/", 1)[-1],
            _short(f.state, file_pb2.File.State, "STATE_"),
            _size(f.size_bytes),
            _when(f, "modified_time"),
            str(f.attempts),
            f.path,
            _clip(f.last_error) or "-",
        )
    return table


def show_files(files: Sequence[file_pb2.File], fmt: OutputFormat) -> None:
    show_many(files, fmt, "files", file_rows)


def attempt_rows(attempts: Sequence[file_pb2.FileAttempt]) -> Table:
    table = _rows_table("ATTEMPT", "OUTCOME", "AGENT", "STARTED", "DURATION", "RECORDS", "ERROR")
    for a in attempts:
        error = f"{a.error_type}: {a.error_message}" if a.error_type else a.error_message
        table.add_row(
            str(a.attempt),
            _short(a.outcome, file_pb2.FileAttempt.Outcome, "OUTCOME_"),
            a.agent.removeprefix("agents/") or "-",
            _when(a, "start_time"),
            f"{a.duration.ToTimedelta().total_seconds():.1f}s" if a.HasField("duration") else "-",
            str(a.records),
            _clip(error) or "-",
        )
    return table


def show_attempts(attempts: Sequence[file_pb2.FileAttempt], fmt: OutputFormat) -> None:
    show_many(attempts, fmt, "attempts", attempt_rows)


# Agents


def agent_rows(agents: Sequence[lease_pb2.Agent]) -> Table:
    table = _rows_table("NAME", "HOST", "LAST SEEN", "LEASES", "FILES")
    for a in agents:
        table.add_row(
            a.name.removeprefix("agents/"),
            a.hostname or "-",
            _when(a, "last_seen_time"),
            str(a.active_leases),
            str(a.leased_files),
        )
    return table


def show_agents(agents: Sequence[lease_pb2.Agent], fmt: OutputFormat) -> None:
    show_many(agents, fmt, "agents", agent_rows)
