"""`autoloader ingestions ...`"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format

from autoloader.cli.context import globals_of
from autoloader.cli.errors import EXIT_BAD_INPUT, CliError
from autoloader.cli.output import (
    OutputFormat,
    as_dict,
    console,
    emit,
    err_console,
    show_ingestion,
    show_ingestions,
)
from autoloader.client import ingestion_name
from autoloader.specfile import expand_enums, leaf_paths, load_spec
from autoloader.v1 import ingestion_pb2 as pb

app = typer.Typer(help="Create and manage ingestions.", no_args_is_help=True)

SpecOption = Annotated[Path, typer.Option("--file", "-f", help="Spec file (YAML or JSON; - for stdin).")]
NameArgument = Annotated[str, typer.Argument(help="Ingestion id or name (ingestions/ID).", show_default=False)]
# Set by the server, never by a spec: ignored when computing what an update changes.
OUTPUT_ONLY = frozenset(
    {
        "name", "state", "state_message", "schema_version", "last_run", "next_run_time",
        "prefect_deployment_id", "file_counts", "create_time", "update_time", "etag",
    }
)  # fmt: skip
IMMUTABLE = ("source.uri", "destination")


def _spec_paths(spec: pb.Ingestion) -> list[str]:
    """The update-mask paths a spec file sets (output-only fields excluded)."""
    data = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    data = expand_enums(data, pb.Ingestion.DESCRIPTOR)
    return [p for p in leaf_paths(data, pb.Ingestion.DESCRIPTOR) if p.split(".")[0] not in OUTPUT_ONLY]


def _value_at(message: Any, path: str) -> Any:
    for part in path.split("."):
        message = getattr(message, part)
    return message


def _changed_paths(spec: pb.Ingestion, current: pb.Ingestion) -> list[str]:
    """Paths the spec sets whose value differs from the server's (so unchanged immutable fields pass)."""
    return [p for p in _spec_paths(spec) if _value_at(spec, p) != _value_at(current, p)]


def _id_for(spec: pb.Ingestion, id_option: str | None) -> str:
    if id_option:
        return id_option.removeprefix("ingestions/")
    return spec.name.removeprefix("ingestions/")


@app.command()
def create(
    ctx: typer.Context,
    file: SpecOption,
    ingestion_id: Annotated[
        str | None, typer.Option("--id", help="Ingestion id (default: from the spec's name, else generated).")
    ] = None,
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="Retry-safe request id (default: a new UUID).")
    ] = None,
) -> None:
    """Create an ingestion from a spec file."""
    g = globals_of(ctx)
    spec = load_spec(file)
    with g.client() as client:
        created = client.create_ingestion(spec, _id_for(spec, ingestion_id), request_id=request_id)
    show_ingestion(created, g.output)


@app.command()
def apply(
    ctx: typer.Context,
    file: SpecOption,
    ingestion_id: Annotated[str | None, typer.Option("--id", help="Ingestion id (default: the spec's name).")] = None,
) -> None:
    """Create the ingestion, or update it to match the spec file."""
    g = globals_of(ctx)
    spec = load_spec(file)
    target = _id_for(spec, ingestion_id)
    if not target:
        raise CliError("apply needs an id: give --id or a `name: ingestions/ID` in the spec", EXIT_BAD_INPUT)
    with g.client() as client:
        try:
            current = client.get_ingestion(target)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            result = client.create_ingestion(spec, target)
            err_console.print(f"created {result.name}")
        else:
            paths = _changed_paths(spec, current)
            if not paths:
                err_console.print(f"{current.name} unchanged")
                result = current
            else:
                spec.name, spec.etag = current.name, current.etag
                result = client.update_ingestion(spec, paths)
                err_console.print(f"updated {result.name}: {', '.join(paths)}")
    show_ingestion(result, g.output)


