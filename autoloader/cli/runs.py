"""`autoloader runs ...`"""

from __future__ import annotations

import time
from typing import Annotated

import grpc
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from autoloader.cli.context import Globals, globals_of
from autoloader.cli.errors import EXIT_FAILED, EXIT_UNAVAILABLE, CliError
from autoloader.cli.output import err_console, run_done, run_state, show_run, show_runs
from autoloader.client import Client, run_name
from autoloader.rpc_errors import error_info
from autoloader.v1 import run_pb2

app = typer.Typer(help="Start, follow and cancel runs.", no_args_is_help=True)

IngestionArgument = Annotated[str, typer.Argument(help="Ingestion id or name (ingestions/ID).", show_default=False)]
RunArgument = Annotated[
    str, typer.Argument(help="Run name: ingestions/ID/runs/RUN or ID/runs/RUN.", show_default=False)
]
ACTIVE = frozenset({run_pb2.Run.STATE_DISCOVERING, run_pb2.Run.STATE_RUNNING})
EXIT_INTERRUPTED = 130
PLAIN_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} files/s" if task.speed else "- files/s", style="progress.data.speed")


class _ProgressBar:
    """A live bar on stderr (a terminal): files done/total, records, files per second."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description:<11}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files"),
            TextColumn("{task.fields[records]} records"),
            _Rate(),
            TimeElapsedColumn(),
            console=err_console,
        )
        self._task = self._progress.add_task("", total=None, records=0)
        self._progress.start()

    def update(self, run: run_pb2.Run) -> None:
        total = run.file_counts.total
        self._progress.update(
            self._task,
            description=run_state(run),
            completed=run_done(run),
            total=total if total or run.state not in ACTIVE else None,
            records=run.records,
        )

    def close(self) -> None:
        self._progress.stop()


class _ProgressLines:
    """Plain progress lines on stderr (not a terminal): on every state change, else every few seconds."""

    def __init__(self) -> None:
        self._state = -1
        self._printed = 0.0

    def update(self, run: run_pb2.Run) -> None:
        now = time.monotonic()
        if run.state == self._state and now - self._printed < PLAIN_EVERY and run.state in ACTIVE:
            return
        self._state, self._printed = run.state, now
        err_console.print(
            f"{run.name}: {run_state(run)}, {run_done(run)}/{run.file_counts.total} files, {run.records} records",
            markup=False,
        )

    def close(self) -> None:
        pass


def follow(client: Client, name: str, g: Globals) -> None:
    """Shows progress on stderr until the run ends, prints it on stdout; exits 1 unless it SUCCEEDED."""
    view = _ProgressBar() if err_console.is_terminal else _ProgressLines()
    last: run_pb2.Run | None = None
    try:
        for run in client.watch_run(name):
            view.update(run)
            last = run
    except KeyboardInterrupt:
        err_console.print(f"stopped watching; the run goes on (`autoloader runs watch {run_name(name)}` to resume)")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        view.close()
    if last is None or last.state in ACTIVE:
        raise CliError("the control plane ended the watch before the run ended; watch it again", EXIT_UNAVAILABLE)
    show_run(last, g.output)
    if last.state != run_pb2.Run.STATE_SUCCEEDED:
        raise CliError(f"{last.name} ended {run_state(last)}" + (f": {last.error}" if last.error else ""), EXIT_FAILED)


@app.command()
def start(
    ctx: typer.Context,
    ingestion: IngestionArgument,
    watch: Annotated[
        bool, typer.Option("--watch", help="Follow the run until it ends (exit 1 unless it succeeds).")
    ] = False,
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="Retry-safe request id (default: a new UUID).")
    ] = None,
) -> None:
    """Start a run: discover new and changed files and queue them."""
    g = globals_of(ctx)
    with g.client() as client:
        try:
            run = client.start_run(ingestion, request_id=request_id)
        except grpc.RpcError as exc:
            reason, metadata = error_info(exc)
            if reason != "RUN_IN_PROGRESS":
                raise
            active = metadata.get("run", "")
            raise CliError(
                f"RUN_IN_PROGRESS: {exc.details()} (follow it with `autoloader runs watch {active}`)"
            ) from None
        if not watch:
            show_run(run, g.output)
            return
        err_console.print(f"started {run.name}")
        follow(client, run.name, g)


@app.command()
def get(ctx: typer.Context, run: RunArgument) -> None:
    """Show one run."""
    g = globals_of(ctx)
    with g.client() as client:
        show_run(client.get_run(run), g.output)


@app.command("list")
def list_(
    ctx: typer.Context,
    ingestion: IngestionArgument,
    state: Annotated[
        list[str] | None,
        typer.Option("--state", help="Only these states (repeatable): running, succeeded, failed, cancelled, ..."),
    ] = None,
) -> None:
    """List an ingestion's runs, newest first."""
    g = globals_of(ctx)
    filter_ = " OR ".join(f"state = {s.upper()}" for s in state or [])
    with g.client() as client:
        show_runs(list(client.list_runs(ingestion, filter=filter_)), g.output)


@app.command()
def cancel(ctx: typer.Context, run: RunArgument) -> None:
    """Cancel a run; its files not yet processed are skipped."""
    g = globals_of(ctx)
    with g.client() as client:
        show_run(client.cancel_run(run), g.output)


@app.command()
def watch(ctx: typer.Context, run: RunArgument) -> None:
    """Follow a run until it ends (exit 1 unless it succeeds); Ctrl-C stops watching, not the run."""
    g = globals_of(ctx)
    with g.client() as client:
        follow(client, run, g)
