"""`autoloader files ...`"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

import typer

from autoloader.cli.context import globals_of
from autoloader.cli.errors import EXIT_BAD_INPUT, CliError
from autoloader.cli.output import OutputFormat, as_dict, console, emit, show_attempts, show_files
from autoloader.client import Client

app = typer.Typer(help="Inspect files and queue them again.", no_args_is_help=True)

IngestionArgument = Annotated[str, typer.Argument(help="Ingestion id or name (ingestions/ID).", show_default=False)]


class FileState(StrEnum):
    pending = "pending"
    leased = "leased"
    succeeded = "succeeded"
    failed = "failed"
    quarantined = "quarantined"
    skipped = "skipped"


class RetryState(StrEnum):
    failed = "failed"
    quarantined = "quarantined"
    skipped = "skipped"
    succeeded = "succeeded"


def _time(value: str | None, option: str) -> datetime | None:
    """An ISO 8601 time from the command line; without an offset it is UTC."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise CliError(
            f"{option} {value!r} is not an ISO 8601 time (e.g. 2026-01-31T12:00:00Z)", EXIT_BAD_INPUT
        ) from None


def _full_path(client: Client, ingestion: str, path: str) -> str:
    """A source path as given when it is a URI, else relative to the ingestion's source."""
    if "://" in path:
        return path
    return client.get_ingestion(ingestion).source.uri.rstrip("/") + "/" + path.lstrip("/")


def _file_names(client: Client, ingestion: str, paths: list[str]) -> list[str]:
    """--path values: a file id ("12"), a file name (".../files/12"), or a source path (looked up)."""
    names = []
    for p in paths:
        if p.isdigit() or "/files/" in p:
            names.append(p)
            continue
        uri = _full_path(client, ingestion, p)
        found = [f.name for f in client.list_files(ingestion, path_prefix=uri) if f.path == uri]
        if not found:
            raise CliError(f"no file {uri} in {ingestion}")
        names += found
    return names


@app.command("list")
def list_(
    ctx: typer.Context,
    ingestion: IngestionArgument,
    state: Annotated[
        list[FileState] | None, typer.Option("--state", case_sensitive=False, help="Only these states (repeatable).")
    ] = None,
    run: Annotated[
        str | None, typer.Option("--run", help="Only files last queued by this run (RUN, ID/runs/RUN or full name).")
    ] = None,
    prefix: Annotated[
        str | None, typer.Option("--prefix", help="Only paths starting with this (a URI, or relative to the source).")
    ] = None,
) -> None:
    """List an ingestion's files."""
    g = globals_of(ctx)
    with g.client() as client:
        path_prefix = _full_path(client, ingestion, prefix) if prefix else ""
        files = client.list_files(ingestion, states=state or [], run=run or "", path_prefix=path_prefix)
        show_files(list(files), g.output)


@app.command()
def retry(
    ctx: typer.Context,
    ingestion: IngestionArgument,
    state: Annotated[
        list[RetryState] | None,
        typer.Option(
            "--state", case_sensitive=False, help="Files in these states (repeatable; default failed and quarantined)."
        ),
    ] = None,
    path: Annotated[
        list[str] | None,
        typer.Option("--path", help="These files (repeatable): a file id, a file name, or a source path."),
    ] = None,
    modified_after: Annotated[
        str | None, typer.Option("--modified-after", help="Files modified at or after this ISO 8601 time (UTC).")
    ] = None,
    modified_before: Annotated[
        str | None, typer.Option("--modified-before", help="Files modified before this ISO 8601 time (UTC).")
    ] = None,
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="Retry-safe request id (default: a new UUID).")
    ] = None,
) -> None:
    """Queue files again, in the active run or a new RETRY run."""
    g = globals_of(ctx)
    after, before = _time(modified_after, "--modified-after"), _time(modified_before, "--modified-before")
    with g.client() as client:
        result = client.retry_files(
            ingestion,
            names=_file_names(client, ingestion, path or []),
            states=state or [],
            modified_after=after,
            modified_before=before,
            request_id=request_id,
        )
    if g.output is not OutputFormat.table:
        emit(as_dict(result), g.output)
    elif result.files_queued:
        console.print(f"queued {result.files_queued} files in {result.run}", markup=False)
    else:
        console.print("nothing to retry")


@app.command()
def attempts(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="File name: ingestions/ID/files/N or ID/files/N.", show_default=False)],
) -> None:
    """Every attempt at one file, oldest first."""
    g = globals_of(ctx)
    with g.client() as client:
        show_attempts(client.list_file_attempts(file), g.output)