@app.command()
def get(ctx: typer.Context, name: NameArgument) -> None:
    """Show one ingestion."""
    g = globals_of(ctx)
    with g.client() as client:
        show_ingestion(client.get_ingestion(name), g.output)


@app.command("list")
def list_(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None, typer.Option("--state", help="Only these states (repeatable): active, paused, error, ...")
    ] = None,
) -> None:
    """List ingestions."""
    g = globals_of(ctx)
    filter_ = " OR ".join(f"state = {s.upper()}" for s in state or [])
    with g.client() as client:
        show_ingestions(list(client.list_ingestions(filter=filter_)), g.output)


@app.command()
def update(
    ctx: typer.Context,
    name: NameArgument,
    file: SpecOption,
    mask: Annotated[
        list[str] | None,
        typer.Option("--mask", help="Fields to change (repeatable), e.g. limits.max_attempts. Default: those in -f."),
    ] = None,
) -> None:
    """Change the fields a spec file sets (or only those named by --mask)."""
    g = globals_of(ctx)
    spec = load_spec(file)
    with g.client() as client:
        if mask:
            paths = [p.strip() for m in mask for p in m.split(",") if p.strip()]
        else:
            current = client.get_ingestion(name)
            paths = _changed_paths(spec, current)
            if not paths:
                err_console.print(f"{current.name} unchanged")
                show_ingestion(current, g.output)
                return
            spec.etag = current.etag
        spec.name = ingestion_name(name)
        show_ingestion(client.update_ingestion(spec, paths), g.output)


@app.command()
def delete(
    ctx: typer.Context,
    name: NameArgument,
    drop_table: Annotated[bool, typer.Option("--drop-table", help="Also drop the Iceberg table.")] = False,
) -> None:
    """Delete an ingestion and its run and file history."""
    g = globals_of(ctx)
    with g.client() as client:
        client.delete_ingestion(name, drop_table=drop_table)
    err_console.print(f"deleted {ingestion_name(name)}")


class RefreshChoice(StrEnum):
    full = "full"
    new_only = "new-only"


@app.command()
def refresh(
    ctx: typer.Context,
    name: NameArgument,
    mode: Annotated[
        RefreshChoice,
        typer.Option("--mode", help="full: load every known file again; new-only: only files discovered from now on."),
    ] = RefreshChoice.full,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would happen; change nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Empty the ingestion's table and load again (asks first: the table's rows are deleted)."""
    g = globals_of(ctx)
    with g.client() as client:
        plan = client.refresh_ingestion(name, mode.value, dry_run=True)
        what = f"{ingestion_name(name)}: empty {plan.table} ({plan.table_rows:,} rows), then " + (
            f"load its {plan.files_queued:,} known files ({plan.bytes_queued:,} bytes) again"
            if mode is RefreshChoice.full
            else "load only files discovered from now on"
        )
        if dry_run:
            if g.output is OutputFormat.table:
                console.print(f"would {what}", markup=False)
            else:
                emit(as_dict(plan), g.output)
            return
        if not yes:
            if not sys.stdin.isatty():
                raise CliError("refresh deletes the table's rows: confirm with --yes", EXIT_BAD_INPUT)
            typer.confirm(f"{what}?", abort=True)
        started = client.refresh_ingestion(name, mode.value)
    err_console.print(f"refresh started: {started.files_queued:,} files queued in {started.run}", markup=False)
    if g.output is OutputFormat.table:
        console.print(started.run, markup=False)
    else:
        emit(as_dict(started), g.output)


@app.command()
def pause(ctx: typer.Context, name: NameArgument) -> None:
    """Stop leasing files and starting scheduled runs."""
    g = globals_of(ctx)
    with g.client() as client:
        show_ingestion(client.pause_ingestion(name), g.output)


@app.command()
def resume(ctx: typer.Context, name: NameArgument) -> None:
    """Resume a paused ingestion."""
    g = globals_of(ctx)
    with g.client() as client:
        show_ingestion(client.resume_ingestion(name), g.output)
