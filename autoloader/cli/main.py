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


def _run_control_plane(state_dir: Path | None, banner: bool, with_agent: bool = False) -> None:
    # Imported here: the SDK and the client commands do not need the server's dependencies loaded.
    from autoloader import logs
    from controlplane import bootstrap
    from controlplane.config import ControlPlaneSettings

    if state_dir is not None:
        os.environ["AUTOLOADER_STATE_DIR"] = str(state_dir)
    settings = _settings(ControlPlaneSettings)
    logs.configure(settings.log_level, settings.log_format)
    try:
        plane = bootstrap.start(settings)
    except bootstrap.StartupError as exc:
        raise CliError(f"control plane did not start: {exc}") from exc
    agent = None
    if with_agent:
        from autoloader.local import start_agent

        try:
            with err_console.status("starting the agent (local Spark)..."):
                agent = start_agent(plane.address, settings.state_dir, shutdown_grace=settings.shutdown_grace)
        except BaseException:
            plane.stop()
            raise
    if banner:
        database = "embedded PostgreSQL in " + str(settings.state_dir) if settings.database_url is None else "external"
        err_console.print(
            f"[bold green]autoloader is up[/] on {plane.address} ({database}"
            f"{', one agent with local Spark' if agent else ''}).\n"
            f"Try: autoloader --address {plane.address} ingestions create -f examples/orders.yaml\n"
            "Stop with Ctrl-C."
        )
    bootstrap.wait_for_signal(plane, agent.stop if agent else None)


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
    """Start everything on this machine, in the foreground: embedded PostgreSQL, the control plane, one agent."""
    _run_control_plane(state_dir, banner=True, with_agent=True)


@app.command()
def agent() -> None:
    """Run one agent: lease files from the control plane (AUTOLOADER_ADDRESS), load them into Iceberg.

    Stops on SIGTERM or Ctrl-C: no new leases, the current batch finishes within
    AUTOLOADER_SHUTDOWN_GRACE seconds or its files are released.
    """
    from agent.config import AgentSettings
    from agent.main import run
    from autoloader import logs

    settings = _settings(AgentSettings)
    logs.configure(settings.log_level, os.environ.get("AUTOLOADER_LOG_FORMAT", "text"))
    run(settings)


@app.command()
def demo(
    ctx: typer.Context,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Where the embedded database and warehouse live (default ~/.autoloader)."),
    ] = None,
) -> None:
    """The whole job on this machine: sample files -> ingestion -> run with progress -> rows read back from Iceberg."""
    from autoloader import logs
    from autoloader.cli.runs import follow
    from autoloader.demo import apply_demo, show_table, start_demo_run, write_sample_files
    from autoloader.local import start_agent
    from controlplane import bootstrap
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
    agent = None
    try:
        with err_console.status("starting the agent (local Spark, Iceberg warehouse)..."):
            agent = start_agent(plane.address, settings.state_dir, shutdown_grace=settings.shutdown_grace)
        with Client(plane.address) as client:
            source = write_sample_files(settings.state_dir)
            ingestion, created = apply_demo(client, settings.state_dir)
            err_console.print(f"{'created' if created else 'found existing'} {ingestion.name} over {source}")
            show_ingestion(ingestion, g.output)
            run = start_demo_run(client, ingestion)
            err_console.print(f"\n{run.name}: loading new and changed files into {ingestion.destination.table}")
            try:
                follow(client, run.name, Globals(plane.address, None, g.output))
            finally:
                show_table(plane.tables, ingestion.destination.table)
    finally:
        if agent is not None:
            agent.stop()
        plane.stop()
    err_console.print(f"state kept in {settings.state_dir}; run `autoloader up` to keep everything running")


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
