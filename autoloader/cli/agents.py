"""`autoloader agents ...`"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from autoloader.cli.output import show_agents

if TYPE_CHECKING:
    from autoloader.cli.main import Globals

app = typer.Typer(help="Inspect the agents that lease files.", no_args_is_help=True)


def _globals(ctx: typer.Context) -> Globals:
    return ctx.find_root().obj  # type: ignore[no-any-return]


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """List the agents known to the control plane: last contact, leases and files they hold."""
    g = _globals(ctx)
    with g.client() as client:
        show_agents(client.list_agents(), g.output)
