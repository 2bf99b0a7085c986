"""`autoloader`: run the control plane, and drive it from the shell."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from autoloader.cli import agents, files, ingestions, runs
from autoloader.cli.context import Globals
from autoloader.cli.errors import EXIT_BAD_INPUT, EXIT_FAILED, CliError, report_rpc_error
from autoloader.cli.output import OutputFormat, err_console, show_ingestion
from autoloader.client import DEFAULT_ADDRESS, Client
from autoloader.specfile import SpecError

app = typer.Typer(
    name="autoloader",
    help="Incremental, effectively-once ingestion of files into Iceberg tables.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(ingestions.app, name="ingestions")
app.add_typer(runs.app, name="runs")
app.add_typer(files.app, name="files")
app.add_typer(agents.app, name="agents")


# The address the current command talks to, for error messages raised outside it.
_session_address = DEFAULT_ADDRESS


@app.callback()
def main_options(
    ctx: typer.Context,
    address: Annotated[
        str, typer.Option("--address", envvar="AUTOLOADER_ADDRESS", help="Control plane host:port.")
    ] = DEFAULT_ADDRESS,
    token: Annotated[
        str | None, typer.Option("--token", envvar="AUTOLOADER_TOKEN", help="Bearer token.", show_default=False)
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o", help="Output format.")] = OutputFormat.table,
) -> None:
    global _session_address
    _session_address = address
    ctx.obj = Globals(address=address, token=token, output=output)


def _run_control_plane(state_dir: Path | None, banner: bool) -> None:
    # Imported here: the SDK and the client commands do not need the server's dependencies loaded.
    from controlplane import bootstrap, logs
    from controlplane.config import ControlPlaneSettings

    if state_dir is not None:
        os.environ["AUTOLOADER_STATE_DIR"] = str(state_dir)
    settings = _settings(ControlPlaneSettings)
    logs.configure(settings.log_level, settings.log_format)
    try:
        plane = bootstrap.start(settings)
    except bootstrap.StartupError as exc:
        raise CliError(f"control plane did not start: {exc}") from exc
    if banner:
        database = "embedded PostgreSQL in " + str(settings.state_dir) if settings.database_url is None else "external"
        err_console.print(
            f"[bold green]autoloader is up[/] on {plane.address} ({database}).\n"
            f"Try: autoloader --address {plane.address} ingestions create -f examples/orders.yaml\n"
            "Stop with Ctrl-C."
        )
    bootstrap.wait_for_signal(plane)


S = TypeVar("S", bound=BaseSettings)


def _settings(cls: type[S], **overrides: Any) -> S:
    """Settings from AUTOLOADER_* variables; a bad value is bad input (exit 2), not a traceback."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"AUTOLOADER_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise CliError(f"bad configuration: {problems}", EXIT_BAD_INPUT) from None


@app.command()
def serve() -> None:
    """Run the control plane (gRPC) until SIGTERM or Ctrl-C.

    Uses AUTOLOADER_DATABASE_URL, or an embedded PostgreSQL under AUTOLOADER_STATE_DIR when unset.
    """
    _run_control_plane(None, banner=False)


@app.command()
def up(
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Where the embedded database lives (default ~/.autoloader)."),
    ] = None,
) -> None:
    """Start everything on this machine: embedded PostgreSQL and the control plane, in the foreground."""
    _run_control_plane(state_dir, banner=True)


@app.command()
def demo(
    ctx: typer.Context,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Where the embedded database lives (default ~/.autoloader)."),
    ] = None,
) -> None:
    """Start everything on this machine, create a sample ingestion, discover its files, show them, and stop."""
    from autoloader.cli.output import show_files, show_run
    from autoloader.demo import apply_demo, discover, write_sample_files
    from controlplane import bootstrap, logs
    from controlplane.config import ControlPlaneSettings

    settings = _settings(ControlPlaneSettings, listen_address="127.0.0.1:0")
    if state_dir is not None:
        settings.state_dir = state_dir
    logs.configure("WARNING", settings.log_format)
    g: Globals = ctx.obj
    with err_console.status("starting the control plane (embedded PostgreSQL)..."):
        try:
            plane = bootstrap.start(settings)
        except bootstrap.StartupError as exc:
            raise CliError(f"control plane did not start: {exc}") from exc
    try:
        with Client(plane.address) as client:
            source = write_sample_files(settings.state_dir)
            ingestion, created = apply_demo(client, settings.state_dir)
            err_console.print(f"{'created' if created else 'found existing'} {ingestion.name} over {source}")
            show_ingestion(ingestion, g.output)
            run = discover(client, ingestion)
            counts = run.file_counts
            err_console.print(
                f"\n{run.name}: queued {counts.total} files (new, changed, or left unprocessed by an earlier run)"
            )
            show_run(run, g.output)
            show_files(list(client.list_files(ingestion.name, run=run.name))[:5], g.output)
            # No agent loads files yet; cancel so the next demo can start a run of its own.
            client.cancel_run(run.name)
            err_console.print("no agent loads files into Iceberg yet (it comes with leasing); run cancelled")
    finally:
        plane.stop()
    err_console.print(f"state kept in {settings.state_dir}; run `autoloader up` to keep the control plane running")


def main() -> None:
    """Console-script entry point: no tracebacks for anything we can explain.

    Usage errors are click's (exit 2); everything else is caught here.
    """
    try:
        app()
    except CliError as exc:
        err_console.print(f"error: {exc.message}", markup=False)
        sys.exit(exc.exit_code)
    except SpecError as exc:
        err_console.print(f"error: {exc}", markup=False)
        sys.exit(EXIT_BAD_INPUT)
    except grpc.RpcError as exc:
        sys.exit(report_rpc_error(exc, _session_address))
    except Exception as exc:
        if os.environ.get("AUTOLOADER_DEBUG"):
            raise
        err_console.print(f"error: unexpected {type(exc).__name__}: {exc} (set AUTOLOADER_DEBUG=1 for details)")
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
