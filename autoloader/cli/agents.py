"""`autoloader agents ...`"""

from __future__ import annotations

import typer

from autoloader.cli.context import globals_of
from autoloader.cli.output import show_agents

app = typer.Typer(help="Inspect the agents that lease files.", no_args_is_help=True)


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """List the agents known to the control plane: last contact, leases and files they hold."""
    g = globals_of(ctx)
    with g.client() as client:
        show_agents(client.list_agents(), g.output)
